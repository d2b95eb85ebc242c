// Command cnirt is a minimal CNI runtime: it drives a conflist through libcni, the library
// containerd and CRI-O use, so that plugins see exactly what they see on a node.
//
// Usage (stable; the e2e harness and the benchmarks call it):
//
//	cnirt add|check|del --conflist FILE --bin-dir DIR1[:DIR2] --netns PATH --cid ID
//	      [--ifname eth0] [--args 'K=V;K=V'] [--cache-dir DIR] [--no-cache] [--timeout 60s]
//
//	add    AddNetworkList: runs the chain in order, prints the final result JSON on stdout
//	       (in the conflist's cniVersion) and caches it under --cache-dir.
//	check  CheckNetworkList: runs CHECK with the cached result as prevResult (cniVersion >= 0.4.0).
//	del    DelNetworkList: runs the chain in reverse with the cached result as prevResult
//	       (cniVersion >= 0.4.0) and removes the cache entry. --netns "" is allowed here, as in
//	       containerd's second DEL.
//
//	--cache-dir  libcni's result cache (default /var/lib/cni, as containerd).
//	--no-cache   use a fresh, empty cache that is thrown away: DEL/CHECK get no prevResult and
//	             ADD leaves nothing behind. With --netns "" this is containerd's RemovePodSandbox DEL.
//	--args       CNI_ARGS pairs, passed in the given order, e.g.
//	             'IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=id;K8S_POD_UID=u'
//
// Plugins run in cnirt's own network namespace (the "node"); use `ip netns exec NODE cnirt ...`
// to run them elsewhere. Plugins' stderr is passed through to cnirt's stderr.
//
// Exit status: 0 on success; 1 when a plugin or libcni fails: then the error is printed on stderr
// and, when it is a CNI error, its JSON {"code":N,"msg":"...","details":"..."} on stdout;
// 2 on a usage error.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
)

// usageError is a bad command line (exit status 2).
type usageError string

func (e usageError) Error() string { return string(e) }

func main() {
	err := run(os.Args[1:])
	if err == nil {
		return
	}
	fmt.Fprintf(os.Stderr, "cnirt: %v\n", err)
	var usage usageError
	if errors.As(err, &usage) {
		fmt.Fprintln(os.Stderr, "usage: cnirt add|check|del --conflist FILE --bin-dir DIR1[:DIR2] --netns PATH "+
			"--cid ID [--ifname eth0] [--args 'K=V;K=V'] [--cache-dir DIR] [--no-cache] [--timeout 60s]")
		os.Exit(2)
	}
	var cniErr *types.Error
	if errors.As(err, &cniErr) {
		_ = json.NewEncoder(os.Stdout).Encode(cniErr)
	}
	os.Exit(1)
}

func run(argv []string) error {
	if len(argv) < 1 {
		return usageError("missing command")
	}
	cmd := argv[0]
	fs := flag.NewFlagSet("cnirt "+cmd, flag.ContinueOnError)
	conflist := fs.String("conflist", "", "network configuration list file")
	binDir := fs.String("bin-dir", "", "plugin directories, ':'-separated (CNI_PATH)")
	netns := fs.String("netns", "", "network namespace path (may be empty for del)")
	cid := fs.String("cid", "", "container ID")
	ifname := fs.String("ifname", "eth0", "interface name in the container")
	cniArgs := fs.String("args", "", "CNI_ARGS, 'K=V;K=V'")
	cacheDir := fs.String("cache-dir", libcni.CacheDir, "libcni result cache directory")
	noCache := fs.Bool("no-cache", false, "use a throw-away empty cache (no prevResult on check/del)")
	timeout := fs.Duration("timeout", 60*time.Second, "overall deadline for the plugin calls")
	annotations := fs.String("pod-annotations", "", "pod annotations as a JSON object, passed as containerd "+
		"passes them: capability io.kubernetes.cri.pod-annotations (runtimeConfig of plugins that declare it)")
	if err := fs.Parse(argv[1:]); err != nil {
		return usageError(err.Error())
	}
	netnsGiven := false
	fs.Visit(func(f *flag.Flag) { netnsGiven = netnsGiven || f.Name == "netns" })
	switch {
	case cmd != "add" && cmd != "check" && cmd != "del":
		return usageError(fmt.Sprintf("unknown command %q", cmd))
	case fs.NArg() != 0:
		return usageError(fmt.Sprintf("unexpected arguments %q", fs.Args()))
	case *conflist == "" || *binDir == "" || *cid == "":
		return usageError("--conflist, --bin-dir and --cid are required")
	case !netnsGiven || (*netns == "" && cmd != "del"):
		return usageError("--netns is required (it may be empty only for del)")
	}
	args, err := parseArgs(*cniArgs)
	if err != nil {
		return usageError(fmt.Sprintf("--args: %v", err))
	}

	list, err := libcni.ConfListFromFile(*conflist)
	if err != nil {
		return err
	}
	if *noCache {
		if *cacheDir, err = os.MkdirTemp("", "cnirt-cache-"); err != nil {
			return err
		}
		defer os.RemoveAll(*cacheDir)
	}
	cni := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(*binDir), *cacheDir, nil)
	rt := &libcni.RuntimeConf{ContainerID: *cid, NetNS: *netns, IfName: *ifname, Args: args}
	if *annotations != "" {
		var pod map[string]string
		if err := json.Unmarshal([]byte(*annotations), &pod); err != nil {
			return usageError(fmt.Sprintf("--pod-annotations: %v", err))
		}
		// containerd (go-cni WithCapability) hands libcni the pod's annotations the same way.
		rt.CapabilityArgs = map[string]interface{}{"io.kubernetes.cri.pod-annotations": pod}
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()

	switch cmd {
	case "add":
		result, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			return err
		}
		if err := result.PrintTo(os.Stdout); err != nil {
			return err
		}
		fmt.Println()
		return nil
	case "check":
		return cni.CheckNetworkList(ctx, list, rt)
	default:
		return cni.DelNetworkList(ctx, list, rt)
	}
}

// parseArgs splits 'K=V;K=V' into pairs, keeping their order.
func parseArgs(s string) ([][2]string, error) {
	var pairs [][2]string
	for _, kv := range strings.Split(s, ";") {
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("%q is not K=V", kv)
		}
		pairs = append(pairs, [2]string{k, v})
	}
	return pairs, nil
}
