#!/usr/bin/env bash
# The main job, on a fresh Debian 12 machine: backups of a running VM. Installs QEMU and the
# tools, builds livesnap-blk, livesnapd, snapctl, the guest image and the static guest agent
# (release), then boots a VM whose disk livesnap-blk serves, with the agent inside and a workload
# that keeps writing; starts livesnapd on a generated config and, while the guest writes, runs
# `snapctl vm snapshot demo` twice (a full backup, then an incremental one), lists, verifies and
# restores both, and checks each restore: e2fsck-clean and holding every line fsync'd before
# its freeze; then a backup of the idle disk whose restore qemu-img compares identical to it
# (tests/src/bin/demo.rs). Everything lands in target/demo/.
#
#   ci/demo.sh                       # quiesced by the guest agent
#   ci/demo.sh --crash-consistent    # snapctl vm snapshot --no-quiesce: crash-consistent backups
set -euo pipefail
cd "$(dirname "$0")/.."

ci/install-deps.sh
ci/build-guest.sh
# The userspace vsock device the host reaches the guest agent through.
command -v vhost-device-vsock >/dev/null || cargo install --locked --quiet vhost-device-vsock

cargo build --release --locked -p livesnap-blk -p livesnap-control --bin livesnap-blk --bin livesnapd --bin snapctl \
    -p livesnap-tests --bin demo

# The guest agent as a static binary (the guest has no libc), as ci/package-agent.sh builds it.
# With --target, RUSTFLAGS apply to the agent only, not to build scripts and proc macros.
TARGET=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked -p livesnap-agent --target "$TARGET"
AGENT="target/$TARGET/release/livesnap-agent"
if ldd "$AGENT" 2>&1 | grep '=>' >/dev/null; then
    echo "demo: $AGENT is not static:" >&2
    ldd "$AGENT" >&2
    exit 1
fi
mkdir -p target/guest-bin
strip -o target/guest-bin/livesnap-agent "$AGENT"

LIVESNAP_BLK="$PWD/target/release/livesnap-blk" \
LIVESNAPD="$PWD/target/release/livesnapd" \
SNAPCTL="$PWD/target/release/snapctl" \
LIVESNAP_AGENT_STATIC="$PWD/target/guest-bin/livesnap-agent" \
VHOST_DEVICE_VSOCK="$(command -v vhost-device-vsock)" \
    target/release/demo "$@"
