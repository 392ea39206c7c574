"""VirtualServer status from director entries (pure)."""

from __future__ import annotations

from kubelvs.core import status as st
from kubelvs.core.resolve import BackendProblem, Resolution
from kubelvs.core.spec import ObjectRef, SpecError

REF = ObjectRef("ns", "web")
NOW = "2026-01-01T00:00:00Z"


def resolution(**kw: object) -> Resolution:
    base = {"generation": 2, "keys": (("k",),), "ready_backends": 3}
    base.update(kw)
    return Resolution(REF, **base)  # type: ignore[arg-type]


def vs(entries: list[dict] | None = None, conditions: list[dict] | None = None) -> dict:
    return {
        "metadata": {"name": "web", "namespace": "ns", "generation": 2},
        "status": {"directors": entries or [], "conditions": conditions or []},
    }


def conditions(summary: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in summary["conditions"]}


def test_ready_when_every_director_programmed_this_generation() -> None:
    own = st.director_entry("a", resolution(), [])
    other = {"node": "b", "programmed": True, "observedGeneration": 2}
    summary = st.summary(vs([other]), resolution(), own, NOW)
    assert conditions(summary) == {
        "Accepted": ("True", "Valid"),
        "Programmed": ("True", "Programmed"),
        "Ready": ("True", "Ready"),
    }
    assert summary["programmedDirectors"] == 2 and summary["readyBackends"] == 3


def test_a_failing_director_makes_it_not_programmed_with_its_message() -> None:
    own = st.director_entry("a", resolution(), ["add-dest: Invalid argument"])
    summary = st.summary(vs(), resolution(), own, NOW)
    assert conditions(summary)["Programmed"] == ("False", "ProgrammingFailed")
    assert "Invalid argument" in summary["conditions"][1]["message"]
    assert conditions(summary)["Ready"] == ("False", "NotProgrammed")


def test_conflict_and_missing_service() -> None:
    error = SpecError(REF, "spec.vip", "TCP 10.0.0.1:80 is already served by VirtualServer ns/old", "VIPConflict")
    own = st.director_entry("a", resolution(error=error), [])
    assert conditions(st.summary(vs(), resolution(error=error), own, NOW))["Accepted"] == ("False", "VIPConflict")
    missing = resolution(problem=BackendProblem("ServiceNotFound", "Service ns/web does not exist"), ready_backends=0)
    summary = st.summary(vs(), missing, st.director_entry("a", missing, []), NOW)
    assert conditions(summary)["Ready"] == ("False", "ServiceNotFound")


def test_transition_time_kept_while_status_unchanged() -> None:
    old = [{"type": "Ready", "status": "True", "reason": "Ready", "message": "", "lastTransitionTime": "earlier"}]
    summary = st.summary(vs(conditions=old), resolution(), st.director_entry("a", resolution(), []), NOW)
    ready = next(c for c in summary["conditions"] if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == "earlier"


def test_one_summary_writer_without_election() -> None:
    obj = vs([{"node": "b", "programmed": True}, {"node": "c", "programmed": True}])
    assert st.summary_writer(obj, "a") and st.summary_writer(obj, "b") and not st.summary_writer(obj, "c")


def test_same_summary_ignores_timestamps() -> None:
    summary = st.summary(vs(), resolution(), st.director_entry("a", resolution(), []), NOW)
    obj = vs()
    obj["status"].update({**summary, "conditions": [{**c, "lastTransitionTime": "x"} for c in summary["conditions"]]})
    assert st.same_summary(obj, summary)
    assert not st.same_summary(vs(), summary)
