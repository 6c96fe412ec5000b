#!/bin/sh
# Installs target/debian/livesnap_*.deb (the host package) with `dpkg -i` into a fresh Debian 12
# root (ci/debroot.sh) and checks: installed cleanly; the binaries run there; the default
# configuration is valid; the user livesnap and the directories exist with their owners and
# modes; livesnapd.service is enabled; both units pass `systemd-analyze verify`; the man pages
# and completions are in place; livesnap-blk serves a VM from /etc/livesnap/vms/NAME.toml with
# the template unit's own command line, as the user livesnap; then `dpkg --purge` leaves
# nothing behind but the data in /var/lib/livesnap. Needs root, debootstrap and the Debian
# mirror. Run ci/package-host.sh first.
set -eu
cd "$(dirname "$0")/.."
CHECK_NAME=check-host-deb
. ci/debroot.sh
DEB=$(ls -t target/debian/livesnap_*_amd64.deb | head -n 1)
cp "$DEB" "$root/tmp/host.deb"
before=$(mktemp)
files_of_root > "$before"
# As on a running system (systemd-tmpfiles, in the postinst, and the backend below need it).
mount -t proc proc "$root/proc"

chroot "$root" dpkg -i /tmp/host.deb
chroot "$root" dpkg -s livesnap | grep -q '^Status: install ok installed' || fail "not installed"
for bin in /usr/sbin/livesnapd /usr/sbin/livesnap-blk /usr/bin/snapctl; do
    chroot "$root" "$bin" --version | grep -q "^${bin##*/} " || fail "$bin does not run in the root"
done
chroot "$root" livesnapd check-config || fail "the default /etc/livesnap/livesnapd.toml is not valid"

# The backends' user, and the directories with their owners and modes.
chroot "$root" getent passwd livesnap | grep -q ':/nonexistent:/usr/sbin/nologin$' || fail "no system user livesnap"
mode() { chroot "$root" stat -c '%U:%G %a' "$1"; }
for want in "/var/lib/livesnap root:root 755" "/var/lib/livesnap/repo root:root 700" \
    "/var/lib/livesnap/restore root:root 700" "/var/lib/livesnap/vms root:root 755" \
    "/run/livesnap root:root 755" "/etc/livesnap/livesnapd.toml root:root 644"; do
    set -- $want
    [ "$(mode "$1")" = "$2 $3" ] || fail "$1 is $(mode "$1"), not $2 $3"
done

# The units: livesnapd enabled, the template not; both pass systemd-analyze verify.
units=usr/lib/systemd/system
[ -f "$root/$units/livesnapd.service" ] && [ -f "$root/$units/livesnap-blk@.service" ] || fail "units missing"
chroot "$root" systemctl is-enabled livesnapd.service | grep -qx enabled || fail "livesnapd.service not enabled"
[ -z "$(ls "$root/etc/systemd/system/multi-user.target.wants/" | grep 'livesnap-blk@')" ] || fail "a livesnap-blk@ instance was enabled"
# --man=no: the root has no man; the pages are checked below.
chroot "$root" systemd-analyze verify --man=no livesnapd.service livesnap-blk@web01.service 2>&1 | tee "$root/tmp/verify"
[ ! -s "$root/tmp/verify" ] || fail "systemd-analyze verify: $(cat "$root/tmp/verify")"

# Man pages and completions, generated from the binaries' command lines.
for page in livesnapd snapctl snapctl-vm-snapshot livesnap-blk livesnap-blk-ctl livesnap-blk-recover; do
    ls "$root/usr/share/man/man1/$page.1"* >/dev/null 2>&1 || fail "man page $page.1 missing"
done
for bin in livesnapd snapctl livesnap-blk; do
    [ -s "$root/usr/share/bash-completion/completions/$bin" ] || fail "bash completion of $bin missing"
    [ -s "$root/usr/share/zsh/vendor-completions/_$bin" ] || fail "zsh completion of $bin missing"
    [ -s "$root/usr/share/fish/vendor_completions.d/$bin.fish" ] || fail "fish completion of $bin missing"
done

# One VM, served as livesnap-blk@t1.service would: its ExecStartPre and ExecStart lines, run
# in the root; the backend must serve its disk and run as the user livesnap.
mkdir -p "$root/srv" "$root/run/livesnap/vms/t1"
truncate -s 16M "$root/srv/t1.img"
cat > "$root/etc/livesnap/vms/t1.toml" <<TOML
[[disk]]
id = "vda"
image = "/srv/t1.img"
socket = "/run/livesnap/vms/t1/vda.sock"
TOML
line() { sed -n "s/^$1=//p" "$root/$units/livesnap-blk@.service" | sed 's/%i/t1/g'; }
# shellcheck disable=SC2046
chroot "$root" $(line ExecStartPre) || fail "ExecStartPre failed"
# shellcheck disable=SC2046
chroot "$root" $(line ExecStart) 2> "$root/tmp/blk.log" &
blk=$!
i=0
while [ ! -S "$root/run/livesnap/vms/t1/control.sock" ]; do
    kill -0 "$blk" 2>/dev/null || fail "livesnap-blk exited: $(cat "$root/tmp/blk.log")"
    i=$((i + 1))
    [ "$i" -lt 600 ] || fail "livesnap-blk did not bind its control socket: $(cat "$root/tmp/blk.log")"
    sleep 0.1
done
# The control socket is bound before the user switch; wait for the "ready" line after it.
until grep -q ' ready' "$root/tmp/blk.log"; do
    kill -0 "$blk" 2>/dev/null || fail "livesnap-blk exited: $(cat "$root/tmp/blk.log")"
    sleep 0.1
done
# chroot execs the backend: $blk is its process.
uid=$(awk '/^Uid:/ { print $2 }' "/proc/$blk/status")
[ "$uid" = "$(chroot "$root" id -u livesnap)" ] || fail "livesnap-blk runs as uid $uid, not livesnap"
[ -S "$root/run/livesnap/vms/t1/vda.sock" ] || fail "no disk socket"
[ "$(mode /var/lib/livesnap/vms/t1)" = "livesnap:livesnap 700" ] || fail "state directory is $(mode /var/lib/livesnap/vms/t1)"
kill -TERM "$blk"
wait "$blk" || fail "livesnap-blk did not stop cleanly: $(cat "$root/tmp/blk.log")"
rm -rf "$root/srv" "$root/etc/livesnap/vms/t1.toml" "$root/run/livesnap/vms/t1"

chroot "$root" dpkg --purge livesnap
for f in usr/sbin/livesnapd usr/sbin/livesnap-blk usr/bin/snapctl etc/livesnap/livesnapd.toml \
    etc/systemd/system/multi-user.target.wants/livesnapd.service; do
    [ ! -e "$root/$f" ] || fail "/$f left after purge"
done
umount "$root/proc"
purge_left "$before" './var/lib/livesnap' './var/lib/livesnap/*'
rm -f "$before"
echo "check-host-deb: $DEB installs, serves a VM as the user livesnap, passes systemd-analyze verify and purges cleanly in a Debian 12 root"
