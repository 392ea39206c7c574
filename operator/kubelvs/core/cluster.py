"""The cluster objects VirtualServers refer to: trimmed to what is read, indexed for lookup (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubelvs.core.spec import SERVICE_NAME_LABEL, Obj, ObjectRef


def _meta(obj: Obj, *keys: str) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    return {k: meta[k] for k in ("name", "namespace", "resourceVersion", *keys) if meta.get(k) is not None}


def _pick(items: Any, *keys: str) -> list[dict[str, Any]]:
    return [{k: item[k] for k in keys if item.get(k) is not None} for item in items or [] if isinstance(item, Mapping)]


def trim_service(svc: Obj) -> dict[str, Any]:
    """What desired state reads of a Service (a director keeps thousands: no managedFields)."""
    return {
        "metadata": _meta(svc),
        "spec": {"ports": _pick((svc.get("spec") or {}).get("ports"), "name", "port", "protocol")},
    }


def trim_endpoint_slice(eps: Obj) -> dict[str, Any]:
    """What desired state reads of an EndpointSlice."""
    meta = _meta(eps)
    service = ((eps.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
    if service is not None:
        meta["labels"] = {SERVICE_NAME_LABEL: service}
    return {
        "metadata": meta,
        "addressType": eps.get("addressType"),
        "ports": _pick(eps.get("ports"), "name", "port", "protocol"),
        "endpoints": _pick(eps.get("endpoints"), "addresses", "conditions", "nodeName"),
    }


def trim_node(node: Obj) -> dict[str, Any]:
    """What a director reads of a Node: labels (nodeSelector) and InternalIP addresses."""
    addresses = [
        a
        for a in _pick((node.get("status") or {}).get("addresses"), "type", "address")
        if a.get("type") == "InternalIP"
    ]
    return {"metadata": _meta(node, "labels"), "status": {"addresses": addresses}}


def trim_virtual_server(vs: Obj) -> dict[str, Any]:
    """A VirtualServer without managedFields and annotations (kubectl's last-applied copy)."""
    trimmed: dict[str, Any] = {"metadata": _meta(vs, "uid", "generation", "creationTimestamp")}
    for key in ("apiVersion", "kind", "spec", "status"):
        if key in vs:
            trimmed[key] = vs[key]
    return trimmed


@dataclass(slots=True)
class Cluster:
    """The objects VirtualServers refer to, indexed for lookup, each cut down to what is read."""

    services: dict[tuple[str, str], Obj] = field(default_factory=dict)
    slices: dict[tuple[str, str], dict[str, Obj]] = field(default_factory=dict)  # by (ns, service)
    node_addresses: dict[str, list[str]] = field(default_factory=dict)
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
        service = ((eps.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
        if service:
            self.slices.setdefault((ref.namespace, service), {})[ref.name] = trim_endpoint_slice(eps)

    def remove_slice(self, eps: Obj) -> None:
        ref = ObjectRef.of(eps)
        service = ((eps.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
        by_name = self.slices.get((ref.namespace, service or ""))
        if by_name is not None:
            by_name.pop(ref.name, None)

    def remove_node(self, name: str) -> None:
        if self.node_addresses.pop(name, None) is not None:
            self.nodes_version += 1

    def put_node(self, node: Obj) -> None:
        name = (node.get("metadata") or {}).get("name")
        addresses = [
            a.get("address")
            for a in (node.get("status") or {}).get("addresses") or []
            if a.get("type") == "InternalIP" and a.get("address")
        ]
        if name and self.node_addresses.get(name) != addresses:
            self.node_addresses[name] = addresses
            self.nodes_version += 1
