#!/bin/sh
# Builds livesnap-agent as a static binary (glibc, +crt-static) and its .deb into
# target/debian/. Needs cargo-deb (`cargo install --locked cargo-deb`).
#
#   ci/package-agent.sh            # build + package
#   -> target/x86_64-unknown-linux-gnu/release/livesnap-agent (static)
#   -> target/debian/livesnap-agent_<version>-1_amd64.deb
#   -> target/debian/livesnap-agent (stripped static binary, for the guest tests)
set -eu
cd "$(dirname "$0")/.."
TARGET=x86_64-unknown-linux-gnu
# With --target, RUSTFLAGS apply to the agent only, not to build scripts and proc macros.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked -p livesnap-agent --target "$TARGET"
BIN="target/$TARGET/release/livesnap-agent"
# ldd says "not a dynamic executable" or "statically linked"; a shared library shows as "=>".
if ldd "$BIN" 2>&1 | grep -q '=>'; then
    echo "package-agent: $BIN is not static:" >&2
    ldd "$BIN" >&2
    exit 1
fi
mkdir -p target/debian
# A stripped copy for the QEMU guest's initramfs (tests/tests/agent_e2e.rs); cargo-deb strips its own.
strip -o target/debian/livesnap-agent "$BIN"
cargo deb -p livesnap-agent --target "$TARGET" --no-build --strip --output target/debian/
ls -l target/debian/*.deb
