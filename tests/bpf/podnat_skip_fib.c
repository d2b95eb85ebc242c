// A stand-in for Cilium's BPF host routing with one native device (ENABLE_SKIP_FIB): every IPv4
// packet from the pod addressed off the node is handed to the uplink by bpf_redirect_neigh, past
// the node's netfilter hooks and routing-policy rules. Packets addressed to the node itself go on
// to the stack (TCX_NEXT), as both dataplanes deliver node-addressed traffic.
//
// "Off the node" in the test bench is 169.254.0.0/16 (the metadata and credentials addresses);
// the uplink's index is compiled in: clang -DUPLINK_IFINDEX=N.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef UPLINK_IFINDEX
#error "compile with -DUPLINK_IFINDEX=<the uplink's ifindex>"
#endif

#define TCX_NEXT -1

SEC("tc")
int podnat_skip_fib(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);

	if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TCX_NEXT;
	if ((bpf_ntohl(ip->daddr) >> 16) != 0xa9fe) /* 169.254.0.0/16 */
		return TCX_NEXT;
	return bpf_redirect_neigh(UPLINK_IFINDEX, NULL, 0, 0);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
