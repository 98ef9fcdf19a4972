#!/usr/bin/env bash
# udp-loss-loop.sh [RUNS]: runs engine/tests/control_udp.rs RUNS times (default 200) on a
# loaded machine and prints "N passed, M failed". Not part of CI: it checks that the UDP
# control channel's loss accounting is exact whatever the load (issue #16).
#
#   The test binary is built once (profile ci). While the runs go on, LOAD busy loops (default:
#   one per core) compete with the tests for the CPU; each is bounded by `timeout` and all are
#   killed on exit. Each run has its own time limit (RUN_TIMEOUT seconds, default 300: a hang is
#   a failure). The output of failed runs is kept in LOG_DIR (default target/udp-loss-loop).
#
#   Environment: LOAD=N busy loops (0: no load), RUN_TIMEOUT=S, LOG_DIR=DIR, TEST_ARGS="..."
#   (extra arguments for the test binary, e.g. a test name filter or --test-threads=1).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-200}
case "$runs" in
    '' | *[!0-9]*) echo "udp-loss-loop.sh: RUNS must be a number, not '$runs'" >&2; exit 2 ;;
esac
load=${LOAD:-$(nproc)}
run_timeout=${RUN_TIMEOUT:-300}
log_dir=${LOG_DIR:-target/udp-loss-loop}
mkdir -p "$log_dir"
rm -f "$log_dir"/run-*.log

echo "== building the control_udp test binary (profile ci)"
binary=$(cargo test -p engine --profile ci --test control_udp --no-run --message-format=json |
    grep -o '"executable":"[^"]*control_udp-[^"]*"' | tail -n 1 | cut -d'"' -f4)
if [ -z "$binary" ] || [ ! -x "$binary" ]; then
    echo "udp-loss-loop.sh: cannot find the control_udp test binary" >&2
    exit 1
fi

burners=()
cleanup() {
    for pid in "${burners[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# At most a day of load, however long the runs take (the trap ends it sooner).
for _ in $(seq 1 "$load"); do
    timeout 86400 sh -c 'while :; do :; done' &
    burners+=("$!")
done

echo "== $runs runs of $binary with $load busy loop(s) on $(nproc) core(s)"
passed=0
failed=0
start=$(date +%s)
for i in $(seq 1 "$runs"); do
    log="$log_dir/run-$i.log"
    # shellcheck disable=SC2086 # TEST_ARGS is a list of arguments
    if timeout "$run_timeout" "$binary" ${TEST_ARGS:-} >"$log" 2>&1; then
        passed=$((passed + 1))
        rm -f "$log"
    else
        failed=$((failed + 1))
        echo "run $i FAILED (output in $log):"
        grep -E 'FAILED|panicked|left:|right:' "$log" | head -n 8 || true
    fi
    if [ $((i % 20)) -eq 0 ]; then
        echo "   $i runs: $passed passed, $failed failed ($(($(date +%s) - start)) s)"
    fi
done
echo "load: $load busy loop(s), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
