#!/bin/sh
# Builds recwriter (tests/src/bin/recwriter.rs), the guest-side writer of
# tests/tests/snapshot_e2e.rs, as a static binary (glibc, +crt-static): the test guest has no libc.
#
#   ci/build-recwriter.sh    -> target/guest-bin/recwriter (stripped, static)
set -eu
cd "$(dirname "$0")/.."
TARGET=x86_64-unknown-linux-gnu
# With --target, RUSTFLAGS apply to the target's crates only, not to build scripts and proc macros.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked -p livesnap-tests --bin recwriter --target "$TARGET"
BIN="target/$TARGET/release/recwriter"
# ldd says "not a dynamic executable" or "statically linked"; a shared library shows as "=>".
if ldd "$BIN" 2>&1 | grep -q '=>'; then
    echo "build-recwriter: $BIN is not static:" >&2
    ldd "$BIN" >&2
    exit 1
fi
mkdir -p target/guest-bin
strip -o target/guest-bin/recwriter "$BIN"
