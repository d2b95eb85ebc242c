/* Calico eBPF's from-workload path for an off-node packet (felix/bpf-gpl/fib_co_re.h,
 * forward_or_drop): FIB lookup, then bpf_redirect_neigh past netfilter; on a failed lookup back
 * to the stack. Node-addressed traffic (a local route) goes up the stack too. */
#include "standin.h"

SEC("tc")
int cali_tc_standin(struct __sk_buff *skb)
{
	struct iphdr *ip = ipv4_of(skb);
	__u32 ifindex = 0;

	if (!ip)
		return TC_ACT_UNSPEC;
	if (fib_lookup(skb, ip, &ifindex) != BPF_FIB_LKUP_RET_SUCCESS)
		return TC_ACT_UNSPEC;
	return bpf_redirect_neigh(ifindex, 0, 0, 0);
}
