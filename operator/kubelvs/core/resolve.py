"""One valid VirtualServer against the cluster: its endpoints, its IPVS services (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from kubelvs.core.cluster import Cluster
from kubelvs.core.model import AF_INET, AF_INET6, Destination, Method, ServiceKey, VirtualService, normalize_address
from kubelvs.core.spec import MAX_WEIGHT, Obj, ObjectRef, PortSpec, SpecError, VirtualServerSpec

# --- resolving backends against the cluster ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendProblem:
    """Why a valid VirtualServer has fewer backends than it should (a status reason)."""

    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class _Endpoint:
    address: str
    port: int
    draining: bool


def _service_port(svc: Obj, wanted: int | str | None, entry: PortSpec) -> Obj | None:
    """Pick the Service port a VirtualServer port maps to (see the CRD reference)."""
    ports = [p for p in (svc.get("spec") or {}).get("ports") or [] if p.get("protocol", "TCP") == entry.protocol.name]
    if wanted is not None:
        return next((p for p in ports if p.get("name") == wanted or p.get("port") == wanted), None)
    for match in (lambda p: entry.name and p.get("name") == entry.name, lambda p: p.get("port") == entry.port):
        found = next((p for p in ports if match(p)), None)
        if found:
            return found
    return ports[0] if len(ports) == 1 else None


def _endpoints(vs: VirtualServerSpec, cluster: Cluster, entry: PortSpec) -> list[_Endpoint] | BackendProblem:
    assert vs.service_name is not None
    svc = cluster.services.get((vs.ref.namespace, vs.service_name))
    if svc is None:
        return BackendProblem("ServiceNotFound", f"Service {vs.ref.namespace}/{vs.service_name} does not exist")
    svc_port = _service_port(svc, vs.service_port, entry)
    if svc_port is None:
        return BackendProblem(
            "ServicePortNotFound",
            f"Service {vs.service_name} has no {entry.protocol.name} port matching "
            f"{vs.service_port if vs.service_port is not None else entry.name or entry.port}",
        )
    family_name = "IPv4" if vs.family == AF_INET else "IPv6"
    best: dict[tuple[str, int], _Endpoint] = {}
    for eps in (cluster.slices.get((vs.ref.namespace, vs.service_name)) or {}).values():
        address_type = eps.get("addressType")
        if address_type != family_name:  # dual-stack Services have one slice per family
            continue
        slice_port = next(
            (
                p
                for p in eps.get("ports") or []
                if (p.get("name") or "") == (svc_port.get("name") or "")
                and p.get("protocol", "TCP") == entry.protocol.name
            ),
            None,
        )
        if slice_port is None or slice_port.get("port") is None:
            continue
        port = int(slice_port["port"])
        for endpoint in eps.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            ready = conditions.get("ready")
            ready = True if ready is None else bool(ready)  # nil means ready (API convention)
            serving = conditions.get("serving")
            serving = ready if serving is None else bool(serving)
            terminating = bool(conditions.get("terminating"))
            if ready and not terminating:
                draining = False
            elif serving and terminating:
                draining = True  # keep it with weight 0 so its connections drain
            else:
                continue
            pod_addresses = list(endpoint.get("addresses") or [])[:1]
            if not pod_addresses:
                continue
            target = pod_addresses[0]
            if vs.target_node:
                node_ips = [
                    a
                    for a in cluster.node_addresses.get(endpoint.get("nodeName") or "", [])
                    if normalize_address(a)[0] == vs.family
                ]
                if not node_ips:
                    continue
                target = node_ips[0]
            _, address = normalize_address(target)
            identity = (normalize_address(pod_addresses[0])[1], port)  # one pod counts once
            previous = best.get(identity)
            if previous is None or (previous.draining and not draining):
                best[identity] = _Endpoint(address, port, draining)
    return sorted(best.values(), key=lambda e: (e.address, e.port))


@dataclass(slots=True)
class Resolution:
    """What became of one VirtualServer: the services it yields or why it yields none."""

    ref: ObjectRef
    generation: int | None = None
    keys: tuple[ServiceKey, ...] = ()
    vip: str = ""
    ready_backends: int = 0
    draining_backends: int = 0
    error: SpecError | None = None
    problem: BackendProblem | None = None
    selected: bool = True  # False when directors.nodeSelector excludes this node

    @property
    def accepted(self) -> bool:
        return self.error is None


def virtual_services(vs: VirtualServerSpec, cluster: Cluster) -> tuple[list[VirtualService], Resolution]:
    """The IPVS services one valid VirtualServer yields, and the counts for its status."""
    resolution = Resolution(vs.ref, vip=vs.vip)
    services: list[VirtualService] = []
    ready: set[str] = set()
    draining: set[str] = set()
    for entry in vs.ports:
        key = ServiceKey(vs.family, int(entry.protocol), vs.vip, entry.port)
        destinations: list[Destination] = []
        if vs.service_name is not None:
            found = _endpoints(vs, cluster, entry)
            if isinstance(found, BackendProblem):
                resolution.problem = resolution.problem or found
                found = []
            per_address: dict[tuple[str, int], list[_Endpoint]] = {}
            for endpoint in found:
                port = _backend_port(vs, entry, endpoint.port)
                per_address.setdefault((endpoint.address, port), []).append(endpoint)
            for (address, port), group in per_address.items():
                live = [e for e in group if not e.draining]
                # Node targets: a node with several ready pods gets a proportional share.
                weight = min(MAX_WEIGHT, vs.weight * len(live)) if live else 0
                (ready if live else draining).add(address)
                destinations.append(_destination(vs, address, port, weight))
        else:
            for backend in vs.static_backends:
                port = _backend_port(vs, entry, backend.port)
                weight = vs.weight if backend.weight is None else backend.weight
                (ready if weight else draining).add(backend.address)
                destinations.append(_destination(vs, backend.address, port, weight))
        if vs.method is not Method.NAT:
            mismatched = [d for d in destinations if d.port != entry.port]
            if mismatched:
                raise SpecError(
                    vs.ref,
                    "spec.backends.serviceRef.port",
                    f"{vs.method.name} cannot remap ports, but endpoints of Service {vs.service_name} listen on "
                    f"{mismatched[0].port}, not {entry.port}: use the same port or method NAT",
                    reason="PortMismatch",
                )
        services.append(
            VirtualService(
                key,
                vs.scheduler,
                vs.sched_flags,
                vs.persistence_timeout,
                vs.netmask,
                tuple(destinations),
            )
        )
    resolution.keys = tuple(s.key for s in services)
    resolution.ready_backends = len(ready)
    resolution.draining_backends = len(draining - ready)
    if vs.service_name is not None and not resolution.problem and not ready:
        resolution.problem = BackendProblem("NoReadyEndpoints", f"Service {vs.service_name} has no ready endpoints")
    return services, resolution


def _backend_port(vs: VirtualServerSpec, entry: PortSpec, endpoint_port: int | None) -> int:
    if vs.method is Method.NAT:
        if isinstance(entry.target_port, int):
            return entry.target_port
        return endpoint_port or entry.port
    return endpoint_port if endpoint_port is not None else entry.port


def _destination(vs: VirtualServerSpec, address: str, port: int, weight: int) -> Destination:
    family = AF_INET6 if ":" in address else AF_INET  # address is normalised text already
    return Destination(
        address,
        port,
        weight,
        vs.method,
        vs.upper_threshold,
        vs.lower_threshold,
        vs.tunnel_type,
        vs.tunnel_port,
        vs.tunnel_checksum,
        family=0 if family == vs.family else family,
    )
