"""VirtualServer status: what each director reports, and the conditions a user reads (pure).

Directors never fight over one object: each writes only its own entry of ``status.directors``
(server-side apply, list keyed by node). The summary (conditions, counts) is written by one
director. Which one is a policy passed to the status writer; today's, :func:`summary_writer`,
needs no election (the first node name among the entries) and has a known flaw: the entry of a
director that is gone for good is never removed, so a dead director whose name sorts first
blocks the summary. The per-VIP election replaces it (the VIP's owner writes), together with
the removal of entries of directors without a live heartbeat.

What a director can know, and so what the conditions claim: ``Programmed`` is about the
directors that *reported* for the current generation, not about every director the selector
matches (a director that never reported is invisible here).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubelvs.core.cluster import status_of
from kubelvs.core.model import ServiceKey
from kubelvs.core.resolve import Resolution
from kubelvs.core.spec import GROUP, VERSION, ObjectRef

Obj = Mapping[str, Any]


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def director_entry(node: str, resolution: Resolution, errors: list[str], reason: str = "") -> dict[str, Any]:
    """This director's entry, without the timestamp (compare entries to decide on a write).

    ``reason``: why nothing could be programmed on this director at all (``KernelUnavailable``,
    ``OwnershipRecordUnreadable``); per-service kernel errors come as ``errors`` alone.
    """
    entry: dict[str, Any] = {
        "node": node,
        "programmed": resolution.accepted and not errors and not reason,
        "services": len(resolution.keys) if resolution.accepted and not reason else 0,
    }
    if resolution.generation is not None:
        entry["observedGeneration"] = resolution.generation
    if resolution.accepted and (errors or reason):
        entry["reason"] = reason or "ProgrammingFailed"
    if errors:
        entry["message"] = "; ".join(errors)[:4000]
    return entry


def entries(vs: Obj) -> dict[str, Mapping[str, Any]]:
    return {e["node"]: e for e in status_of(vs).get("directors") or [] if "node" in e}


def summary_writer(vs: Obj, node: str) -> bool:
    """True when this director writes the VirtualServer's summary status (without the election:
    with it, the VIP's owner writes, see ``kubelvs.director.election``)."""
    return node <= min(entries(vs), default=node)


def _condition(
    previous: Mapping[str, Mapping[str, Any]],
    kind: str,
    ok: bool,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> dict[str, Any]:
    status = "True" if ok else "False"
    before = previous.get(kind)
    changed = before is None or before.get("status") != status
    condition = {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now if changed else before["lastTransitionTime"],  # type: ignore[index]
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


@dataclass(frozen=True, slots=True)
class Announcement:
    """The election's view of a VirtualServer's VIP, for its ``Announced`` condition and ``owner``."""

    owner: str  # "" when no live director holds it
    ok: bool
    reason: str
    message: str


def summary(
    vs: Obj, resolution: Resolution, own: Mapping[str, Any], now: str, announcement: Announcement | None = None
) -> dict[str, Any]:
    """The status summary from every director's entry (this director's ``own`` one being fresh).

    ``announcement``: with the election on, the VIP's owner and the ``Announced`` condition."""
    reports = dict(entries(vs))
    reports[own["node"]] = own
    generation = resolution.generation
    current = [e for e in reports.values() if e.get("observedGeneration") == generation]
    programmed = [e for e in current if e.get("programmed")]
    previous = {c.get("type"): c for c in status_of(vs).get("conditions") or []}

    if resolution.error is not None:
        accepted = (False, resolution.error.reason, str(resolution.error.message))
    else:
        accepted = (True, "Valid", "the spec is valid and its VIP, ports and protocols are not claimed by another")
    if not accepted[0]:
        prog = (False, "NotAccepted", "not programmed: the spec is not accepted")
    elif not current:
        prog = (False, "NoDirectors", "no director has programmed this generation yet")
    elif len(programmed) == len(current):
        prog = (
            True,
            "Programmed",
            f"in the kernel of the {len(programmed)} director(s) that reported for generation {generation}",
        )
    else:
        failed = sorted(e["node"] for e in current if not e.get("programmed"))
        detail = "; ".join(f"{n}: {reports[n].get('message', '')}" for n in failed)
        reasons = {str(reports[n].get("reason") or "ProgrammingFailed") for n in failed}
        reason = reasons.pop() if len(reasons) == 1 else "ProgrammingFailed"  # e.g. KernelUnavailable on all
        prog = (False, reason, f"{len(failed)} of {len(current)} director(s) failed: {detail}"[:4000])

    if not accepted[0]:
        ready = (False, "NotAccepted", accepted[2])
    elif not prog[0]:
        ready = (False, "NotProgrammed", prog[2])
    elif resolution.problem is not None:
        ready = (False, resolution.problem.reason, resolution.problem.message)
    elif resolution.ready_backends == 0:
        ready = (False, "NoReadyBackends", "every real server has weight 0")
    else:
        ready = (True, "Ready", f"{resolution.ready_backends} ready backend(s)")

    result: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": [
            _condition(previous, "Accepted", *accepted, generation, now),
            _condition(previous, "Programmed", *prog, generation, now),
            _condition(previous, "Ready", *ready, generation, now),
        ],
        "readyBackends": resolution.ready_backends,
        "drainingBackends": resolution.draining_backends,
        "waitingBackends": resolution.waiting_backends,
        "programmedDirectors": len(programmed),
    }
    if announcement is not None:
        if not accepted[0]:
            announced = (False, "NotAccepted", accepted[2])
        else:
            announced = (announcement.ok, announcement.reason, announcement.message)
        result["conditions"].append(_condition(previous, "Announced", *announced, generation, now))
        result["owner"] = announcement.owner
    return result


def event(vs: Obj, kind: str, reason: str, message: str, node: str, now: str) -> dict[str, Any]:
    """A Kubernetes Event about a VirtualServer (``kind``: Normal or Warning)."""
    meta = vs.get("metadata") or {}
    return {
        "metadata": {"generateName": f"{meta.get('name')}.", "namespace": meta.get("namespace")},
        "involvedObject": {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "VirtualServer",
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
        },
        "type": kind,
        "reason": reason,
        "message": message[:1000],
        "source": {"component": "kubelvs-director", "host": node},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


def same_summary(vs: Obj, new: Mapping[str, Any]) -> bool:
    """Whether writing ``new`` would change nothing a user can see (timestamps aside)."""
    status = status_of(vs)
    for key in (
        "observedGeneration",
        "readyBackends",
        "drainingBackends",
        "waitingBackends",
        "programmedDirectors",
        "owner",
    ):
        if status.get(key) != new.get(key):
            return False
    old = {c.get("type"): c for c in status.get("conditions") or []}
    for condition in new["conditions"]:
        before = old.get(condition["type"]) or {}
        for key in ("status", "reason", "message", "observedGeneration"):
            if before.get(key) != condition.get(key):
                return False
    return True


def same_entry(vs: Obj, entry: Mapping[str, Any]) -> bool:
    before = entries(vs).get(entry["node"])
    if before is None:
        return False
    return all(
        before.get(k) == entry.get(k) for k in ("programmed", "services", "observedGeneration", "message", "reason")
    )


def errors_by_origin(
    failures: Iterable[tuple[ServiceKey, str]], origins: Mapping[ServiceKey, ObjectRef]
) -> dict[ObjectRef, list[str]]:
    """Kernel errors (a failed operation, a foreign service in the way) per VirtualServer."""
    errors: dict[ObjectRef, list[str]] = {}
    for key, message in failures:
        origin = origins.get(key)
        if origin is not None:
            errors.setdefault(origin, []).append(message)
    return errors


def merge_errors(
    previous: Mapping[ObjectRef, list[str]],
    found: Mapping[ObjectRef, list[str]],
    scope: Collection[ObjectRef] | None,
) -> dict[ObjectRef, list[str]]:
    """The errors after a sync of ``scope`` (None: everything): a sync speaks only for what it
    covered, so the errors of VirtualServers outside its scope stay as they were."""
    if scope is None:
        return dict(found)
    merged = {ref: errors for ref, errors in previous.items() if ref not in scope}
    merged.update({ref: errors for ref, errors in found.items() if ref in scope})
    return merged
