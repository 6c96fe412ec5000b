# Sourced by the .deb checks (ci/check-agent-deb.sh, ci/check-host-deb.sh): a fresh Debian 12
# root to install a package into with `dpkg -i`, and what a purge must leave of it.
#
#   CHECK_NAME=NAME          # prefixes messages
#   . ci/debroot.sh          # sets $root, removed at exit
#   files_of_root > before   # every path in the root, but the ones dpkg and the tools
#   ...                      # rewrite as they work (its database, logs, caches, the
#                            # user database's backups and lock, systemd's runtime state)
#   purge_left before 'GLOB' # fails unless the root holds only what it held in `before`,
#                            # and paths matching the shell GLOBs (the package's data)
#
# Needs root, debootstrap and the Debian mirror. The root is debootstrapped once (minbase +
# systemd) and cached as target/debian/bookworm-root.tar.gz.
CHECK_NAME=${CHECK_NAME:?set CHECK_NAME before sourcing ci/debroot.sh}
fail() { echo "$CHECK_NAME: $*" >&2; exit 1; }
# The mirror this machine's apt already uses (override with DEBIAN_MIRROR).
MIRROR="${DEBIAN_MIRROR:-$(apt-cache policy | sed -n 's|^ *[0-9]* \(https\{0,1\}://[^ ]*\) bookworm/main amd64 Packages$|\1|p' | head -n 1)}"
CACHE=target/debian/bookworm-root.tar.gz

if [ ! -f "$CACHE" ]; then
    [ -n "$MIRROR" ] || fail "no Debian mirror in apt's sources; set DEBIAN_MIRROR"
    mkdir -p target/debian
    build=$(mktemp -d /tmp/livesnap-debootstrap.XXXXXX)
    debootstrap --variant=minbase --include=systemd,systemd-sysv bookworm "$build" "$MIRROR"
    tar -C "$build" -czf "$CACHE.tmp" .
    mv "$CACHE.tmp" "$CACHE"
    rm -rf "$build"
fi

root=$(mktemp -d /tmp/livesnap-debroot.XXXXXX)
cleanup_root() {
    # /proc, if a check mounted it for a process run in the root.
    if mountpoint -q "$root/proc"; then umount "$root/proc"; fi
    rm -rf "$root"
}
trap cleanup_root EXIT
tar -C "$root" -xzf "$CACHE"
# mktemp made it 0700: its users (a package's system user) must reach their files below it.
chmod 0755 "$root"

files_of_root() {
    (cd "$root" && find . -xdev \
        \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./tmp -o -path ./var/lib/dpkg \
           -o -path ./var/log -o -path ./var/cache -o -path ./var/lib/systemd/deb-systemd-helper-enabled \
           -o -path ./var/lib/systemd/deb-systemd-helper-masked -o -path ./run/systemd \) -prune -o -print) |
        grep -v -e '^\./etc/\(passwd\|group\|shadow\|gshadow\)-$' -e '^\./etc/\.pwd\.lock$' | LC_ALL=C sort
}

purge_left() {
    before=$1
    shift
    after=$(mktemp)
    files_of_root > "$after"
    extra=$(LC_ALL=C comm -13 "$before" "$after" | while read -r path; do
        keep=no
        for glob in "$@"; do
            # shellcheck disable=SC2254
            case "$path" in $glob) keep=yes ;; esac
        done
        [ "$keep" = yes ] || echo "$path"
    done)
    rm -f "$after"
    [ -z "$extra" ] || fail "purge left these behind: $(echo "$extra" | tr '\n' ' ')"
}
