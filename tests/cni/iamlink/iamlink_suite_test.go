// Package iamlink_test drives the iamlink CNI plugin the way containerd does (libcni, a chain
// ptp + host-local + iamlink) inside a throw-away "node" network namespace per test, and checks
// what ARCHITECTURE.md promises: the record and slot in the store, the nftables entry, the pod's
// metadata route, CHECK, DEL, GC and the CNI error codes.
//
// Run it with tests/cni/run.sh. Environment:
//
//	IAMLINK_BIN_DIR  directory holding the iamlink binary (default <repo>/target/release)
//	CNI_REF_DIR      reference plugins ptp, host-local (default /usr/lib/cni)
//	CNIRT            the cnirt tool (default <repo>/.build/bin/cnirt, built by tests/cni/build.sh)
package iamlink_test

import (
	"os"
	"path/filepath"
	"testing"

	. "github.com/onsi/ginkgo"
	. "github.com/onsi/gomega"
)

var (
	repoRoot     string // the repository root, found from this package's real directory
	iamlinkDir   string // where the iamlink binary is
	refPluginDir string // where ptp and host-local are
	cnirtPath    string
)

func TestIamlink(t *testing.T) {
	RegisterFailHandler(Fail)
	RunSpecs(t, "iamlink CNI plugin")
}

var _ = BeforeSuite(func() {
	// go test runs in the package directory, which may be reached through the build GOPATH's
	// symlink (.build/gopath/src/iamlink/tests/cni -> tests/cni): resolve it first.
	wd, err := os.Getwd()
	Expect(err).NotTo(HaveOccurred())
	wd, err = filepath.EvalSymlinks(wd)
	Expect(err).NotTo(HaveOccurred())
	repoRoot = filepath.Clean(filepath.Join(wd, "..", "..", ".."))

	iamlinkDir = envOr("IAMLINK_BIN_DIR", filepath.Join(repoRoot, "target", "release"))
	refPluginDir = envOr("CNI_REF_DIR", "/usr/lib/cni")
	cnirtPath = envOr("CNIRT", filepath.Join(repoRoot, ".build", "bin", "cnirt"))

	for _, p := range []string{"ptp", "host-local"} {
		Expect(filepath.Join(refPluginDir, p)).To(BeAnExistingFile(), "reference plugin missing; set CNI_REF_DIR")
	}
})

// expectIamlinkBinary fails the current test early, with the fix, when the plugin is not built.
func expectIamlinkBinary() {
	Expect(filepath.Join(iamlinkDir, "iamlink")).To(BeAnExistingFile(),
		"build the plugin (cargo build --release) or set IAMLINK_BIN_DIR")
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
