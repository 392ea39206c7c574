"""One valid VirtualServer against the cluster: its endpoints, its IPVS virtual services (pure).

Words: a *Service* is a Kubernetes Service (``vs.service_name``, ``cluster.services``); an IPVS
*virtual service* is a :class:`~kubelvs.core.model.VirtualService`, one per VIP, port and protocol.

What the cluster holds is not validated by anyone we trust (a Node's InternalIP and an endpoint's
address are free strings): a value that cannot be used drops that endpoint, and at worst gives
the VirtualServers that use it a :class:`BackendProblem`. It never raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubelvs.core.cluster import Cluster, EndpointState, SliceEndpoint
from kubelvs.core.model import (
    AF_INET,
    AF_INET6,
    Destination,
    Method,
    ServiceKey,
    VirtualService,
    address_order,
    make_sorted_service,
)
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


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _service_port(k8s_service: Obj, wanted: int | str | None, entry: PortSpec) -> Mapping[str, Any] | None:
    """Pick the Service port a VirtualServer port maps to (see the CRD reference)."""
    raw = _mapping(k8s_service.get("spec")).get("ports")
    ports = [
        p
        for p in (raw if isinstance(raw, list) else [])
        if isinstance(p, Mapping) and p.get("protocol", "TCP") == entry.protocol.name
    ]
    if wanted is not None:
        return next((p for p in ports if p.get("name") == wanted or p.get("port") == wanted), None)
    for match in (lambda p: entry.name and p.get("name") == entry.name, lambda p: p.get("port") == entry.port):
        found = next((p for p in ports if match(p)), None)
        if found:
            return found
    return ports[0] if len(ports) == 1 else None


def _slice_port(eps: Obj, port_name: Any, entry: PortSpec) -> int | None:
    """The port an EndpointSlice gives for the Service port named ``port_name`` (None: unusable slice)."""
    for p in eps["ports"]:
        if p.name == (port_name or "") and p.protocol == entry.protocol.name:
            return p.port
    return None


def _target_address(
    vs: VirtualServerSpec, cluster: Cluster, node: str | None, pod_address: str
) -> str | BackendProblem | None:
    """Where IPVS sends an endpoint's traffic: the pod, or with ``target: Node`` its Node's first
    InternalIP of the VIP's family. None: the endpoint is left out (no Node, or no such address);
    a BackendProblem when that is because the Node's address is not an IP address."""
    if not vs.target_node:
        return pod_address
    if node is None:
        return None
    addresses = cluster.node_addresses.get(node)
    if addresses is None:
        return None
    address = addresses.first(vs.family)
    if address is not None:
        return address  # canonical text already (Cluster.put_node)
    invalid = addresses.invalid
    if invalid:
        return BackendProblem(
            "InvalidNodeAddress",
            f"Node {node}: status.addresses[].address (InternalIP) {invalid[0]} is not an "
            f"IPv{4 if vs.family == AF_INET else 6} address; the endpoints on that Node are left out",
        )
    return None


def _endpoint(
    vs: VirtualServerSpec, cluster: Cluster, endpoint: SliceEndpoint, port: int, waiting: set[str]
) -> tuple[str, _Endpoint] | BackendProblem | None:
    """One endpoint: (pod address, where to send its traffic), or None to leave it out (a pod
    that is not ready yet is added to ``waiting``)."""
    if endpoint.family != vs.family:
        return None
    if endpoint.state is EndpointState.WAITING:
        waiting.add(endpoint.address)
        return None
    target = _target_address(vs, cluster, endpoint.node, endpoint.address)
    if not isinstance(target, str):
        return target
    return endpoint.address, _Endpoint(target, port, endpoint.state is EndpointState.DRAINING)


def _endpoints(
    vs: VirtualServerSpec, cluster: Cluster, entry: PortSpec, waiting: set[str]
) -> tuple[list[_Endpoint], BackendProblem | None]:
    """The endpoints of ``vs``'s Service for one of its ports, each pod once (ready wins over
    draining); the pods not ready yet are added to ``waiting``."""
    assert vs.service_name is not None
    k8s_service = cluster.services.get((vs.ref.namespace, vs.service_name))
    if k8s_service is None:
        return [], BackendProblem("ServiceNotFound", f"Service {vs.ref.namespace}/{vs.service_name} does not exist")
    svc_port = _service_port(k8s_service, vs.service_port, entry)
    if svc_port is None:
        return [], BackendProblem(
            "ServicePortNotFound",
            f"Service {vs.service_name} has no {entry.protocol.name} port matching "
            f"{vs.service_port if vs.service_port is not None else entry.name or entry.port}",
        )
    family_name = "IPv4" if vs.family == AF_INET else "IPv6"
    problem: BackendProblem | None = None
    best: dict[tuple[str, int], _Endpoint] = {}
    for eps in (cluster.slices.get((vs.ref.namespace, vs.service_name)) or {}).values():
        # Dual-stack Services have one slice per family.
        port = _slice_port(eps, svc_port.get("name"), entry) if eps.get("addressType") == family_name else None
        if port is None:
            continue
        for endpoint in eps["endpoints"]:
            found = _endpoint(vs, cluster, endpoint, port, waiting)
            if isinstance(found, BackendProblem):
                problem = problem or found
            elif found is not None:
                pod, usable = found
                previous = best.get((pod, usable.port))  # one pod counts once, whatever slices list it
                if previous is None or (previous.draining and not usable.draining):
                    best[pod, usable.port] = usable
    waiting.difference_update(pod for pod, _port in best)  # ready or draining in another slice
    return sorted(best.values(), key=lambda e: (e.address, e.port)), problem


@dataclass(frozen=True, slots=True)
class Resolution:
    """What became of one VirtualServer: the IPVS virtual services it yields or why it yields none.

    Frozen: the memo hands the same instance to every desired state that reuses it; a field that
    differs between passes (``generation``, ``selected``) is set with ``dataclasses.replace``.
    """

    ref: ObjectRef
    generation: int | None = None
    keys: tuple[ServiceKey, ...] = ()
    vip: str = ""
    ready_backends: int = 0
    draining_backends: int = 0
    waiting_backends: int = 0  # endpoints not ready yet (a readiness gate, a probe): not in IPVS
    error: SpecError | None = None
    problem: BackendProblem | None = None
    selected: bool = True  # False when directors.nodeSelector excludes this node

    @property
    def accepted(self) -> bool:
        return self.error is None


def virtual_services(vs: VirtualServerSpec, cluster: Cluster) -> tuple[list[VirtualService], Resolution]:
    """The IPVS virtual services one valid VirtualServer yields, and the counts for its status.

    Missing or unusable backends are a ``Resolution.problem``; the VirtualServer is still
    programmed. One check needs the cluster and refuses it instead: see :func:`check_ports_kept`
    (raises SpecError, reason PortMismatch).
    """
    ipvs_services: list[VirtualService] = []
    ready: set[str] = set()
    draining: set[str] = set()
    waiting: set[str] = set()  # pod addresses
    problem: BackendProblem | None = None
    static, presorted = _static_backends(vs, ready, draining) if vs.service_name is None else ([], False)
    make_service = make_sorted_service if presorted else VirtualService
    for entry in vs.ports:
        if vs.service_name is not None:
            found, found_problem = _endpoints(vs, cluster, entry, waiting)
            problem = problem or found_problem
            destinations = _service_destinations(vs, entry, found, ready, draining)
        else:
            destinations = _static_destinations(vs, entry, static)
        check_ports_kept(vs, entry, destinations)
        key = ServiceKey(vs.family, int(entry.protocol), vs.vip, entry.port)
        ipvs_services.append(
            make_service(key, vs.scheduler, vs.sched_flags, vs.persistence_timeout, vs.netmask, tuple(destinations))
        )
    if vs.service_name is not None and not problem and not ready:
        problem = BackendProblem("NoReadyEndpoints", f"Service {vs.service_name} has no ready endpoints")
    resolution = Resolution(
        vs.ref,
        keys=tuple(s.key for s in ipvs_services),
        vip=vs.vip,
        ready_backends=len(ready),
        draining_backends=len(draining - ready),
        waiting_backends=len(waiting),
        problem=problem,
    )
    return ipvs_services, resolution


def check_ports_kept(vs: VirtualServerSpec, entry: PortSpec, destinations: list[Destination]) -> None:
    """Refuse a DR or TUN VirtualServer whose real servers listen on another port than the VIP's.

    DR and TUN forward packets unchanged, so a real server must listen on the virtual service's
    own port. ``parse_virtual_server`` refuses that for static addresses; for a ``serviceRef``
    the port is known only from the EndpointSlices, so the check runs here, after resolution.
    It refuses the VirtualServer (SpecError at ``spec.backends.serviceRef.port``, reason
    PortMismatch: Accepted=False) rather than reporting a backend problem, because programming it
    would send every connection to a port nobody listens on.
    """
    if vs.method is Method.NAT:
        return
    mismatched = next((d for d in destinations if d.port != entry.port), None)
    if mismatched is not None:
        raise SpecError(
            vs.ref,
            "spec.backends.serviceRef.port",
            f"{vs.method.name} cannot remap ports, but endpoints of Service {vs.service_name} listen on "
            f"{mismatched.port}, not {entry.port}: use the same port or method NAT",
            reason="PortMismatch",
        )


def _service_destinations(
    vs: VirtualServerSpec, entry: PortSpec, endpoints: list[_Endpoint], ready: set[str], draining: set[str]
) -> list[Destination]:
    """One real server per (address, port): with Node targets, a Node with several ready pods
    gets a proportional share of the weight; one with only draining pods weight 0."""
    per_address: dict[tuple[str, int], list[_Endpoint]] = {}
    for endpoint in endpoints:
        port = _backend_port(vs, entry, endpoint.port)
        per_address.setdefault((endpoint.address, port), []).append(endpoint)
    destinations: list[Destination] = []
    for (address, port), group in per_address.items():
        live = sum(1 for e in group if not e.draining)
        weight = min(MAX_WEIGHT, vs.weight * live) if live else 0
        (ready if live else draining).add(address)
        destinations.append(_destination(vs, address, port, weight))
    return destinations


StaticRow = tuple[str, int | None, int, int]  # address, its own port, weight, family (0: the VIP's)


def _static_backends(vs: VirtualServerSpec, ready: set[str], draining: set[str]) -> tuple[list[StaticRow], bool]:
    """The static backends with their weights, in canonical order, once per VirtualServer (not
    once per port: 50 ports x 10 backends sort 500 keys instead of 5,000). When their addresses
    are distinct the address alone decides the order, whatever port each port entry gives them:
    each port's real servers then come out sorted (True)."""
    rows: list[StaticRow] = []
    for backend in sorted(vs.static_backends, key=lambda b: (address_order(b.address), b.address)):
        weight = vs.weight if backend.weight is None else backend.weight
        (ready if weight else draining).add(backend.address)
        family = AF_INET6 if ":" in backend.address else AF_INET
        rows.append((backend.address, backend.port, weight, 0 if family == vs.family else family))
    return rows, len({address for address, *_ in rows}) == len(rows)


def _static_destinations(vs: VirtualServerSpec, entry: PortSpec, rows: list[StaticRow]) -> list[Destination]:
    """The static backends as real servers of one port: a backend's own port, else the port's
    (NAT: a numeric targetPort for all), as :func:`_backend_port` gives, inlined with
    :func:`_destination` (a desired state at 10,000 x 10 builds 100,000 here)."""
    method, upper, lower = vs.method, vs.upper_threshold, vs.lower_threshold
    tunnel_type, tunnel_port, checksum = vs.tunnel_type, vs.tunnel_port, vs.tunnel_checksum
    target = entry.target_port if method is Method.NAT and isinstance(entry.target_port, int) else None
    default = entry.port
    return [
        Destination(
            address,
            target if target is not None else default if port is None else port,
            weight,
            method,
            upper,
            lower,
            tunnel_type,
            tunnel_port,
            checksum,
            family,
        )
        for address, port, weight, family in rows
    ]


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
        0 if family == vs.family else family,
    )
