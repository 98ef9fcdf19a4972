#!/usr/bin/env bash
# port-rate.sh: forwarding rate of the ports on one veth pair, DPDK vs the kernel.
#
#   scripts/port-rate.sh [SECONDS]        (root; builds engine's port_rate example with --features dpdk)
#
#   namespace prG<pid>: prg<pid> 10.252.0.1   --veth-->   namespace prF<pid>: prf<pid> 10.252.0.2
#   generator (CPU 0): 64-byte UDP frames to 10.252.0.99 via prf's MAC, AF_PACKET + qdisc bypass
#   forwarder (CPU 1): every IPv4 frame back out of prf to prg's MAC
#       afpacket: AfPacketRx(prf) -> RawIpTx(bound to prf; 10.252.0.99 has a permanent neighbour entry)
#       dpdk:     EAL --vdev=net_af_packet0,iface=prf -> DpdkRx -> DpdkTx (next hop = prg's MAC)
#   prG drops what comes back (10.252.0.99 is nobody; ip_forward=0).
# Prints the generator's and each forwarder's rate. Reserves hugepages for the DPDK run and
# releases them, and removes its namespaces, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_RUN=${1:-10}
[ "$(id -u)" -eq 0 ] || { echo "port-rate.sh: must run as root" >&2; exit 2; }

cargo build --release -p engine --features dpdk --example port_rate >&2
BIN=target/release/examples/port_rate

G=prG$$; F=prF$$; GI=prg$$; FI=prf$$
cleanup() {
    for ns in $G $F; do
        for pid in $(ip netns pids $ns 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del $ns 2>/dev/null || true
    done
    bash scripts/hugepages.sh release >/dev/null || true
}
trap cleanup EXIT
ip netns add $G; ip netns add $F
ip link add $GI netns $G type veth peer name $FI netns $F
for pair in "$G $GI 10.252.0.1" "$F $FI 10.252.0.2"; do
    set -- $pair
    ip netns exec "$1" sysctl -qw "net.ipv6.conf.$2.disable_ipv6=1"
    ip netns exec "$1" ethtool -K "$2" tx off sg off tso off gso off gro off >/dev/null 2>&1 || true
    ip -n "$1" addr add "$3/24" dev "$2"
    ip -n "$1" link set "$2" up
    ip -n "$1" link set lo up
done
GMAC=$(ip netns exec $G cat /sys/class/net/$GI/address)
FMAC=$(ip netns exec $F cat /sys/class/net/$FI/address)
ip -n $F neigh replace 10.252.0.99 lladdr "$GMAC" dev $FI nud permanent

run_pair() { # forwarder args...
    ip netns exec $F taskset -c 1 "$BIN" "$@" &
    local fwd=$!
    sleep 2
    ip netns exec $G taskset -c 0 "$BIN" gen $GI "$FMAC" 10.252.0.1 10.252.0.99 "$SECONDS_RUN"
    wait $fwd
}

echo "== kernel: AfPacketRx -> RawIpTx"
run_pair afpacket $FI "$SECONDS_RUN"
echo "== DPDK: DpdkRx -> DpdkTx on net_af_packet0"
bash scripts/hugepages.sh reserve 256 >/dev/null
run_pair dpdk $FI "$GMAC" "$SECONDS_RUN" 1
