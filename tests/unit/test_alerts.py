"""The alerts (charts/kubelvs/files/alerts.yaml) and the Grafana dashboard (files/dashboard.json):
every query names a metric the director exports, and ``promtool test rules`` passes over synthetic
series (tests/unit/promtool/alerts_test.yaml). promtool is built by ``hack/install/tools.sh promtool``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from kubelvs.director import metrics as director_metrics
from prometheus_client import CollectorRegistry

REPO = Path(__file__).resolve().parents[2]
FILES = REPO / "charts" / "kubelvs" / "files"
METRIC = re.compile(r"\bkubelvs_[a-z0-9_]+")


def exported() -> set[str]:
    """Every series name the director can export: its registry's (with the _total, _bucket, _info
    suffixes) and the kernel counters collected at scrape time."""
    registry = CollectorRegistry()
    director_metrics.Metrics(registry)
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_count", "_sum"], "info": ["_info"]}
    names = {family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]}
    # The kernel's families, named as exposed (written by KernelCounters, not the registry).
    names |= {name for name, _kind, _doc, _value in director_metrics.KERNEL_FAMILIES}
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads((FILES / "dashboard.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            queries.append(query["query"])
    return queries


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((FILES / "alerts.yaml").read_text())["groups"] for rule in group["rules"]]


def test_the_dashboard_queries_only_exported_metrics() -> None:
    names = exported()
    used = {name for query in dashboard_queries() for name in METRIC.findall(query)}
    assert used, "the dashboard queries nothing"
    assert used <= names, f"not exported by the director: {sorted(used - names)}"


def test_the_alerts_use_only_exported_metrics() -> None:
    names = exported()
    for rule in alert_rules():
        used = set(METRIC.findall(rule["expr"]))
        assert used and used <= names, f"{rule['alert']}: not exported: {sorted(used - names)}"


def test_the_alerts_cover_what_an_operator_must_know() -> None:
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts == {
        "KubelvsVIPWithoutOwner",
        "KubelvsVIPSplitBrain",
        "KubelvsSyncFailing",
        "KubelvsProgrammingErrors",
        "KubelvsAllBackendsDown",
        "KubelvsSyncStale",
        "KubelvsAPIErrors",
        "KubelvsSlowHeartbeats",
    }
    tested = (REPO / "tests" / "unit" / "promtool" / "alerts_test.yaml").read_text()
    for alert in alerts:
        assert f"alertname: {alert}\n" in tested or f"alertname: {alert}," in tested, f"{alert} has no promtool test"


def promtool() -> str:
    cache = Path(os.environ.get("KUBELVS_CACHE") or Path.home() / ".cache" / "kubelvs")
    path = shutil.which("promtool") or str(cache / "bin" / "promtool")
    if not Path(path).exists():
        pytest.skip("promtool not built (hack/install/tools.sh promtool)")
    return path


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(FILES / "alerts.yaml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_every_alert_pass() -> None:
    test_file = REPO / "tests" / "unit" / "promtool" / "alerts_test.yaml"
    result = subprocess.run([promtool(), "test", "rules", str(test_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
