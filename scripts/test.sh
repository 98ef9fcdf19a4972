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
# The default members (everything but dpdk-sys, which the DPDK step below lints and tests).
cargo clippy --all-targets -- -D warnings
echo "== cargo test (profile ci: optimised, so the lab's load tests measure replication, not debug builds)"
# One test at a time: the lab tests load a 2-core machine on purpose.
cargo test --profile ci --no-fail-fast -- --test-threads=1

echo "== the default build needs no libdpdk (pkg-config pointed nowhere; own target folder)"
PKG_CONFIG_PATH=/nonexistent PKG_CONFIG_LIBDIR=/nonexistent CARGO_TARGET_DIR=target/no-dpdk cargo build

echo "== DPDK ports: dpdk-sys and engine --features dpdk (hugepages reserved for the run)"
if [ "$(id -u)" -eq 0 ]; then
    bash scripts/hugepages.sh reserve 512
    trap 'bash scripts/hugepages.sh release' EXIT
else
    echo "test.sh: not root: no hugepages; the DPDK real-path tests will be skipped (or fail under CI=true)" >&2
fi
cargo clippy -p dpdk-sys -p engine -p pipelines --features engine/dpdk,pipelines/dpdk --all-targets -- -D warnings
cargo test -p dpdk-sys -p engine --features engine/dpdk --profile ci -- --test-threads=1
# tcpcopy and intercept on DPDK virtual devices in the lab.
cargo test -p pipelines --features dpdk --profile ci --test lab_dpdk -- --test-threads=1
