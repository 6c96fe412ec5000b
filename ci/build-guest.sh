#!/bin/bash
# Builds the test guest of livesnap: Debian's cloud kernel and a small initramfs (busybox-static,
# the virtio, virtio-blk, ext4 and vsock modules, and ci/guest/init as /init).
#
#   ci/build-guest.sh [OUT_DIR]        default OUT_DIR: <workspace>/target/guest
#
# Writes OUT_DIR/vmlinuz, OUT_DIR/initramfs.img (an uncompressed newc cpio) and OUT_DIR/stamp.
# Cached: does nothing when the stamp says the outputs were built from the same kernel and
# busybox package versions, the same init and the same version of this script. Set FORCE=1 to
# rebuild anyway. Installs what it needs (apt) when run as root.
#
# The image holds no job: a test appends a second cpio archive with /job.sh to initramfs.img
# (Linux unpacks concatenated archives in order), see tests/src/guest.rs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/target/guest}"
KERNEL_META=linux-image-cloud-amd64
# Module names wanted in the guest; their dependencies are added from modules.dep. A name built
# into the kernel (modules.builtin) is skipped: ext4 is built in the 6.1 cloud kernel.
MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
crc16 mbcache jbd2 crc32c_generic ext4
vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport"

export DEBIAN_FRONTEND=noninteractive
export PATH="$PATH:/usr/sbin:/sbin"

log() { echo "build-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

# Installs missing Debian packages (root only).
need_pkgs() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing packages ${missing[*]}; install them or run as root"
    log "installing ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

need_pkgs busybox-static cpio kmod xz-utils zstd

# Which kernel package the meta package points at, and the versions that make the stamp.
KPKG="$(apt-cache depends "$KERNEL_META" 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[^ ]*\)$/\1/p' | head -n1)"
if [ -z "$KPKG" ]; then
    apt-get update -qq
    KPKG="$(apt-cache depends "$KERNEL_META" | sed -n 's/^ *Depends: \(linux-image-[^ ]*\)$/\1/p' | head -n1)"
fi
[ -n "$KPKG" ] || die "cannot resolve $KERNEL_META to a kernel package"
KVER_PKG="$(apt-cache policy "$KPKG" | sed -n 's/^ *Candidate: //p')"
[ -n "$KVER_PKG" ] && [ "$KVER_PKG" != "(none)" ] || die "no candidate version of $KPKG"
BB_VER="$(dpkg-query -W -f='${Version}' busybox-static)"

STAMP="kernel=$KPKG=$KVER_PKG
busybox-static=$BB_VER
init=$(sha256sum "$ROOT/ci/guest/init" | cut -d' ' -f1)
script=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"

if [ "${FORCE:-0}" != 1 ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.img" ] \
    && [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$STAMP" ]; then
    log "up to date: $OUT ($KPKG $KVER_PKG)"
    exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

log "downloading $KPKG=$KVER_PKG"
(cd "$WORK" && apt-get download -qq -o APT::Sandbox::User=root "$KPKG=$KVER_PKG")
dpkg-deb -x "$WORK"/"$KPKG"_*.deb "$WORK/kernel"
KVER="$(ls "$WORK/kernel/lib/modules")"
[ "$(echo "$KVER" | wc -l)" -eq 1 ] || die "expected one module tree, found: $KVER"
MODDIR="$WORK/kernel/lib/modules/$KVER"
# The package does not ship modules.dep (postinst runs depmod); make it in the extracted tree.
[ -f "$MODDIR/modules.dep" ] || depmod -b "$WORK/kernel" "$KVER"

# Module name as the kernel spells it: file base name without .ko[.xz|.zst], '-' as '_'.
mod_name() { local b; b="$(basename "$1")"; b="${b%%.ko*}"; echo "${b//-/_}"; }

# Path (relative to MODDIR) of a module by name, from modules.dep; empty if none.
mod_path() {
    awk -F: -v want="$1" '{
        n = $1; sub(/.*\//, "", n); sub(/\.ko.*$/, "", n); gsub(/-/, "_", n)
        if (n == want) { print $1; exit }
    }' "$MODDIR/modules.dep"
}

is_builtin() {
    awk -v want="$1" '{
        n = $0; sub(/.*\//, "", n); sub(/\.ko.*$/, "", n); gsub(/-/, "_", n)
        if (n == want) { found = 1; exit }
    } END { exit !found }' "$MODDIR/modules.builtin"
}

# Depth-first: dependencies before the module, each once.
ORDER=()
declare -A SEEN=()
visit() {
    local path="$1" name dep
    name="$(mod_name "$path")"
    [ -n "${SEEN[$name]:-}" ] && return 0
    SEEN[$name]=1
    for dep in $(grep -m1 "^$path:" "$MODDIR/modules.dep" | cut -d: -f2); do
        visit "$dep"
    done
    ORDER+=("$path")
}
for m in $MODULES; do
    p="$(mod_path "$m")"
    if [ -n "$p" ]; then
        visit "$p"
    elif is_builtin "$m"; then
        log "$m is built into $KVER"
    else
        die "module $m is neither in modules.dep nor built into $KVER"
    fi
done

RD="$WORK/initramfs"
mkdir -p "$RD"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,mnt,run,etc,lib/modules}
cp /bin/busybox "$RD/bin/busybox"
ln -s busybox "$RD/bin/sh"
install -m 0755 "$ROOT/ci/guest/init" "$RD/init"
: >"$RD/etc/modules"
for p in "${ORDER[@]}"; do
    name="$(mod_name "$p")"
    case "$p" in
        *.ko.xz) xz -dc "$MODDIR/$p" >"$RD/lib/modules/$name.ko" ;;
        *.ko.zst) zstd -qdc "$MODDIR/$p" >"$RD/lib/modules/$name.ko" ;;
        *.ko.gz) gzip -dc "$MODDIR/$p" >"$RD/lib/modules/$name.ko" ;;
        *.ko) cp "$MODDIR/$p" "$RD/lib/modules/$name.ko" ;;
        *) die "unexpected module file $p" ;;
    esac
    echo "$name" >>"$RD/etc/modules"
done
log "modules: $(tr '\n' ' ' <"$RD/etc/modules")"
# /dev/console for the kernel to open before /init runs (init also reopens it from devtmpfs).
if [ "$(id -u)" -eq 0 ]; then
    mknod -m 600 "$RD/dev/console" c 5 1
fi

mkdir -p "$OUT"
rm -f "$OUT/stamp"
(cd "$RD" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) \
    >"$OUT/initramfs.img.tmp"
cp "$WORK/kernel/boot/vmlinuz-$KVER" "$OUT/vmlinuz.tmp"
mv "$OUT/initramfs.img.tmp" "$OUT/initramfs.img"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
printf '%s\n' "$STAMP" >"$OUT/stamp"
log "built $OUT (kernel $KVER, initramfs $(du -h "$OUT/initramfs.img" | cut -f1))"
