"""Render deploy/ from the Helm chart (the single source): ``python hack/install/render_deploy.py``.

``--check`` renders into memory and fails, naming the file, when deploy/ differs (tests/api/test_chart.py
runs it). Every object carries Helm's ownership metadata for release "kubelvs" in "kubelvs-system",
so a ``kubectl apply -f deploy/`` install is adopted in place by ``helm install``/``upgrade``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubelvs"
DEPLOY = REPO / "deploy"
RELEASE, NAMESPACE = "kubelvs", "kubelvs-system"
HEADER = "# Rendered from charts/kubelvs by hack/install/render_deploy.py (release {r}, namespace {n}): do not edit.\n"
# deploy file -> (chart templates, extra values)
FILES: dict[str, tuple[list[str], list[str]]] = {
    "namespace.yaml": (["templates/namespace.yaml"], []),
    "rbac.yaml": (["templates/rbac.yaml"], []),
    "director.yaml": (["templates/director.yaml", "templates/metrics.yaml"], []),
    "realserver.yaml": (["templates/realserver.yaml"], []),
    "monitoring/prometheusrule.yaml": (["templates/monitoring.yaml"], ["metrics.prometheusRule.enabled=true"]),
    "monitoring/grafana-dashboard.yaml": (["templates/monitoring.yaml"], ["metrics.grafanaDashboard.enabled=true"]),
}
ARGOCD_CM = "argocd/argocd-cm-health.yaml"


def kube_version() -> str:
    """The Kubernetes version the project tests against (the control plane's wrapper module)."""
    for line in (REPO / "hack" / "cluster" / "go.mod").read_text().splitlines():
        if line.startswith("require k8s.io/kubernetes "):
            return line.split()[-1].lstrip("v")
    raise SystemExit("no k8s.io/kubernetes version in hack/cluster/go.mod")


def helm() -> str:
    cache = Path(
        os.environ.get("KUBELVS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kubelvs"
    )
    return os.environ.get("HELM") or str(cache / "bin" / "helm")


def render(templates: list[str], values: list[str]) -> str:
    command = [helm(), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--skip-tests"]
    command += ["--kube-version", kube_version()]
    for template in templates:
        command += ["--show-only", template]
    for value in values:
        command += ["--set", value]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    for doc in docs:
        annotations = doc["metadata"].setdefault("annotations", {})
        annotations["meta.helm.sh/release-name"] = RELEASE
        annotations["meta.helm.sh/release-namespace"] = NAMESPACE
    return HEADER.format(r=RELEASE, n=NAMESPACE) + yaml.safe_dump_all(docs, sort_keys=False, width=120)


def argocd_health() -> str:
    """The Lua health check as an argocd-cm snippet (merge it into Argo CD's ConfigMap)."""
    lua = (DEPLOY / "argocd" / "virtualserver-health.lua").read_text()
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "argocd-cm", "namespace": "argocd", "labels": {"app.kubernetes.io/part-of": "argocd"}},
        "data": {"resource.customizations.health.kubelvs.io_VirtualServer": lua},
    }
    header = (
        "# Argo CD health of VirtualServers: merge into argocd-cm (kubectl -n argocd patch configmap argocd-cm\n"
        "# --patch-file deploy/argocd/argocd-cm-health.yaml). Rendered from virtualserver-health.lua by\n"
        "# hack/install/render_deploy.py: do not edit.\n"
    )
    return header + yaml.safe_dump(config_map, sort_keys=False, width=120)


def wanted() -> dict[str, str]:
    files: dict[str, str] = {}
    for name, (templates, values) in FILES.items():
        present = [t for t in templates if (CHART / t).exists()]  # realserver.yaml lands with its issue
        if present:
            try:
                files[name] = render(present, values)
            except subprocess.CalledProcessError as error:
                if "could not find template" in error.stderr:
                    continue  # a template that renders nothing with the default values
                raise SystemExit(f"helm template for deploy/{name} failed:\n{error.stderr}") from error
    files["monitoring/dashboard.json"] = (
        json.dumps(json.loads((CHART / "files" / "dashboard.json").read_text()), indent=1) + "\n"
    )
    files[ARGOCD_CM] = argocd_health()
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if deploy/ differs from the chart's rendering")
    args = parser.parse_args()
    differs = []
    for name, text in wanted().items():
        path = DEPLOY / name
        current = path.read_text() if path.exists() else ""
        if current == text:
            continue
        if args.check:
            diff = difflib.unified_diff(
                current.splitlines(), text.splitlines(), f"deploy/{name}", "rendered", lineterm=""
            )
            differs.append("\n".join(list(diff)[:40]))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote deploy/{name}")
    if differs:
        print(
            "deploy/ is not the chart's rendering (run hack/install/render_deploy.py):",
            *differs,
            sep="\n",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
