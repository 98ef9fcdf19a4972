#!/usr/bin/env bash
# setup.sh: install what the tcpcopy-rs lab needs on a fresh Debian 12 machine (run as root).
# Idempotent: packages already installed are left alone; apt-get update runs only if something is missing.
set -euo pipefail

say() { echo "setup.sh: $*"; }
die() { echo "setup.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get install); try: sudo $0"
command -v dpkg-query >/dev/null || die "this script expects Debian/Ubuntu (dpkg, apt-get)"

# package -> a command it provides (documentation only; the check is dpkg's state)
PACKAGES=(libpcap-dev apache2-utils ethtool tcpdump iproute2 nftables pkg-config wrk procps psmisc)
# DPDK ports (engine feature `dpdk`): headers and libraries, libclang for bindgen, and the
# dpdk tools (dpdk-devbind.py, dpdk-hugepages.py).
PACKAGES+=(libdpdk-dev libclang-dev dpdk)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

missing=()
# nginx-light on Debian 12 (a transitional package to nginx there); any nginx flavour will do.
if installed nginx-light || installed nginx || installed nginx-full || installed nginx-core; then
    say "nginx: already installed ($(nginx -v 2>&1 || true))"
else
    if apt-cache show nginx-light >/dev/null 2>&1; then missing+=(nginx-light); else missing+=(nginx); fi
fi
for p in "${PACKAGES[@]}"; do
    if installed "$p"; then
        say "$p: already installed"
    else
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -gt 0 ]; then
    say "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
    say "installed: ${missing[*]}"
else
    say "all packages present; nothing installed (apt-get update skipped)"
fi

# The nginx package may start a daemon in the root namespace (only under systemd, which our machines do
# not run). The lab starts its own nginx instances inside namespaces, so stop any root-namespace one.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    if systemctl is-active --quiet nginx 2>/dev/null; then
        systemctl stop nginx && say "stopped nginx.service"
    fi
    systemctl disable --quiet nginx 2>/dev/null && say "disabled nginx.service" || true
fi
if [ -s /run/nginx.pid ]; then
    pid=$(cat /run/nginx.pid)
    if kill -0 "$pid" 2>/dev/null && [ "$(readlink /proc/"$pid"/ns/net)" = "$(readlink /proc/1/ns/net)" ]; then
        kill -QUIT "$pid" && say "stopped the package's nginx (pid $pid, from /run/nginx.pid)"
    fi
fi

if command -v cargo >/dev/null; then
    say "rust: $(cargo --version) / $(rustc --version 2>/dev/null || echo 'rustc missing')"
else
    say "rust: cargo not found. Install a toolchain with rustup:"
    say "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y && . \$HOME/.cargo/env"
    say "  (or: apt-get install cargo rustc, if Debian's version is recent enough for rust-version in Cargo.toml)"
fi

for c in nginx ab wrk ethtool tcpdump ip pkg-config; do
    command -v "$c" >/dev/null && say "ok: $c -> $(command -v "$c")" || say "warning: $c not on PATH"
done
pkg-config --exists libpcap 2>/dev/null && say "ok: libpcap $(pkg-config --modversion libpcap)" \
    || say "warning: pkg-config does not find libpcap"
pkg-config --exists libdpdk 2>/dev/null && say "ok: libdpdk $(pkg-config --modversion libdpdk)" \
    || say "warning: pkg-config does not find libdpdk (needed only for --features dpdk)"
say "done. Next: cargo build --release && scripts/lab.sh up"
