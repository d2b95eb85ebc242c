/* Cilium with BPF host routing and one native device (ENABLE_SKIP_FIB): every packet not
 * addressed to the node goes to DIRECT_ROUTING_DEV by bpf_redirect_neigh(dev, NULL), no FIB
 * lookup, so no ip rule is consulted. NATIVE_IFINDEX is the bench's uplink (imds0) and
 * NODE_NET/NODE_PREFIX the node's own addresses, given with -D at compile time. */
#include "standin.h"

SEC("tc")
int cil_skip_fib(struct __sk_buff *skb)
{
	struct iphdr *ip = ipv4_of(skb);
	__u32 mask = NODE_PREFIX ? ~0u << (32 - NODE_PREFIX) : 0;

	if (!ip)
		return TC_ACT_UNSPEC;
	if ((bpf_ntohl(ip->daddr) & mask) == NODE_NET)
		return TC_ACT_UNSPEC;
	return bpf_redirect_neigh(NATIVE_IFINDEX, 0, 0, 0);
}
