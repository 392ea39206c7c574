"""The cluster objects VirtualServers refer to: trimmed to what is read, indexed for lookup (pure).

"Service" here always means a *Kubernetes* Service (``Cluster.services``, ``trim_service``): the
object whose EndpointSlices a VirtualServer follows. The IPVS virtual services that desired state
is made of are ``kubelvs.core.model.VirtualService`` and live in ``kubelvs.core.desired``.

Everything here takes objects as the API server or a file gives them: any field may be missing,
null or of the wrong type (Node addresses and EndpointSlice addresses are free strings). Nothing
here raises on such a value; it is dropped, or kept for :mod:`kubelvs.core.resolve` to report on
the one VirtualServer that uses it.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kubelvs.core.model import AF_INET, AF_INET6, is_canonical_ipv4, normalize_address
from kubelvs.core.spec import SERVICE_NAME_LABEL, Obj, ObjectRef, meta, packed, unpacked


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def service_name_of(eps: Obj) -> str | None:
    """The Service an EndpointSlice belongs to (its ``kubernetes.io/service-name`` label), if any."""
    name = _mapping(meta(eps).get("labels")).get(SERVICE_NAME_LABEL)
    return name if isinstance(name, str) and name else None


def endpoint_address(value: Any) -> tuple[int, str] | None:
    """(family, canonical text) of an address read from a cluster object, or None if unusable.

    Unusable: not a string, not an IP address, surrounding whitespace, an IPv6 zone, or an IPv6
    address that embeds an IPv4 one in its low 32 bits with the high 96 zero (IPv4-compatible,
    and with it ``::`` and ``::1``) or is IPv4-mapped (``::ffff:a.b.c.d``): the API server refuses
    these as endpoint addresses, and IPVS would use them as IPv6 real servers that do not exist.
    """
    if not isinstance(value, str):
        return None
    if is_canonical_ipv4(value):  # canonical IPv4 already: no cache entry (~130 bytes each)
        return AF_INET, value
    return _endpoint_address(value)


@functools.lru_cache(maxsize=1 << 16)  # the same pod and node addresses recur in every pass
def _endpoint_address(text: str) -> tuple[int, str] | None:
    if not text or text != text.strip() or "%" in text:
        return None
    try:
        family, address = normalize_address(text)
    except (ValueError, TypeError):
        return None
    if family == AF_INET6:
        parsed = ipaddress.IPv6Address(address)
        if parsed.ipv4_mapped is not None or int(parsed) >> 32 == 0:
            return None
    return family, address


def _meta(obj: Obj, *keys: str) -> dict[str, Any]:
    found = meta(obj)
    return {k: found[k] for k in ("name", "namespace", "resourceVersion", *keys) if found.get(k) is not None}


def _pick(items: Any, *keys: str) -> list[dict[str, Any]]:
    if not isinstance(items, list | tuple):
        return []
    return [{k: item[k] for k in keys if item.get(k) is not None} for item in items if isinstance(item, Mapping)]


def trim_service(svc: Obj) -> dict[str, Any]:
    """What desired state reads of a Service (a director keeps thousands: no managedFields)."""
    return {
        "metadata": _meta(svc),
        "spec": {"ports": _pick(_mapping(svc.get("spec")).get("ports"), "name", "port", "protocol")},
    }


class EndpointState(enum.Enum):
    READY = "ready"  # a real server with its weight
    DRAINING = "draining"  # kept with weight 0 so that its connections drain
    WAITING = "waiting"  # not ready yet, not terminating (e.g. its kubelvs.io/receiver-ready gate): left out


def endpoint_state(conditions: Any) -> EndpointState | None:
    """The EndpointSlice conditions' truth table; None: leave the endpoint out.

    ``ready`` unset means ready and ``serving`` unset means "as ready" (API conventions for
    EndpointConditions). Ready and not terminating: ready. Terminating but still serving:
    draining (weight 0, established connections finish). Not ready and not terminating:
    waiting (left out, counted in the status). Anything else: left out.
    """
    found = _mapping(conditions)
    ready = found.get("ready")
    ready = True if ready is None else bool(ready)
    serving = found.get("serving")
    serving = ready if serving is None else bool(serving)
    terminating = bool(found.get("terminating"))
    if ready and not terminating:
        return EndpointState.READY
    if serving and terminating:
        return EndpointState.DRAINING
    if not terminating:
        return EndpointState.WAITING
    return None


class SliceEndpoint(NamedTuple):
    """An entry of an EndpointSlice's ``endpoints[]`` that some VirtualServer may use: its first
    address parsed, its conditions read. A tuple, not the entry's dicts: a director keeps tens of
    thousands (a 4-endpoint slice kept 3.4 KB as dicts, natively at 10,000 slices)."""

    family: int
    address: str  # canonical text
    state: EndpointState
    node: str | None  # nodeName (for ``target: Node``)


class SlicePort(NamedTuple):
    """An entry of an EndpointSlice's ``ports[]``, as resolve matches it to a Service port."""

    name: Any  # "" when unnamed; another value as given (it matches no Service port's name)
    port: int | None  # None: not a port number
    protocol: Any  # "TCP" when unset


def _port_number(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535 else None


def _text(value: Any) -> Any:
    return sys.intern(value) if type(value) is str else value  # names repeat across thousands of slices


def _slice_ports(items: Any) -> tuple[SlicePort, ...]:
    if type(items) is tuple and all(type(p) is SlicePort for p in items):
        return items  # trimmed already (the informer trims, then the view)
    return tuple(
        SlicePort(
            _text(p.get("name") or ""),
            _port_number(p.get("port")),
            _text(p["protocol"]) if p.get("protocol") is not None else "TCP",
        )
        for p in (items if isinstance(items, list) else ())
        if isinstance(p, Mapping)
    )


def _slice_endpoints(items: Any) -> tuple[SliceEndpoint, ...]:
    """The entries that some VirtualServer may use. Left out for good: an entry without a usable
    first address (resolve never reads the others), or whose conditions leave it out."""
    if type(items) is tuple and all(type(e) is SliceEndpoint for e in items):
        return items
    kept = []
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, Mapping):
            continue
        state = endpoint_state(item.get("conditions"))
        addresses = item.get("addresses")
        pod = endpoint_address(addresses[0]) if state and isinstance(addresses, list) and addresses else None
        if state is None or pod is None:
            continue
        node = item.get("nodeName")
        kept.append(SliceEndpoint(pod[0], pod[1], state, sys.intern(node) if type(node) is str else None))
    return tuple(kept)


def trim_endpoint_slice(eps: Obj) -> dict[str, Any]:
    """What desired state reads of an EndpointSlice (trimming a trimmed one gives it back)."""
    trimmed_meta = _meta(eps)
    service = service_name_of(eps)
    if service is not None:
        trimmed_meta["labels"] = {SERVICE_NAME_LABEL: service}
    return {
        "metadata": trimmed_meta,
        "addressType": eps.get("addressType"),
        "ports": _slice_ports(eps.get("ports")),
        "endpoints": _slice_endpoints(eps.get("endpoints")),
    }


def trim_node(node: Obj) -> dict[str, Any]:
    """What a director reads of a Node: labels (nodeSelector) and InternalIP addresses."""
    addresses = [
        a
        for a in _pick(_mapping(node.get("status")).get("addresses"), "type", "address")
        if a.get("type") == "InternalIP"
    ]
    return {"metadata": _meta(node, "labels"), "status": {"addresses": addresses}}


def status_of(vs: Mapping[str, Any]) -> dict[str, Any]:
    """The ``status`` of a VirtualServer as the API server gives it or as trimmed ({}: none)."""
    value = unpacked(vs.get("status"))
    return value if isinstance(value, dict) else {}


def spec_of(vs: Mapping[str, Any]) -> dict[str, Any]:
    """The ``spec`` of a VirtualServer as the API server gives it or as trimmed ({}: none)."""
    value = unpacked(vs.get("spec"))
    return value if isinstance(value, dict) else {}


_VIRTUAL_SERVER_META = ("uid", "generation", "creationTimestamp")  # kept beside name, namespace, resourceVersion


def trim_virtual_server(vs: Obj, same_spec: Obj | None = None) -> dict[str, Any]:
    """A VirtualServer without managedFields and annotations (kubectl's last-applied copy), its
    spec and status packed (:class:`~kubelvs.core.spec.Packed`). ``same_spec``: a trimmed copy
    known to have the same spec (the same generation), whose packed spec is taken as it is: most
    updates are status writes, and packing the spec again for each was most of their cost."""
    trimmed: dict[str, Any] = {"metadata": _meta(vs, *_VIRTUAL_SERVER_META)}
    for key in ("apiVersion", "kind"):
        if key in vs:
            trimmed[key] = vs[key]
    for key in ("spec", "status"):
        if key in vs:
            trimmed[key] = packed(vs[key])
    if same_spec is not None and "spec" in same_spec and "spec" in vs:
        trimmed["spec"] = same_spec["spec"]
    return trimmed


def refresh_status(kept: dict[str, Any], vs: Obj) -> bool:
    """Bring ``kept``, a trimmed VirtualServer, up to ``vs``, a newer version of the same object
    at the same generation (a status write), in place: its resourceVersion and its status are
    all of a trimmed copy that such a write changes. False when anything else kept differs (the
    caller then trims ``vs`` anew).

    In place, not a new trimmed copy (three small dicts per status event, and a trim of the
    whole object): natively, once every one of 10,000 statuses was written, Python's pools held
    7.3 MB of free blocks instead of 20.7 MB. The RSS growth of those writes stayed (+39 MB:
    pymalloc arenas kept by the few objects each echo leaves among its garbage)."""
    old_meta, new_meta = kept.get("metadata"), meta(vs)
    if type(old_meta) is not dict or ("spec" in kept) != ("spec" in vs):
        return False
    if any(old_meta.get(key) != new_meta.get(key) for key in ("name", "namespace", *_VIRTUAL_SERVER_META)):
        return False
    if kept.get("apiVersion") != vs.get("apiVersion") or kept.get("kind") != vs.get("kind"):
        return False
    version = new_meta.get("resourceVersion")
    if version is None:
        old_meta.pop("resourceVersion", None)
    else:
        old_meta["resourceVersion"] = version
    if "status" in vs:
        kept["status"] = packed(vs["status"])
    else:
        kept.pop("status", None)
    return True


@dataclass(frozen=True, slots=True)
class NodeAddresses:
    """A Node's InternalIP addresses (``status.addresses[].address``), parsed once per Node change."""

    usable: tuple[tuple[int, str], ...] = ()  # (family, canonical text), in the Node's order
    invalid: tuple[str, ...] = ()  # repr() of the values that are not usable IP addresses

    def first(self, family: int) -> str | None:
        return next((address for f, address in self.usable if f == family), None)


@dataclass(slots=True)
class Cluster:
    """The objects VirtualServers refer to, indexed for lookup, each cut down to what is read.

    ``services`` holds Kubernetes Services by (namespace, name); ``slices`` their EndpointSlices
    by (namespace, Service name) then slice name (a key is removed with its last slice);
    ``node_addresses`` each Node's InternalIPs by Node name, parsed (the invalid ones kept
    apart, for resolve to report on the VirtualServers that use that Node).
    """

    services: dict[tuple[str, str], Obj] = field(default_factory=dict)
    slices: dict[tuple[str, str], dict[str, Obj]] = field(default_factory=dict)  # by (ns, service)
    node_addresses: dict[str, NodeAddresses] = field(default_factory=dict)
    nodes_version: int = 0  # bumped on every Node change, for memoised Node targets

    @classmethod
    def build(cls, services: Iterable[Obj] = (), slices: Iterable[Obj] = (), nodes: Iterable[Obj] = ()) -> Cluster:
        cluster = cls()
        for svc in services:
            cluster.put_service(svc)
        for eps in slices:
            cluster.put_slice(eps)
        for node in nodes:
            cluster.put_node(node)
        return cluster

    def put_service(self, svc: Obj) -> None:
        ref = ObjectRef.of(svc)
        self.services[ref.namespace, ref.name] = trim_service(svc)

    def remove_service(self, namespace: str, name: str) -> None:
        self.services.pop((namespace, name), None)

    def put_slice(self, eps: Obj) -> None:
        ref = ObjectRef.of(eps)
        service = service_name_of(eps)
        if service:
            self.slices.setdefault((ref.namespace, service), {})[ref.name] = trim_endpoint_slice(eps)

    def remove_slice(self, eps: Obj) -> None:
        ref = ObjectRef.of(eps)
        key = (ref.namespace, service_name_of(eps) or "")
        by_name = self.slices.get(key)
        if by_name is not None:
            by_name.pop(ref.name, None)
            if not by_name:  # namespaces come and go (CI): keep no empty index behind
                del self.slices[key]

    def remove_node(self, name: str) -> None:
        if self.node_addresses.pop(name, None) is not None:
            self.nodes_version += 1

    def put_node(self, node: Obj) -> None:
        name = meta(node).get("name")
        if not isinstance(name, str) or not name:
            return
        usable: list[tuple[int, str]] = []
        invalid: list[str] = []
        for entry in _pick(_mapping(node.get("status")).get("addresses"), "type", "address"):
            if entry.get("type") != "InternalIP" or not entry.get("address"):
                continue
            parsed = endpoint_address(entry["address"])
            if parsed is None:
                invalid.append(repr(entry["address"]))
            else:
                usable.append(parsed)
        addresses = NodeAddresses(tuple(usable), tuple(invalid))
        if self.node_addresses.get(name) != addresses:
            self.node_addresses[name] = addresses
            self.nodes_version += 1
