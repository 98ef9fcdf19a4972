#!/usr/bin/env bash
# hugepages.sh: reserve hugepages and mount hugetlbfs for DPDK, and put the machine back as it was.
#
#   hugepages.sh reserve N [--size 2M|1G] [--node N]   at least N pages of that size (default 2M),
#                                                      on one NUMA node when --node is given; mounts
#                                                      hugetlbfs (pagesize=SIZE) at the fixed mount
#   hugepages.sh status                                pages per size and node, hugetlbfs mounts,
#                                                      what this script changed
#   hugepages.sh release                               undoes every change `reserve` recorded: the
#                                                      page counts it raised go back to their old
#                                                      value, its mount is unmounted and its mount
#                                                      folder removed if it created it
#
# Idempotent: reserving again what is already there changes nothing; `release` with nothing
# recorded does nothing. The state lives in $HUGEPAGES_STATE_DIR (default /run/tcpcopy-hugepages),
# the mounts at $HUGEPAGES_MOUNT (default /dev/hugepages-tcpcopy; 1G pages at ...-1G). Tests set
# both variables to keep their own state apart from a reservation made for the whole test run.
#
# Refuses (exit 2) when not root, when the page size is not supported, and when the pages would
# take more than MemAvailable minus a reserve of 256 MiB for the rest of the machine.
set -euo pipefail

STATE_DIR=${HUGEPAGES_STATE_DIR:-/run/tcpcopy-hugepages}
STATE="$STATE_DIR/state"
MOUNT_BASE=${HUGEPAGES_MOUNT:-/dev/hugepages-tcpcopy}
# Memory kept free for everything else, in kB.
KEEP_KB=$((256 * 1024))

say() { echo "hugepages.sh: $*"; }
die() { echo "hugepages.sh: $*" >&2; exit "${2:-1}"; }
usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

need_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root: '$1' writes /proc/sys/vm and /sys nr_hugepages and mounts hugetlbfs; try: sudo $0 $*" 2
}

# size argument (2M, 1G, 2048kB, ...) -> kB
size_kb() {
    case "$1" in
        2M|2m|2MB|2048kB|2048) echo 2048 ;;
        1G|1g|1GB|1048576kB|1048576) echo 1048576 ;;
        *) die "unsupported page size '$1' (use 2M or 1G)" 2 ;;
    esac
}

mount_for() { # kB -> mount point
    if [ "$1" -eq 2048 ]; then echo "$MOUNT_BASE"; else echo "$MOUNT_BASE-$(( $1 / 1048576 ))G"; fi
}

nr_path() { # kB node -> the nr_hugepages file
    if [ -n "$2" ]; then
        echo "/sys/devices/system/node/node$2/hugepages/hugepages-${1}kB/nr_hugepages"
    else
        echo "/sys/kernel/mm/hugepages/hugepages-${1}kB/nr_hugepages"
    fi
}

is_mounted() { awk -v m="$1" '$2 == m { found = 1 } END { exit !found }' /proc/mounts; }

recorded() { [ -f "$STATE" ] && grep -qxF -- "$1" <(cut -d' ' -f1-2 "$STATE"); }

record() { mkdir -p "$STATE_DIR"; echo "$*" >>"$STATE"; }

mem_available_kb() { awk '/^MemAvailable:/ { print $2 }' /proc/meminfo; }

cmd_reserve() {
    local count="" size=2M node=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --size) size=${2:?--size needs 2M or 1G}; shift 2 ;;
            --size=*) size=${1#--size=}; shift ;;
            --node) node=${2:?--node needs a NUMA node number}; shift 2 ;;
            --node=*) node=${1#--node=}; shift ;;
            -h|--help) usage ;;
            *) [ -z "$count" ] || usage; count=$1; shift ;;
        esac
    done
    [[ "$count" =~ ^[0-9]+$ ]] && [ "$count" -gt 0 ] || die "reserve needs a page count > 0, e.g. reserve 512" 2
    [ -z "$node" ] || [[ "$node" =~ ^[0-9]+$ ]] || die "--node needs a number, e.g. --node 0" 2
    need_root reserve
    local kb path mnt
    kb=$(size_kb "$size")
    path=$(nr_path "$kb" "$node")
    if [ ! -e "$path" ]; then
        if [ -n "$node" ] && [ ! -d "/sys/devices/system/node/node$node" ]; then
            die "NUMA node $node does not exist here (nodes: $(ls /sys/devices/system/node | grep -o 'node[0-9]*' | tr '\n' ' '))" 2
        fi
        die "${size} pages are not supported by this CPU or kernel (no $path)" 2
    fi

    local current
    current=$(cat "$path")
    if [ "$current" -lt "$count" ]; then
        local need_kb avail_kb
        need_kb=$(( (count - current) * kb ))
        avail_kb=$(mem_available_kb)
        if [ $(( need_kb + KEEP_KB )) -gt "$avail_kb" ]; then
            die "not enough memory: $count pages of $size need $(( need_kb / 1024 )) MiB more, MemAvailable is $(( avail_kb / 1024 )) MiB (and $(( KEEP_KB / 1024 )) MiB stay for the rest); reserve fewer pages" 2
        fi
        # Record the old value once, before the first change, so release restores it.
        recorded "nr $path" || record "nr $path $current"
        echo "$count" >"$path"
        local got
        got=$(cat "$path")
        if [ "$got" -lt "$count" ]; then
            echo "$current" >"$path"
            die "the kernel reserved only $got of $count pages of $size (memory fragmented); try fewer pages, or reserve at boot (hugepages=$count on the kernel command line)"
        fi
        say "reserved $count pages of $size${node:+ on node $node} (was $current)"
    else
        say "$current pages of $size${node:+ on node $node} already reserved (>= $count): unchanged"
    fi

    mnt=$(mount_for "$kb")
    if is_mounted "$mnt"; then
        say "hugetlbfs already mounted at $mnt"
    else
        if [ ! -d "$mnt" ]; then
            mkdir -p "$mnt"
            recorded "mkdir $mnt" || record "mkdir $mnt"
        fi
        mount -t hugetlbfs -o "pagesize=${kb}K" nodev "$mnt"
        record "mount $mnt"
        say "mounted hugetlbfs (pagesize $size) at $mnt"
    fi
}

cmd_status() {
    local dir kb
    for dir in /sys/kernel/mm/hugepages/hugepages-*kB; do
        [ -d "$dir" ] || continue
        kb=${dir##*hugepages-}; kb=${kb%kB}
        printf 'hugepages.sh: %7s kB pages: total %s, free %s, reserved %s, surplus %s\n' "$kb" \
            "$(cat "$dir/nr_hugepages")" "$(cat "$dir/free_hugepages")" \
            "$(cat "$dir/resv_hugepages")" "$(cat "$dir/surplus_hugepages")"
        for node in /sys/devices/system/node/node*/hugepages/hugepages-"${kb}"kB; do
            [ -d "$node" ] || continue
            local n=${node#/sys/devices/system/node/node}; n=${n%%/*}
            printf 'hugepages.sh:            node %s: total %s, free %s\n' "$n" \
                "$(cat "$node/nr_hugepages")" "$(cat "$node/free_hugepages")"
        done
    done
    local mounts
    mounts=$(awk '$3 == "hugetlbfs" { print $2 " (" $4 ")" }' /proc/mounts)
    if [ -n "$mounts" ]; then
        while IFS= read -r line; do say "hugetlbfs mounted at $line"; done <<<"$mounts"
    else
        say "no hugetlbfs mounted"
    fi
    if [ -s "$STATE" ]; then
        say "changes recorded in $STATE (undone by 'release'):"
        sed 's/^/hugepages.sh:   /' "$STATE"
    else
        say "no changes recorded in $STATE"
    fi
    say "MemAvailable: $(( $(mem_available_kb) / 1024 )) MiB"
}

cmd_release() {
    if [ ! -s "$STATE" ]; then
        say "nothing to release (no changes recorded in $STATE)"
        rm -f "$STATE"
        return 0
    fi
    need_root release
    local failed=0 line kind target value lines
    # Undo in reverse order: unmount, then remove the folder, then give the pages back.
    mapfile -t lines < <(tac "$STATE")
    for line in "${lines[@]}"; do
        read -r kind target value <<<"$line"
        case "$kind" in
            mount)
                if is_mounted "$target"; then
                    if umount "$target"; then
                        say "unmounted $target"
                    else
                        local users
                        users=$(fuser -m "$target" 2>/dev/null | tr -s ' ' || true)
                        echo "hugepages.sh: cannot unmount $target (in use${users:+ by pids$users}); stop the DPDK process and run release again" >&2
                        failed=1
                        continue
                    fi
                fi
                ;;
            mkdir)
                if is_mounted "$target"; then failed=1; continue; fi
                rmdir "$target" 2>/dev/null && say "removed $target" || true
                ;;
            nr)
                echo "$value" >"$target"
                say "restored $target to $value (now $(cat "$target"))"
                ;;
            *) echo "hugepages.sh: ignoring unknown state line: $line" >&2 ;;
        esac
        # Drop the line once undone, so a failed release can be run again.
        grep -vxF -- "$line" "$STATE" >"$STATE.tmp" || true
        mv "$STATE.tmp" "$STATE"
    done
    if [ "$failed" -ne 0 ]; then
        die "release incomplete; what is left is still recorded in $STATE"
    fi
    rm -f "$STATE"
    rmdir "$STATE_DIR" 2>/dev/null || true
    say "released: the machine is as it was before reserve"
}

[ $# -ge 1 ] || usage
command=$1; shift
case "$command" in
    reserve) cmd_reserve "$@" ;;
    status) cmd_status "$@" ;;
    release) cmd_release "$@" ;;
    -h|--help|help) usage ;;
    *) echo "hugepages.sh: unknown command '$command'" >&2; usage ;;
esac
