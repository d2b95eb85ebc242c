package iamlink_test

// The test bench: a node (a network namespace of its own, where every plugin runs, as a
// runtime would run them in the host namespace), pods (netns made with testutils.NewNS), libcni
// driving the conflist, and readers for what iamlink leaves behind (store, nftables, routes).
// Nothing here touches the root network namespace.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	mathrand "math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	. "github.com/onsi/ginkgo"
	. "github.com/onsi/gomega"
	"github.com/vishvananda/netlink"
)

const (
	networkName     = "iamlink-test"
	daemonIP        = "198.18.0.1"
	daemonAddress   = daemonIP + ":8181"
	podSubnet       = "198.18.64.0/24"
	podGateway      = "198.18.64.1"
	metadataIP      = "169.254.169.254"
	credentialsIP   = "169.254.170.23" // the default credentialsAddress
	defaultMarkMask = 0x307f
	podIfname       = "eth0"
	callTimeout     = 30 * time.Second
)

// chainVersions are the spec versions libcni 1.1.x can drive a chain with.
var chainVersions = []string{"0.3.1", "0.4.0", "1.0.0"}

// shuffle orders CNI_ARGS differently on each call, as containerd does; seeded by Ginkgo's seed
// so a failing order can be replayed with -ginkgo.seed.
var shuffle = &lockedRand{r: mathrand.New(mathrand.NewSource(GinkgoRandomSeed()))}

// lockedRand is a math/rand source shared by concurrent ADDs.
type lockedRand struct {
	mu sync.Mutex
	r  *mathrand.Rand
}

func (l *lockedRand) Shuffle(n int, swap func(i, j int)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.r.Shuffle(n, swap)
}

// node is one test's node: its network namespace (lo up, holding the daemon address) and a
// temp dir with the store, host-local's data dir and libcni's result cache.
type node struct {
	ns       ns.NetNS
	dir      string
	storeDir string
	ipamDir  string
	exec     *recordingExec
	cni      *libcni.CNIConfig
	pods     []*pod
}

// pod is one sandbox: its netns and the identity the runtime passes in CNI_ARGS.
type pod struct {
	ns        ns.NetNS
	netnsPath string
	cid       string
	namespace string
	name      string
	uid       string
}

func newNode() *node {
	dir, err := os.MkdirTemp("", "iamlink-cni-test-")
	Expect(err).NotTo(HaveOccurred())
	n := &node{dir: dir, storeDir: filepath.Join(dir, "store"), ipamDir: filepath.Join(dir, "ipam")}
	n.ns, err = testutils.NewNS()
	Expect(err).NotTo(HaveOccurred())
	n.do(func() {
		lo, err := netlink.LinkByName("lo")
		Expect(err).NotTo(HaveOccurred())
		Expect(netlink.LinkSetUp(lo)).To(Succeed())
		addr, err := netlink.ParseAddr(daemonIP + "/32")
		Expect(err).NotTo(HaveOccurred())
		Expect(netlink.AddrAdd(lo, addr)).To(Succeed())
	})
	n.exec = &recordingExec{DefaultExec: invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: GinkgoWriter}}}
	n.cni = n.cniWithCache(filepath.Join(dir, "cache"))
	return n
}

// cniWithCache is libcni as a runtime holds it, with the given result cache; a fresh, empty
// cache gives DEL no prevResult, as containerd's last DEL.
func (n *node) cniWithCache(cacheDir string) *libcni.CNIConfig {
	return libcni.NewCNIConfigWithCacheDir([]string{iamlinkDir, refPluginDir}, cacheDir, n.exec)
}

// destroy removes the pods' and the node's namespaces (with every veth and nft rule in them)
// and the temp dir. Safe on a half-built node.
func (n *node) destroy() {
	for _, p := range n.pods {
		p.destroy()
	}
	if n.ns != nil {
		Expect(n.ns.Close()).To(Succeed())
		Expect(testutils.UnmountNS(n.ns)).To(Succeed())
		n.ns = nil
	}
	Expect(os.RemoveAll(n.dir)).To(Succeed())
}

// do runs f on a thread inside the node's netns; Gomega failures inside are reported.
func (n *node) do(f func()) {
	Expect(n.ns.Do(func(ns.NetNS) error {
		defer GinkgoRecover()
		f()
		return nil
	})).To(Succeed())
}

func (n *node) newPod(name string) *pod {
	podNS, err := testutils.NewNS()
	Expect(err).NotTo(HaveOccurred())
	p := &pod{ns: podNS, netnsPath: podNS.Path(), cid: randomHex(32),
		namespace: "team-a", name: name, uid: uuid()}
	n.pods = append(n.pods, p)
	return p
}

// destroy closes and unmounts the pod's netns, which deletes its veth pair.
func (p *pod) destroy() {
	if p.ns != nil {
		Expect(p.ns.Close()).To(Succeed())
		Expect(testutils.UnmountNS(p.ns)).To(Succeed())
		p.ns = nil
	}
}

// args is the pod's CNI_ARGS as containerd builds them, in a new order on each call.
func (p *pod) args() [][2]string {
	args := [][2]string{
		{"IgnoreUnknown", "1"},
		{"K8S_POD_NAMESPACE", p.namespace},
		{"K8S_POD_NAME", p.name},
		{"K8S_POD_INFRA_CONTAINER_ID", p.cid},
		{"K8S_POD_UID", p.uid},
	}
	shuffle.Shuffle(len(args), func(i, j int) { args[i], args[j] = args[j], args[i] })
	return args
}

func (p *pod) argsString() string {
	var kv []string
	for _, a := range p.args() {
		kv = append(kv, a[0]+"="+a[1])
	}
	return strings.Join(kv, ";")
}

// rt is the runtime conf for an ADD/CHECK/DEL of this pod; netns may be "" (a late DEL).
func (p *pod) rt(netns string) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{ContainerID: p.cid, NetNS: netns, IfName: podIfname, Args: p.args()}
}

// iamlinkConf is iamlink's entry in the conflist, as ARCHITECTURE.md's netconf with defaults.
func (n *node) iamlinkConf() map[string]interface{} {
	return map[string]interface{}{"type": "iamlink", "daemonAddress": daemonAddress, "storeDir": n.storeDir}
}

// ptpConf is the primary plugin: ptp + host-local on the pod subnet, no routes of its own.
func (n *node) ptpConf() map[string]interface{} {
	return map[string]interface{}{"type": "ptp", "ipam": map[string]interface{}{
		"type": "host-local", "subnet": podSubnet, "dataDir": n.ipamDir}}
}

func conflist(cniVersion string, plugins ...map[string]interface{}) *libcni.NetworkConfigList {
	b, err := json.Marshal(map[string]interface{}{"cniVersion": cniVersion, "name": networkName, "plugins": plugins})
	Expect(err).NotTo(HaveOccurred())
	list, err := libcni.ConfListFromBytes(b)
	Expect(err).NotTo(HaveOccurred())
	return list
}

// chain is the conflist under test: ptp + host-local, then iamlink.
func (n *node) chain(cniVersion string) *libcni.NetworkConfigList {
	return conflist(cniVersion, n.ptpConf(), n.iamlinkConf())
}

func (n *node) add(list *libcni.NetworkConfigList, p *pod) (result types.Result, err error) {
	n.do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		defer cancel()
		result, err = n.cni.AddNetworkList(ctx, list, p.rt(p.netnsPath))
	})
	return result, err
}

// mustAdd adds the pod and returns ptp's host-side veth, as the result names it.
func (n *node) mustAdd(list *libcni.NetworkConfigList, p *pod) (*current.Result, string) {
	result, err := n.add(list, p)
	Expect(err).NotTo(HaveOccurred())
	res, err := current.NewResultFromResult(result)
	Expect(err).NotTo(HaveOccurred())
	return res, hostVeth(res)
}

func (n *node) check(list *libcni.NetworkConfigList, p *pod) (err error) {
	n.do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		defer cancel()
		err = n.cni.CheckNetworkList(ctx, list, p.rt(p.netnsPath))
	})
	return err
}

// del runs DelNetworkList with cni (n.cni, or one with an empty cache) and the given netns.
func (n *node) del(cni *libcni.CNIConfig, list *libcni.NetworkConfigList, p *pod, netns string) (err error) {
	n.do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		defer cancel()
		err = cni.DelNetworkList(ctx, list, p.rt(netns))
	})
	return err
}

// hostVeth is the result's host-side interface (the one without a sandbox).
func hostVeth(res *current.Result) string {
	for _, iface := range res.Interfaces {
		if iface.Sandbox == "" {
			return iface.Name
		}
	}
	Fail(fmt.Sprintf("no host interface in result %+v", res))
	return ""
}

// ifindex is the index of a link in the node's namespace.
func (n *node) ifindex(name string) (index int) {
	n.do(func() {
		link, err := netlink.LinkByName(name)
		Expect(err).NotTo(HaveOccurred())
		index = link.Attrs().Index
	})
	return index
}

// --- The store (ARCHITECTURE.md "The store") ---

type record struct {
	ContainerID   string `json:"containerId"`
	Ifname        string `json:"ifname"`
	Network       string `json:"network"`
	Slot          int    `json:"slot"`
	HostInterface struct {
		Name   string `json:"name"`
		Index  int    `json:"index"`
		Source string `json:"source"`
	} `json:"hostInterface"`
	Netns string `json:"netns"`
	Pod   struct {
		Namespace string `json:"namespace"`
		Name      string `json:"name"`
		UID       string `json:"uid"`
	} `json:"pod"`
	IPs                []string          `json:"ips"`
	Created            string            `json:"created"`
	CreatedBoottimeNs  uint64            `json:"createdBoottimeNs"`
	RuntimeAnnotations map[string]string `json:"runtimeAnnotations"`
}

// recordFields are the keys ARCHITECTURE.md gives a record.
var recordFields = []string{"containerId", "ifname", "network", "slot", "hostInterface", "netns",
	"pod", "ips", "created", "createdBoottimeNs"}

func (n *node) recordPath(p *pod) string {
	return filepath.Join(n.storeDir, "records", p.cid+"."+podIfname+".json")
}

func (n *node) slotPath(slot int) string {
	return filepath.Join(n.storeDir, "slots", fmt.Sprint(slot))
}

// readRecord parses the pod's record, and its raw keys to check the field names.
func (n *node) readRecord(p *pod) (rec record, keys map[string]json.RawMessage) {
	b, err := os.ReadFile(n.recordPath(p))
	Expect(err).NotTo(HaveOccurred())
	Expect(json.Unmarshal(b, &keys)).To(Succeed(), "record %s: %s", n.recordPath(p), b)
	Expect(json.Unmarshal(b, &rec)).To(Succeed(), "record %s: %s", n.recordPath(p), b)
	return rec, keys
}

// slotLinks is slot number -> link target for every link in slots/.
func (n *node) slotLinks() map[string]string {
	links := map[string]string{}
	entries, err := os.ReadDir(filepath.Join(n.storeDir, "slots"))
	if errors.Is(err, os.ErrNotExist) {
		return links
	}
	Expect(err).NotTo(HaveOccurred())
	for _, e := range entries {
		target, err := os.Readlink(filepath.Join(n.storeDir, "slots", e.Name()))
		Expect(err).NotTo(HaveOccurred(), "slots/%s is not a symlink", e.Name())
		links[e.Name()] = target
	}
	return links
}

// --- The interception rule set (ARCHITECTURE.md), read with `nft -j` in the node namespace ---

func (n *node) nft(args ...string) (stdout []byte, err error) {
	n.do(func() {
		var stderr bytes.Buffer
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		defer cancel()
		cmd := exec.CommandContext(ctx, "nft", args...)
		cmd.Stderr = &stderr
		stdout, err = cmd.Output()
		if err != nil {
			err = fmt.Errorf("nft %s: %v: %s", strings.Join(args, " "), err, stderr.String())
		}
	})
	return stdout, err
}

// nftObjects is `nft -j list ...`'s list of objects, each {"kind": {...}}.
func (n *node) nftObjects(args ...string) []map[string]json.RawMessage {
	out, err := n.nft(append([]string{"-j", "list"}, args...)...)
	Expect(err).NotTo(HaveOccurred())
	var doc struct {
		Nftables []map[string]json.RawMessage `json:"nftables"`
	}
	Expect(json.Unmarshal(out, &doc)).To(Succeed(), "nft output: %s", out)
	return doc.Nftables
}

// podEntries is the `pods` map: host interface name -> jump target ("slot-<n>").
func (n *node) podEntries() map[string]string {
	entries := map[string]string{}
	for _, obj := range n.nftObjects("map", "inet", "iamlink", "pods") {
		raw, ok := obj["map"]
		if !ok {
			continue
		}
		var m struct {
			Elem [][2]json.RawMessage `json:"elem"`
		}
		Expect(json.Unmarshal(raw, &m)).To(Succeed(), "map: %s", raw)
		for _, kv := range m.Elem {
			var verdict struct {
				Jump struct {
					Target string `json:"target"`
				} `json:"jump"`
			}
			Expect(json.Unmarshal(kv[1], &verdict)).To(Succeed(), "element value: %s", kv[1])
			entries[nftElemKey(kv[0])] = verdict.Jump.Target
		}
	}
	return entries
}

// nftElemKey reads a set element key: a plain string, or {"elem": {"val": "..."}} when the
// element carries a comment or timeout.
func nftElemKey(raw json.RawMessage) string {
	var key string
	if json.Unmarshal(raw, &key) == nil {
		return key
	}
	var wrapped struct {
		Elem struct {
			Val string `json:"val"`
		} `json:"elem"`
	}
	Expect(json.Unmarshal(raw, &wrapped)).To(Succeed(), "element key: %s", raw)
	return wrapped.Elem.Val
}

type nftChain struct {
	Name   string `json:"name"`
	Type   string `json:"type"`
	Hook   string `json:"hook"`
	Prio   int    `json:"prio"`
	Policy string `json:"policy"`
}

type nftRule struct {
	Chain string            `json:"chain"`
	Expr  []json.RawMessage `json:"expr"`
}

// table is table inet iamlink's chains by name and rules by chain.
func (n *node) table() (chains map[string]nftChain, rules map[string][]nftRule) {
	chains, rules = map[string]nftChain{}, map[string][]nftRule{}
	for _, obj := range n.nftObjects("table", "inet", "iamlink") {
		if raw, ok := obj["chain"]; ok {
			var c nftChain
			Expect(json.Unmarshal(raw, &c)).To(Succeed())
			chains[c.Name] = c
		}
		if raw, ok := obj["rule"]; ok {
			var r nftRule
			Expect(json.Unmarshal(raw, &r)).To(Succeed())
			rules[r.Chain] = append(rules[r.Chain], r)
		}
	}
	return chains, rules
}

// slotMark scatters the slot's bits into the set bits of mask, lowest first (ARCHITECTURE.md).
func slotMark(slot int, mask uint32) uint32 {
	var mark uint32
	for bit := uint(0); bit < 32 && slot != 0; bit++ {
		if mask&(1<<bit) != 0 {
			if slot&1 != 0 {
				mark |= 1 << bit
			}
			slot >>= 1
		}
	}
	return mark
}

// --- The pod's side ---

// route is the pod's IPv4 route to dst/32 on eth0, or nil.
func (p *pod) route(dst string) (found *netlink.Route) {
	Expect(p.ns.Do(func(ns.NetNS) error {
		defer GinkgoRecover()
		link, err := netlink.LinkByName(podIfname)
		Expect(err).NotTo(HaveOccurred())
		routes, err := netlink.RouteList(link, netlink.FAMILY_V4)
		Expect(err).NotTo(HaveOccurred())
		for i, r := range routes {
			if r.Dst != nil && r.Dst.String() == dst+"/32" {
				found = &routes[i]
			}
		}
		return nil
	})).To(Succeed())
	return found
}

// deleteRoute removes the pod's route to dst/32 on its interface, as an operator's mistake would.
func (p *pod) deleteRoute(dst string) {
	r := p.route(dst)
	Expect(r).NotTo(BeNil(), "no route to %s/32 to delete", dst)
	Expect(p.ns.Do(func(ns.NetNS) error { return netlink.RouteDel(r) })).To(Succeed())
}

// reachable tells whether the pod's routing table has any path to ip.
func (p *pod) reachable(ip string) (ok bool) {
	Expect(p.ns.Do(func(ns.NetNS) error {
		_, err := netlink.RouteGet(net.ParseIP(ip))
		ok = err == nil
		return nil
	})).To(Succeed())
	return ok
}

// --- Running plugins ---

// pluginCall is one plugin execution seen by libcni: what it got and what it printed.
type pluginCall struct {
	plugin  string
	command string
	stdin   []byte
	stdout  []byte
}

// recordingExec is libcni's default exec that keeps every call, so that a test can compare
// what a plugin received with what it returned, byte for byte.
type recordingExec struct {
	invoke.DefaultExec
	mu    sync.Mutex
	calls []pluginCall
}

func (e *recordingExec) ExecPlugin(ctx context.Context, path string, stdin []byte, env []string) ([]byte, error) {
	out, err := e.DefaultExec.ExecPlugin(ctx, path, stdin, env)
	call := pluginCall{plugin: filepath.Base(path), stdin: stdin, stdout: out}
	for _, kv := range env {
		if strings.HasPrefix(kv, "CNI_COMMAND=") {
			call.command = strings.TrimPrefix(kv, "CNI_COMMAND=")
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.calls = append(e.calls, call)
	return out, err
}

// lastCall is the latest call of plugin with command.
func (e *recordingExec) lastCall(plugin, command string) pluginCall {
	e.mu.Lock()
	defer e.mu.Unlock()
	for i := len(e.calls) - 1; i >= 0; i-- {
		if c := e.calls[i]; c.plugin == plugin && c.command == command {
			return c
		}
	}
	Fail(fmt.Sprintf("%s was not called with %s", plugin, command))
	return pluginCall{}
}

var _ invoke.Exec = &recordingExec{}

// run is one direct execution of a program in the node namespace.
type run struct {
	exitCode int
	stdout   []byte
	stderr   []byte
}

// runIamlink executes the plugin in the node namespace with exactly the given CNI_* variables
// (others from the test's environment, e.g. PATH for nft) and stdin.
func (n *node) runIamlink(cniEnv map[string]string, stdin string) run {
	return n.runCommand(cniEnv, stdin, filepath.Join(iamlinkDir, "iamlink"))
}

// runCommand runs path with args in the node namespace; the environment is the test's without
// CNI_* variables, plus env.
func (n *node) runCommand(env map[string]string, stdin string, path string, args ...string) (r run) {
	n.do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		defer cancel()
		cmd := exec.CommandContext(ctx, path, args...)
		for _, kv := range os.Environ() {
			if !strings.HasPrefix(kv, "CNI_") {
				cmd.Env = append(cmd.Env, kv)
			}
		}
		for k, v := range env {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
		cmd.Stdin = strings.NewReader(stdin)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		var exitErr *exec.ExitError
		if errors.As(err, &exitErr) {
			r.exitCode = exitErr.ExitCode()
		} else {
			Expect(err).NotTo(HaveOccurred())
		}
		r.stdout, r.stderr = stdout.Bytes(), stderr.Bytes()
		fmt.Fprintf(GinkgoWriter, "%s %s %v -> exit %d\nstdout: %s\nstderr: %s\n",
			filepath.Base(path), env["CNI_COMMAND"], args, r.exitCode, r.stdout, r.stderr)
	})
	return r
}

// cniEnv is the environment a runtime gives a plugin for command on this pod.
func (p *pod) cniEnv(command string) map[string]string {
	return map[string]string{
		"CNI_COMMAND":     command,
		"CNI_CONTAINERID": p.cid,
		"CNI_NETNS":       p.netnsPath,
		"CNI_IFNAME":      podIfname,
		"CNI_PATH":        iamlinkDir + string(os.PathListSeparator) + refPluginDir,
		"CNI_ARGS":        p.argsString(),
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, err := rand.Read(b)
	Expect(err).NotTo(HaveOccurred())
	return hex.EncodeToString(b)
}

func uuid() string {
	h := randomHex(16)
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}
