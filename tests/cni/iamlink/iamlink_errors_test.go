package iamlink_test

// The iamlink binary executed directly, with crafted stdin and CNI_* variables: the CNI error
// codes, VERSION, and the spec 1.1.0 commands (STATUS, GC) that libcni 1.1.x cannot send.

import (
	"encoding/json"
	"fmt"
	"os"

	. "github.com/onsi/ginkgo"
	. "github.com/onsi/gomega"
)

// cniError is the error a plugin prints on stdout; pointers tell a missing key from a zero.
type cniError struct {
	CNIVersion *string `json:"cniVersion"`
	Code       *int    `json:"code"`
	Msg        *string `json:"msg"`
	Details    *string `json:"details"`
}

// text is the message and details, to match words in.
func (e cniError) text() string {
	if e.Details == nil {
		return *e.Msg
	}
	return *e.Msg + "; " + *e.Details
}

// expectCNIError checks that the plugin failed with a well-formed CNI error of the given code.
func expectCNIError(r run, code int) cniError {
	ExpectWithOffset(1, r.exitCode).NotTo(Equal(0), "stdout: %s\nstderr: %s", r.stdout, r.stderr)
	var e cniError
	ExpectWithOffset(1, json.Unmarshal(r.stdout, &e)).To(Succeed(), "stdout must be the error JSON: %q", r.stdout)
	ExpectWithOffset(1, e.CNIVersion).NotTo(BeNil(), "error without cniVersion: %s", r.stdout)
	ExpectWithOffset(1, e.Msg).NotTo(BeNil(), "error without msg: %s", r.stdout)
	ExpectWithOffset(1, *e.Msg).NotTo(BeEmpty())
	ExpectWithOffset(1, e.Code).NotTo(BeNil(), "error without code: %s", r.stdout)
	ExpectWithOffset(1, *e.Code).To(Equal(code), "error: %s", r.stdout)
	return e
}

var _ = Describe("iamlink called directly", func() {
	var (
		n *node
		p *pod
	)

	BeforeEach(func() {
		expectIamlinkBinary()
		n = newNode()
		p = n.newPod("web")
	})
	AfterEach(func() { n.destroy() })

	// netconf is iamlink's stdin for a chain at cniVersion; keys in change replace the defaults
	// (a nil value removes the key).
	netconf := func(cniVersion string, change map[string]interface{}) string {
		conf := n.iamlinkConf()
		conf["cniVersion"] = cniVersion
		conf["name"] = networkName
		conf["prevResult"] = map[string]interface{}{
			"cniVersion": cniVersion,
			"interfaces": []map[string]interface{}{
				{"name": "vethfake0", "mac": "02:00:00:00:00:01"},
				{"name": podIfname, "mac": "02:00:00:00:00:02", "sandbox": p.netnsPath},
			},
			"ips": []map[string]interface{}{{"address": "198.18.64.9/24", "gateway": podGateway, "interface": 1}},
		}
		for k, v := range change {
			if v == nil {
				delete(conf, k)
			} else {
				conf[k] = v
			}
		}
		b, err := json.Marshal(conf)
		Expect(err).NotTo(HaveOccurred())
		return string(b)
	}

	It("VERSION lists every spec version from 0.3.0 to 1.1.0", func() {
		r := n.runIamlink(map[string]string{"CNI_COMMAND": "VERSION"}, `{"cniVersion":"1.1.0"}`)
		Expect(r.exitCode).To(Equal(0), "stderr: %s", r.stderr)
		var info struct {
			CNIVersion        string   `json:"cniVersion"`
			SupportedVersions []string `json:"supportedVersions"`
		}
		Expect(json.Unmarshal(r.stdout, &info)).To(Succeed(), "stdout: %s", r.stdout)
		Expect(info.SupportedVersions).To(ContainElements("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"))
	})

	It("refuses an ADD without prevResult: iamlink must be chained after a primary plugin (code 7)", func() {
		r := n.runIamlink(p.cniEnv("ADD"), netconf("1.0.0", map[string]interface{}{"prevResult": nil}))
		e := expectCNIError(r, 7)
		Expect(e.text()).To(MatchRegexp(`(?i)chain|prevResult`))
		Expect(n.recordPath(p)).NotTo(BeAnExistingFile())
	})

	It("refuses an unsupported cniVersion (code 1)", func() {
		expectCNIError(n.runIamlink(p.cniEnv("ADD"), netconf("9.9.9", nil)), 1)
	})

	It("refuses an ADD without CNI_CONTAINERID (code 4)", func() {
		env := p.cniEnv("ADD")
		delete(env, "CNI_CONTAINERID")
		expectCNIError(n.runIamlink(env, netconf("1.0.0", nil)), 4)
	})

	It("refuses an ADD without the pod's namespace and name in CNI_ARGS (code 4)", func() {
		env := p.cniEnv("ADD")
		env["CNI_ARGS"] = "IgnoreUnknown=1;K8S_POD_INFRA_CONTAINER_ID=" + p.cid
		expectCNIError(n.runIamlink(env, netconf("1.0.0", nil)), 4)
		Expect(n.recordPath(p)).NotTo(BeAnExistingFile())
	})

	It("refuses malformed JSON on stdin (code 6)", func() {
		expectCNIError(n.runIamlink(p.cniEnv("ADD"), `{"cniVersion":"1.0.0","type":"iamlink",`), 6)
	})

	It("refuses a netconf without daemonAddress (code 7)", func() {
		expectCNIError(n.runIamlink(p.cniEnv("ADD"), netconf("1.0.0", map[string]interface{}{"daemonAddress": nil})), 7)
	})

	It("answers STATUS at 1.1.0 with success", func() {
		env := map[string]string{"CNI_COMMAND": "STATUS", "CNI_PATH": p.cniEnv("STATUS")["CNI_PATH"]}
		conf := netconf("1.1.0", map[string]interface{}{"prevResult": nil})
		r := n.runIamlink(env, conf)
		Expect(r.exitCode).To(Equal(0), "stdout: %s\nstderr: %s", r.stdout, r.stderr)
	})

	It("GC at 1.1.0 removes the attachments not listed as valid and keeps the listed one", func() {
		list := n.chain("1.0.0")
		keep, gone := p, n.newPod("web-gone")
		_, keepVeth := n.mustAdd(list, keep)
		_, goneVeth := n.mustAdd(list, gone)
		keepRec, _ := n.readRecord(keep)
		goneRec, _ := n.readRecord(gone)

		env := map[string]string{"CNI_COMMAND": "GC", "CNI_PATH": p.cniEnv("GC")["CNI_PATH"]}
		conf := netconf("1.1.0", map[string]interface{}{
			"prevResult":                nil,
			"cni.dev/valid-attachments": []map[string]string{{"containerID": keep.cid, "ifname": podIfname}},
		})
		r := n.runIamlink(env, conf)
		Expect(r.exitCode).To(Equal(0), "stdout: %s\nstderr: %s", r.stdout, r.stderr)

		Expect(n.recordPath(gone)).NotTo(BeAnExistingFile())
		_, err := os.Lstat(n.slotPath(goneRec.Slot))
		Expect(os.IsNotExist(err)).To(BeTrue(), "slot link %d of the collected pod still there", goneRec.Slot)
		Expect(n.recordPath(keep)).To(BeAnExistingFile())
		Expect(n.slotLinks()).To(HaveKey(fmt.Sprint(keepRec.Slot)))
		Expect(n.podEntries()).To(Equal(map[string]string{keepVeth: fmt.Sprintf("slot-%d", keepRec.Slot)}))
		Expect(n.podEntries()).NotTo(HaveKey(goneVeth))

		// The runtime's DELs still come afterwards, and succeed.
		Expect(n.del(n.cni, list, gone, gone.netnsPath)).To(Succeed())
		Expect(n.del(n.cni, list, keep, keep.netnsPath)).To(Succeed())
		Expect(n.podEntries()).To(BeEmpty())
	})
})
