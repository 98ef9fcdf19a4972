/* The DPDK headers dpdk-sys binds (see build.rs), plus the constants DPDK defines through
 * function-like macros (RTE_BIT64), which bindgen cannot expand: they are restated here as
 * `static const` values that clang evaluates. Only FFI: no logic lives here. */
#ifndef DPDK_SYS_WRAPPER_H
#define DPDK_SYS_WRAPPER_H

#include <rte_config.h>
#include <rte_common.h>
#include <rte_version.h>
#include <rte_errno.h>
#include <rte_log.h>
#include <rte_eal.h>
#include <rte_lcore.h>
#include <rte_launch.h>
#include <rte_cycles.h>
#include <rte_memory.h>
#include <rte_mempool.h>
#include <rte_mbuf.h>
#include <rte_ring.h>
#include <rte_ethdev.h>

/* Transmit offload capabilities and requests (rte_ethdev.h, RTE_BIT64-based). */
static const uint64_t DPDK_SYS_TX_OFFLOAD_IPV4_CKSUM = RTE_ETH_TX_OFFLOAD_IPV4_CKSUM;
static const uint64_t DPDK_SYS_TX_OFFLOAD_UDP_CKSUM = RTE_ETH_TX_OFFLOAD_UDP_CKSUM;
static const uint64_t DPDK_SYS_TX_OFFLOAD_TCP_CKSUM = RTE_ETH_TX_OFFLOAD_TCP_CKSUM;
static const uint64_t DPDK_SYS_TX_OFFLOAD_MBUF_FAST_FREE = RTE_ETH_TX_OFFLOAD_MBUF_FAST_FREE;
static const uint64_t DPDK_SYS_TX_OFFLOAD_MULTI_SEGS = RTE_ETH_TX_OFFLOAD_MULTI_SEGS;
/* Receive offload capabilities. */
static const uint64_t DPDK_SYS_RX_OFFLOAD_IPV4_CKSUM = RTE_ETH_RX_OFFLOAD_IPV4_CKSUM;
static const uint64_t DPDK_SYS_RX_OFFLOAD_TCP_CKSUM = RTE_ETH_RX_OFFLOAD_TCP_CKSUM;
static const uint64_t DPDK_SYS_RX_OFFLOAD_RSS_HASH = RTE_ETH_RX_OFFLOAD_RSS_HASH;
/* RSS hash functions (rte_eth_rss_conf.rss_hf). */
static const uint64_t DPDK_SYS_RSS_IP = RTE_ETH_RSS_IP;
static const uint64_t DPDK_SYS_RSS_TCP = RTE_ETH_RSS_TCP;
static const uint64_t DPDK_SYS_RSS_UDP = RTE_ETH_RSS_UDP;
/* Link state (rte_eth_link.link_status). */
static const uint32_t DPDK_SYS_LINK_UP = RTE_ETH_LINK_UP;

/* Small helpers for what is a macro, a thread-local or a bitfield in DPDK (dpdk_sys_shim.c). */
/** The calling thread's rte_errno (a per-lcore thread-local in DPDK). */
int dpdk_sys_errno(void);
/** Sets the transmit offload request of `m`: ORs `ol_flags` in and sets l2/l3/l4 lengths. */
void dpdk_sys_mbuf_set_tx_offload(struct rte_mbuf *m, uint64_t ol_flags,
				  uint16_t l2_len, uint16_t l3_len, uint16_t l4_len);
/** The link status bit of `link` (1 up, 0 down). */
int dpdk_sys_link_status(const struct rte_eth_link *link);
/** The link duplex bit of `link` (1 full, 0 half). */
int dpdk_sys_link_duplex(const struct rte_eth_link *link);

#endif
