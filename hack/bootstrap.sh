#!/usr/bin/env bash
# Install what kubelvs's demo, tests and benchmarks need, idempotently: Debian packages (the
# VM kernel with IPVS, qemu, ipvsadm), the project venv, and (with --cluster) the local
# Kubernetes control plane built from Go modules. Quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

want_cluster=0
for arg in "$@"; do
  case "$arg" in
    --cluster) want_cluster=1 ;;
    *) echo "usage: $0 [--cluster]" >&2; exit 2 ;;
  esac
done

packages=(qemu-system-x86 linux-image-amd64 ipvsadm busybox-static iproute2 kmod procps squashfs-tools
          nftables util-linux  # nft: the VIP port filter (kubelvs.kernel.vipfilter); nsenter
          keepalived tcpdump  # the HA benchmark's VRRP reference; capture fallback for the HA tests
          containerd runc buildah mmdebstrap)  # the chart under a real kubelet (tests/install/test_kubelet.py)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
stamp=.venv/.kubelvs-installed
if [ ! -x .venv/bin/python ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: creating the venv (.venv)"
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi

if ((want_cluster)); then
  bash hack/cluster/build.sh
  # The install path: helm and kubeconform (tests/api/test_chart.py), kubelet and kube-scheduler
  # (tests/install/test_kubelet.py), promtool (tests/unit/test_alerts.py; from Debian's package).
  bash hack/install/tools.sh helm kubeconform promtool
  bash hack/install/node/build.sh
fi
