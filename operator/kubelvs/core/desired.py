"""Desired state of one director: every VirtualServer resolved, conflicts settled, memoised (pure).

Words: ``DesiredState.services`` (like ``Observed.services`` and ``ServiceKey``) holds IPVS
*virtual services*, one per VIP, port and protocol. A Kubernetes *Service* is what a
VirtualServer's ``serviceRef`` names; those live in :class:`~kubelvs.core.cluster.Cluster`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from kubelvs.core.cluster import Cluster
from kubelvs.core.model import IPVSState, ServiceKey, VirtualService
from kubelvs.core.resolve import Resolution, virtual_services
from kubelvs.core.spec import KIND, Obj, ObjectRef, SpecError, VirtualServerSpec, meta, parse_virtual_server


@dataclass(slots=True)
class DesiredState:
    """What one director wants: IPVS virtual services, VIPs, and what became of each VirtualServer.

    ``update_desired`` shares ``vips``, ``origins`` and ``vip_ports`` (with their sets) between
    the state it is given and the one it returns: treat every field as read-only.
    """

    services: IPVSState = field(default_factory=dict)  # IPVS virtual services, not Kubernetes Services
    vips: dict[str, int] = field(default_factory=dict)  # address -> family, to be made local
    origins: dict[ServiceKey, ObjectRef] = field(default_factory=dict)
    resolutions: dict[ObjectRef, Resolution] = field(default_factory=dict)
    # VIP -> {(protocol number, port)} of the accepted virtual services selected here on that VIP:
    # the only ports the VIP should answer on (a VIP shared by VirtualServers gets their union).
    vip_ports: dict[str, set[tuple[int, int]]] = field(default_factory=dict)

    @property
    def errors(self) -> list[SpecError]:
        return [r.error for r in self.resolutions.values() if r.error is not None]


def age_key(obj: Obj) -> tuple[str, str, str]:
    found = meta(obj)
    return str(found.get("creationTimestamp") or ""), str(found.get("namespace") or "default"), str(found.get("name"))


def _generation(obj: Obj) -> int | None:
    generation = meta(obj).get("generation")
    return generation if isinstance(generation, int) and not isinstance(generation, bool) else None


def selects_node(node_selector: Mapping[str, str], node_labels: Mapping[str, str] | None) -> bool:
    if node_labels is None:  # standalone: no node, every VirtualServer is ours
        return True
    return all(node_labels.get(k) == v for k, v in node_selector.items())


# --- the memo ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemoEntry:
    """One VirtualServer resolved, valid while its version and its backends' versions hold."""

    version: str  # the VirtualServer's spec_version()
    backends: tuple[object, ...]  # _backend_version() when it was resolved
    spec: VirtualServerSpec
    virtual_services: tuple[VirtualService, ...]  # IPVS virtual services
    resolution: Resolution  # frozen: shared by every desired state that reuses the entry


Memo = dict[ObjectRef, MemoEntry]

_ABSENT = "<absent>"  # the version of an object that does not exist (a resourceVersion is never empty)


def _version(obj: Obj | None) -> str | None:
    """An object's resourceVersion; None when it has none (manifests), so it cannot be memoised.

    (Object identity is no substitute: ids are reused once an object is garbage collected, and
    a manifest edited in place keeps its id.)
    """
    if obj is None:
        return _ABSENT
    version = meta(obj).get("resourceVersion")
    if isinstance(version, str):  # what the API server sends
        return version or None
    return str(version) if isinstance(version, int) and not isinstance(version, bool) else None


def spec_version(obj: Obj) -> str | None:
    """What changes when a VirtualServer's spec changes: its uid and generation (the API server
    bumps the generation on every change of the spec, never for a status write, as the CRD has
    the status subresource); its resourceVersion when it has no uid or generation. Status writes
    change the resourceVersion: keyed on it, every status written re-parsed its VirtualServer at
    the next full pass (10,000 of them at once after a start-up).
    """
    found = meta(obj)
    uid, generation = found.get("uid"), _generation(obj)
    if isinstance(uid, str) and uid and generation is not None:
        return f"{uid}/{generation}"
    return _version(obj)


def _backend_version(vs: VirtualServerSpec, cluster: Cluster) -> tuple[object, ...] | None:
    """What changes when ``vs``'s backends change; None when one of them has no resourceVersion."""
    if vs.service_name is None:
        return ()
    key = (vs.ref.namespace, vs.service_name)
    k8s_service_version = _version(cluster.services.get(key))
    slice_versions = tuple(sorted((n, _version(e)) for n, e in (cluster.slices.get(key) or {}).items()))
    if k8s_service_version is None or any(v is None for _, v in slice_versions):
        return None
    version = (k8s_service_version, slice_versions)
    return (*version, cluster.nodes_version) if vs.target_node else version


def _resolve(
    obj: Obj, cluster: Cluster, memo: Memo | None
) -> tuple[VirtualServerSpec, tuple[VirtualService, ...], Resolution]:
    """Parse and resolve one VirtualServer, reusing the memo while it and its backends are unchanged.

    Only objects with a resourceVersion (and backends with one) are memoised. Raises SpecError.
    """
    ref = ObjectRef.of(obj)
    version = spec_version(obj) if memo is not None else None
    vs: VirtualServerSpec | None = None
    if memo is not None and version is not None:
        cached = memo.get(ref)
        if cached is not None and cached.version == version:
            if cached.backends == _backend_version(cached.spec, cluster):
                return cached.spec, cached.virtual_services, cached.resolution
            # Only its backends changed (an EndpointSlice event): the spec parsed before serves,
            # a third of what each such change cost to resolve.
            vs = cached.spec
    if vs is None:
        vs = parse_virtual_server(obj)
    try:
        found, resolution = virtual_services(vs, cluster)
    except SpecError:
        raise
    except Exception as exc:  # a bug, or cluster data nobody thought of: fail this one VirtualServer only
        raise SpecError(
            ref, "spec.backends", f"could not be resolved against the cluster: {exc!r}", reason="ResolutionFailed"
        ) from exc
    ipvs_services = tuple(found)
    resolution = replace(resolution, generation=_generation(obj))
    if memo is not None:
        backends = _backend_version(vs, cluster) if version is not None else None
        if version is not None and backends is not None:
            memo[ref] = MemoEntry(version, backends, vs, ipvs_services, resolution)
        else:
            memo.pop(ref, None)
    return vs, ipvs_services, resolution


# --- desired state ----------------------------------------------------------------------------


def _add_ports(vip_ports: dict[str, set[tuple[int, int]]], ipvs_services: Iterable[VirtualService]) -> None:
    for svc in ipvs_services:
        vip_ports.setdefault(svc.key.address, set()).add((svc.key.protocol, svc.key.port))


def desired_state(
    virtual_servers: Iterable[Obj],
    cluster: Cluster | None = None,
    node_labels: Mapping[str, str] | None = None,
    memo: Memo | None = None,
    refused: Mapping[ObjectRef, SpecError] | None = None,
) -> DesiredState:
    """Compute the desired IPVS state of one director.

    ``refused``: VirtualServers refused by a rule that needs more than one object and the
    cluster (e.g. DirectorSelectionConflict, from the election): reported, not programmed.

    Two VirtualServers that claim the same VIP, port and protocol: the older one (by
    creationTimestamp, then namespace/name) keeps it, the newer one is refused as a VIPConflict.
    ``memo`` (kept by the caller between calls) skips VirtualServers whose object and backends
    did not change, so an EndpointSlice event costs one VirtualServer's work, not all of them.
    Nothing in the cluster objects raises: at worst one VirtualServer gets an error or a problem.
    """
    cluster = cluster or Cluster()
    state = DesiredState()
    for obj in sorted(virtual_servers, key=age_key):
        ref = ObjectRef.of(obj)
        if refused and ref in refused:
            state.resolutions[ref] = Resolution(ref, _generation(obj), error=refused[ref])
            continue
        try:
            vs, ipvs_services, resolution = _resolve(obj, cluster, memo)
            for svc in ipvs_services:
                owner = state.origins.get(svc.key)
                if owner is not None:
                    raise SpecError(
                        ref, "spec.vip", f"{svc.key} is already served by {KIND} {owner}", reason="VIPConflict"
                    )
        except SpecError as error:
            state.resolutions[ref] = Resolution(ref, _generation(obj), error=error)
            continue
        selected = selects_node(vs.node_selector, node_labels)
        if resolution.selected != selected:
            resolution = replace(resolution, selected=selected)
        state.resolutions[ref] = resolution
        for svc in ipvs_services:
            state.origins[svc.key] = ref  # claimed even when not selected here: conflicts are global
        if selected:
            for svc in ipvs_services:
                state.services[svc.key] = svc
            state.vips[vs.vip] = vs.family
            _add_ports(state.vip_ports, ipvs_services)
    return state


def update_desired(
    previous: DesiredState,
    virtual_servers: Mapping[ObjectRef, Obj],
    changed: Iterable[ObjectRef],
    cluster: Cluster,
    node_labels: Mapping[str, str] | None,
    memo: Memo,
    refused: Mapping[ObjectRef, SpecError] | None = None,
) -> DesiredState | None:
    """``desired_state`` again, when only the ``changed`` VirtualServers or their backends changed.

    The Python work is O(changed), not O(all VirtualServers); only two dicts are copied whole,
    so that ``previous`` stays as it was. That holds while each changed VirtualServer
    was accepted before and still is, with the same keys, VIP and node selection: then no
    conflict can move, and ``vips``, ``origins`` and ``vip_ports`` stay the same (they are
    shared with ``previous``). Otherwise it returns None and the caller makes a full pass.
    """
    state = DesiredState(
        dict(previous.services), previous.vips, previous.origins, dict(previous.resolutions), previous.vip_ports
    )
    for ref in changed:
        before = previous.resolutions.get(ref)
        obj = virtual_servers.get(ref)
        if before is None or obj is None or before.error is not None or (refused and ref in refused):
            return None  # added, deleted, or refused (before or now): conflicts may move
        try:
            vs, ipvs_services, resolution = _resolve(obj, cluster, memo)
        except SpecError:
            return None
        selected = selects_node(vs.node_selector, node_labels)
        if (resolution.keys, resolution.vip, selected) != (before.keys, before.vip, before.selected):
            return None
        if resolution.selected != selected:
            resolution = replace(resolution, selected=selected)
        state.resolutions[ref] = resolution
        if selected:
            for svc in ipvs_services:
                state.services[svc.key] = svc
    return state
