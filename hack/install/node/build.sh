#!/usr/bin/env bash
# Builds the node binaries of the real-kubelet install test from Go modules, into $KUBELVS_CACHE/bin:
#   kubelet, kube-scheduler  from k8s.io/kubernetes (this wrapper module: hack/cluster's requirements
#                            plus their commands), version-stamped like hack/cluster/build.sh
#   kubelvs-pause            the sandbox image's program (pause.go)
# Rebuilt only when missing or stale (stamp: version + hash of go.mod/go.sum + flags); one build at a
# time with the control plane's lock. Usage: hack/install/node/build.sh [--force]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KUBELVS_CACHE="${KUBELVS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubelvs}"
BIN_DIR="$KUBELVS_CACHE/bin"
log() { printf '[node/build.sh] %s\n' "$*" >&2; }

K8S_VERSION="$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3; exit}' "$HERE/go.mod")"
minor="${K8S_VERSION#v1.}"
minor="${minor%%.*}"
LDFLAGS="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	LDFLAGS+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
	LDFLAGS+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done
files_hash="$(cat "$HERE/go.mod" "$HERE/go.sum" "$HERE/pause.go" | sha256sum | cut -c1-16)"
stamp() { echo "$1 $K8S_VERSION $files_hash $(printf '%s' "$LDFLAGS" | sha256sum | cut -c1-16)"; }
current() { [ -x "$BIN_DIR/$1" ] && [ "$(cat "$BIN_DIR/.$1.stamp" 2>/dev/null)" = "$(stamp "$1")" ]; }

force=0
[ "${1:-}" = --force ] && force=1
todo=()
for name in kubelet kube-scheduler kubelvs-pause; do
	if [ $force = 1 ] || ! current "$name"; then todo+=("$name"); fi
done
if [ ${#todo[@]} -eq 0 ]; then
	log "up to date in $BIN_DIR: kubelet kube-scheduler kubelvs-pause ($K8S_VERSION)"
	exit 0
fi
go=$(command -v go || echo /usr/local/go/bin/go)
export GOMODCACHE="$KUBELVS_CACHE/go/mod" GOCACHE="$KUBELVS_CACHE/go/build" CGO_ENABLED=0
export GOFLAGS="-mod=readonly -buildvcs=false -trimpath"
mkdir -p "$BIN_DIR"
exec 9>"$KUBELVS_CACHE/build.lock"
flock 9
for name in "${todo[@]}"; do
	if [ $force = 0 ] && current "$name"; then continue; fi
	start=$(date +%s)
	case "$name" in
	kubelvs-pause) (cd "$HERE" && "$go" build -ldflags "-s -w" -o "$BIN_DIR/.$name.tmp" pause.go) ;;
	*) (cd "$HERE" && "$go" build -ldflags "$LDFLAGS" -o "$BIN_DIR/.$name.tmp" "k8s.io/kubernetes/cmd/$name") ;;
	esac
	mv -f "$BIN_DIR/.$name.tmp" "$BIN_DIR/$name"
	stamp "$name" >"$BIN_DIR/.$name.stamp"
	log "built $name in $(($(date +%s) - start)) s"
done
