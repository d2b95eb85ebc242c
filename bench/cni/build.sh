#!/bin/sh
# Builds bench/cni/cnibench into <repo>/.build/bin/cnibench in GOPATH mode against Debian's Go
# packages (/usr/share/gocode), the way tests/cni/goenv.sh builds cnirt: no module proxy, no
# network. A private GOPATH under .build/ links iamlink/bench/cni -> <repo>/bench/cni.
set -eu
here=$(cd "$(dirname "$0")" && pwd -P)
root=$(cd "$here/../.." && pwd -P)
build="$root/.build"

export GO111MODULE=off
export GOPATH="$build/gopath:/usr/share/gocode"
export GOCACHE="${GOCACHE:-$build/gocache}"
export GOFLAGS=
export CGO_ENABLED=0
pkg=iamlink/bench/cni

mkdir -p "$build/gopath/src/iamlink/bench" "$build/bin"
if [ "$(readlink "$build/gopath/src/$pkg" 2>/dev/null || true)" != "$here" ]; then
    rm -rf "$build/gopath/src/$pkg"
    ln -s "$here" "$build/gopath/src/$pkg"
fi
go vet "$pkg/cnibench"
go build -o "$build/bin/cnibench" "$pkg/cnibench"
