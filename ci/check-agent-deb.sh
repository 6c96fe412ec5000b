#!/bin/sh
# Installs target/debian/livesnap-agent_*.deb with `dpkg -i` into a fresh Debian 12 root
# (ci/debroot.sh) and checks: installed cleanly, the static binary runs there, the unit is
# enabled, the hooks directory and the example hooks are in place; then `dpkg --purge` removes
# it and leaves no file behind. Needs root, debootstrap and the Debian mirror. Run
# ci/package-agent.sh first.
set -eu
cd "$(dirname "$0")/.."
CHECK_NAME=check-agent-deb
. ci/debroot.sh
DEB=$(ls -t target/debian/livesnap-agent_*_amd64.deb | head -n 1)
cp "$DEB" "$root/tmp/agent.deb"
before=$(mktemp)
files_of_root > "$before"

chroot "$root" dpkg -i /tmp/agent.deb
chroot "$root" dpkg -s livesnap-agent | grep -q '^Status: install ok installed' || fail "not installed"
chroot "$root" /usr/sbin/livesnap-agent --version | grep -q '^livesnap-agent ' || fail "the binary does not run in the root"
[ -L "$root/etc/systemd/system/multi-user.target.wants/livesnap-agent.service" ] || fail "unit not enabled"
chroot "$root" systemctl is-enabled livesnap-agent.service | grep -qx enabled || fail "systemctl: not enabled"
[ -f "$root/lib/systemd/system/livesnap-agent.service" ] || fail "unit missing"
[ -d "$root/etc/livesnap/hooks.d" ] || fail "hooks directory missing"
[ -x "$root/usr/share/doc/livesnap-agent/examples/hooks.d/10-postgresql" ] || fail "example hook missing"
[ -f "$root/usr/share/doc/livesnap-agent/README.md" ] || fail "tenants' README missing"
chroot "$root" dpkg --purge livesnap-agent
[ ! -e "$root/usr/sbin/livesnap-agent" ] || fail "binary left after purge"
[ ! -e "$root/etc/systemd/system/multi-user.target.wants/livesnap-agent.service" ] || fail "unit still enabled after purge"
purge_left "$before"
rm -f "$before"
echo "check-agent-deb: $DEB installs, is enabled and purges cleanly in a Debian 12 root"
