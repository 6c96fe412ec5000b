#!/bin/sh
# Installs target/debian/livesnap-agent_*.deb with `dpkg -i` into a fresh Debian 12 root
# (debootstrap, minbase + systemd, cached as target/debian/bookworm-root.tar.gz) and checks:
# installed cleanly, the static binary runs there, the unit is enabled, the hooks directory
# and the example hooks are in place; then `dpkg --purge` removes it cleanly.
# Needs root, debootstrap and the Debian mirror. Run ci/package-agent.sh first.
set -eu
cd "$(dirname "$0")/.."
# The mirror this machine's apt already uses (override with DEBIAN_MIRROR).
MIRROR="${DEBIAN_MIRROR:-$(apt-cache policy | sed -n 's|^ *[0-9]* \(https\{0,1\}://[^ ]*\) bookworm/main amd64 Packages$|\1|p' | head -n 1)}"
[ -n "$MIRROR" ] || { echo "check-agent-deb: no Debian mirror in apt's sources; set DEBIAN_MIRROR" >&2; exit 1; }
CACHE=target/debian/bookworm-root.tar.gz
DEB=$(ls -t target/debian/livesnap-agent_*_amd64.deb | head -n 1)

if [ ! -f "$CACHE" ]; then
    build=$(mktemp -d /tmp/livesnap-debootstrap.XXXXXX)
    debootstrap --variant=minbase --include=systemd,systemd-sysv bookworm "$build" "$MIRROR"
    tar -C "$build" -czf "$CACHE.tmp" .
    mv "$CACHE.tmp" "$CACHE"
    rm -rf "$build"
fi

root=$(mktemp -d /tmp/livesnap-debroot.XXXXXX)
trap 'rm -rf "$root"' EXIT
tar -C "$root" -xzf "$CACHE"
cp "$DEB" "$root/tmp/agent.deb"

fail() { echo "check-agent-deb: $*" >&2; exit 1; }

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
echo "check-agent-deb: $DEB installs, is enabled and purges cleanly in a Debian 12 root"
