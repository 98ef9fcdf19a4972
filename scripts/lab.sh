#!/usr/bin/env bash
# lab.sh: a four-host lab in network namespaces for tcpcopy-rs tests and demos.
#
#   lab.sh up     [PREFIX]      create the lab (fails if any of its namespaces exists)
#   lab.sh down   [PREFIX]      kill every process in the lab's namespaces, delete them (no-op if absent)
#   lab.sh status [PREFIX]      show one lab (or, without PREFIX, every lab found)
#   lab.sh exec   HOST cmd...   run cmd in ${LAB_PREFIX:-tcr-}HOST (HOST: client|online|online2|target|assistant|br)
#
# PREFIX defaults to $LAB_PREFIX or "tcr-". Namespaces: ${PREFIX}client, ${PREFIX}online,
# ${PREFIX}target, ${PREFIX}assistant and ${PREFIX}br (the bridge lives there); with
# LAB_ONLINE2=on, `up` adds a second online host, ${PREFIX}online2 (`down` removes it if present).
#
# Topology (one /24 LAN on bridge br0 in ${PREFIX}br, one veth per host, named eth0 inside the host and
# after the host inside ${PREFIX}br; veths are created directly inside the namespaces, so nothing is
# ever created in the root namespace and names never collide between labs):
#
#   client    10.77.0.10  02:77:00:00:00:0a
#   online    10.77.0.20  02:77:00:00:00:14   nginx :80, tcpcopy captures here
#   online2   10.77.0.21  02:77:00:00:00:15   only with LAB_ONLINE2=on: a second online server (its
#                                             own nginx :80 and tcpcopy; same clients, same target)
#   target    10.77.0.30  02:77:00:00:00:1e   nginx :8080, labserver :8081
#                         route 10.77.0.10/32 via 10.77.0.40, route 10.9.9.0/24 via 10.77.0.40
#   assistant 10.77.0.40  02:77:00:00:00:28   intercept :36524, net.ipv4.ip_forward=0
#
# Every host: lo up, rp_filter 0 (all, default, lo, eth0), IPv6 disabled (no ND/MLD noise in captures),
# permanent neighbour entries for every other host (no ARP needed; the image has no ping).
# Offloads (tx sg tso gso gro) are turned off on every veth unless LAB_OFFLOADS=on, which turns them on.
set -euo pipefail

HOSTS=(client online target assistant)
# Every host a lab may have (online2 only with LAB_ONLINE2=on), for down and status.
ALL_HOSTS=(client online online2 target assistant)
declare -A ADDR=([client]=10.77.0.10 [online]=10.77.0.20 [online2]=10.77.0.21 [target]=10.77.0.30
    [assistant]=10.77.0.40)
declare -A MAC=([client]=02:77:00:00:00:0a [online]=02:77:00:00:00:14 [online2]=02:77:00:00:00:15
    [target]=02:77:00:00:00:1e [assistant]=02:77:00:00:00:28)
PREFIX_LEN=24
CLIENT_RANGE=10.9.9.0/24
IFACE=eth0
BRIDGE=br0

die() { echo "lab.sh: $*" >&2; exit 1; }
say() { echo "lab.sh: $*" >&2; }

require_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces need CAP_NET_ADMIN); try: sudo $0 $*"
    command -v ip >/dev/null || die "ip not found; install iproute2 (scripts/setup.sh)"
}

check_prefix() {
    [[ "$1" =~ ^[A-Za-z0-9_.-]{0,40}$ ]] || die "bad prefix '$1' (letters, digits, '_', '.', '-'; at most 40)"
}

ns_exists() { [ -e "/run/netns/$1" ]; }

lab_namespaces() { local p=$1; echo "${p}client ${p}online ${p}online2 ${p}target ${p}assistant ${p}br"; }

# Kill every process in namespace $1: SIGTERM, wait up to ~2 s, then SIGKILL, wait up to ~2 s more.
kill_ns_processes() {
    local ns=$1 pids i
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -n "$pids" ] || return 0
    say "killing in $ns: $(echo $pids)"
    kill -TERM $pids 2>/dev/null || true
    for i in $(seq 20); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [ -n "$pids" ] || return 0
        sleep 0.1
    done
    say "still alive in $ns after SIGTERM, sending SIGKILL: $(echo $pids)"
    kill -KILL $pids 2>/dev/null || true
    for i in $(seq 20); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [ -n "$pids" ] || return 0
        sleep 0.1
    done
    say "warning: processes survive SIGKILL in $ns: $(echo $pids)"
}

cmd_down() {
    local p=$1 ns found=0
    for ns in $(lab_namespaces "$p"); do
        ns_exists "$ns" || continue
        found=1
        kill_ns_processes "$ns"
    done
    for ns in $(lab_namespaces "$p"); do
        ns_exists "$ns" || continue
        ip netns del "$ns" || say "warning: could not delete namespace $ns"
    done
    if [ "$found" = 1 ]; then say "lab '${p}' is down"; fi
}

sysctl_ns() { # ns key value (best effort for keys that may not exist)
    ip netns exec "$1" sysctl -qw "$2=$3" >/dev/null 2>&1 || say "warning: sysctl $2=$3 failed in $1"
}

offloads() { # ns dev
    local state=off
    [ "${LAB_OFFLOADS:-off}" = on ] && state=on
    ip netns exec "$1" ethtool -K "$2" tx $state sg $state tso $state gso $state gro $state \
        >/dev/null 2>&1 || say "warning: ethtool -K $2 (offloads $state) in $1 reported an error"
}

cmd_up() {
    local p=$1 ns h other br="${p}br"
    command -v ethtool >/dev/null || die "ethtool not found; install it (scripts/setup.sh)"
    case "${LAB_ONLINE2:-off}" in
        on) HOSTS=(client online online2 target assistant) ;;
        off) ;;
        *) die "LAB_ONLINE2 must be on or off, not '${LAB_ONLINE2}'" ;;
    esac
    for ns in $(lab_namespaces "$p"); do
        ns_exists "$ns" && die "namespace $ns already exists: lab '${p}' is up (run: $0 down ${p})"
    done
    # On any failure below, remove what was created.
    trap 'say "up failed; cleaning up"; cmd_down "$p"' ERR

    ip netns add "$br"
    ip -n "$br" link set lo up
    ip -n "$br" link add "$BRIDGE" type bridge stp_state 0 forward_delay 0 mcast_snooping 0
    sysctl_ns "$br" net.ipv6.conf.all.disable_ipv6 1
    sysctl_ns "$br" net.ipv6.conf.default.disable_ipv6 1
    # Bridged frames must not go through iptables if br_netfilter happens to be loaded.
    for k in bridge-nf-call-iptables bridge-nf-call-ip6tables bridge-nf-call-arptables; do
        [ -e "/proc/sys/net/bridge/$k" ] && sysctl_ns "$br" "net.bridge.$k" 0
    done
    ip -n "$br" link set "$BRIDGE" up

    for h in "${HOSTS[@]}"; do
        ns="${p}$h"
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        sysctl_ns "$ns" net.ipv6.conf.all.disable_ipv6 1
        sysctl_ns "$ns" net.ipv6.conf.default.disable_ipv6 1
        sysctl_ns "$ns" net.ipv4.conf.all.rp_filter 0
        sysctl_ns "$ns" net.ipv4.conf.default.rp_filter 0
        sysctl_ns "$ns" net.ipv4.conf.lo.rp_filter 0
        ip link add "$IFACE" netns "$ns" address "${MAC[$h]}" type veth peer name "$h" netns "$br"
        sysctl_ns "$ns" "net.ipv4.conf.$IFACE.rp_filter" 0
        ip -n "$ns" addr add "${ADDR[$h]}/$PREFIX_LEN" dev "$IFACE"
        ip -n "$br" link set "$h" master "$BRIDGE"
        offloads "$ns" "$IFACE"
        offloads "$br" "$h"
        ip -n "$br" link set "$h" up
        ip -n "$ns" link set "$IFACE" up
    done

    # The assistant must not forward the target's replies (they would reach the real client, which resets).
    sysctl_ns "${p}assistant" net.ipv4.ip_forward 0
    # The target answers replicated sessions through the assistant.
    ip -n "${p}target" route add "${ADDR[client]}/32" via "${ADDR[assistant]}" dev "$IFACE"
    ip -n "${p}target" route add "$CLIENT_RANGE" via "${ADDR[assistant]}" dev "$IFACE"

    for h in "${HOSTS[@]}"; do
        for other in "${HOSTS[@]}"; do
            [ "$h" = "$other" ] && continue
            ip -n "${p}$h" neigh replace "${ADDR[$other]}" lladdr "${MAC[$other]}" dev "$IFACE" nud permanent
        done
    done
    trap - ERR
    say "lab '${p}' is up (offloads ${LAB_OFFLOADS:-off}): $(printf "${p}%s " "${HOSTS[@]}")${br}"
}

status_one() {
    local p=$1 ns h pids
    echo "lab '${p}':"
    for h in "${ALL_HOSTS[@]}" br; do
        ns="${p}$h"
        # The second online host is optional.
        if [ "$h" = online2 ] && ! ns_exists "$ns"; then continue; fi
        if ! ns_exists "$ns"; then
            echo "  $ns: missing"
            continue
        fi
        pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
        if [ "$h" = br ]; then
            echo "  $ns: bridge $BRIDGE ports: $(ip -n "$ns" -o link show master "$BRIDGE" 2>/dev/null \
                | awk -F': ' '{print $2}' | cut -d@ -f1 | tr '\n' ' ')"
        else
            echo "  $ns: $(ip -n "$ns" -o -4 addr show dev "$IFACE" 2>/dev/null | awk '{print $4}') \
fwd=$(ip netns exec "$ns" sysctl -n net.ipv4.ip_forward 2>/dev/null)"
            ip -n "$ns" route show | sed 's/^/      route: /'
        fi
        echo "      processes: ${pids:-none}"
        if [ -n "$pids" ]; then
            for pid in $pids; do
                echo "        $pid $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-100)"
            done
        fi
    done
}

cmd_status() {
    if [ $# -ge 1 ]; then
        status_one "$1"
        return
    fi
    local prefixes
    prefixes=$(ls /run/netns 2>/dev/null | sed -n 's/^\(.*\)assistant$/\1/p' | sort -u)
    if [ -z "$prefixes" ]; then
        echo "no lab is up"
        return
    fi
    for p in $prefixes; do
        # Only report sets that look like a lab (the bridge namespace exists too).
        ns_exists "${p}br" && status_one "$p"
    done
}

main() {
    local cmd=${1:-}
    [ $# -gt 0 ] && shift
    case "$cmd" in
        up | down)
            require_root "$cmd" "$@"
            local p=${1:-${LAB_PREFIX:-tcr-}}
            check_prefix "$p"
            "cmd_$cmd" "$p"
            ;;
        status)
            require_root "$cmd" "$@"
            [ $# -ge 1 ] && check_prefix "$1"
            cmd_status "$@"
            ;;
        exec)
            require_root "$cmd" "$@"
            [ $# -ge 2 ] || die "usage: $0 exec HOST cmd... (HOST: client|online|online2|target|assistant|br)"
            local h=$1 p=${LAB_PREFIX:-tcr-}
            shift
            case "$h" in client | online | online2 | target | assistant | br) ;; *) die "unknown host '$h'" ;; esac
            check_prefix "$p"
            ns_exists "${p}$h" || die "namespace ${p}$h does not exist (run: $0 up ${p})"
            exec ip netns exec "${p}$h" "$@"
            ;;
        *)
            sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
            exit 2
            ;;
    esac
}

main "$@"
