#!/bin/sh
# Builds the host package: livesnapd, snapctl and livesnap-blk (release), their man pages and
# shell completions generated from their clap definitions (cargo run -p xtask -- host-docs),
# and the .deb (control/Cargo.toml's [package.metadata.deb]). Needs cargo-deb
# (`cargo install --locked cargo-deb`).
#
#   ci/package-host.sh
#   -> target/host-docs/{man,completions}/ (generated, not checked in)
#   -> target/debian/livesnap_<version>-1_amd64.deb
set -eu
cd "$(dirname "$0")/.."
cargo build --release --locked -p livesnap-control -p livesnap-blk --bins
rm -rf target/host-docs
cargo run --locked --quiet -p xtask -- host-docs target/host-docs
mkdir -p target/debian
cargo deb -p livesnap-control --no-build --strip --output target/debian/
ls -l target/debian/livesnap_*.deb
