"""The directors' election Leases (coordination.k8s.io/v1) in the director's namespace.

Three kinds, all labelled ``app.kubernetes.io/name: kubelvs``:

* a heartbeat per director (``kubelvs-director-<node>``, ``kubelvs.io/lease: heartbeat``),
  renewed every retry period with one PUT, small and of fixed size: whether the director is
  shutting down, its address for direct peer heartbeats;
* an unfit report per director (``kubelvs-unfit-<node>``, ``kubelvs.io/lease: unfit``): the VIPs
  it cannot serve now, written only when that set changes. It can hold every VIP (a director
  with no interface for any), so it does not ride on the heartbeat: 10,000 VIPs were 120 KB
  written to etcd and parsed by every peer at each renewal;
* a claim per VIP (``kubelvs-vip-<vip>``, ``kubelvs.io/lease: vip``), written only when its
  owner changes, always with the resourceVersion last seen: a create fails if the Lease exists,
  an update if it changed meanwhile, so two directors can never both win.

The steady-state write load is thus one request per director per retry period, whatever the
number of VIPs. Nobody compares the times written by two nodes (renewTime, acquireTime): clocks
differ between nodes; a director judges a heartbeat by whether its resourceVersion moves. Two
renewTimes of one director's heartbeat, both by its clock, tell which renewal is the older.

Requests go out as raw JSON with a (connect, read) timeout and without urllib3's retries: a PUT
whose answer timed out must come back to the caller as a failure, not be sent again behind its
back (a blind resend of a claim that did land would then be refused with 409, and the retries
would stretch one call to four timeouts). Deciding what to write is the director's business.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import math
import re
import threading
import zlib
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
UNFIT = "unfit"
VIP = "vip"
VIP_ANNOTATION = "kubelvs.io/vip"
UNFIT_ANNOTATION = "kubelvs.io/unfit"
DRAINING_ANNOTATION = "kubelvs.io/shutting-down"
PEER_ADDRESS_ANNOTATION = "kubelvs.io/peer-address"
HEARTBEAT_PREFIX = "kubelvs-director-"
UNFIT_PREFIX = "kubelvs-unfit-"
CLAIM_PREFIX = "kubelvs-vip-"
SELECTOR = f"{APP_LABEL}={APP}"

_API = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
_MAX_NAME = 253  # a Lease name is a DNS-1123 subdomain
_INVALID = re.compile(r"[^a-z0-9.-]+")
# An unfit report longer than this is compressed: the API server refuses annotations over
# 256 KiB in all, and 10,000 IPv6 VIPs are 150-300 KB as text, 55-70 KB compressed.
_COMPRESS_OVER = 32 * 1024
_COMPRESSED = "zlib+base64:"


# ---------------------------------------------------------------------------------------------
# Names


def _node_lease_name(prefix: str, node: str) -> str:
    """``<prefix><node>``; a node name that had to be changed (or cut) to make a valid name gets
    a hash of the original appended, so distinct nodes keep distinct Leases."""
    labels = (label.strip("-") for label in _INVALID.sub("-", node.lower()).split("."))
    text = ".".join(label for label in labels if label)
    name = prefix + text
    if text and text == node and len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(node.encode()).hexdigest()[:10]
    text = text[: _MAX_NAME - len(prefix) - len(digest) - 1].rstrip("-.")
    return f"{prefix}{text}-{digest}" if text else prefix + digest


def heartbeat_name(node: str) -> str:
    """``kubelvs-director-<node>``."""
    return _node_lease_name(HEARTBEAT_PREFIX, node)


def unfit_name(node: str) -> str:
    """``kubelvs-unfit-<node>``."""
    return _node_lease_name(UNFIT_PREFIX, node)


def encode_vips(vips: Iterable[str]) -> str:
    """The sorted VIPs, comma-separated; compressed (``zlib+base64:...``) when long."""
    text = ",".join(sorted(vips))
    if len(text) <= _COMPRESS_OVER:
        return text
    return _COMPRESSED + base64.b64encode(zlib.compress(text.encode(), 9)).decode()


def decode_vips(value: str) -> frozenset[str]:
    """What :func:`encode_vips` wrote. Raises ValueError for a corrupt compressed value."""
    if value.startswith(_COMPRESSED):
        try:
            value = zlib.decompress(base64.b64decode(value[len(_COMPRESSED) :], validate=True)).decode()
        except (zlib.error, ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"corrupt unfit report: {error}") from error
    return frozenset(v for v in map(str.strip, value.split(",")) if v)


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


def _holder(meta: Mapping[str, Any], spec: Mapping[str, Any], name: Callable[[str], str]) -> str | None:
    """The node a director's own Lease belongs to, if its name is the one that node writes."""
    node = spec.get("holderIdentity")
    return node if isinstance(node, str) and node and meta.get("name") == name(node) else None


@dataclass(frozen=True, slots=True)
class HeartbeatRecord:
    node: str
    version: str  # resourceVersion: a director is alive while this keeps changing
    duration_seconds: int
    draining: bool  # shutting down: it serves no VIP any more (hands every one over)
    peer_address: str  # for direct peer heartbeats; "" if none
    # spec.renewTime by the director's own clock (None: none): orders two renewals of one
    # director, never compared with another node's clock.
    renewed: float | None = field(default=None, compare=False)

    @classmethod
    def from_lease(cls, obj: Any) -> HeartbeatRecord | None:
        parts = _parts(obj, HEARTBEAT)
        if parts is None:
            return None
        meta, annotations, spec, version = parts
        node, duration = _holder(meta, spec, heartbeat_name), spec.get("leaseDurationSeconds")
        if node is None or not isinstance(duration, int) or isinstance(duration, bool) or duration <= 0:
            return None
        peer = annotations.get(PEER_ADDRESS_ANNOTATION)
        draining = annotations.get(DRAINING_ANNOTATION) == "true"
        return cls(node, version, duration, draining, peer if isinstance(peer, str) else "", renew_time(obj))


@dataclass(frozen=True, slots=True)
class UnfitRecord:
    """The VIPs a director cannot serve now (reported when that set changes)."""

    node: str
    version: str
    vips: frozenset[str]

    @classmethod
    def from_lease(cls, obj: Any) -> UnfitRecord | None:
        parts = _parts(obj, UNFIT)
        if parts is None:
            return None
        meta, annotations, spec, version = parts
        node, value = _holder(meta, spec, unfit_name), annotations.get(UNFIT_ANNOTATION, "")
        if node is None or not isinstance(value, str):
            return None
        try:
            return cls(node, version, decode_vips(value))
        except ValueError:
            return None


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


def renew_time(obj: Obj) -> float | None:
    """A Lease's ``spec.renewTime`` as a POSIX time, by its writer's clock; None when absent or
    malformed. Compared only with another renewTime of the same writer (which renewal is the
    older), or, as a diagnostic, with the reader's clock (how far behind the watch is)."""
    value = _mapping(obj.get("spec")).get("renewTime")
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


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
        self.writes: Counter[str] = Counter()  # write requests sent, by "heartbeat" | "unfit" | "claim"
        self._lock = threading.Lock()
        # Lease name -> (resourceVersion, acquireTime) last written, for a director's own Leases:
        # a renewal is one PUT, no GET first.
        self._own: dict[str, tuple[str, str]] = {}

    # -- a director's own Leases: heartbeat, unfit report ------------------------------------

    def renew_heartbeat(
        self, node: str, duration_seconds: float, draining: bool = False, peer_address: str = ""
    ) -> HeartbeatRecord:
        """Create or renew ``node``'s heartbeat: one PUT with the version last written, else (the
        first call, a restart, a Lease someone else touched) a fresh read and one more try."""
        annotations = {PEER_ADDRESS_ANNOTATION: peer_address}
        if draining:
            annotations[DRAINING_ANNOTATION] = "true"
        duration = math.ceil(duration_seconds)
        version = self._write_own(HEARTBEAT, node, annotations, {"leaseDurationSeconds": duration})
        return HeartbeatRecord(node, version, duration, draining, peer_address)

    def report_unfit(self, node: str, vips: Iterable[str]) -> UnfitRecord:
        """Write the VIPs ``node`` cannot serve now (the caller writes only when they change)."""
        vips = frozenset(vips)
        version = self._write_own(UNFIT, node, {UNFIT_ANNOTATION: encode_vips(vips)}, {})
        return UnfitRecord(node, version, vips)

    def _write_own(self, kind: str, node: str, annotations: dict[str, str], spec: Obj) -> str:
        """Create or update one of ``node``'s own Leases: one PUT with the version last written,
        else (the first call, a restart, a Lease someone else touched) a fresh read and one more
        try. Returns the new resourceVersion; the answer is not parsed (an unfit report can hold
        every VIP)."""
        name = heartbeat_name(node) if kind == HEARTBEAT else unfit_name(node)
        with self._lock:
            last = self._own.get(name)
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": _labels(kind),
                "annotations": annotations,
            },
            "spec": {"holderIdentity": node, **spec},
        }
        try:
            return self._write_own_once(name, body, last)
        except ApiException as error:
            # Left by an earlier run of this director, or touched by someone else. (A deleted one
            # gives no 404: Leases allow create-on-update, the PUT re-creates it.)
            if error.status != 409:
                raise
        fresh = self._request("GET", name, missing_ok=True)
        if fresh is None:
            last = None
        else:
            fresh_spec, meta = _mapping(fresh.get("spec")), _mapping(fresh.get("metadata"))
            holder = fresh_spec.get("holderIdentity")
            if holder and holder != node:
                raise HeartbeatTaken(f"Lease {self.namespace}/{name} is held by {holder!r}, not by node {node!r}")
            last = (str(meta.get("resourceVersion") or ""), str(fresh_spec.get("acquireTime") or ""))
        try:
            return self._write_own_once(name, body, last)
        except ApiException as error:
            if error.status != 409:
                raise
            raise Conflict(f"Lease {name} changed twice while being written") from error

    def _write_own_once(self, name: str, body: Obj, last: tuple[str, str] | None) -> str:
        now = _now()
        body["spec"]["renewTime"] = now
        body["spec"]["acquireTime"] = last[1] if last and last[1] else now
        kind = body["metadata"]["labels"][KIND_LABEL]
        if last is None:
            body["metadata"].pop("resourceVersion", None)
            obj = self._request("POST", None, body, write=kind)
        else:
            body["metadata"]["resourceVersion"] = last[0]
            obj = self._request("PUT", name, body, write=kind)
        assert obj is not None
        version = _mapping(_mapping(obj).get("metadata")).get("resourceVersion")
        if not isinstance(version, str) or not version:  # the server answers with what was written
            raise ValueError(f"the API server returned Lease {name} without a resourceVersion: {obj!r:.500}")
        with self._lock:
            self._own[name] = (version, body["spec"]["acquireTime"])
        return version

    def get_heartbeat(self, node: str) -> HeartbeatRecord | None:
        """A fresh read (not the watch cache): None if there is none (or it is not a heartbeat)."""
        obj = self._request("GET", heartbeat_name(node), missing_ok=True)
        return None if obj is None else HeartbeatRecord.from_lease(obj)

    def delete_heartbeat(self, node: str) -> None:
        """On a clean shutdown: the others need not wait for it to expire. Gone already is fine."""
        with self._lock:
            self._own.pop(heartbeat_name(node), None)
        self._request("DELETE", heartbeat_name(node), write=HEARTBEAT, missing_ok=True)

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
