#!/usr/bin/env bash
# demo.sh: replicate live HTTP traffic in the namespace lab and report how much reached the target.
#
#   client --HTTP--> online:80 (nginx)          tcpcopy (online) copies requests to target:8080
#   target:8080 (nginx) replies via assistant   intercept (assistant) captures them, tells tcpcopy
#
# Environment: DEMO_REQUESTS (per mode, default 1000), DEMO_CONNECTIONS (keep-alive, default 20),
# DEMO_SETTLE_S (bound on waiting for the target, default 30), LAB_OFFLOADS=on (leave offloads on),
# DEMO_KEEP=1 (keep the run directory), DEMO_TCPCOPY_FLAGS (more tcpcopy flags, e.g. "--workers 2").
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=demo-
LAB="$ROOT/scripts/lab.sh"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
REQUESTS=${DEMO_REQUESTS:-1000}
CONNECTIONS=${DEMO_CONNECTIONS:-20}
SETTLE_S=${DEMO_SETTLE_S:-30}
ONLINE=10.77.0.20
TARGET=10.77.0.30
ASSISTANT=10.77.0.40
RUN=$(mktemp -d /tmp/tcpcopy-demo.XXXXXX)
TAG="d$$"
PIDS=()

say() { echo "demo: $*"; }
die() { echo "demo: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces)"
# A fresh machine: install what the lab needs (idempotent; quiet when everything is there).
bash "$ROOT/scripts/setup.sh" >"${TMPDIR:-/tmp}/tcpcopy-demo-setup.log" 2>&1 \
    || die "scripts/setup.sh failed: $(tail -5 "${TMPDIR:-/tmp}/tcpcopy-demo-setup.log")"
command -v nginx >/dev/null || die "nginx still not found after scripts/setup.sh"
command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (see scripts/setup.sh's output)"

cleanup() {
    local rc=$?
    set +e
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    "$LAB" down "$PREFIX" >/dev/null 2>&1 # kills anything left in the namespaces, deletes them
    if [ "${DEMO_KEEP:-0}" = 1 ] || [ $rc -ne 0 ]; then
        say "logs kept in $RUN"
    else
        rm -rf "$RUN"
    fi
    exit $rc
}
trap cleanup EXIT INT TERM

say "building release binaries"
(cd "$ROOT" && cargo build --release -q -p lab --bins) || die "cargo build -p lab failed"
(cd "$ROOT" && cargo build --release -q -p pipelines --bins) \
    || say "warning: cargo build -p pipelines failed; tcpcopy/intercept may be missing or stale"

# nginx config like the test harness's (lab::Lab::nginx): one process, own paths, countable log.
nginx_start() { # host ip port
    local host=$1 ip=$2 port=$3 d="$RUN/nginx-$1"
    mkdir -p "$d/logs" "$d/tmp"
    cat >"$d/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 16384;
pid $d/nginx.pid;
error_log $d/logs/error.log notice;
events { worker_connections 8192; }
http {
    default_type text/plain;
    log_format lab '\$remote_addr:\$remote_port \$request_method \$request_uri \$status \$request_length \$connection \$connection_requests';
    access_log $d/logs/access.log lab;
    keepalive_requests 100000;
    keepalive_timeout 65;
    client_max_body_size 64m;
    client_body_temp_path $d/tmp/client_body;
    proxy_temp_path $d/tmp/proxy;
    fastcgi_temp_path $d/tmp/fastcgi;
    uwsgi_temp_path $d/tmp/uwsgi;
    scgi_temp_path $d/tmp/scgi;
    server {
        listen $ip:$port backlog=4096;
        location / { return 200 "ok \$uri\n"; }
    }
}
EOF
    ip netns exec "${PREFIX}$host" nginx -p "$d" -c "$d/nginx.conf" -e "$d/logs/error.log" \
        >"$d/stdout.log" 2>&1 &
    PIDS+=($!)
    wait_port "$host" "$ip" "$port" || die "nginx on $host did not start: $(cat "$d/logs/error.log")"
}

wait_port() { # host ip port: bounded wait until the port accepts connections
    local i
    for i in $(seq 100); do
        if ip netns exec "${PREFIX}$1" bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

count() { # access log -> number of requests of this run
    grep -c " /p/$TAG-" "$1" 2>/dev/null || true
}

say "bringing the lab up (prefix $PREFIX, offloads ${LAB_OFFLOADS:-off})"
"$LAB" down "$PREFIX" >/dev/null 2>&1 || true
"$LAB" up "$PREFIX"
nginx_start online $ONLINE 80
nginx_start target $TARGET 8080

# The C tools' own usage lines, unchanged (plus a log file each for the report).
say "intercept on the assistant: intercept -i eth0 -F 'tcp and src port 8080'"
ip netns exec ${PREFIX}assistant "$BIN/intercept" -i eth0 -F "tcp and src port 8080" \
    -l "$RUN/intercept.log" &
PIDS+=($!)
wait_port assistant $ASSISTANT 36524 || die "intercept did not start: $(cat "$RUN/intercept.log")"

say "tcpcopy on the online host: tcpcopy -x 80-$TARGET:8080 -s $ASSISTANT (captures on every interface)"
# shellcheck disable=SC2086 # DEMO_TCPCOPY_FLAGS is a list of flags
ip netns exec ${PREFIX}online "$BIN/tcpcopy" -x 80-$TARGET:8080 -s $ASSISTANT \
    -l "$RUN/tcpcopy.log" ${DEMO_TCPCOPY_FLAGS:-} &
PIDS+=($!)
for _ in $(seq 100); do
    grep -q "connected to intercept" "$RUN/tcpcopy.log" 2>/dev/null && break
    sleep 0.1
done
grep -q "connected to intercept" "$RUN/tcpcopy.log" || die "tcpcopy did not connect: $(cat "$RUN/tcpcopy.log")"

say "load: $REQUESTS close + $REQUESTS keep-alive requests over $CONNECTIONS connections"
ip netns exec ${PREFIX}client "$BIN/httpload" --target $ONLINE:80 --requests "$REQUESTS" --mode close \
    --concurrency 4 --tag "$TAG-c" --timeout-s 120 || say "warning: some close-mode requests failed"
ip netns exec ${PREFIX}client "$BIN/httpload" --target $ONLINE:80 --requests "$REQUESTS" --mode keepalive \
    --connections "$CONNECTIONS" --tag "$TAG-k" --timeout-s 120 || say "warning: some keep-alive requests failed"

ONLINE_LOG="$RUN/nginx-online/logs/access.log"
TARGET_LOG="$RUN/nginx-target/logs/access.log"
say "waiting (up to ${SETTLE_S}s) for the target's count to settle"
last=-1
stable=0
for i in $(seq $((SETTLE_S * 4))); do
    n=$(count "$TARGET_LOG")
    if [ "$n" = "$last" ]; then stable=$((stable + 1)); else stable=0; last=$n; fi
    [ "$stable" -ge 8 ] && break # unchanged for 2 s
    sleep 0.25
done

online_n=$(count "$ONLINE_LOG")
target_n=$(count "$TARGET_LOG")
# Replicated = distinct paths of this run seen online that also reached the target.
matched=$(comm -12 <(awk '{print $3}' "$ONLINE_LOG" | grep "^/p/$TAG-" | sort -u) \
    <(awk '{print $3}' "$TARGET_LOG" 2>/dev/null | grep "^/p/$TAG-" | sort -u) | wc -l)
pct=$(awk -v m="$matched" -v o="$online_n" 'BEGIN { if (o > 0) printf "%.1f", 100 * m / o; else print "0.0" }')
echo
echo "online requests: $online_n, target requests: $target_n, replicated: $pct%"
