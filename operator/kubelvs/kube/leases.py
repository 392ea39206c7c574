"""The directors' election Leases (coordination.k8s.io/v1) in the director's namespace.

Two kinds, both labelled ``app.kubernetes.io/name: kubelvs``:

* a heartbeat per director (``kubelvs-director-<node>``, ``kubelvs.io/lease: heartbeat``),
  renewed every retry period with one PUT, carrying what the other directors need to know of
  it (the VIPs it cannot serve now, its address for direct peer heartbeats);
* a claim per VIP (``kubelvs-vip-<vip>``, ``kubelvs.io/lease: vip``), written only when its
  owner changes, always with the resourceVersion last seen: a create fails if the Lease exists,
  an update if it changed meanwhile, so two directors can never both win.

The steady-state write load is thus one request per director per retry period, whatever the
number of VIPs. Nobody compares the times written here (renewTime, acquireTime): clocks differ
between nodes; a director judges a heartbeat by whether its resourceVersion moves.

Requests go out as raw JSON with a (connect, read) timeout and without urllib3's retries: a PUT
whose answer timed out must come back to the caller as a failure, not be sent again behind its
back (a blind resend of a claim that did land would then be refused with 409, and the retries
would stretch one call to four timeouts). Deciding what to write is the director's business.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import math
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from kubernetes.client.exceptions import ApiException

from kubelvs.core.model import normalize_address
from kubelvs.kube.informers import LIST_TIMEOUT, PAGE_SIZE, Informer
from kubelvs.kube.rest import KubeApi

Obj = dict[str, Any]

APP_LABEL = "app.kubernetes.io/name"
APP = "kubelvs"
KIND_LABEL = "kubelvs.io/lease"
HEARTBEAT = "heartbeat"
VIP = "vip"
VIP_ANNOTATION = "kubelvs.io/vip"
UNFIT_ANNOTATION = "kubelvs.io/unfit"
PEER_ADDRESS_ANNOTATION = "kubelvs.io/peer-address"
HEARTBEAT_PREFIX = "kubelvs-director-"
CLAIM_PREFIX = "kubelvs-vip-"
SELECTOR = f"{APP_LABEL}={APP}"

_API = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
_MAX_NAME = 253  # a Lease name is a DNS-1123 subdomain
_INVALID = re.compile(r"[^a-z0-9.-]+")


# ---------------------------------------------------------------------------------------------
# Names


def heartbeat_name(node: str) -> str:
    """``kubelvs-director-<node>``; a node name that had to be changed (or cut) to make a valid
    name gets a hash of the original appended, so distinct nodes keep distinct Leases."""
    labels = (label.strip("-") for label in _INVALID.sub("-", node.lower()).split("."))
    text = ".".join(label for label in labels if label)
    name = HEARTBEAT_PREFIX + text
    if text and text == node and len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(node.encode()).hexdigest()[:10]
    text = text[: _MAX_NAME - len(HEARTBEAT_PREFIX) - len(digest) - 1].rstrip("-.")
    return f"{HEARTBEAT_PREFIX}{text}-{digest}" if text else HEARTBEAT_PREFIX + digest


def _ipv6_hex(address: ipaddress.IPv6Address) -> str:
    """RFC 5952 text, always in hex groups: a newer Python writes ``::ffff:10.0.0.1``, whose
    dots would meet the separators of ``::ffff:10:0:0:1`` once both became '-'."""
    value = int(address)
    groups = [f"{(value >> (112 - 16 * i)) & 0xFFFF:x}" for i in range(8)]
    best, best_len, start = -1, 1, -1  # the first longest run of at least two zero groups
    for i, group in enumerate([*groups, "x"]):
        if group == "0":
            start = i if start < 0 else start
            continue
        if start >= 0 and i - start > best_len:
            best, best_len = start, i - start
        start = -1
    if best < 0:
        return ":".join(groups)
    return ":".join(groups[:best]) + "::" + ":".join(groups[best + best_len :])


@functools.lru_cache(maxsize=1 << 14)  # every event of a claim checks its name
def claim_name(vip: str) -> str:
    """``kubelvs-vip-10-0-0-1``, ``kubelvs-vip-fd00--1``: one name per address, whatever its
    spelling. Raises ValueError for text that is not an IP address (or has an IPv6 zone)."""
    address = ipaddress.ip_address(vip.strip())
    if isinstance(address, ipaddress.IPv4Address):
        return CLAIM_PREFIX + str(address).replace(".", "-")
    if address.scope_id:
        raise ValueError(f"a VIP has no IPv6 zone: {vip!r}")
    text = _ipv6_hex(address).replace(":", "-")
    # A name ends alphanumeric: "fd00::" becomes "fd00--0", which no other address gives
    # (the compressed form never ends in "::0").
    return CLAIM_PREFIX + (text + "0" if text.endswith("-") else text)


# ---------------------------------------------------------------------------------------------
# Records: what the directors read of a Lease (plain values, no client model classes)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _parts(obj: Any, kind: str) -> tuple[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any], str] | None:
    """(metadata, annotations, spec, resourceVersion) of one of our Leases of ``kind``, else None."""
    meta = _mapping(_mapping(obj).get("metadata"))
    labels = _mapping(meta.get("labels"))
    version = meta.get("resourceVersion")
    if labels.get(APP_LABEL) != APP or labels.get(KIND_LABEL) != kind or not isinstance(version, str) or not version:
        return None
    return meta, _mapping(meta.get("annotations")), _mapping(_mapping(obj).get("spec")), version


@dataclass(frozen=True, slots=True)
class HeartbeatRecord:
    node: str
    version: str  # resourceVersion: a director is alive while this keeps changing
    duration_seconds: int
    unfit: frozenset[str]  # VIPs it cannot serve now
    peer_address: str  # for direct peer heartbeats; "" if none

    @classmethod
    def from_lease(cls, obj: Any) -> HeartbeatRecord | None:
        parts = _parts(obj, HEARTBEAT)
        if parts is None:
            return None
        meta, annotations, spec, version = parts
        node, duration = spec.get("holderIdentity"), spec.get("leaseDurationSeconds")
        if not isinstance(node, str) or not node or meta.get("name") != heartbeat_name(node):
            return None
        if not isinstance(duration, int) or isinstance(duration, bool) or duration <= 0:
            return None
        unfit, peer = annotations.get(UNFIT_ANNOTATION), annotations.get(PEER_ADDRESS_ANNOTATION)
        return cls(
            node,
            version,
            duration,
            frozenset(v.strip() for v in unfit.split(",") if v.strip()) if isinstance(unfit, str) else frozenset(),
            peer if isinstance(peer, str) else "",
        )


@dataclass(frozen=True, slots=True)
class ClaimRecord:
    vip: str  # canonical text (kubelvs.core.model.normalize_address)
    holder: str  # the owner node; "" when released
    version: str  # resourceVersion: the precondition of the next write
    transitions: int
    acquired: str = field(default="", compare=False)  # acquireTime, informative: kept on a rewrite
    # The Lease's uid, sent with an update: Leases allow create-on-update, so without it a PUT
    # from a view older than a deletion would bring the claim back instead of failing.
    uid: str = field(default="", compare=False)

    @classmethod
    def from_lease(cls, obj: Any) -> ClaimRecord | None:
        parts = _parts(obj, VIP)
        if parts is None:
            return None
        meta, annotations, spec, version = parts
        vip = annotations.get(VIP_ANNOTATION)
        try:
            if not isinstance(vip, str) or meta.get("name") != claim_name(vip):
                return None  # a hand-made Lease: its name is not the one a director would write
            vip = normalize_address(vip)[1]
        except ValueError:
            return None
        transitions = spec.get("leaseTransitions")
        return cls(
            vip,
            _text(spec.get("holderIdentity")),
            version,
            transitions if isinstance(transitions, int) and not isinstance(transitions, bool) else 0,
            _text(spec.get("acquireTime")),
            _text(meta.get("uid")),
        )


def trim_lease(obj: Obj) -> Obj:
    """What the directors read of a Lease (no managedFields): for the informer's cache."""
    meta = _mapping(obj.get("metadata"))
    keys = ("name", "namespace", "uid", "resourceVersion", "labels", "annotations")
    return {"metadata": {k: meta[k] for k in keys if meta.get(k) is not None}, "spec": dict(_mapping(obj.get("spec")))}


# ---------------------------------------------------------------------------------------------
# Writes and reads


class Conflict(Exception):
    """The write was refused: the Lease changed (or appeared, or went) since ``expected``.

    ``record`` is the fresh record when known. This client does not read after a refusal (a
    read per lost race; the watch brings the new state at once), so it is None here. A write
    that timed out raises no Conflict but a urllib3 error: its outcome is unknown until the
    watch shows it.
    """

    def __init__(self, message: str, record: HeartbeatRecord | ClaimRecord | None = None) -> None:
        super().__init__(message)
        self.record = record


class HeartbeatTaken(Exception):
    """The heartbeat Lease of this node is held by another identity: two directors think they
    run on the same node (or someone wrote the Lease by hand). Never overwritten silently."""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # MicroTime


def _labels(kind: str) -> dict[str, str]:
    return {APP_LABEL: APP, KIND_LABEL: kind}


class LeaseClient:
    """The election's requests, for one namespace. Thread-safe.

    Raises, besides :class:`Conflict`: ``ApiException`` for any other refusal (403, 429, 5xx)
    and urllib3's errors for timeouts and refused connections; the caller retries.
    """

    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        timeout_seconds: float = 5.0,
        on_write: Callable[[str], None] | None = None,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.timeout = (min(10.0, timeout_seconds), timeout_seconds)  # (connect, read)
        self.on_write = on_write
        self.writes: Counter[str] = Counter()  # write requests sent, by "heartbeat" | "claim"
        self._lock = threading.Lock()
        # node -> (resourceVersion, acquireTime) last written: a renewal is one PUT, no GET first.
        self._heartbeats: dict[str, tuple[str, str]] = {}

    # -- heartbeats -------------------------------------------------------------------------

    def renew_heartbeat(
        self, node: str, duration_seconds: float, unfit: Iterable[str] = (), peer_address: str = ""
    ) -> HeartbeatRecord:
        """Create or renew ``node``'s heartbeat: one PUT with the version last written, else (the
        first call, a restart, a Lease someone else touched) a fresh read and one more try."""
        name = heartbeat_name(node)
        unfit = frozenset(unfit)
        with self._lock:
            last = self._heartbeats.get(node)
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": _labels(HEARTBEAT),
                "annotations": {UNFIT_ANNOTATION: ",".join(sorted(unfit)), PEER_ADDRESS_ANNOTATION: peer_address},
            },
            "spec": {"holderIdentity": node, "leaseDurationSeconds": math.ceil(duration_seconds)},
        }
        try:
            return self._write_heartbeat(node, body, last, unfit)
        except ApiException as error:
            # Left by an earlier run of this director, or touched by someone else. (A deleted one
            # gives no 404: Leases allow create-on-update, the PUT re-creates it.)
            if error.status != 409:
                raise
        fresh = self._request("GET", name, missing_ok=True)
        if fresh is None:
            last = None
        else:
            spec, meta = _mapping(fresh.get("spec")), _mapping(fresh.get("metadata"))
            holder = spec.get("holderIdentity")
            if holder and holder != node:
                raise HeartbeatTaken(f"Lease {self.namespace}/{name} is held by {holder!r}, not by node {node!r}")
            last = (str(meta.get("resourceVersion") or ""), str(spec.get("acquireTime") or ""))
        try:
            return self._write_heartbeat(node, body, last, unfit)
        except ApiException as error:
            if error.status != 409:
                raise
            raise Conflict(f"heartbeat {name} changed twice while being renewed") from error

    def _write_heartbeat(
        self, node: str, body: Obj, last: tuple[str, str] | None, unfit: frozenset[str]
    ) -> HeartbeatRecord:
        now = _now()
        body["spec"]["renewTime"] = now
        body["spec"]["acquireTime"] = last[1] if last and last[1] else now
        if last is None:
            body["metadata"].pop("resourceVersion", None)
            obj = self._request("POST", None, body, write="heartbeat")
        else:
            body["metadata"]["resourceVersion"] = last[0]
            obj = self._request("PUT", body["metadata"]["name"], body, write="heartbeat")
        assert obj is not None
        version = _mapping(_mapping(obj).get("metadata")).get("resourceVersion")
        if not isinstance(version, str) or not version:  # the server answers with what was written
            raise ValueError(f"the API server returned a heartbeat without a resourceVersion: {obj!r:.500}")
        # The record of what we wrote, not parsed back from the answer: its unfit list can hold
        # every VIP (a director with no interface for any), split again at every renewal.
        peer = body["metadata"]["annotations"][PEER_ADDRESS_ANNOTATION]
        record = HeartbeatRecord(node, version, body["spec"]["leaseDurationSeconds"], unfit, peer)
        with self._lock:
            self._heartbeats[node] = (record.version, body["spec"]["acquireTime"])
        return record

    def get_heartbeat(self, node: str) -> HeartbeatRecord | None:
        """A fresh read (not the watch cache): None if there is none (or it is not a heartbeat)."""
        obj = self._request("GET", heartbeat_name(node), missing_ok=True)
        return None if obj is None else HeartbeatRecord.from_lease(obj)

    def delete_heartbeat(self, node: str) -> None:
        """On a clean shutdown: the others need not wait for it to expire. Gone already is fine."""
        with self._lock:
            self._heartbeats.pop(node, None)
        self._request("DELETE", heartbeat_name(node), write="heartbeat", missing_ok=True)

    def list_heartbeats(self) -> tuple[list[HeartbeatRecord], str]:
        items, version = self._list(HEARTBEAT)
        return [r for r in map(HeartbeatRecord.from_lease, items) if r is not None], version

    # -- claims -----------------------------------------------------------------------------

    def claim(self, vip: str, holder: str, expected: ClaimRecord | None) -> ClaimRecord:
        """Make ``holder`` (``""``: nobody) the owner of ``vip``, if the claim is still ``expected``.

        ``expected=None``: the claim must not exist yet. Raises :class:`Conflict` when it does,
        or when it changed or went since ``expected`` was read.
        """
        vip = normalize_address(vip)[1]
        name, now = claim_name(vip), _now()
        meta: Obj = {
            "name": name,
            "namespace": self.namespace,
            "labels": _labels(VIP),
            "annotations": {VIP_ANNOTATION: vip},
        }
        if expected is None:
            transitions, acquired = 0, now
        else:
            if claim_name(expected.vip) != name:
                raise ValueError(f"expected record is for {expected.vip}, not {vip}")
            meta["resourceVersion"] = expected.version
            if expected.uid:  # a UID precondition: 409, not a re-creation, if it was deleted meanwhile
                meta["uid"] = expected.uid
            changed = holder != expected.holder
            transitions = expected.transitions + 1 if changed else expected.transitions
            acquired = now if changed or not expected.acquired else expected.acquired
        spec: Obj = {"leaseTransitions": transitions, "acquireTime": acquired, "renewTime": now}
        if holder:
            spec["holderIdentity"] = holder  # absent: released
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}
        try:
            if expected is None:
                obj = self._request("POST", None, body, write="claim")
            else:
                obj = self._request("PUT", name, body, write="claim")
        except ApiException as error:
            if error.status == 409:
                what = "exists already" if expected is None else f"changed since version {expected.version}"
                raise Conflict(f"claim {name} {what}") from error
            if error.status == 404 and expected is not None:
                raise Conflict(f"claim {name} was deleted") from error
            raise
        assert obj is not None
        record = ClaimRecord.from_lease(obj)
        if record is None:
            raise ValueError(f"the API server returned a claim this client cannot read: {obj!r:.500}")
        return record

    def delete_claim(self, vip: str, expected: ClaimRecord) -> None:
        """Delete the claim of a VIP no VirtualServer uses any more, if it is still ``expected``
        (Conflict otherwise: someone claimed it meanwhile). Gone already is fine."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"resourceVersion": expected.version}}
        try:
            self._request("DELETE", claim_name(vip), body, write="claim", missing_ok=True)
        except ApiException as error:
            if error.status == 409:
                raise Conflict(f"claim {claim_name(vip)} changed since version {expected.version}") from error
            raise

    def list_claims(self) -> tuple[list[ClaimRecord], str]:
        items, version = self._list(VIP)
        return [r for r in map(ClaimRecord.from_lease, items) if r is not None], version

    # -- requests ---------------------------------------------------------------------------

    def _list(self, kind: str) -> tuple[list[Obj], str]:
        """A fresh, paged LIST of our Leases of ``kind``: (items, resourceVersion)."""
        items: list[Obj] = []
        query: list[tuple[str, str]] = [("labelSelector", f"{SELECTOR},{KIND_LABEL}={kind}"), ("limit", str(PAGE_SIZE))]
        token = ""
        while True:
            page = self._request("GET", None, query=query + ([("continue", token)] if token else []))
            assert page is not None
            items.extend(item for item in page.get("items") or [] if isinstance(item, dict))
            meta = _mapping(page.get("metadata"))
            token = str(meta.get("continue") or "")
            if not token:
                return items, str(meta.get("resourceVersion") or "")

    def _request(
        self,
        method: str,
        name: str | None,
        body: Obj | None = None,
        *,
        query: list[tuple[str, str]] | None = None,
        write: str = "",
        missing_ok: bool = False,
    ) -> Obj | None:
        """One request, as raw JSON: the parsed answer; None for a 404 when ``missing_ok``.
        Any other non-2xx answer raises ApiException (with the status, as the client's own)."""
        path = _API.format(namespace=quote(self.namespace, safe=""))
        if name is not None:
            path += "/" + quote(name, safe="")
        if write:
            with self._lock:
                self.writes[write] += 1
            if self.on_write is not None:
                self.on_write(write)
        return self.api.call(  # type: ignore[no-any-return]
            method, path, query=dict(query or []), body=body, timeout=self.timeout, missing_ok=missing_ok
        )


def lease_informer(
    api: KubeApi,
    namespace: str,
    on_event: Callable[[str, Obj], None],
    on_relisted: Callable[[list[Obj]], None],
    timeout: float = LIST_TIMEOUT,
    on_restart: Callable[[str, str], None] = lambda resource, reason: None,
) -> Informer:
    """Lists, then watches, our Leases (heartbeats and claims) in ``namespace``, trimmed; the
    director reads them with :meth:`HeartbeatRecord.from_lease` / :meth:`ClaimRecord.from_lease`."""
    call = api.lister(_API.format(namespace=quote(namespace, safe="")), label_selector=SELECTOR)
    return Informer("leases", call, trim_lease, on_event, on_relisted, on_restart, timeout)
