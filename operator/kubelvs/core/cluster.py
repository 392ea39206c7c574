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

import functools
import ipaddress
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubelvs.core.model import AF_INET, AF_INET6, is_canonical_ipv4, normalize_address
from kubelvs.core.spec import SERVICE_NAME_LABEL, Obj, ObjectRef, meta


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


SHARED_TEXT_MAX = 256  # longer strings (a failure's message) are rare and seldom repeated


def shared(value: Any) -> Any:
    """``value`` rebuilt with its keys and short strings interned: one copy of "Programmed",
    "conditions" or a condition's message for every object that holds them, instead of one per
    object and per watch event (a JSON decoder shares keys only within one document). Traced
    natively, a VirtualServer with its status (3 conditions, one director entry) kept 6.2 KB when
    it came in a watch event and 4.7 KB in a listing; 3.3 KB either way now.
    """
    kind = type(value)
    if kind is dict:
        return {sys.intern(k) if type(k) is str else k: shared(v) for k, v in value.items()}
    if kind is list:
        return [shared(v) for v in value]
    if kind is str and len(value) <= SHARED_TEXT_MAX:
        return sys.intern(value)
    return value


def trim_service(svc: Obj) -> dict[str, Any]:
    """What desired state reads of a Service (a director keeps thousands: no managedFields)."""
    return {
        "metadata": _meta(svc),
        "spec": {"ports": _pick(_mapping(svc.get("spec")).get("ports"), "name", "port", "protocol")},
    }


def trim_endpoint_slice(eps: Obj) -> dict[str, Any]:
    """What desired state reads of an EndpointSlice."""
    trimmed_meta = _meta(eps)
    service = service_name_of(eps)
    if service is not None:
        trimmed_meta["labels"] = {SERVICE_NAME_LABEL: service}
    return {
        "metadata": trimmed_meta,
        "addressType": eps.get("addressType"),
        "ports": _pick(eps.get("ports"), "name", "port", "protocol"),
        "endpoints": shared(_pick(eps.get("endpoints"), "addresses", "conditions", "nodeName")),
    }


def trim_node(node: Obj) -> dict[str, Any]:
    """What a director reads of a Node: labels (nodeSelector) and InternalIP addresses."""
    addresses = [
        a
        for a in _pick(_mapping(node.get("status")).get("addresses"), "type", "address")
        if a.get("type") == "InternalIP"
    ]
    return {"metadata": _meta(node, "labels"), "status": {"addresses": addresses}}


def trim_virtual_server(vs: Obj) -> dict[str, Any]:
    """A VirtualServer without managedFields and annotations (kubectl's last-applied copy)."""
    trimmed: dict[str, Any] = {"metadata": _meta(vs, "uid", "generation", "creationTimestamp")}
    for key in ("apiVersion", "kind", "spec", "status"):
        if key in vs:
            trimmed[key] = shared(vs[key])  # the metadata's values are this object's own
    return trimmed


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
