"""From Kubernetes objects to desired IPVS state: a pure function of plain dicts.

The inputs are VirtualServers, Services, EndpointSlices and Nodes exactly as the API returns
them (or as YAML manifests hold them). One bad VirtualServer yields a :class:`SpecError` that
names the object and the field; it never stops the others from being programmed.
"""

from __future__ import annotations

import ipaddress
import marshal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubelvs.core.model import (
    AF_INET,
    SCHED_FLAG_BITS,
    SCHEDULERS,
    Method,
    Protocol,
    TunnelChecksum,
    TunnelType,
    format_hostport,
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


def meta(obj: Obj) -> Mapping[str, Any]:
    """An object's ``metadata``, or an empty mapping when it is missing or not an object.

    The one place that reads ``metadata`` from a raw object: cluster objects come from
    the API server or from files, and a junk value must not raise.
    """
    found = obj.get("metadata") if type(obj) is dict or isinstance(obj, Mapping) else None
    return found if type(found) is dict or isinstance(found, Mapping) else {}


class Packed(bytes):
    """A VirtualServer's ``spec`` or ``status`` as a director keeps it between reads: marshalled.

    As dicts, a spec is 1-1.5 KB and a status with 3 conditions and one director entry 2-4 KB
    (the dicts' tables, the timestamps); marshalled, 200 and 600-900 bytes. Marshal, not JSON:
    2 µs to pack and 3 µs to read (JSON: 10 and 8), and it never leaves the process. What reads
    them (parsing a new generation, writing this director's status) reads them once.
    """


def unpacked(value: Any) -> Any:
    """``value`` read back if :class:`Packed`, else as it is (an object from the API or a file)."""
    return marshal.loads(value) if type(value) is Packed else value


def packed(value: Any) -> Any:
    """A dict packed (trimming a trimmed object gives it back); anything else, such as a junk
    value for the parser to report, as it is."""
    return Packed(marshal.dumps(value)) if type(value) is dict else value


@dataclass(frozen=True, order=True, slots=True)
class ObjectRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def of(cls, obj: Obj) -> ObjectRef:
        found = meta(obj)
        return cls(str(found.get("namespace") or "default"), str(found.get("name") or ""))


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
            if family != AF_INET and ipaddress.IPv6Address(address).ipv4_mapped:
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
    spec = f.mapping(unpacked(obj.get("spec")), "spec", required=True, fields=SPEC_FIELDS)
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
    if method is Method.NAT:
        _refuse_colliding_nat_backends(f, backends, ports)
    return tuple(backends)


def _refuse_colliding_nat_backends(f: _Fields, backends: list[StaticBackend], ports: tuple[PortSpec, ...]) -> None:
    """Under NAT two entries of one address can still name one real server of a port, which the
    kernel would refuse as a duplicate at programming time; refused here instead, as the CRD's
    rules do (naming the same entry):
    - with a numeric targetPort (the port of every real server of that virtual port), each
      address may be listed once: the second entry is refused;
    - an entry without a port takes the virtual port: another entry of its address must not name
      a virtual port (that entry is refused)."""
    if any(isinstance(entry.target_port, int) for entry in ports):
        first_of: dict[str, int] = {}
        for i, backend in enumerate(backends):
            earlier = first_of.setdefault(backend.address, i)
            if earlier != i:
                raise f.fail(
                    f"spec.backends.addresses[{i}]",
                    f"{backend.address} is listed twice (as addresses[{earlier}]; with NAT a numeric targetPort "
                    "is the port of every real server)",
                )
    virtual_ports = {entry.port for entry in ports}
    portless = {backend.address: i for i, backend in reversed(list(enumerate(backends))) if backend.port is None}
    for i, backend in enumerate(backends):
        if backend.port in virtual_ports and backend.address in portless:
            raise f.fail(
                f"spec.backends.addresses[{i}]",
                f"{format_hostport(backend.address, backend.port)} is also addresses[{portless[backend.address]}], "
                "an entry without a port (with NAT that one takes the virtual port)",
            )
