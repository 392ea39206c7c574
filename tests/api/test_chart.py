"""The Helm chart, validated offline: ``helm lint --strict``, ``helm template`` over a matrix of values
files through ``kubeconform -strict`` with schemas generated from the local API server's OpenAPI v3
(CRDs included), the same output server-side dry-run applied, bad values refused with the key
named, and deploy/ equal to the chart's rendering. helm and kubeconform come from
``hack/install/tools.sh`` (built from Go modules into the cache, like the control plane)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helm_tools import CHART, REPO, Helm, ensure_tools, kube_version

VALUES = sorted((REPO / "tests" / "install" / "values").glob("*.yaml"))
BAD_VALUES = sorted((REPO / "tests" / "install" / "bad-values").glob("*.yaml"))
# Kinds whose CRDs (the Prometheus Operator's) are not in the test cluster: their content is checked
# by promtool (tests/unit/test_alerts.py).
NOT_SERVED = {"ServiceMonitor", "PrometheusRule"}


@pytest.fixture(scope="module")
def tools(control_plane) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return ensure_tools(Path(control_plane.kubectl).parent)


@pytest.fixture(scope="module")
def helm(tools: dict[str, str], kubeconfig: str, tmp_path_factory) -> Helm:  # type: ignore[no-untyped-def]
    return Helm(tools["helm"], kubeconfig, tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session")
def schema_location(control_plane, kubectl, tmp_path_factory) -> str:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("schemas")
    result = subprocess.run(
        [sys.executable, str(REPO / "hack" / "install" / "openapi_schemas.py"), "--out", str(out),
         "--kubectl", str(kubectl.path), "--kubeconfig", str(kubectl.kubeconfig)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return result.stdout.strip()


def render(helm, values: Path, namespace: str = "kubelvs-system") -> str:  # type: ignore[no-untyped-def]
    return str(
        helm("template", "kubelvs", str(CHART), "--namespace", namespace, "--kube-version", kube_version(),
             "--include-crds", "-f", str(values)).stdout
    )  # fmt: skip


def test_helm_lint_strict_is_clean(helm) -> None:  # type: ignore[no-untyped-def]
    for values in VALUES:
        result = helm("lint", "--strict", str(CHART), "--kube-version", kube_version(), "-f", str(values))
        assert "0 chart(s) failed" in result.stdout, result.stdout
        assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize("values", VALUES, ids=[v.stem for v in VALUES])
def test_rendered_chart_passes_kubeconform_strict(helm, tools, schema_location: str, values: Path, tmp_path) -> None:  # type: ignore[no-untyped-def]
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(render(helm, values))
    kinds = {d["kind"] for d in yaml.safe_load_all(manifest.read_text()) if d}
    assert {"DaemonSet", "CustomResourceDefinition"} <= kinds
    result = subprocess.run(
        [tools["kubeconform"], "-strict", "-summary", "-kubernetes-version", kube_version(),
         "-schema-location", schema_location, "-skip", ",".join(sorted(NOT_SERVED)), str(manifest)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Invalid: 0, Errors: 0" in result.stdout, result.stdout


@pytest.mark.parametrize("values", VALUES, ids=[v.stem for v in VALUES])
def test_rendered_chart_is_accepted_by_a_server_side_dry_run(helm, kubectl, namespace: str, values: Path) -> None:  # type: ignore[no-untyped-def]
    # Rendered into this test's (existing) namespace: the chart's Namespace is then an update.
    docs = [d for d in yaml.safe_load_all(render(helm, values, namespace)) if d and d["kind"] not in NOT_SERVED]
    result = kubectl(
        "apply", "--server-side", "--dry-run=server", "--field-manager=helm-test", "-f", "-",
        input=yaml.safe_dump_all(docs), check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("serverside-applied (server dry run)") == len(docs), result.stdout


@pytest.mark.parametrize("values", BAD_VALUES, ids=[v.stem for v in BAD_VALUES])
def test_bad_values_are_refused_naming_the_key(helm, values: Path) -> None:  # type: ignore[no-untyped-def]
    expected = values.read_text().splitlines()[0].removeprefix("# refused: ").strip()
    result = helm("template", "kubelvs", str(CHART), "--kube-version", kube_version(), "-f", str(values), check=False)
    assert result.returncode != 0, f"{values.name} was accepted"
    assert "don't meet the specifications of the schema" in result.stderr, result.stderr
    assert expected in result.stderr, result.stderr


def test_deploy_is_the_charts_rendering(tools) -> None:  # type: ignore[no-untyped-def]
    result = subprocess.run(
        [sys.executable, str(REPO / "hack" / "install" / "render_deploy.py"), "--check"],
        capture_output=True, text=True, env={**os.environ, "HELM": tools["helm"]},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_charts_crd_is_a_file_equal_to_crds() -> None:
    for crd in (REPO / "crds").glob("*.yaml"):
        in_chart = CHART / "crds" / crd.name
        assert in_chart.is_file() and not in_chart.is_symlink(), in_chart
        assert in_chart.read_text() == crd.read_text(), f"{in_chart} differs from {crd}"
    assert {p.name for p in (CHART / "crds").iterdir()} == {p.name for p in (REPO / "crds").glob("*.yaml")}
