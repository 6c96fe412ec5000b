#!/usr/bin/env bash
# A Garage object store (S3-compatible) on loopback, for the tests and the demo.
#
#   ci/garage.sh start DIR [NODES]   NODES = 1 (default; replication 1) or 3 (replication 3):
#                                    configs, data and logs under DIR, free ports, bucket
#                                    `livesnap`, a key with read/write on it. Writes
#                                    DIR/endpoint (http://127.0.0.1:PORT of node 1),
#                                    DIR/credentials (mode 0600: access_key_id,
#                                    secret_access_key), DIR/bucket, DIR/nodeN/pid; prints the
#                                    endpoint.
#   ci/garage.sh restart DIR N       starts node N again (after a kill), waits until it answers
#   ci/garage.sh stop DIR            SIGTERM to every node, then SIGKILL after 5 s
#
# The binary: $GARAGE, else `garage` on PATH, else ~/.cargo/bin/garage
# (`cargo install --locked --version 2.5.0 garage`; ci/test.sh installs it).
set -euo pipefail

die() { echo "garage.sh: $*" >&2; exit 1; }

garage_bin() {
    if [ -n "${GARAGE:-}" ]; then echo "$GARAGE"; return; fi
    if command -v garage >/dev/null; then command -v garage; return; fi
    [ -x "$HOME/.cargo/bin/garage" ] && { echo "$HOME/.cargo/bin/garage"; return; }
    die "no garage binary: cargo install --locked --version 2.5.0 garage (or set GARAGE)"
}

# A TCP port on 127.0.0.1 that nothing listens on now (the kernel's choice).
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Runs node N of DIR in the background; its pid in DIR/nodeN/pid.
run_node() {
    local dir=$1 n=$2
    "$GARAGE" -c "$dir/node$n/garage.toml" server >>"$dir/node$n/log" 2>&1 &
    echo $! >"$dir/node$n/pid"
}

# Waits until node N answers on its RPC port; prints its node id.
wait_node() {
    local dir=$1 n=$2 id i
    for i in $(seq 1 300); do
        if id=$("$GARAGE" -c "$dir/node$n/garage.toml" node id -q 2>/dev/null); then
            echo "${id%%@*}"
            return
        fi
        kill -0 "$(cat "$dir/node$n/pid")" 2>/dev/null || die "node $n exited: $(tail -5 "$dir/node$n/log")"
        sleep 0.1
    done
    die "node $n did not answer within 30 s: $(tail -5 "$dir/node$n/log")"
}

cmd_start() {
    local dir=$1 nodes=${2:-1}
    [ "$nodes" = 1 ] || [ "$nodes" = 3 ] || die "NODES must be 1 or 3"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    [ ! -e "$dir/endpoint" ] || die "$dir holds a store already (stop it and remove the directory)"
    local secret n ids=() rpc=() s3 admin
    secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
    for n in $(seq 1 "$nodes"); do
        mkdir -p "$dir/node$n/meta" "$dir/node$n/data"
        rpc[n]=$(free_port) s3=$(free_port) admin=$(free_port)
        [ "$n" = 1 ] && echo "http://127.0.0.1:$s3" >"$dir/endpoint.tmp"
        cat >"$dir/node$n/garage.toml" <<EOF
metadata_dir = "$dir/node$n/meta"
data_dir = "$dir/node$n/data"
db_engine = "sqlite"
replication_factor = $nodes
rpc_bind_addr = "127.0.0.1:${rpc[n]}"
rpc_public_addr = "127.0.0.1:${rpc[n]}"
rpc_secret = "$secret"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin"
admin_token = "$secret"
EOF
        run_node "$dir" "$n"
    done
    for n in $(seq 1 "$nodes"); do
        ids[n]=$(wait_node "$dir" "$n")
    done
    local g=("$GARAGE" -c "$dir/node1/garage.toml")
    for n in $(seq 2 "$nodes"); do
        "${g[@]}" node connect "${ids[n]}@127.0.0.1:${rpc[n]}" >/dev/null
    done
    # Peers that just connected may need a moment before a layout can name them.
    for n in $(seq 1 "$nodes"); do
        local i
        for i in $(seq 1 100); do
            "${g[@]}" layout assign -z dc1 -c 1G "${ids[n]}" >/dev/null 2>&1 && break
            sleep 0.1
        done
    done
    "${g[@]}" layout apply --version 1 >/dev/null
    local i
    for i in $(seq 1 100); do
        "${g[@]}" bucket create livesnap >/dev/null 2>&1 && break
        sleep 0.1
    done
    local key
    key=$("${g[@]}" key create livesnap-key)
    local id secret_key
    id=$(sed -n 's/^ *Key ID: *//p' <<<"$key" | head -1)
    secret_key=$(sed -n 's/^ *Secret key: *//p' <<<"$key" | head -1)
    [ -n "$id" ] && [ -n "$secret_key" ] || die "cannot read the key from: $key"
    "${g[@]}" bucket allow --read --write --owner livesnap --key livesnap-key >/dev/null
    (umask 077 && printf 'access_key_id = "%s"\nsecret_access_key = "%s"\n' "$id" "$secret_key" >"$dir/credentials")
    echo livesnap >"$dir/bucket"
    mv "$dir/endpoint.tmp" "$dir/endpoint"
    cat "$dir/endpoint"
}

cmd_restart() {
    local dir=$1 n=$2
    [ -f "$dir/node$n/garage.toml" ] || die "no node $n in $dir"
    run_node "$dir" "$n"
    wait_node "$dir" "$n" >/dev/null
}

cmd_stop() {
    local dir=$1 pids=() p i
    for p in "$dir"/node*/pid; do
        [ -f "$p" ] && pids+=("$(cat "$p")")
    done
    [ ${#pids[@]} -gt 0 ] || return 0
    kill "${pids[@]}" 2>/dev/null || true
    for i in $(seq 1 50); do
        kill -0 "${pids[@]}" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "${pids[@]}" 2>/dev/null || true
}

GARAGE=$(garage_bin)
case "${1:-}" in
start) [ $# -ge 2 ] || die "usage: garage.sh start DIR [NODES]"; cmd_start "$2" "${3:-1}" ;;
restart) [ $# -eq 3 ] || die "usage: garage.sh restart DIR N"; cmd_restart "$2" "$3" ;;
stop) [ $# -eq 2 ] || die "usage: garage.sh stop DIR"; cmd_stop "$2" ;;
*) die "usage: garage.sh start DIR [NODES] | restart DIR N | stop DIR" ;;
esac
