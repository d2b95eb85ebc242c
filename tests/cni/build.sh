#!/bin/sh
# Builds tests/cni/cnirt into <repo>/.build/bin/cnirt (GOPATH mode, see goenv.sh). Idempotent.
set -eu
here=$(cd "$(dirname "$0")" && pwd -P)
. "$here/goenv.sh"

go build -o "$build/bin/cnirt" "$IAMLINK_GO_PKG/cnirt"
echo "built $build/bin/cnirt" >&2
