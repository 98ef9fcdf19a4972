/* C helpers for DPDK features that are not functions: the rte_errno thread-local, mbuf
 * bitfields, link bitfields. Only FFI: each helper is one statement. */
#include "wrapper.h"

int dpdk_sys_errno(void)
{
	return rte_errno;
}

void dpdk_sys_mbuf_set_tx_offload(struct rte_mbuf *m, uint64_t ol_flags,
				  uint16_t l2_len, uint16_t l3_len, uint16_t l4_len)
{
	m->ol_flags |= ol_flags;
	m->l2_len = l2_len;
	m->l3_len = l3_len;
	m->l4_len = l4_len;
}

int dpdk_sys_link_status(const struct rte_eth_link *link)
{
	return link->link_status;
}

int dpdk_sys_link_duplex(const struct rte_eth_link *link)
{
	return link->link_duplex;
}
