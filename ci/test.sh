#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need, builds the guest image
# (cached), lints, and runs every test of the workspace with nextest.
set -euo pipefail
cd "$(dirname "$0")/.."

ci/install-deps.sh
ci/build-guest.sh
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest

cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --all-targets --locked
cargo nextest run --workspace --locked --no-fail-fast
