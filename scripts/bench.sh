#!/usr/bin/env bash
# bench.sh: the in-memory benchmarks in one command (no root, no lab): the established-session
# path (64/512-byte segments over 1k, 100k and 1M sessions), intercept's extract-and-route path,
# table memory per session, session lookups, 1 -> 2 worker scaling (engine-bench), and the
# control path encode -> batch -> loopback -> decode -> dispatch (control-bench).
#   scripts/bench.sh            # everything, about 15 minutes on 2 cores
#   scripts/bench.sh --quick    # 1k and 100k sessions only
# The lab benchmarks need root and run on their own: target/release/lab-rate,
# target/release/offline-rate (see the README's Performance section).
set -euo pipefail
cd "$(dirname "$0")/.."
quick=()
[ "${1:-}" = "--quick" ] && quick=(--quick)
cargo build --release -q -p bench --bin engine-bench --bin control-bench
echo "== engine-bench ${quick[*]:-} --repeat 2"
target/release/engine-bench "${quick[@]}" --repeat 2
echo "== engine-bench --scaling"
target/release/engine-bench --scaling
echo "== control-bench --records 30000000 --workers 2"
target/release/control-bench --records 30000000 --workers 2
