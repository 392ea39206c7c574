"""From Kubernetes objects to desired IPVS state: a pure function of plain dicts.

The inputs are VirtualServers, Services, EndpointSlices and Nodes exactly as the API returns
them (or as YAML manifests hold them). One bad VirtualServer yields a :class:`SpecError` that
names the object and the field; it never stops the others from being programmed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kubelvs.model import (
    AF_INET,
    AF_INET6,
    SCHED_FLAG_BITS,
    SCHEDULERS,
    Destination,
    IPVSState,
    Method,
    Protocol,
    ServiceKey,
    TunnelChecksum,
    TunnelType,
    VirtualService,
    normalize_address,
)

GROUP = "kubelvs.io"
VERSION = "v1alpha1"
KIND = "VirtualServer"
PLURAL = "virtualservers"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MAX_WEIGHT = 65535
MAX_PERSISTENCE_SECONDS = 31 * 24 * 3600

Obj = Mapping[str, Any]


@dataclass(frozen=True, order=True, slots=True)
class ObjectRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def of(cls, obj: Obj) -> ObjectRef:
        meta = obj.get("metadata") or {}
        return cls(str(meta.get("namespace") or "default"), str(meta.get("name") or ""))


class SpecError(ValueError):
    """A VirtualServer that cannot be programmed, with the offending field's path."""

    def __init__(self, ref: ObjectRef, path: str, message: str, reason: str = "InvalidSpec") -> None:
        super().__init__(f"{KIND} {ref}: {path}: {message}")
        self.ref = ref
        self.path = path
        self.message = message
        self.reason = reason


# --- the parsed, validated spec ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PortSpec:
    port: int
    protocol: Protocol
    name: str | None = None
    target_port: int | str | None = None


@dataclass(frozen=True, slots=True)
class StaticBackend:
    address: str
    port: int | None
    weight: int | None


@dataclass(frozen=True, slots=True)
class VirtualServerSpec:
    ref: ObjectRef
    family: int
    vip: str
    ports: tuple[PortSpec, ...]
    scheduler: str
    sched_flags: int
    persistence_timeout: int
    netmask: int
    method: Method
    tunnel_type: TunnelType
    tunnel_port: int
    tunnel_checksum: TunnelChecksum
    service_name: str | None
    service_port: int | str | None
    static_backends: tuple[StaticBackend, ...]
    target_node: bool
    weight: int
    upper_threshold: int
    lower_threshold: int
    node_selector: Mapping[str, str]


class _Fields:
    """Typed access to a nested dict that reports errors with their field path."""

    def __init__(self, ref: ObjectRef) -> None:
        self.ref = ref

    def fail(self, path: str, message: str) -> SpecError:
        return SpecError(self.ref, path, message)

    def mapping(
        self, value: Any, path: str, required: bool = False, fields: tuple[str, ...] | None = None
    ) -> Mapping[str, Any]:
        """An object; with ``fields``, any other key is refused (as the API server's strict
        field validation does), so a misspelt field is an error rather than silently ignored."""
        if value is None:
            if required:
                raise self.fail(path, "is required")
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(path, f"must be an object, not {type(value).__name__}")
        for key in value:
            if fields is not None and key not in fields:
                raise self.fail(f"{path}.{key}", f"unknown field (known: {', '.join(fields)})")
        return value

    def integer(self, value: Any, path: str, low: int, high: int) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # YAML/JSON 80.0: the API server stores it as 80
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"must be an integer, not {value!r}")
        if not low <= value <= high:
            raise self.fail(path, f"must be between {low} and {high}, not {value}")
        return value

    def choice(self, value: Any, path: str, choices: Iterable[str]) -> str:
        options = tuple(choices)
        if value not in options:
            raise self.fail(path, f"must be one of {', '.join(options)}, not {value!r}")
        return str(value)

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(path, f"must be a non-empty string, not {value!r}")
        return value

    def address(self, value: Any, path: str) -> tuple[int, str]:
        """An IP address written plainly: no whitespace, no IPv6 zone, no IPv4-mapped IPv6."""
        try:
            if not isinstance(value, str) or value != value.strip() or "%" in value:
                raise ValueError
            family, address = normalize_address(value)
            if ipaddress.ip_address(address).version == 6 and ipaddress.IPv6Address(address).ipv4_mapped:
                raise ValueError
        except ValueError:
            raise self.fail(path, f"must be an IPv4 or IPv6 address, not {value!r}") from None
        return family, address


def _get(mapping: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """A field's value, where an explicit null means the default (as the API server treats it)."""
    value = mapping.get(key)
    return default if value is None else value


SPEC_FIELDS = ("vip", "ports", "scheduler", "schedulerFlags", "persistence", "forwarding", "backends", "directors")


def parse_virtual_server(obj: Obj) -> VirtualServerSpec:
    """Validate a VirtualServer and return its typed spec. Raises SpecError."""
    ref = ObjectRef.of(obj)
    f = _Fields(ref)
    spec = f.mapping(obj.get("spec"), "spec", required=True, fields=SPEC_FIELDS)
    family, vip = f.address(spec.get("vip"), "spec.vip")

    forwarding = f.mapping(spec.get("forwarding"), "spec.forwarding", fields=("method", "tunnel"))
    method = Method[f.choice(_get(forwarding, "method", "DR"), "spec.forwarding.method", ("DR", "TUN", "NAT"))]
    tunnel_type, tunnel_port, tunnel_checksum = _parse_tunnel(f, forwarding, method)

    ports = _parse_ports(f, spec.get("ports"), method)

    scheduler = f.choice(_get(spec, "scheduler", "wlc"), "spec.scheduler", SCHEDULERS)
    sched_flags = 0
    raw_flags = _get(spec, "schedulerFlags", [])
    if not isinstance(raw_flags, list):
        raise f.fail("spec.schedulerFlags", "must be a list")
    for i, flag in enumerate(raw_flags):
        path = f"spec.schedulerFlags[{i}]"
        f.choice(flag, path, SCHED_FLAG_BITS)
        if not flag.startswith(scheduler + "-"):
            raise f.fail(path, f"{flag!r} is only valid with the {flag.split('-')[0]} scheduler")
        if flag in raw_flags[:i]:
            raise f.fail(path, f"{flag!r} is listed twice")
        sched_flags |= SCHED_FLAG_BITS[flag]

    persistence_timeout, netmask = _parse_persistence(f, spec.get("persistence"), family)

    backends = f.mapping(
        spec.get("backends"),
        "spec.backends",
        required=True,
        fields=("serviceRef", "addresses", "target", "weight", "upperThreshold", "lowerThreshold"),
    )
    target = f.choice(_get(backends, "target", "Pod"), "spec.backends.target", ("Pod", "Node"))
    weight = f.integer(_get(backends, "weight", 1), "spec.backends.weight", 0, MAX_WEIGHT)
    upper = f.integer(_get(backends, "upperThreshold", 0), "spec.backends.upperThreshold", 0, 2**31 - 1)
    lower = f.integer(_get(backends, "lowerThreshold", 0), "spec.backends.lowerThreshold", 0, 2**31 - 1)
    service_ref = backends.get("serviceRef")
    addresses = backends.get("addresses")
    if (service_ref is None) == (not addresses):
        raise f.fail("spec.backends", "exactly one of serviceRef and addresses must be set")
    service_name: str | None = None
    service_port: int | str | None = None
    static: tuple[StaticBackend, ...] = ()
    if service_ref is not None:
        service_ref = f.mapping(service_ref, "spec.backends.serviceRef", fields=("name", "port"))
        service_name = f.string(service_ref.get("name"), "spec.backends.serviceRef.name")
        service_port = service_ref.get("port")
        if service_port is not None and not isinstance(service_port, str):
            service_port = f.integer(service_port, "spec.backends.serviceRef.port", 1, 65535)
    else:
        static = _parse_addresses(f, addresses, family, method, ports)
        if target == "Node":
            raise f.fail("spec.backends.target", "Node applies to serviceRef backends only")

    directors = f.mapping(spec.get("directors"), "spec.directors", fields=("nodeSelector",))
    node_selector = f.mapping(directors.get("nodeSelector"), "spec.directors.nodeSelector")
    for key, value in node_selector.items():
        if not isinstance(value, str):
            raise f.fail(f"spec.directors.nodeSelector.{key}", f"must be a string, not {value!r}")

    return VirtualServerSpec(
        ref=ref,
        family=family,
        vip=vip,
        ports=ports,
        scheduler=scheduler,
        sched_flags=sched_flags,
        persistence_timeout=persistence_timeout,
        netmask=netmask,
        method=method,
        tunnel_type=tunnel_type,
        tunnel_port=tunnel_port,
        tunnel_checksum=tunnel_checksum,
        service_name=service_name,
        service_port=service_port,
        static_backends=static,
        target_node=target == "Node",
        weight=weight,
        upper_threshold=upper,
        lower_threshold=lower,
        node_selector={str(k): str(v) for k, v in node_selector.items()},
    )


def _parse_tunnel(f: _Fields, forwarding: Mapping[str, Any], method: Method) -> tuple[TunnelType, int, TunnelChecksum]:
    tunnel = f.mapping(forwarding.get("tunnel"), "spec.forwarding.tunnel", fields=("type", "port", "checksum"))
    if forwarding.get("tunnel") is not None and method is not Method.TUN:
        raise f.fail("spec.forwarding.tunnel", "is only valid with method TUN")
    kind = TunnelType[
        f.choice(_get(tunnel, "type", "ipip"), "spec.forwarding.tunnel.type", ("ipip", "gue", "gre")).upper()
    ]
    port = 0
    if kind is TunnelType.GUE:
        port = f.integer(tunnel.get("port"), "spec.forwarding.tunnel.port", 1, 65535)
    elif tunnel.get("port") is not None:
        raise f.fail("spec.forwarding.tunnel.port", "is only valid with tunnel type gue")
    checksum = TunnelChecksum.NONE
    if tunnel.get("checksum") is not None:
        if kind is TunnelType.IPIP:
            raise f.fail("spec.forwarding.tunnel.checksum", "is only valid with tunnel types gue and gre")
        name = f.choice(tunnel["checksum"], "spec.forwarding.tunnel.checksum", ("none", "csum", "remcsum"))
        if name == "remcsum" and kind is not TunnelType.GUE:
            raise f.fail("spec.forwarding.tunnel.checksum", "remcsum is only valid with tunnel type gue")
        checksum = {"none": TunnelChecksum.NOCSUM, "csum": TunnelChecksum.CSUM, "remcsum": TunnelChecksum.REMCSUM}[name]
    return kind, port, checksum


def _parse_ports(f: _Fields, raw: Any, method: Method) -> tuple[PortSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise f.fail("spec.ports", "must be a non-empty list")
    ports: list[PortSpec] = []
    seen: dict[tuple[int, Protocol], int] = {}
    for i, entry in enumerate(raw):
        path = f"spec.ports[{i}]"
        entry = f.mapping(entry, path, required=True, fields=("name", "port", "protocol", "targetPort"))
        port = f.integer(entry.get("port"), f"{path}.port", 1, 65535)
        protocol = Protocol[f.choice(_get(entry, "protocol", "TCP"), f"{path}.protocol", ("TCP", "UDP", "SCTP"))]
        if (port, protocol) in seen:
            raise f.fail(
                f"{path}.port", f"{protocol.name} {port} is already used by spec.ports[{seen[port, protocol]}]"
            )
        seen[port, protocol] = i
        name = entry.get("name")
        if name is not None:
            name = f.string(name, f"{path}.name")
        target = entry.get("targetPort")
        if target is not None and not isinstance(target, str):
            target = f.integer(target, f"{path}.targetPort", 1, 65535)
        if target is not None and method is not Method.NAT and target != port:
            raise f.fail(
                f"{path}.targetPort",
                f"{method.name} forwards packets unchanged, so targetPort must equal port {port} (use NAT to remap)",
            )
        ports.append(PortSpec(port, protocol, name, target))
    return tuple(ports)


def _parse_persistence(f: _Fields, raw: Any, family: int) -> tuple[int, int]:
    if raw is None:
        return 0, 0
    persistence = f.mapping(raw, "spec.persistence", fields=("timeoutSeconds", "netmask"))
    timeout = f.integer(
        _get(persistence, "timeoutSeconds", 300), "spec.persistence.timeoutSeconds", 1, MAX_PERSISTENCE_SECONDS
    )
    mask = persistence.get("netmask")
    if mask is None:
        return timeout, 0
    path = "spec.persistence.netmask"
    if family == AF_INET:
        try:
            if not isinstance(mask, str) or mask.count(".") != 3:
                raise ValueError
            network = ipaddress.IPv4Network(f"0.0.0.0/{mask}")
            if str(network.netmask) != mask:  # refuses hostmasks such as 0.0.0.255
                raise ValueError
        except ValueError:
            raise f.fail(path, f"must be an IPv4 netmask such as 255.255.255.0, not {mask!r}") from None
        if network.prefixlen == 0:
            raise f.fail(path, "must not be 0.0.0.0")
        return timeout, network.prefixlen
    if isinstance(mask, str) and mask.isascii() and mask.isdigit():
        mask = int(mask)
    return timeout, f.integer(mask, path, 1, 128)


def _parse_addresses(
    f: _Fields, raw: Any, family: int, method: Method, ports: tuple[PortSpec, ...]
) -> tuple[StaticBackend, ...]:
    if not isinstance(raw, list):
        raise f.fail("spec.backends.addresses", "must be a list")
    backends = []
    seen: set[tuple[str, int | None]] = set()
    for i, entry in enumerate(raw):
        path = f"spec.backends.addresses[{i}]"
        entry = f.mapping(entry, path, required=True, fields=("ip", "port", "weight"))
        rs_family, address = f.address(entry.get("ip"), f"{path}.ip")
        if rs_family != family and method is not Method.TUN:
            raise f.fail(f"{path}.ip", "must be of the VIP's address family (only TUN can mix families)")
        port = entry.get("port")
        if port is not None:
            port = f.integer(port, f"{path}.port", 1, 65535)
            if method is not Method.NAT and any(p.port != port for p in ports):
                raise f.fail(f"{path}.port", f"{method.name} cannot remap ports: omit port or use NAT")
        weight = entry.get("weight")
        if weight is not None:
            weight = f.integer(weight, f"{path}.weight", 0, MAX_WEIGHT)
        identity = (address, port if method is Method.NAT else None)  # DR/TUN: always the VIP's port
        if identity in seen:
            raise f.fail(f"{path}.ip", f"{address} is listed twice")
        seen.add(identity)
        backends.append(StaticBackend(address, port, weight))
    return tuple(backends)


# --- resolving backends against the cluster ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendProblem:
    """Why a valid VirtualServer has fewer backends than it should (a status reason)."""

    reason: str
    message: str


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


@dataclass(slots=True)
class DesiredState:
    services: IPVSState = field(default_factory=dict)
    vips: dict[str, int] = field(default_factory=dict)  # address -> family, to be made local
    origins: dict[ServiceKey, ObjectRef] = field(default_factory=dict)
    resolutions: dict[ObjectRef, Resolution] = field(default_factory=dict)

    @property
    def errors(self) -> list[SpecError]:
        return [r.error for r in self.resolutions.values() if r.error is not None]


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
