#!/usr/bin/env bash
# Builds the install-path tools from Go modules into $KUBELVS_CACHE/bin, like hack/cluster/build.sh:
#   helm         helm.sh/helm/v3/cmd/helm                               (chart lint/template/install)
#   kubeconform  github.com/yannh/kubeconform/cmd/kubeconform           (offline schema validation)
#   promtool     github.com/prometheus/prometheus/cmd/promtool          (alert rule unit tests)
#                (taken from Debian's prometheus package when apt can fetch it: seconds, where the
#                Go build takes ~23 min on 2 cores; only the promtool binary is extracted, nothing
#                is installed or started)
#   crane        github.com/google/go-containerregistry/cmd/crane       (the kubelet node's pause image)
# A binary is rebuilt only when it is missing or its stamp (module@version) differs. Builds share
# GOMODCACHE/GOCACHE and the build lock with the control plane (one link at a time: 2 cores).
#
# Usage: hack/install/tools.sh [--force] [helm kubeconform promtool crane]   (default: helm kubeconform)
set -euo pipefail

KUBELVS_CACHE="${KUBELVS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubelvs}"
BIN_DIR="$KUBELVS_CACHE/bin"
DEFAULT_TOOLS=(helm kubeconform)

log() { printf '[tools.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

module_of() { # tool -> module path@version of its main package
	case "$1" in
	helm) echo "helm.sh/helm/v3/cmd/helm@v3.22.0" ;;
	kubeconform) echo "github.com/yannh/kubeconform/cmd/kubeconform@v0.7.0" ;;
	promtool) echo "github.com/prometheus/prometheus/cmd/promtool@v0.316.0" ;;
	crane) echo "github.com/google/go-containerregistry/cmd/crane@v0.22.1" ;;
	*) die "unknown tool: $1 (known: helm kubeconform promtool crane)" ;;
	esac
}

find_go() {
	if command -v go >/dev/null 2>&1; then command -v go
	elif [ -x /usr/local/go/bin/go ]; then echo /usr/local/go/bin/go
	else die "no Go toolchain found (need go on PATH or at /usr/local/go/bin/go)"; fi
}

ldflags_of() { # tool -> link flags (version strings the tools print or use)
	local mod flags="-s -w"
	mod="$(module_of "$1")"
	case "$1" in
	helm)
		# Its version, and the Kubernetes version `helm template`/`lint` assume without a cluster
		# (that of the client-go it links; unset, 1.20).
		flags+=" -X helm.sh/helm/v3/internal/version.version=${mod##*@}"
		local p
		for p in pkg/chartutil pkg/lint/rules; do
			flags+=" -X helm.sh/helm/v3/$p.k8sVersionMajor=1 -X helm.sh/helm/v3/$p.k8sVersionMinor=37"
		done
		;;
	esac
	echo "$flags"
}

stamp_of() { echo "$(module_of "$1") $(ldflags_of "$1")"; }

DEBIAN_PROMTOOL_STAMP="debian prometheus package"
is_current() {
	[ -x "$BIN_DIR/$1" ] || return 1
	local stamp
	stamp="$(cat "$BIN_DIR/.$1.stamp" 2>/dev/null)"
	[ "$stamp" = "$(stamp_of "$1")" ] || { [ "$1" = promtool ] && [[ "$stamp" == "$DEBIAN_PROMTOOL_STAMP "* ]]; }
}

promtool_from_debian() { # -> 0 if $BIN_DIR/promtool was extracted from Debian's package
	command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1 || return 1
	local work deb
	work="$(mktemp -d)"
	# shellcheck disable=SC2064
	trap "rm -rf '$work'" RETURN
	(cd "$work" && apt-get download prometheus >/dev/null 2>&1) || return 1
	deb="$(ls "$work"/prometheus_*.deb 2>/dev/null | head -1)"
	[ -n "$deb" ] && dpkg-deb -x "$deb" "$work/x" && [ -x "$work/x/usr/bin/promtool" ] || return 1
	"$work/x/usr/bin/promtool" --version >/dev/null 2>&1 || return 1
	mv -f "$work/x/usr/bin/promtool" "$BIN_DIR/promtool"
	echo "$DEBIAN_PROMTOOL_STAMP $(basename "$deb")" >"$BIN_DIR/.promtool.stamp"
	log "promtool from $(basename "$deb") -> $BIN_DIR/promtool"
}

build_one() { # tool
	local tool="$1" mod go start gobin
	mod="$(module_of "$tool")"
	go="$(find_go)"
	log "building $tool ($mod) ..."
	start=$(date +%s)
	gobin="$(mktemp -d "$BIN_DIR/.gobin.XXXXXX")"
	GOBIN="$gobin" "$go" install -ldflags "$(ldflags_of "$tool")" "$mod" || { rm -rf "$gobin"; die "go install $mod failed"; }
	mv -f "$gobin/$tool" "$BIN_DIR/$tool"
	rm -rf "$gobin"
	stamp_of "$tool" >"$BIN_DIR/.$tool.stamp"
	log "built $tool in $(($(date +%s) - start)) s -> $BIN_DIR/$tool"
}

main() {
	local force=0 names=() todo=() n
	for n in "$@"; do
		case "$n" in
		--force) force=1 ;;
		bindir) echo "$BIN_DIR"; return 0 ;;
		*) module_of "$n" >/dev/null; names+=("$n") ;;
		esac
	done
	[ ${#names[@]} -gt 0 ] || names=("${DEFAULT_TOOLS[@]}")
	mkdir -p "$BIN_DIR"
	for n in "${names[@]}"; do
		if [ $force = 1 ] || ! is_current "$n"; then
			if [ "$n" = promtool ] && promtool_from_debian; then continue; fi
			todo+=("$n")
		fi
	done
	if [ ${#todo[@]} -eq 0 ]; then
		log "up to date in $BIN_DIR: ${names[*]}"
		return 0
	fi
	export GOMODCACHE="$KUBELVS_CACHE/go/mod" GOCACHE="$KUBELVS_CACHE/go/build" CGO_ENABLED=0
	export GOFLAGS="-buildvcs=false -trimpath"
	mkdir -p "$GOMODCACHE" "$GOCACHE"
	exec 9>"$KUBELVS_CACHE/build.lock"
	if ! flock -n 9; then
		log "another build is running; waiting for $KUBELVS_CACHE/build.lock"
		flock 9
	fi
	for n in "${todo[@]}"; do
		if [ $force = 0 ] && is_current "$n"; then continue; fi
		build_one "$n"
	done
}

main "$@"
