#!/usr/bin/env bash
# The bare-metal mirror-port deployment of tcpcopy on DPDK, as a script to copy and edit.
#
#   switch mirror of production traffic ──> NIC A (DPDK, capture)  ┐
#                                                                  ├─ tcpcopy box
#   test network (target, assistant)   <── NIC B (DPDK, transmit)  ┘   + a kernel NIC for the
#                                                                      control channel to intercept
#
# tcpcopy captures the mirrored client requests on NIC A (promiscuous: the frames are addressed
# to the production server), replays them to the target through NIC B, and talks to intercept
# over the management interface (kernel stack). The target routes its replies for the client
# addresses (or the -c range) to the assistant, where intercept runs (see README.md).
#
# Run as root, once per boot for the set-up part; build first with:
#   apt-get install libdpdk-dev libclang-dev dpdk && cargo build --release --features dpdk
set -euo pipefail

# --- edit these ---------------------------------------------------------------------------
MIRROR_NIC=0000:01:00.0          # PCI address of the NIC that receives the mirror
TEST_NIC=0000:01:00.1            # PCI address of the NIC towards the target
NEXT_HOP=10.0.0.30               # the target (or the router towards it): IPv4 (ARP) or MAC
TRANSFER=80-10.0.0.30:8080       # -x: online port -> target address:port
INTERCEPT=10.1.0.40              # -s: intercept on the assistant, via the management network
CLIENTS=10.9.9.x                 # -c: replay client addresses the target routes to the assistant
WORKER_CORES=2                   # a core isolated from the scheduler (isolcpus=2 nohz_full=2)
HUGEPAGES=1024                   # 2 MiB pages (2 GiB)
# ------------------------------------------------------------------------------------------

here=$(cd "$(dirname "$0")/.." && pwd)

# 1. Hugepages for DPDK's packet buffers (scripts/hugepages.sh release undoes it).
bash "$here/scripts/hugepages.sh" reserve "$HUGEPAGES"

# 2. Hand both NICs to DPDK: vfio-pci (IOMMU on: intel_iommu=on or amd_iommu=on on the kernel
#    command line; without an IOMMU: echo 1 > /sys/module/vfio/parameters/enable_unsafe_noiommu_mode).
modprobe vfio-pci
dpdk-devbind.py --bind=vfio-pci "$MIRROR_NIC" "$TEST_NIC"
dpdk-devbind.py --status-dev net

# 3. Replay.
exec "$here/target/release/tcpcopy" \
    --dpdk-pci "$MIRROR_NIC" --dpdk-pci "$TEST_NIC" \
    --dpdk-rx "$MIRROR_NIC" --dpdk-tx "$TEST_NIC" --next-hop "$NEXT_HOP" \
    --dpdk-lcores "$WORKER_CORES" --cores "$WORKER_CORES" \
    -x "$TRANSFER" -c "$CLIENTS" -s "$INTERCEPT" \
    -l /var/log/tcpcopy.log -P /run/tcpcopy.pid
