"""The Argo CD health check of VirtualServers (deploy/argocd/virtualserver-health.lua), run in Lua 5.1
(Argo CD's dialect, through lupa) over statuses shaped by kubelvs.core.status.summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

lua51 = pytest.importorskip("lupa.lua51")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "argocd" / "virtualserver-health.lua"


def to_lua(runtime: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return runtime.table_from({k: to_lua(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([to_lua(runtime, v) for v in value])
    return value


def health(vs: dict[str, Any]) -> tuple[str, str]:
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = to_lua(runtime, vs)
    result = runtime.execute(SCRIPT.read_text())
    return str(result["status"]), str(result["message"])


def condition(kind: str, ok: bool, reason: str, message: str = "", generation: int = 2) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message or reason,
        "observedGeneration": generation,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }


def vs(
    *conditions: dict[str, Any], generation: int = 2, observed: int | None = 2, owner: str | None = "node-a"
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "kubelvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": "web", "namespace": "default", "generation": generation},
        "spec": {},
    }
    if observed is not None:
        status: dict[str, Any] = {"observedGeneration": observed, "conditions": list(conditions)}
        if owner is not None:
            status["owner"] = owner
        obj["status"] = status
    return obj


ACCEPTED = condition("Accepted", True, "Valid")
PROGRAMMED = condition("Programmed", True, "Programmed")
READY = condition("Ready", True, "Ready", "2 ready backend(s)")
ANNOUNCED = condition("Announced", True, "Owner")


def test_ready_for_the_current_generation_with_an_owner_is_healthy() -> None:
    status, message = health(vs(ACCEPTED, PROGRAMMED, READY, ANNOUNCED))
    assert status == "Healthy"
    assert "node-a" in message and "2 ready backend(s)" in message


def test_ready_without_the_election_is_healthy() -> None:
    assert health(vs(ACCEPTED, PROGRAMMED, READY, owner=None))[0] == "Healthy"


def test_no_status_yet_is_progressing() -> None:
    assert health(vs(observed=None)) == ("Progressing", "Waiting for a director to report")


def test_a_lagging_observed_generation_is_progressing_even_if_ready_before() -> None:
    status, message = health(vs(ACCEPTED, PROGRAMMED, READY, ANNOUNCED, generation=3, observed=2))
    assert status == "Progressing" and "generation 3" in message


def test_not_yet_programmed_by_any_director_is_progressing() -> None:
    programmed = condition("Programmed", False, "NoDirectors", "no director has programmed this generation yet")
    assert health(vs(ACCEPTED, programmed, condition("Ready", False, "NotProgrammed")))[0] == "Progressing"


def test_a_refused_spec_is_degraded_with_the_reason() -> None:
    accepted = condition("Accepted", False, "VIPConflict", "VIP 10.0.0.1:80/TCP is claimed by default/other")
    status, message = health(vs(accepted, condition("Programmed", False, "NotAccepted"), owner=""))
    assert status == "Degraded"
    assert "VIPConflict" in message and "default/other" in message


@pytest.mark.parametrize("reason", ["ProgrammingFailed", "KernelUnavailable", "OwnershipRecordUnreadable"])
def test_a_programming_failure_is_degraded(reason: str) -> None:
    programmed = condition("Programmed", False, reason, "1 of 2 director(s) failed: node-b: no IPVS")
    status, message = health(vs(ACCEPTED, programmed, condition("Ready", False, "NotProgrammed"), ANNOUNCED))
    assert status == "Degraded" and reason in message


@pytest.mark.parametrize("owner", ["", None])
def test_a_vip_without_owner_is_degraded(owner: str | None) -> None:
    announced = condition("Announced", False, "NoInterfaceForVIP", "no interface's subnet contains 10.0.0.1")
    status, message = health(vs(ACCEPTED, PROGRAMMED, READY, announced, owner=owner))
    assert status == "Degraded"
    assert "No director owns the VIP" in message and "NoInterfaceForVIP" in message


def test_no_ready_backend_is_degraded() -> None:
    ready = condition("Ready", False, "NoReadyBackends", "every real server has weight 0")
    assert health(vs(ACCEPTED, PROGRAMMED, ready, ANNOUNCED)) == (
        "Degraded",
        "Ready=False (NoReadyBackends): every real server has weight 0",
    )


def test_the_statuses_kubelvs_writes_map_as_documented() -> None:
    """The real summary function's output, not hand-written conditions."""
    from kubelvs.core.resolve import Resolution
    from kubelvs.core.spec import ObjectRef
    from kubelvs.core.status import Announcement, director_entry, summary

    ok = Resolution(ObjectRef("default", "web"), generation=2, keys=(("k",),), ready_backends=2)  # type: ignore[arg-type]
    own = director_entry("node-a", ok, [])
    written = summary({}, ok, own, "2026-01-01T00:00:00Z", Announcement("node-a", True, "Owner", "owned"))
    assert health({**vs(), "status": written})[0] == "Healthy"
    failed = director_entry("node-a", ok, [], reason="KernelUnavailable")
    written = summary({}, ok, failed, "2026-01-01T00:00:00Z", Announcement("", False, "NoOwner", "nobody"))
    assert health({**vs(), "status": written})[0] == "Degraded"


def test_the_argocd_snippet_carries_this_script() -> None:
    snippet = yaml.safe_load((REPO / "deploy" / "argocd" / "argocd-cm-health.yaml").read_text())
    assert snippet["data"]["resource.customizations.health.kubelvs.io_VirtualServer"] == SCRIPT.read_text()


def test_the_argocd_applications_sync_the_crds_first_and_never_prune_them() -> None:
    apps = {
        a["metadata"]["name"]: a
        for a in yaml.safe_load_all((REPO / "deploy" / "argocd" / "application.yaml").read_text())
    }
    crds, chart = apps["kubelvs-crds"], apps["kubelvs"]
    wave = "argocd.argoproj.io/sync-wave"
    assert int(crds["metadata"]["annotations"][wave]) < int(chart["metadata"]["annotations"][wave])
    assert crds["spec"]["source"]["path"] == "crds" and crds["spec"]["syncPolicy"]["automated"]["prune"] is False
    assert chart["spec"]["source"]["path"] == "charts/kubelvs" and chart["spec"]["source"]["helm"]["skipCrds"] is True
    # The chart makes its namespace with the Pod Security labels; Argo CD's would have none.
    assert "CreateNamespace=true" not in chart["spec"]["syncPolicy"].get("syncOptions", [])
    assert chart["spec"]["destination"]["namespace"] == "kubelvs-system"
