/* Cilium with BPF host routing and several native devices (bpf/bpf_lxc.c
 * handle_ipv4_from_lxc, bpf/lib/fib.h): FIB lookup, drop when it fails (DROP_NO_FIB);
 * node-addressed traffic (a local route: not forwarded) goes up the stack. */
#include "standin.h"

SEC("tc")
int cil_fib_standin(struct __sk_buff *skb)
{
	struct iphdr *ip = ipv4_of(skb);
	__u32 ifindex = 0;
	long rc;

	if (!ip)
		return TC_ACT_UNSPEC;
	rc = fib_lookup(skb, ip, &ifindex);
	if (rc == BPF_FIB_LKUP_RET_NOT_FWDED)
		return TC_ACT_UNSPEC;
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return TC_ACT_SHOT;
	return bpf_redirect_neigh(ifindex, 0, 0, 0);
}
