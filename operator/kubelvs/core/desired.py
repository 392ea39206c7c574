"""Desired state of one director: every VirtualServer resolved, conflicts settled, memoised (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from kubelvs.core.cluster import Cluster
from kubelvs.core.model import IPVSState, ServiceKey, VirtualService
from kubelvs.core.resolve import Resolution, virtual_services
from kubelvs.core.spec import KIND, Obj, ObjectRef, SpecError, VirtualServerSpec, parse_virtual_server


@dataclass(slots=True)
class DesiredState:
    services: IPVSState = field(default_factory=dict)
    vips: dict[str, int] = field(default_factory=dict)  # address -> family, to be made local
    origins: dict[ServiceKey, ObjectRef] = field(default_factory=dict)
    resolutions: dict[ObjectRef, Resolution] = field(default_factory=dict)

    @property
    def errors(self) -> list[SpecError]:
        return [r.error for r in self.resolutions.values() if r.error is not None]


def _age_key(obj: Obj) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("creationTimestamp") or ""), str(meta.get("namespace") or "default"), str(meta.get("name"))


def selects_node(node_selector: Mapping[str, str], node_labels: Mapping[str, str] | None) -> bool:
    if node_labels is None:  # standalone: no node, every VirtualServer is ours
        return True
    return all(node_labels.get(k) == v for k, v in node_selector.items())


def _version(obj: Obj | None) -> object:
    """What changes when an object changes: its resourceVersion (or identity, for manifests)."""
    if obj is None:
        return None
    return (obj.get("metadata") or {}).get("resourceVersion") or id(obj)


def _backend_version(vs: VirtualServerSpec, cluster: Cluster) -> tuple[object, ...]:
    if vs.service_name is None:
        return ()
    key = (vs.ref.namespace, vs.service_name)
    slices = cluster.slices.get(key) or {}
    version = (_version(cluster.services.get(key)), tuple(sorted((n, _version(e)) for n, e in slices.items())))
    return (*version, cluster.nodes_version) if vs.target_node else version


Memo = dict[ObjectRef, tuple[object, tuple[object, ...], VirtualServerSpec, list[VirtualService], Resolution]]


def _resolve(
    obj: Obj, cluster: Cluster, memo: Memo | None
) -> tuple[VirtualServerSpec, list[VirtualService], Resolution]:
    """Parse and resolve one VirtualServer, reusing the memo while it and its backends are unchanged."""
    ref = ObjectRef.of(obj)
    version = _version(obj)
    cached = memo.get(ref) if memo is not None else None
    if cached is not None and cached[0] == version and cached[1] == _backend_version(cached[2], cluster):
        _, _, vs, services, resolution = cached
        return vs, services, replace(resolution)
    vs = parse_virtual_server(obj)
    services, resolution = virtual_services(vs, cluster)
    if memo is not None:
        memo[ref] = (version, _backend_version(vs, cluster), vs, services, replace(resolution))
    return vs, services, resolution


def desired_state(
    virtual_servers: Iterable[Obj],
    cluster: Cluster | None = None,
    node_labels: Mapping[str, str] | None = None,
    memo: Memo | None = None,
) -> DesiredState:
    """Compute the desired IPVS state of one director.

    Two VirtualServers that claim the same VIP, port and protocol: the older one (by
    creationTimestamp, then namespace/name) keeps it, the newer one is refused as a VIPConflict.
    ``memo`` (kept by the caller between calls) skips VirtualServers whose object and backends
    did not change, so an EndpointSlice event costs one VirtualServer's work, not all of them.
    """
    cluster = cluster or Cluster()
    state = DesiredState()
    for obj in sorted(virtual_servers, key=_age_key):
        ref = ObjectRef.of(obj)
        generation = (obj.get("metadata") or {}).get("generation")
        try:
            vs, services, resolution = _resolve(obj, cluster, memo)
            resolution.generation = generation
            for svc in services:
                owner = state.origins.get(svc.key)
                if owner is not None:
                    raise SpecError(
                        ref, "spec.vip", f"{svc.key} is already served by {KIND} {owner}", reason="VIPConflict"
                    )
            resolution.selected = selects_node(vs.node_selector, node_labels)
        except SpecError as error:
            state.resolutions[ref] = Resolution(ref, generation, error=error)
            continue
        state.resolutions[ref] = resolution
        for svc in services:
            state.origins[svc.key] = ref  # claimed even when not selected here: conflicts are global
            if resolution.selected:
                state.services[svc.key] = svc
        if resolution.selected:
            state.vips[vs.vip] = vs.family
    return state


def update_desired(
    previous: DesiredState,
    virtual_servers: Mapping[ObjectRef, Obj],
    changed: Iterable[ObjectRef],
    cluster: Cluster,
    node_labels: Mapping[str, str] | None,
    memo: Memo,
) -> DesiredState | None:
    """``desired_state`` again, when only the ``changed`` VirtualServers or their backends changed.

    The Python work is O(changed), not O(all VirtualServers); only two dicts are copied whole,
    so that ``previous`` stays as it was. That holds while each changed VirtualServer
    was accepted before and still is, with the same keys, VIP and node selection: then no
    conflict can move. Otherwise it returns None and the caller makes a full pass.
    """
    state = DesiredState(dict(previous.services), previous.vips, previous.origins, dict(previous.resolutions))
    for ref in changed:
        before = previous.resolutions.get(ref)
        obj = virtual_servers.get(ref)
        if before is None or obj is None or before.error is not None:
            return None  # added, deleted, or refused before: conflicts may move
        try:
            vs, services, resolution = _resolve(obj, cluster, memo)
        except SpecError:
            return None
        resolution.generation = (obj.get("metadata") or {}).get("generation")
        resolution.selected = selects_node(vs.node_selector, node_labels)
        if (resolution.keys, resolution.vip, resolution.selected) != (before.keys, before.vip, before.selected):
            return None
        state.resolutions[ref] = resolution
        if resolution.selected:
            for svc in services:
                state.services[svc.key] = svc
    return state
