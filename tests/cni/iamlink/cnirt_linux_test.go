package iamlink_test

// cnirt (tests/cni/cnirt), the runtime the e2e harness and the benchmarks use, driving the
// chain in the node namespace as containerd's CRI plugin does for one pod.

import (
	"encoding/json"
	"net"
	"os"
	"path/filepath"

	. "github.com/onsi/ginkgo"
	. "github.com/onsi/gomega"
)

var _ = Describe("cnirt", func() {
	var n *node

	BeforeEach(func() {
		expectIamlinkBinary()
		n = newNode()
	})
	AfterEach(func() { n.destroy() })

	It("drives the chain the way containerd does: ADD, CHECK, DEL, then DEL with empty netns and no cache", func() {
		Expect(cnirtPath).To(BeAnExistingFile(), "run tests/cni/build.sh or set CNIRT")
		p := n.newPod("web")
		listFile := filepath.Join(n.dir, "10-iamlink.conflist")
		Expect(os.WriteFile(listFile, n.chain("1.0.0").Bytes, 0o644)).To(Succeed())
		cnirt := func(args ...string) (stdout string, code int) {
			common := []string{"--conflist", listFile, "--bin-dir", iamlinkDir + ":" + refPluginDir,
				"--cid", p.cid, "--args", p.argsString(), "--cache-dir", filepath.Join(n.dir, "cnirt-cache")}
			r := n.runCommand(nil, "", cnirtPath, append(args, common...)...)
			return string(r.stdout), r.exitCode
		}

		out, code := cnirt("add", "--netns", p.netnsPath)
		Expect(code).To(Equal(0), out)
		var result struct {
			CNIVersion string `json:"cniVersion"`
			IPs        []struct {
				Address string `json:"address"`
			} `json:"ips"`
		}
		Expect(json.Unmarshal([]byte(out), &result)).To(Succeed())
		Expect(result.CNIVersion).To(Equal("1.0.0"))
		Expect(result.IPs).To(HaveLen(1))
		_, subnet, _ := net.ParseCIDR(podSubnet)
		ip, _, err := net.ParseCIDR(result.IPs[0].Address)
		Expect(err).NotTo(HaveOccurred())
		Expect(subnet.Contains(ip)).To(BeTrue())
		Expect(n.recordPath(p)).To(BeAnExistingFile())

		out, code = cnirt("check", "--netns", p.netnsPath)
		Expect(code).To(Equal(0), out)
		out, code = cnirt("del", "--netns", p.netnsPath)
		Expect(code).To(Equal(0), out)
		Expect(n.recordPath(p)).NotTo(BeAnExistingFile())
		p.destroy()
		out, code = cnirt("del", "--netns", "", "--no-cache")
		Expect(code).To(Equal(0), out)

		// A failing plugin: cnirt exits 1 and prints the CNI error on stdout.
		out, code = cnirt("check", "--netns", "/nonexistent/netns")
		Expect(code).To(Equal(1))
		Expect(out).To(ContainSubstring(`"code"`))
	})
})
