#!/bin/bash
# Installs the Debian packages livesnap's test suite needs (Debian 12, as root). Idempotent:
# does nothing when everything is installed at the wanted versions.
#
# - QEMU 7.2 from bookworm (qemu-system-x86_64, qemu-storage-daemon, qemu-img), pinned to one
#   version: qemu-utils and qemu-block-extra must match qemu-system-x86, and a newer qemu-utils
#   from backports would otherwise conflict.
# - e2fsprogs (mkfs.ext4 -d, e2fsck, debugfs) and coreutils (md5sum) for the host's checks; fdisk
#   (sfdisk) for the partitioned images of the file-restore tests.
# - busybox-static, cpio, kmod (depmod), xz-utils, zstd for ci/build-guest.sh.
# - debootstrap and binutils (strip) for ci/package-agent.sh and ci/check-agent-deb.sh.
# - libvirt-daemon-system and libvirt-clients (virsh) for the libvirt-managed VM's test
#   (ci/libvirt.sh starts the daemons where no systemd does).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

[ "$(id -u)" -eq 0 ] || { echo "install-deps: run as root" >&2; exit 1; }

PLAIN=(e2fsprogs fdisk coreutils busybox-static cpio kmod xz-utils zstd debootstrap binutils libvirt-daemon-system libvirt-clients)

installed_version() { dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null | sed -n 's/^install ok installed //p'; }

candidate() { apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p'; }

# Up to date when qemu-system-x86, qemu-utils and qemu-block-extra are installed at the same
# version and every plain package is installed.
up_to_date() {
    local v p
    v="$(installed_version qemu-system-x86)"
    [ -n "$v" ] || return 1
    [ "$(installed_version qemu-utils)" = "$v" ] || return 1
    [ "$(installed_version qemu-block-extra)" = "$v" ] || return 1
    for p in "${PLAIN[@]}"; do
        [ -n "$(installed_version "$p")" ] || return 1
    done
}

if up_to_date; then
    echo "install-deps: up to date (qemu $(installed_version qemu-system-x86))"
    exit 0
fi

apt-get update -qq
V="$(candidate qemu-system-x86)"
[ -n "$V" ] && [ "$V" != "(none)" ] || { echo "install-deps: no candidate for qemu-system-x86" >&2; exit 1; }
apt-get install -y -qq --no-install-recommends --allow-downgrades \
    "qemu-system-x86=$V" "qemu-utils=$V" "qemu-block-extra=$V" "${PLAIN[@]}" >/dev/null
up_to_date || { echo "install-deps: packages still missing after apt-get install" >&2; exit 1; }
echo "install-deps: installed (qemu $V)"
