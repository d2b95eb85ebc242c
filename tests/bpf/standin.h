/* What the three dataplane stand-ins share: the IPv4 header of a pod's packet, from the
 * Ethernet frame a veth delivers. Test code only, compiled by clang at test time
 * (tests/harness/tcx.py); the license string below is the kernel's condition for
 * bpf_fib_lookup, a GPL-only helper, which is why these are not part of any binary. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef AF_INET
#define AF_INET 2
#endif

char LICENSE[] SEC("license") = "GPL";

static __always_inline struct iphdr *ipv4_of(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);

	if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return 0;
	return ip;
}

/* bpf_fib_lookup with flags 0 (ip rules apply), as Calico's forward_or_drop and Cilium's fib.h
 * call it; fills *ifindex with the egress device. */
static __always_inline long fib_lookup(struct __sk_buff *skb, struct iphdr *ip, __u32 *ifindex)
{
	struct bpf_fib_lookup fib = {};

	fib.family = AF_INET;
	fib.tos = ip->tos;
	fib.l4_protocol = ip->protocol;
	fib.tot_len = bpf_ntohs(ip->tot_len);
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	fib.ifindex = skb->ingress_ifindex;
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	*ifindex = fib.ifindex;
	return rc;
}
