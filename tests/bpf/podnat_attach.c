// Attaches the program of a BPF object by tcx at the tail of an interface's ingress, as a
// dataplane does, and holds the link until killed (the link goes with this process).
//   podnat_attach OBJECT PROGRAM IFNAME
#include <errno.h>
#include <net/if.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#define ATTACH_TCX_INGRESS 46 /* BPF_TCX_INGRESS, newer than libbpf 1.1's headers */

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s OBJECT PROGRAM IFNAME\n", argv[0]);
		return 2;
	}
	unsigned int ifindex = if_nametoindex(argv[3]);
	if (!ifindex) {
		fprintf(stderr, "no interface %s\n", argv[3]);
		return 1;
	}
	struct bpf_object *obj = bpf_object__open_file(argv[1], NULL);
	if (!obj || bpf_object__load(obj)) {
		fprintf(stderr, "cannot load %s: %s\n", argv[1], strerror(errno));
		return 1;
	}
	struct bpf_program *prog = bpf_object__find_program_by_name(obj, argv[2]);
	if (!prog) {
		fprintf(stderr, "no program %s in %s\n", argv[2], argv[1]);
		return 1;
	}
	int link = bpf_link_create(bpf_program__fd(prog), ifindex, ATTACH_TCX_INGRESS, NULL);
	if (link < 0) {
		fprintf(stderr, "tcx attach to %s failed: %s\n", argv[3], strerror(-link));
		return 1;
	}
	printf("attached\n");
	fflush(stdout);
	pause();
	return 0;
}
