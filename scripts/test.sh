#!/usr/bin/env bash
# test.sh: every test of tcpcopy-rs, on a fresh Debian machine, as root.
#   format and lint, unit and property tests, real-path port tests (veth + namespaces),
#   and the lab's end-to-end replication tests (nginx, tcpcopy, intercept in four namespaces).
# Root-only tests fail loudly under CI=true when not root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then
    bash scripts/setup.sh
else
    echo "test.sh: not root: the namespace and capture tests will be skipped (or fail under CI=true)" >&2
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test (profile ci: optimised, so the lab's load tests measure replication, not debug builds)"
# One test at a time: the lab tests load a 2-core machine on purpose.
cargo test --workspace --profile ci --no-fail-fast -- --test-threads=1
