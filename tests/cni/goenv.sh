# Sourced with $here set to a Go directory of the repository (tests/cni by default; bench/cni
# sets IAMLINK_GO_PKG=iamlink/bench/cni): the Go environment for building it in GOPATH mode
# against Debian's Go packages (/usr/share/gocode), with no module proxy and no network. The repository is not under a GOPATH, so a private one is made under
# .build/ (git-ignored):  .build/gopath/src/iamlink/tests/cni -> <repo>/tests/cni
# and packages are built by import path (iamlink/tests/cni/...).
root=$(cd "$here/../.." && pwd -P)
build="$root/.build"

export GO111MODULE=off
export GOPATH="$build/gopath:/usr/share/gocode"
export GOCACHE="${GOCACHE:-$build/gocache}"
export GOFLAGS=
export CGO_ENABLED=0
IAMLINK_GO_PKG=${IAMLINK_GO_PKG:-iamlink/tests/cni}

mkdir -p "$(dirname "$build/gopath/src/$IAMLINK_GO_PKG")" "$build/bin"
if [ "$(readlink "$build/gopath/src/$IAMLINK_GO_PKG" 2>/dev/null || true)" != "$here" ]; then
    rm -rf "$build/gopath/src/$IAMLINK_GO_PKG"
    ln -s "$here" "$build/gopath/src/$IAMLINK_GO_PKG"
fi
