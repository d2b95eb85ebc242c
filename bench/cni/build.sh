#!/bin/sh
# Builds bench/cni/cnibench into <repo>/.build/bin/cnibench in GOPATH mode against Debian's Go
# packages (/usr/share/gocode), with tests/cni/goenv.sh, as cnirt is: no module proxy, no network.
# The private GOPATH under .build/ links iamlink/bench/cni -> <repo>/bench/cni.
set -eu
here=$(cd "$(dirname "$0")" && pwd -P)
IAMLINK_GO_PKG=iamlink/bench/cni
. "$here/../../tests/cni/goenv.sh"
pkg=$IAMLINK_GO_PKG
go vet "$pkg/cnibench"
go build -o "$build/bin/cnibench" "$pkg/cnibench"
