#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need, builds the guest image
# (cached), the guest agent's static binary and .deb and the host .deb, lints, installs each .deb
# into a fresh Debian 12 root, runs every fuzz target for a few seconds, then runs every test of the workspace
# with nextest (last, so that its summary closes the output).
set -euo pipefail
cd "$(dirname "$0")/.."

# CI builds each crate once: incremental state would only fill the disk (a CI run once ran out).
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
# One line per stage: free space where the builds go, and what the build trees hold.
disk() {
    echo "disk after $1: $(df -h --output=avail . | tail -n 1 | tr -d ' ') free;" \
        "$(du -sh target fuzz/target 2>/dev/null | awk '{printf "%s %s; ", $2, $1}')"
}
disk start

ci/install-deps.sh
ci/build-guest.sh
# Cargo tools: the test runner, the packager, the userspace vsock device the agent's QEMU tests
# reach the guest through, and the fuzzer's driver.
for tool in cargo-nextest:cargo-nextest cargo-deb:cargo-deb vhost-device-vsock:vhost-device-vsock cargo-fuzz:cargo-fuzz; do
    bin=${tool%%:*} crate=${tool##*:}
    command -v "$bin" >/dev/null || cargo install --locked --quiet "$crate"
done
# Garage, the S3-compatible object store the repository's object-store tests run against
# (ci/garage.sh starts it on loopback); ~14 min to build, so only when missing.
command -v garage >/dev/null || [ -x "$HOME/.cargo/bin/garage" ] || cargo install --locked --quiet --version 2.5.0 garage

disk tools
cargo fmt --all --check
cargo fmt --manifest-path fuzz/Cargo.toml --check
cargo clippy --workspace --all-targets --locked -- -D warnings
disk clippy
cargo build --workspace --all-targets --locked
disk build
ci/package-agent.sh
ci/build-recwriter.sh
ci/check-agent-deb.sh
ci/package-host.sh
ci/check-host-deb.sh
disk packages
# Every fuzz target builds and runs a few seconds from its seeds (ci/fuzz.sh SECONDS for more).
ci/fuzz.sh 5
disk fuzz
# Debian's libvirt at qemu:///system, for the libvirt-managed VM's test.
ci/libvirt.sh
cargo nextest run --workspace --locked --no-fail-fast || { disk tests; exit 1; }
