#!/bin/sh
# Builds cnirt and runs the iamlink CNI suite (ginkgo v1 through go test). Needs root: it makes
# network namespaces (a "node" and pods per test), never touching the root namespace.
# Extra arguments go to the test binary, e.g.  tests/cni/run.sh -ginkgo.focus='GC'
# Env: IAMLINK_BIN_DIR (default <repo>/target/release), CNI_REF_DIR (default /usr/lib/cni).
set -eu
here=$(cd "$(dirname "$0")" && pwd -P)
"$here/build.sh"
. "$here/goenv.sh"

export CNIRT="$build/bin/cnirt"
export IAMLINK_BIN_DIR="${IAMLINK_BIN_DIR:-$root/target/release}"

cd "$build/gopath/src/$IAMLINK_GO_PKG/iamlink"
go vet .
exec timeout 170 go test -count=1 -timeout 150s -v . -args "$@"
