#!/usr/bin/env bash
# fuzz.sh [SECONDS] [TARGET...]: runs every fuzz target under fuzz/ (or the ones named) for
# SECONDS each (default 60), at nice 19, with libFuzzer through cargo-fuzz; prints per target
# the inputs executed and the crashes found, and exits non-zero when one crashed.
#
# Not part of CI (.ci/run -> scripts/test.sh): a separate, long-running command.
#   - cargo-fuzz is installed when missing; it needs `-Z` flags, which this stable toolchain
#     accepts with RUSTC_BOOTSTRAP=1 (the libFuzzer runtime also needs a C++ compiler).
#   - Targets are built as cargo fuzz builds them by default: optimised, debug assertions and
#     overflow checks on, AddressSanitizer.
#   - Each target starts from its committed corpus (fuzz/corpus/<target>, minimized) and the
#     seeds fuzz/seeds.py writes; what it finds goes to fuzz/corpus-work/<target> (not
#     committed), crashes to fuzz/artifacts/<target>/. Keep a crash as a unit test of the
#     crate that owns the parser (hex bytes inline), fix it, and re-run.
#   - Limits per input: 2 GiB RSS, 512 MiB in one allocation, 10 s.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
export RUSTC_BOOTSTRAP=1

if ! command -v c++ >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update && apt-get install -y g++
    else
        echo "fuzz.sh: libFuzzer needs a C++ compiler: apt-get install g++ (as root)" >&2
        exit 1
    fi
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    nice -n 19 cargo install --locked cargo-fuzz
fi

python3 fuzz/seeds.py
if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

echo "== building ${#targets[@]} fuzz targets"
nice -n 19 cargo fuzz build

# Inputs larger than libFuzzer's default guess, where size matters.
max_len() {
    case "$1" in
        pcap_reader|config_yaml) echo 16384 ;;
        udp_reassembly|session_table|tcpcopy_ingress|control_datagram|control_stream) echo 8192 ;;
        *) echo 4096 ;;
    esac
}

mkdir -p fuzz/logs
failed=0
printf '\n%-18s %8s %14s %10s %8s\n' target seconds inputs "inputs/s" crashes
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus-work/$t" "fuzz/corpus/$t" "fuzz/seeds/$t" "fuzz/artifacts/$t"
    before=$(find "fuzz/artifacts/$t" -type f | wc -l)
    log="fuzz/logs/$t.log"
    start=$(date +%s)
    status=0
    nice -n 19 cargo fuzz run "$t" "fuzz/corpus-work/$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$seconds" -max_len="$(max_len "$t")" -rss_limit_mb=2048 \
        -malloc_limit_mb=512 -timeout=10 -print_final_stats=1 >"$log" 2>&1 || status=$?
    elapsed=$(( $(date +%s) - start ))
    # libFuzzer's own time ("Done N runs in S second(s)"), else the wall time with the build.
    fuzzed=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | grep -o '[0-9]* second' | grep -o '[0-9]*' | tail -1)
    elapsed=${fuzzed:-$elapsed}
    inputs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    if [ -z "$inputs" ]; then
        # No final stats (a crash): the last status line, "#N ...".
        inputs=$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#')
    fi
    inputs=${inputs:-0}
    crashes=$(( $(find "fuzz/artifacts/$t" -type f | wc -l) - before ))
    if [ "$status" -ne 0 ] && [ "$crashes" -eq 0 ]; then
        crashes=1
    fi
    rate=$(( inputs / (elapsed > 0 ? elapsed : 1) ))
    printf '%-18s %8s %14s %10s %8s\n' "$t" "$elapsed" "$inputs" "$rate" "$crashes"
    if [ "$crashes" -ne 0 ]; then
        failed=1
        echo "   crash: see $log and fuzz/artifacts/$t/" >&2
    fi
done
# pcap_reader's input file (one per fuzzing process).
rm -f /dev/shm/tcpcopy-fuzz-pcap-*.bin "${TMPDIR:-/tmp}"/tcpcopy-fuzz-pcap-*.bin
if [ "$failed" -ne 0 ]; then
    echo "fuzz.sh: crashes found" >&2
    exit 1
fi
echo "fuzz.sh: no crash"
