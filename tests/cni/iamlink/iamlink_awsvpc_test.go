package iamlink_test

// aws-vpc-cni cannot run here (it needs the EC2 API), so these tests build what it leaves on a
// node by hand: a veth whose host side is named "eni" + the first 11 hex digits of
// sha1(namespace.name) — the same name for a recreated StatefulSet pod — a pod default route via
// 169.254.1.1 with a static ARP entry, and its 0.4.0 result shape ("mac":"0" for the host side).
// iamlink is then executed directly with that prevResult, as libcni would.

import (
	"crypto/sha1"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"

	"github.com/containernetworking/plugins/pkg/ns"
	. "github.com/onsi/ginkgo"
	. "github.com/onsi/gomega"
	"github.com/vishvananda/netlink"
)

// eniName is aws-vpc-cni's host interface name for a pod.
func eniName(p *pod) string {
	sum := sha1.Sum([]byte(p.namespace + "." + p.name))
	return "eni" + hex.EncodeToString(sum[:])[:11]
}

// plumbLikeAwsVpcCni makes the pod's veth pair and routes the way aws-vpc-cni does.
func (n *node) plumbLikeAwsVpcCni(p *pod, ip string) {
	host := eniName(p)
	n.do(func() {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: host}, PeerName: "tmp" + p.cid[:8]}
		Expect(netlink.LinkAdd(veth)).To(Succeed())
		peer, err := netlink.LinkByName(veth.PeerName)
		Expect(err).NotTo(HaveOccurred())
		Expect(netlink.LinkSetNsFd(peer, int(p.ns.Fd()))).To(Succeed())
		hostLink, err := netlink.LinkByName(host)
		Expect(err).NotTo(HaveOccurred())
		Expect(netlink.LinkSetUp(hostLink)).To(Succeed())
	})
	Expect(p.ns.Do(func(ns.NetNS) error {
		defer GinkgoRecover()
		link, err := netlink.LinkByName("tmp" + p.cid[:8])
		Expect(err).NotTo(HaveOccurred())
		Expect(netlink.LinkSetName(link, podIfname)).To(Succeed())
		Expect(netlink.LinkSetUp(link)).To(Succeed())
		addr, err := netlink.ParseAddr(ip + "/32")
		Expect(err).NotTo(HaveOccurred())
		Expect(netlink.AddrAdd(link, addr)).To(Succeed())
		gw := net.ParseIP("169.254.1.1")
		Expect(netlink.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: &net.IPNet{IP: gw, Mask: net.CIDRMask(32, 32)}, Scope: netlink.SCOPE_LINK})).To(Succeed())
		Expect(netlink.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Gw: gw})).To(Succeed())
		mac, err := net.ParseMAC("02:00:00:00:00:01")
		Expect(err).NotTo(HaveOccurred())
		Expect(netlink.NeighAdd(&netlink.Neigh{LinkIndex: link.Attrs().Index, IP: gw, HardwareAddr: mac, State: netlink.NUD_PERMANENT})).To(Succeed())
		return nil
	})).To(Succeed())
}

// awsNetconf is iamlink's stdin behind aws-vpc-cni at 0.4.0, with aws-vpc-cni's result shape.
func (n *node) awsNetconf(p *pod, ip string, withPrev bool) string {
	conf := n.iamlinkConf()
	conf["cniVersion"] = "0.4.0"
	conf["name"] = "aws-cni"
	if withPrev {
		conf["prevResult"] = map[string]interface{}{
			"cniVersion": "0.4.0",
			"interfaces": []map[string]interface{}{
				{"name": eniName(p), "mac": "0"},
				{"name": podIfname, "mac": "0", "sandbox": "0"},
			},
			"ips":   []map[string]interface{}{{"version": "4", "address": ip + "/32", "interface": 1}},
			"dns":   map[string]interface{}{},
			"x-aws": map[string]interface{}{"routeTableId": 2},
		}
	}
	b, err := json.Marshal(conf)
	Expect(err).NotTo(HaveOccurred())
	return string(b)
}

var _ = Describe("behind aws-vpc-cni (host interfaces named after the pod)", func() {
	var n *node

	BeforeEach(func() {
		expectIamlinkBinary()
		n = newNode()
	})
	AfterEach(func() { n.destroy() })

	It("returns aws-vpc-cni's result byte for byte and adds no route where the default route already reaches the node", func() {
		p := n.newPod("web-0")
		n.plumbLikeAwsVpcCni(p, "198.18.65.10")
		conf := n.awsNetconf(p, "198.18.65.10", true)
		r := n.runIamlink(p.cniEnv("ADD"), conf)
		Expect(r.exitCode).To(Equal(0), "stdout: %s\nstderr: %s", r.stdout, r.stderr)
		var sent struct {
			PrevResult json.RawMessage `json:"prevResult"`
		}
		Expect(json.Unmarshal([]byte(conf), &sent)).To(Succeed())
		Expect(r.stdout).To(MatchJSON(sent.PrevResult))
		Expect(p.route(metadataIP)).To(BeNil(), "iamlink must leave aws-vpc-cni's routes alone")
		rec, _ := n.readRecord(p)
		Expect(n.podEntries()).To(Equal(map[string]string{eniName(p): fmt.Sprintf("slot-%d", rec.Slot)}))
	})

	It("a late DEL of the old container keeps the record and entry of the new pod that reuses the host interface name", func() {
		old := n.newPod("db-0")
		n.plumbLikeAwsVpcCni(old, "198.18.65.20")
		r := n.runIamlink(old.cniEnv("ADD"), n.awsNetconf(old, "198.18.65.20", true))
		Expect(r.exitCode).To(Equal(0), "stdout: %s\nstderr: %s", r.stdout, r.stderr)
		oldRec, _ := n.readRecord(old)

		// The old sandbox dies without a DEL reaching iamlink yet (its veth goes with its netns);
		// the StatefulSet recreates db-0, whose host interface gets the same name.
		oldEnvLateDel := old.cniEnv("DEL")
		old.destroy()
		// The kernel tears a dead netns down asynchronously; its veth goes with it.
		Eventually(func() error {
			var err error
			n.do(func() { _, err = netlink.LinkByName(eniName(old)) })
			return err
		}, "10s", "20ms").Should(HaveOccurred(), "old host interface still present")
		fresh := n.newPod("db-0")
		Expect(eniName(fresh)).To(Equal(eniName(old)))
		n.plumbLikeAwsVpcCni(fresh, "198.18.65.21")
		r = n.runIamlink(fresh.cniEnv("ADD"), n.awsNetconf(fresh, "198.18.65.21", true))
		Expect(r.exitCode).To(Equal(0), "stdout: %s\nstderr: %s", r.stdout, r.stderr)
		freshRec, _ := n.readRecord(fresh)
		Expect(freshRec.Slot).NotTo(Equal(oldRec.Slot), "the old record still holds its slot until its DEL")
		Expect(n.podEntries()).To(Equal(map[string]string{eniName(fresh): fmt.Sprintf("slot-%d", freshRec.Slot)}))

		// Now the old container's late DEL arrives: empty netns, no prevResult.
		oldEnvLateDel["CNI_NETNS"] = ""
		r = n.runIamlink(oldEnvLateDel, n.awsNetconf(old, "", false))
		Expect(r.exitCode).To(Equal(0), "stdout: %s\nstderr: %s", r.stdout, r.stderr)

		Expect(n.recordPath(old)).NotTo(BeAnExistingFile())
		_, err := os.Lstat(n.slotPath(oldRec.Slot))
		Expect(os.IsNotExist(err)).To(BeTrue(), "the old slot link must go")
		after, _ := n.readRecord(fresh)
		Expect(after).To(Equal(freshRec), "the new pod's record is untouched")
		Expect(n.slotLinks()).To(HaveKeyWithValue(fmt.Sprint(freshRec.Slot), "../records/"+fresh.cid+".eth0.json"))
		Expect(n.podEntries()).To(Equal(map[string]string{eniName(fresh): fmt.Sprintf("slot-%d", freshRec.Slot)}))
		chains, _ := n.table()
		Expect(chains).To(HaveKey(fmt.Sprintf("slot-%d", freshRec.Slot)))
		Expect(chains).NotTo(HaveKey(fmt.Sprintf("slot-%d", oldRec.Slot)))
	})
})
