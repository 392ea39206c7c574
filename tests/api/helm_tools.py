"""helm and kubeconform for the chart tests (tests/api/test_chart.py, test_deploy.py): built from Go
modules into the cache by hack/install/tools.sh when missing, run against the session's cluster."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubelvs"


def kube_version() -> str:
    """The Kubernetes version the tests run (hack/cluster/go.mod): what `helm template` assumes."""
    for line in (REPO / "hack" / "cluster" / "go.mod").read_text().splitlines():
        if line.startswith("require k8s.io/kubernetes "):
            return line.split()[-1].lstrip("v")
    raise AssertionError("no k8s.io/kubernetes in hack/cluster/go.mod")


def ensure_tools(bindir: Path) -> dict[str, str]:
    """helm and kubeconform (a no-op when the cache has them)."""
    subprocess.run(["bash", str(REPO / "hack" / "install" / "tools.sh"), "helm", "kubeconform"], check=True)
    return {"helm": str(bindir / "helm"), "kubeconform": str(bindir / "kubeconform")}


class Helm:
    """Runs helm against ``kubeconfig`` with its own cache, config and data directories."""

    def __init__(self, binary: str, kubeconfig: str, home: Path) -> None:
        self.binary = binary
        self.env = {
            **os.environ,
            "KUBECONFIG": kubeconfig,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([self.binary, *args], capture_output=True, text=True, env=self.env, timeout=300)
        if check and result.returncode != 0:
            raise AssertionError(
                f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return result
