#!/usr/bin/env bash
# Builds the director image daemonlessly (no Docker, no registry) and writes it as an OCI archive:
#   1. a Debian bookworm root filesystem with Python 3.11, venv, nftables, util-linux by mmdebstrap
#      (cached: $KUBELVS_CACHE/image/rootfs-bookworm/), committed as localhost/kubelvs-base:bookworm;
#   2. a wheelhouse of kubelvs and its dependencies made on the host (pip), so the image build is
#      offline;
#   3. `buildah bud --isolation chroot` of the repository's Dockerfile with that base (BASE) and
#      wheelhouse (PIP_OPTIONS), tagged localhost/kubelvs:<tag>;
#   4. an OCI archive of it ($KUBELVS_CACHE/image/kubelvs-<tag>.oci.tar) that `ctr images import` takes.
# Needs root and the Debian packages mmdebstrap, buildah (hack/bootstrap.sh --image installs them).
#
# Usage: hack/install/image.sh [tag]     (default tag: dev); prints the archive's path
#        hack/install/image.sh --pause   the test node's sandbox image (localhost/kubelvs-pause:1)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
KUBELVS_CACHE="${KUBELVS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubelvs}"
WORK="$KUBELVS_CACHE/image"
if [ "${1:-}" = --pause ]; then
	MODE=pause
	shift
else
	MODE=kubelvs
fi
TAG="${1:-dev}"
BASE_IMAGE=localhost/kubelvs-base:bookworm
IMAGE="localhost/kubelvs:$TAG"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"

log() { printf '[image.sh] %s\n' "$*" >&2; }
mkdir -p "$WORK"

# buildah's storage in the cache, with the settings this sandbox needs (see ../shared/TESTBED.md §7).
export CONTAINERS_STORAGE_CONF="$WORK/storage.conf"
cat >"$CONTAINERS_STORAGE_CONF" <<CONF
[storage]
driver = "overlay"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
CONF

mirror() { # the Debian mirror apt uses
	grep -rhoE '^(URIs:|deb)[[:space:]]+https?://[^[:space:]]+/debian/?([[:space:]]|$)' /etc/apt/sources.list /etc/apt/sources.list.d 2>/dev/null \
		| awk '{print $2}' | head -1
}

if [ "$MODE" = pause ]; then
	# The sandbox image for the test node (no registry serves one): the static program built by
	# hack/install/node/build.sh, alone in the image.
	archive="$WORK/kubelvs-pause.oci.tar"
	if [ -s "$archive" ] && [ "$archive" -nt "$KUBELVS_CACHE/bin/kubelvs-pause" ]; then
		echo "$archive"
		exit 0
	fi
	container=$(buildah from scratch)
	buildah copy --quiet "$container" "$KUBELVS_CACHE/bin/kubelvs-pause" /pause >/dev/null
	buildah config --entrypoint '["/pause"]' "$container"
	buildah commit --quiet --rm "$container" localhost/kubelvs-pause:1 >/dev/null
	rm -f "$archive"
	buildah push --quiet localhost/kubelvs-pause:1 "oci-archive:$archive:localhost/kubelvs-pause:1" >/dev/null
	echo "$archive"
	exit 0
fi

start=$(date +%s)
rootfs="$WORK/rootfs-bookworm"  # a directory (mmdebstrap writes a tarball only for a *.tar target)
if [ ! -d "$rootfs" ]; then
	log "building the base root filesystem with mmdebstrap ..."
	mmdebstrap --quiet --variant=essential --include=python3,python3-venv,ca-certificates,nftables,util-linux \
		bookworm "$rootfs.tmp" "$(mirror)"
	mv -f "$rootfs.tmp" "$rootfs"
fi
if ! buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
	log "committing $BASE_IMAGE"
	container=$(buildah from scratch)
	buildah add --quiet "$container" "$rootfs" / >/dev/null
	buildah commit --quiet --rm "$container" "$BASE_IMAGE" >/dev/null
fi

archive="$WORK/kubelvs-$TAG.oci.tar"
# Rebuilt only when its sources changed (or the archive is missing).
sources_hash="$(cd "$REPO" && find Dockerfile pyproject.toml README.md operator -type f ! -path '*/__pycache__/*' \
	! -path '*.egg-info/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)"
if [ -s "$archive" ] && [ "$(cat "$archive.stamp" 2>/dev/null)" = "$sources_hash" ] \
	&& buildah inspect --type image "$IMAGE" >/dev/null 2>&1; then
	log "up to date: $IMAGE -> $archive"
	echo "$archive"
	exit 0
fi

context="$WORK/context"
rm -rf "$context"
mkdir -p "$context/wheels"
cp -r "$REPO/Dockerfile" "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/operator" "$context/"
find "$context/operator" -name __pycache__ -prune -exec rm -rf {} +
log "wheelhouse (kubelvs and its dependencies) ..."
"$PYTHON" -m pip wheel --quiet --wheel-dir "$context/wheels" "$context" >"$WORK/wheel.log" 2>&1 \
	|| { cat "$WORK/wheel.log" >&2; exit 1; }

log "buildah bud $IMAGE ..."
buildah bud --quiet --isolation chroot --layers=false \
	--build-arg "BASE=$BASE_IMAGE" \
	--build-arg "PIP_OPTIONS=--no-index --find-links /src/wheels" --build-arg PACKAGE=kubelvs \
	-t "$IMAGE" "$context" >/dev/null
rm -f "$archive"
buildah push --quiet "$IMAGE" "oci-archive:$archive:$IMAGE" >/dev/null
echo "$sources_hash" >"$archive.stamp"
buildah rmi --prune >/dev/null 2>&1 || true  # the previous build of this tag, now untagged
size=$(buildah images --format '{{.Size}}' "$IMAGE")
log "built $IMAGE ($size) in $(($(date +%s) - start)) s -> $archive"
echo "$archive"
