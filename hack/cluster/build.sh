#!/usr/bin/env bash
# Builds the local Kubernetes control plane used by tests/api from Go modules:
#   etcd, kube-apiserver, kube-controller-manager, kubectl
# into $KUBELVS_CACHE/bin (KUBELVS_CACHE defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/kubelvs).
#
# Versions come from the wrapper modules next to this script:
#   hack/cluster/go.mod       requires k8s.io/kubernetes vX and replaces every staging module
#   hack/cluster/etcd/go.mod  requires go.etcd.io/etcd/server/v3 vY
#
# Idempotent: a binary is rebuilt only when it is missing or its recorded stamp
# (version + hash of the wrapper go.mod/go.sum + link flags) differs. One build at a
# time (each link needs ~2 GiB), serialized across processes with flock.
#
# Usage:
#   hack/cluster/build.sh                 build whatever is missing or stale
#   hack/cluster/build.sh kubectl etcd    only these
#   hack/cluster/build.sh --force [...]   rebuild even if the stamp matches
#   hack/cluster/build.sh bindir          print the bin directory
#   hack/cluster/build.sh gomod [1.34.N]  regenerate hack/cluster/go.mod from that
#                                         Kubernetes version's `=> ./staging` replaces
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KUBELVS_CACHE="${KUBELVS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubelvs}"
BIN_DIR="$KUBELVS_CACHE/bin"
ALL_BINARIES=(etcd kube-apiserver kube-controller-manager kubectl)

log() { printf '[build.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

find_go() {
	if command -v go >/dev/null 2>&1; then
		command -v go
	elif [ -x /usr/local/go/bin/go ]; then
		echo /usr/local/go/bin/go
	else
		die "no Go toolchain found (need go >= 1.25 on PATH or at /usr/local/go/bin/go)"
	fi
}

go_env() {
	export GOMODCACHE="$KUBELVS_CACHE/go/mod"
	export GOCACHE="$KUBELVS_CACHE/go/build"
	export CGO_ENABLED=0
	# -mod=readonly: go.mod/go.sum are committed and must not change during a build.
	export GOFLAGS="-mod=readonly -buildvcs=false -trimpath"
	mkdir -p "$GOMODCACHE" "$GOCACHE" "$BIN_DIR"
}

# Version of a module required in a go.mod file (first match).
required_version() { # file module
	awk -v m="$2" '$1 == m && $2 ~ /^v/ {print $2; exit} $1 == "require" && $2 == m {print $3; exit}' "$1"
}

K8S_VERSION="$(required_version "$HERE/go.mod" k8s.io/kubernetes)"
ETCD_VERSION="$(required_version "$HERE/etcd/go.mod" go.etcd.io/etcd/server/v3)"

# Hash of module files, ignoring whole-line comments and blank lines (editing a comment
# in go.mod must not force a 20-minute rebuild).
hash_files() { cat "$@" | grep -Ev '^[[:space:]]*(//|$)' | sha256sum | cut -c1-16; }

# Per binary: module dir, package, ldflags, version label.
spec() { # name -> sets MODDIR PKG LDFLAGS VERSION
	case "$1" in
	etcd)
		MODDIR="$HERE/etcd"
		PKG="go.etcd.io/etcd/server/v3"
		VERSION="$ETCD_VERSION"
		LDFLAGS="-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION"
		;;
	kube-apiserver | kube-controller-manager | kubectl)
		MODDIR="$HERE"
		PKG="k8s.io/kubernetes/cmd/$1"
		VERSION="$K8S_VERSION"
		local minor="${K8S_VERSION#v1.}"
		minor="${minor%%.*}"
		LDFLAGS="-s -w"
		local p
		for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
			LDFLAGS+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
			LDFLAGS+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
		done
		;;
	*) die "unknown binary: $1 (known: ${ALL_BINARIES[*]})" ;;
	esac
}

stamp_of() { # name
	spec "$1"
	echo "$1 $VERSION $(hash_files "$MODDIR/go.mod" "$MODDIR/go.sum") $(printf '%s' "$LDFLAGS" | sha256sum | cut -c1-16)"
}

is_current() { # name
	local bin="$BIN_DIR/$1" stampf="$BIN_DIR/.$1.stamp"
	[ -x "$bin" ] && [ -f "$stampf" ] && [ "$(cat "$stampf")" = "$(stamp_of "$1")" ]
}

build_one() { # name
	local name="$1" go start end
	go="$(find_go)"
	spec "$name"
	local out="$BIN_DIR/$name" tmp="$BIN_DIR/.$name.tmp.$$"
	log "building $name $VERSION ($PKG) with $("$go" version | awk '{print $3}') ..."
	start=$(date +%s)
	(cd "$MODDIR" && "$go" build -ldflags "$LDFLAGS" -o "$tmp" "$PKG") || { rm -f "$tmp"; die "go build of $name failed"; }
	mv -f "$tmp" "$out"
	stamp_of "$name" >"$BIN_DIR/.$name.stamp"
	end=$(date +%s)
	log "built $name $VERSION in $((end - start)) s -> $out"
}

cmd_gomod() { # [version]
	local v="${1:-$K8S_VERSION}" go modfile
	v="v${v#v}"
	go="$(find_go)"
	go_env
	export GOFLAGS="-mod=mod -buildvcs=false"
	modfile="$(cd "$HERE" && "$go" mod download -json "k8s.io/kubernetes@$v" | awk -F'"' '$2 == "GoMod" {print $4}')"
	[ -f "$modfile" ] || die "could not download go.mod of k8s.io/kubernetes@$v"
	local staging="v0.${v#v1.}"
	{
		echo "// Wrapper module: builds kube-apiserver, kube-controller-manager and kubectl"
		echo "// from k8s.io/kubernetes $v (see build.sh). Regenerate with: build.sh gomod"
		echo "module kubelvs.dev/hack/cluster"
		echo
		awk '$1 == "go" {print; exit}' "$modfile"
		echo
		awk '$1 == "godebug" {print; print ""}' "$modfile"
		echo "require k8s.io/kubernetes $v"
		echo
		echo "// Every staging module of $v (its \`=> ./staging\` replaces), pinned to $staging."
		echo "replace ("
		grep -E '=>[[:space:]]+\./staging/' "$modfile" | awk -v s="$staging" '{print "\t" $1 " => " $1 " " s}'
		echo ")"
	} >"$HERE/go.mod"
	(cd "$HERE" && "$go" mod tidy)
	log "regenerated $HERE/go.mod for k8s.io/kubernetes $v"
}

main() {
	local force=0 names=()
	while [ $# -gt 0 ]; do
		case "$1" in
		--force) force=1 ;;
		bindir)
			echo "$BIN_DIR"
			return 0
			;;
		gomod)
			shift
			cmd_gomod "$@"
			return 0
			;;
		-h | --help)
			sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
			return 0
			;;
		*) names+=("$1") ;;
		esac
		shift
	done
	[ ${#names[@]} -gt 0 ] || names=("${ALL_BINARIES[@]}")
	[ -n "$K8S_VERSION" ] || die "cannot read the k8s.io/kubernetes version from $HERE/go.mod"
	[ -n "$ETCD_VERSION" ] || die "cannot read the etcd version from $HERE/etcd/go.mod"

	mkdir -p "$BIN_DIR"
	# Fast path without the lock: everything current.
	local todo=() n
	for n in "${names[@]}"; do
		if [ $force = 1 ] || ! is_current "$n"; then todo+=("$n"); fi
	done
	if [ ${#todo[@]} -eq 0 ]; then
		log "up to date in $BIN_DIR: ${names[*]} (kubernetes $K8S_VERSION, etcd $ETCD_VERSION)"
		return 0
	fi

	go_env
	# One build at a time, also across concurrent invocations.
	exec 9>"$KUBELVS_CACHE/build.lock"
	if ! flock -n 9; then
		log "another build is running; waiting for $KUBELVS_CACHE/build.lock"
		flock 9
	fi
	local total_start
	total_start=$(date +%s)
	for n in "${todo[@]}"; do
		# Re-check under the lock: a concurrent invocation may have built it.
		if [ $force = 0 ] && is_current "$n"; then
			log "$n is up to date"
			continue
		fi
		build_one "$n"
	done
	log "done in $(($(date +%s) - total_start)) s; binaries in $BIN_DIR"
}

main "$@"; exit $?
