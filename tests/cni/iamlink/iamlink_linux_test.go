package iamlink_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containernetworking/plugins/pkg/testutils"
	. "github.com/onsi/ginkgo"
	. "github.com/onsi/gomega"
)

var _ = Describe("the test bench", func() {
	var n *node

	BeforeEach(func() { n = newNode() })
	AfterEach(func() { n.destroy() })

	// Without iamlink a ptp pod has no path to the metadata address: the route iamlink adds
	// is what the other tests see, not something the bench provides.
	It("ptp + host-local alone give the pod an address but no route to the metadata address", func() {
		p := n.newPod("bare")
		list := conflist("1.0.0", n.ptpConf())
		res, veth := n.mustAdd(list, p)
		Expect(res.IPs).To(HaveLen(1))
		Expect(res.IPs[0].Gateway.String()).To(Equal(podGateway))
		Expect(n.ifindex(veth)).To(BeNumerically(">", 0))
		Expect(p.reachable(metadataIP)).To(BeFalse())
		Expect(n.del(n.cni, list, p, p.netnsPath)).To(Succeed())
	})
})

var _ = Describe("iamlink chained after ptp", func() {
	var n *node

	BeforeEach(func() {
		expectIamlinkBinary()
		n = newNode()
	})
	AfterEach(func() { n.destroy() })

	for _, ver := range chainVersions {
		ver := ver

		// Exact comparison: within the same AddNetworkList, the recording exec keeps the
		// prevResult libcni handed to iamlink and iamlink's stdout; a chained plugin that only
		// records must print its prevResult as is. The list's result must also be ptp's own
		// output, so nothing was lost in libcni's conversions either.
		It(fmt.Sprintf("[%s] returns ptp's result unchanged", ver), func() {
			p := n.newPod("web")
			result, err := n.add(n.chain(ver), p)
			Expect(err).NotTo(HaveOccurred())

			iamlinkAdd := n.exec.lastCall("iamlink", "ADD")
			var stdin struct {
				PrevResult json.RawMessage `json:"prevResult"`
			}
			Expect(json.Unmarshal(iamlinkAdd.stdin, &stdin)).To(Succeed())
			Expect(stdin.PrevResult).NotTo(BeEmpty())
			Expect(string(iamlinkAdd.stdout)).To(MatchJSON(stdin.PrevResult))

			ptpAdd := n.exec.lastCall("ptp", "ADD")
			final, err := json.Marshal(result)
			Expect(err).NotTo(HaveOccurred())
			Expect(string(final)).To(MatchJSON(ptpAdd.stdout))
			Expect(result.Version()).To(Equal(ver))
		})

		It(fmt.Sprintf("[%s] records the pod in the store and links its slot", ver), func() {
			p := n.newPod("web")
			before := time.Now().UTC().Add(-time.Second)
			res, veth := n.mustAdd(n.chain(ver), p)

			rec, keys := n.readRecord(p)
			for _, k := range recordFields {
				Expect(keys).To(HaveKey(k), "ARCHITECTURE.md names the record field %q", k)
			}
			Expect(rec.ContainerID).To(Equal(p.cid))
			Expect(rec.Ifname).To(Equal(podIfname))
			Expect(rec.Network).To(Equal(networkName))
			Expect(rec.Pod.Namespace).To(Equal(p.namespace))
			Expect(rec.Pod.Name).To(Equal(p.name))
			Expect(rec.Pod.UID).To(Equal(p.uid))
			Expect(rec.HostInterface.Name).To(Equal(veth))
			Expect(rec.HostInterface.Index).To(Equal(n.ifindex(veth)))
			Expect(rec.HostInterface.Source).To(BeElementOf("peer-ifindex", "prev-result"))
			Expect(rec.Netns).To(Equal(p.netnsPath))
			Expect(rec.IPs).To(ConsistOf(res.IPs[0].Address.String()))
			created, err := time.Parse(time.RFC3339, rec.Created)
			Expect(err).NotTo(HaveOccurred())
			Expect(rec.Created).To(HaveSuffix("Z"))
			Expect(created).To(BeTemporally(">=", before.Truncate(time.Second)))
			Expect(created).To(BeTemporally("<=", time.Now().UTC().Add(time.Second)))
			Expect(rec.CreatedBoottimeNs).To(BeNumerically(">", 0))

			Expect(rec.Slot).To(BeNumerically(">=", 1))
			Expect(n.slotLinks()).To(Equal(map[string]string{
				fmt.Sprint(rec.Slot): filepath.Join("..", "records", p.cid+"."+podIfname+".json"),
			}))
			linked, err := filepath.EvalSymlinks(n.slotPath(rec.Slot))
			Expect(err).NotTo(HaveOccurred())
			Expect(linked).To(Equal(n.recordPath(p)))
		})

		It(fmt.Sprintf("[%s] maps the pod's host veth to its slot chain in the node's nftables", ver), func() {
			p := n.newPod("web")
			_, veth := n.mustAdd(n.chain(ver), p)
			rec, _ := n.readRecord(p)
			slotChain := fmt.Sprintf("slot-%d", rec.Slot)

			Expect(n.podEntries()).To(Equal(map[string]string{veth: slotChain}))

			chains, rules := n.table()
			Expect(chains).To(HaveKeyWithValue("identify", nftChain{
				Name: "identify", Type: "filter", Hook: "prerouting", Prio: -150, Policy: "accept"}))
			Expect(chains).To(HaveKey("identify-pod"))
			Expect(chains).To(HaveKeyWithValue("intercept", nftChain{
				Name: "intercept", Type: "nat", Hook: "prerouting", Prio: -110, Policy: "accept"}))
			Expect(chains).To(HaveKey(slotChain))
			Expect(rules[slotChain]).To(HaveLen(1))
			Expect(string(rules[slotChain][0].Expr[0])).To(MatchJSON(fmt.Sprintf(
				`{"mangle":{"key":{"meta":{"key":"mark"}},"value":{"|":[{"meta":{"key":"mark"}},%d]}}}`,
				slotMark(rec.Slot, defaultMarkMask))))
			intercept, err := json.Marshal(rules["intercept"])
			Expect(err).NotTo(HaveOccurred())
			Expect(string(intercept)).To(ContainSubstring(`{"dnat":{"family":"ip","addr":"198.18.0.1","port":8181}}`))
			identifyPod, err := json.Marshal(rules["identify-pod"])
			Expect(err).NotTo(HaveOccurred())
			Expect(string(identifyPod)).To(ContainSubstring(`"data":"@pods"`))
		})

		It(fmt.Sprintf("[%s] routes the metadata and credentials addresses via the pod's gateway", ver), func() {
			p := n.newPod("web")
			res, _ := n.mustAdd(n.chain(ver), p)
			gw := res.IPs[0].Gateway
			Expect(gw.String()).To(Equal(podGateway))
			for _, dst := range []string{metadataIP, credentialsIP} {
				r := p.route(dst)
				Expect(r).NotTo(BeNil(), "no route to %s/32 on %s in the pod", dst, podIfname)
				Expect(r.Gw.Equal(gw)).To(BeTrue(), "route to %s via %v, want %v", dst, r.Gw, gw)
			}
			Expect(p.reachable(metadataIP)).To(BeTrue())
		})

		if testutils.SpecVersionHasCHECK(ver) {
			It(fmt.Sprintf("[%s] passes CHECK, and fails it naming the record once that is deleted", ver), func() {
				p := n.newPod("web")
				list := n.chain(ver)
				n.mustAdd(list, p)
				Expect(n.check(list, p)).To(Succeed())

				Expect(os.Remove(n.recordPath(p))).To(Succeed())
				err := n.check(list, p)
				Expect(err).To(HaveOccurred())
				fmt.Fprintf(GinkgoWriter, "CHECK without record: %v\n", err)
				Expect(err.Error()).To(MatchRegexp(`(?i)record`))
			})

			It(fmt.Sprintf("[%s] fails CHECK naming a pod route deleted by hand, in explain's words", ver), func() {
				p := n.newPod("web")
				list := n.chain(ver)
				n.mustAdd(list, p)
				p.deleteRoute(metadataIP)
				err := n.check(list, p)
				Expect(err).To(HaveOccurred())
				fmt.Fprintf(GinkgoWriter, "CHECK without route: %v\n", err)
				Expect(err.Error()).To(ContainSubstring("iamlink check failed for pod"))
				Expect(err.Error()).To(ContainSubstring("pod route missing: the pod has no route to " + metadataIP))
				Expect(err.Error()).NotTo(ContainSubstring(credentialsIP), "the route left in place is not named")
			})
		}

		It(fmt.Sprintf("[%s] DEL removes the record, slot and map entry; later DELs succeed, also without netns", ver), func() {
			p := n.newPod("web")
			list := n.chain(ver)
			_, veth := n.mustAdd(list, p)
			rec, _ := n.readRecord(p)

			Expect(n.del(n.cni, list, p, p.netnsPath)).To(Succeed())
			Expect(n.recordPath(p)).NotTo(BeAnExistingFile())
			_, err := os.Lstat(n.slotPath(rec.Slot))
			Expect(os.IsNotExist(err)).To(BeTrue(), "slot link %d still there", rec.Slot)
			Expect(n.podEntries()).NotTo(HaveKey(veth))

			// libcni dropped its cache on the first DEL: this one has no prevResult.
			Expect(n.del(n.cni, list, p, p.netnsPath)).To(Succeed())

			// containerd's RemovePodSandbox: the netns is gone, CNI_NETNS is empty.
			p.destroy()
			Expect(n.del(n.cni, list, p, "")).To(Succeed())
			Expect(n.podEntries()).To(BeEmpty())
			Expect(n.slotLinks()).To(BeEmpty())
		})

		// A pod whose StopPodSandbox DEL never happened (or failed): the last DEL, with no netns
		// and no prevResult, must still clean up, since the record is keyed by container and ifname.
		It(fmt.Sprintf("[%s] a DEL with empty netns and no prevResult after the netns is gone still cleans up", ver), func() {
			p := n.newPod("web")
			list := n.chain(ver)
			_, veth := n.mustAdd(list, p)
			rec, _ := n.readRecord(p)

			p.destroy()
			emptyCache := n.cniWithCache(filepath.Join(n.dir, "empty-cache"))
			Expect(n.del(emptyCache, list, p, "")).To(Succeed())
			Expect(n.exec.lastCall("iamlink", "DEL").stdin).NotTo(ContainSubstring("prevResult"))
			Expect(n.recordPath(p)).NotTo(BeAnExistingFile())
			_, err := os.Lstat(n.slotPath(rec.Slot))
			Expect(os.IsNotExist(err)).To(BeTrue(), "slot link %d still there", rec.Slot)
			Expect(n.podEntries()).NotTo(HaveKey(veth))
		})
	}

	// containerd hands libcni the pod's annotations as the capability io.kubernetes.cri.pod-annotations;
	// libcni puts them into runtimeConfig only for plugins that declare the capability.
	It("records the pod's IAM annotations that the runtime passes, and only those", func() {
		annotations := map[string]string{
			"iam.amazonaws.com/role":        "web",
			"iam.amazonaws.com/external-id": "ext-1",
			"kubernetes.io/config.source":   "api",
		}
		withCapability := n.iamlinkConf()
		withCapability["capabilities"] = map[string]bool{"io.kubernetes.cri.pod-annotations": true}
		declared := conflist("1.0.0", n.ptpConf(), withCapability)

		p := n.newPod("annotated")
		var err error
		n.do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
			defer cancel()
			rt := p.rt(p.netnsPath)
			rt.CapabilityArgs = map[string]interface{}{"io.kubernetes.cri.pod-annotations": annotations}
			_, err = n.cni.AddNetworkList(ctx, declared, rt)
		})
		Expect(err).NotTo(HaveOccurred())
		Expect(string(n.exec.lastCall("iamlink", "ADD").stdin)).To(ContainSubstring("runtimeConfig"))
		rec, _ := n.readRecord(p)
		Expect(rec.RuntimeAnnotations).To(Equal(map[string]string{
			"iam.amazonaws.com/role": "web", "iam.amazonaws.com/external-id": "ext-1"}))

		// Without the capability libcni passes nothing, and the record says the runtime told nothing.
		q := n.newPod("undeclared")
		n.do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
			defer cancel()
			rt := q.rt(q.netnsPath)
			rt.CapabilityArgs = map[string]interface{}{"io.kubernetes.cri.pod-annotations": annotations}
			_, err = n.cni.AddNetworkList(ctx, n.chain("1.0.0"), rt)
		})
		Expect(err).NotTo(HaveOccurred())
		_, keys := n.readRecord(q)
		Expect(keys).NotTo(HaveKey("runtimeAnnotations"))
	})

	It("gives two pods different slots and map entries, and keeps one when the other is deleted", func() {
		list := n.chain("1.0.0")
		a, b := n.newPod("web-a"), n.newPod("web-b")
		_, vethA := n.mustAdd(list, a)
		_, vethB := n.mustAdd(list, b)
		recA, _ := n.readRecord(a)
		recB, _ := n.readRecord(b)
		Expect(recA.Slot).NotTo(Equal(recB.Slot))
		Expect(n.podEntries()).To(Equal(map[string]string{
			vethA: fmt.Sprintf("slot-%d", recA.Slot),
			vethB: fmt.Sprintf("slot-%d", recB.Slot),
		}))

		Expect(n.del(n.cni, list, a, a.netnsPath)).To(Succeed())
		Expect(n.podEntries()).To(Equal(map[string]string{vethB: fmt.Sprintf("slot-%d", recB.Slot)}))
		Expect(n.slotLinks()).To(HaveLen(1))
		Expect(n.recordPath(b)).To(BeAnExistingFile())
		Expect(n.del(n.cni, list, b, b.netnsPath)).To(Succeed())
	})

	It("honours markMask and an empty credentialsAddress", func() {
		p := n.newPod("web")
		conf := n.iamlinkConf()
		conf["markMask"] = "0x3070"
		conf["credentialsAddress"] = ""
		n.mustAdd(conflist("1.0.0", n.ptpConf(), conf), p)
		rec, _ := n.readRecord(p)

		Expect(p.route(metadataIP)).NotTo(BeNil())
		Expect(p.route(credentialsIP)).To(BeNil(), "credentialsAddress \"\" disables its route")
		_, rules := n.table()
		slotRule, err := json.Marshal(rules[fmt.Sprintf("slot-%d", rec.Slot)])
		Expect(err).NotTo(HaveOccurred())
		Expect(string(slotRule)).To(ContainSubstring(fmt.Sprintf(`[{"meta":{"key":"mark"}},%d]`, slotMark(rec.Slot, 0x3070))))
		identifyPod, err := json.Marshal(rules["identify-pod"])
		Expect(err).NotTo(HaveOccurred())
		Expect(string(identifyPod)).To(ContainSubstring(fmt.Sprintf(`[{"meta":{"key":"mark"}},%d]`, ^uint32(0x3070))))
		for _, chain := range []string{"identify", "intercept"} {
			matches, err := json.Marshal(rules[chain])
			Expect(err).NotTo(HaveOccurred())
			Expect(string(matches)).To(ContainSubstring(metadataIP), chain)
			// Not matched as a destination (a pod port of an older pod may be sent on to it).
			Expect(string(matches)).NotTo(ContainSubstring(`"right":"`+credentialsIP+`"`), chain)
		}
	})

	// ADD, DEL and GC run in parallel on a node; the store lock must keep slots unique.
	It("gives concurrently added pods distinct slots, and concurrent DELs leave nothing behind", func() {
		const pods = 8
		list := n.chain("1.0.0")
		var all []*pod
		for i := 0; i < pods; i++ {
			all = append(all, n.newPod(fmt.Sprintf("web-%d", i)))
		}
		parallel := func(f func(p *pod)) {
			var wg sync.WaitGroup
			for _, p := range all {
				wg.Add(1)
				go func(p *pod) {
					defer GinkgoRecover()
					defer wg.Done()
					f(p)
				}(p)
			}
			wg.Wait()
		}

		parallel(func(p *pod) { n.mustAdd(list, p) })
		slots := map[int]string{}
		for _, p := range all {
			rec, _ := n.readRecord(p)
			Expect(slots).NotTo(HaveKey(rec.Slot), "slot %d given twice", rec.Slot)
			slots[rec.Slot] = p.cid
		}
		Expect(n.slotLinks()).To(HaveLen(pods))
		Expect(n.podEntries()).To(HaveLen(pods))

		parallel(func(p *pod) { Expect(n.del(n.cni, list, p, p.netnsPath)).To(Succeed()) })
		Expect(n.slotLinks()).To(BeEmpty())
		Expect(n.podEntries()).To(BeEmpty())
		records, err := os.ReadDir(filepath.Join(n.storeDir, "records"))
		Expect(err).NotTo(HaveOccurred())
		Expect(records).To(BeEmpty())
	})
})
