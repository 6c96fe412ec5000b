#!/bin/bash
# Makes Debian's libvirt reachable at qemu:///system for tests/tests/libvirt.rs (as root; the
# packages come from ci/install-deps.sh). Under systemd the package's units already run it;
# without systemd (a container, this CI machine) it starts virtlogd and libvirtd as daemons.
# Idempotent.
set -euo pipefail

reachable() { virsh -c qemu:///system version >/dev/null 2>&1; }

if reachable; then
    echo "libvirt: reachable"
    exit 0
fi
command -v libvirtd >/dev/null || { echo "libvirt: libvirtd is not installed (ci/install-deps.sh)" >&2; exit 1; }
pgrep -x virtlogd >/dev/null || virtlogd -d
pgrep -x libvirtd >/dev/null || libvirtd -d
for _ in $(seq 1 100); do
    if reachable; then
        echo "libvirt: started ($(virsh -c qemu:///system version --daemon | sed -n 's/^Running against daemon: //p'))"
        exit 0
    fi
    sleep 0.1
done
echo "libvirt: libvirtd runs but qemu:///system does not answer" >&2
virsh -c qemu:///system version >&2 || true
exit 1
