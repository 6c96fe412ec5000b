#!/usr/bin/env bash
# The main job, on a fresh Debian 12 machine: installs QEMU and the tools, builds livesnap-blk
# and the demo guest, then boots a VM on disks served by livesnap-blk, writes a file, reboots,
# reads it back, and checks the image from the host.
set -euo pipefail
cd "$(dirname "$0")/.."

ci/install-deps.sh
ci/build-guest.sh
cargo build --release --locked -p livesnap-blk -p livesnap-tests --bin demo
LIVESNAP_BLK="$PWD/target/release/livesnap-blk" target/release/demo
