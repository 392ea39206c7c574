"""Plain data for IPVS state: what we want in the kernel and what we read back.

Everything here is immutable and free of I/O, so the planner can compare desired and observed
state with ``==`` and tests can build states by hand.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar, dataclass_transform

AF_INET = 2
AF_INET6 = 10


class Protocol(enum.IntEnum):
    TCP = 6
    UDP = 17
    SCTP = 132


class Method(enum.IntEnum):
    """Forwarding method; the values are the kernel's IP_VS_CONN_F_* forwarding codes."""

    NAT = 0  # IP_VS_CONN_F_MASQ
    LOCAL = 1  # IP_VS_CONN_F_LOCALNODE (never desired, may be observed)
    TUN = 2  # IP_VS_CONN_F_TUNNEL
    DR = 3  # IP_VS_CONN_F_DROUTE
    UNKNOWN = -1  # a code this version does not know, read from a foreign entry: never encoded

    @property
    def ipvsadm_flag(self) -> str:
        return {Method.NAT: "-m", Method.LOCAL: "-g", Method.TUN: "-i", Method.DR: "-g"}.get(self, "-?")


class TunnelType(enum.IntEnum):
    """IP_VS_CONN_F_TUNNEL_TYPE_*: the encapsulation used by the TUN method."""

    IPIP = 0
    GUE = 1
    GRE = 2
    UNKNOWN = -1  # read from a foreign entry, never encoded (see Method.UNKNOWN)


class TunnelChecksum(enum.IntEnum):
    """IP_VS_TUNNEL_ENCAP_FLAG_*: checksum handling of GUE/GRE encapsulation."""

    NONE = 0  # IP_VS_TUNNEL_ENCAP_FLAG_NOCSUM
    NOCSUM = 0
    CSUM = 1
    REMCSUM = 2
    UNKNOWN = -1  # read from a foreign entry, never encoded (see Method.UNKNOWN)


# Scheduler flags as the kernel numbers them (IP_VS_SVC_F_SCHED1..3). Their meaning
# depends on the scheduler, so the names carry the scheduler's prefix.
SCHED_FLAG_BITS: dict[str, int] = {
    "sh-fallback": 0x0008,
    "sh-port": 0x0010,
    "mh-fallback": 0x0008,
    "mh-port": 0x0010,
}
SVC_F_PERSISTENT = 0x0001
SVC_F_HASHED = 0x0002  # kernel-internal: set on every service it reports
SVC_F_ONEPACKET = 0x0004

SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh")


class ServiceKey(NamedTuple):
    """What identifies a virtual service in the kernel (the address is normalised text)."""

    family: int
    protocol: int
    address: str
    port: int
    fwmark: int = 0

    def __str__(self) -> str:
        if self.fwmark:
            return f"fwmark {self.fwmark}"
        protocol = Protocol(self.protocol).name if self.protocol in _PROTOCOLS else f"protocol {self.protocol}"
        return f"{protocol} {format_hostport(self.address, self.port)}"


_PROTOCOLS = frozenset(Protocol)


class DestKey(NamedTuple):
    address: str
    port: int

    def __str__(self) -> str:
        return format_hostport(self.address, self.port)


_T = TypeVar("_T")


@dataclass_transform(frozen_default=True)
def value_class(cls: type[_T]) -> type[_T]:
    """A slots dataclass that is frozen to the type checker (mypy refuses any assignment to a
    field; ``tests/unit/test_model.py`` checks it) but not at run time, for the values made by the
    hundred thousand: a frozen dataclass's ``__init__`` stores each field through
    ``object.__setattr__``, 1.6 µs for a Destination against 0.35 µs with plain slot stores
    (natively; a desired state at 10,000 x 10 has 100,000 of them, a plan of it 110,000
    Operations: 2-3 s of ``kubelvs apply`` under emulation). Equal and hashed by value, as a
    frozen one (``unsafe_hash``: nothing assigns to them, so the hash never changes)."""
    return dataclass(slots=True, unsafe_hash=True)(cls)  # type: ignore[return-value]


@value_class
class Destination:
    """One real server of a virtual service."""

    address: str
    port: int
    weight: int = 1
    method: Method = Method.DR
    upper_threshold: int = 0
    lower_threshold: int = 0
    tunnel_type: TunnelType = TunnelType.IPIP
    tunnel_port: int = 0
    tunnel_checksum: TunnelChecksum = TunnelChecksum.NONE
    family: int = 0  # 0: the service's family (mixed families are only valid with TUN)

    @property
    def key(self) -> DestKey:
        return DestKey(self.address, self.port)


@dataclass(frozen=True, slots=True)
class VirtualService:
    """One IPVS virtual service and its real servers (sorted by address and port)."""

    key: ServiceKey
    scheduler: str = "wlc"
    sched_flags: int = 0  # IP_VS_SVC_F_SCHED* and ONEPACKET bits, without PERSISTENT/HASHED
    persistence_timeout: int = 0  # seconds; 0 means not persistent
    netmask: int = 0  # persistence granularity as a prefix length; 0 means the full address
    destinations: tuple[Destination, ...] = ()

    def __post_init__(self) -> None:
        # The address last: two spellings of one address (never produced: addresses are
        # canonical text) could not tie and take their input order.
        if len(self.destinations) > 1:
            object.__setattr__(self, "destinations", tuple(sorted(self.destinations, key=destination_order)))

    @property
    def effective_netmask(self) -> int:
        return self.netmask or (32 if self.key.family == AF_INET else 128)

    def same_settings(self, other: VirtualService) -> bool:
        """True when the service-level settings (not the real servers) are equal."""
        return (
            self.scheduler == other.scheduler
            and self.sched_flags == other.sched_flags
            and self.persistence_timeout == other.persistence_timeout
            and self.effective_netmask == other.effective_netmask
        )

    def without_destinations(self) -> VirtualService:
        if not self.destinations:
            return self  # frozen: the same object serves
        return VirtualService(self.key, self.scheduler, self.sched_flags, self.persistence_timeout, self.netmask, ())

    def dest_map(self) -> dict[DestKey, Destination]:
        return {d.key: d for d in self.destinations}

    @property
    def has_unknown_values(self) -> bool:
        """True when the kernel reported something this version cannot represent (an unknown
        address family, forwarding method, tunnel type or checksum mode): such a service can
        only be foreign, and must never be encoded back."""
        if self.key.family not in _FAMILIES:
            return True
        method, tunnel, checksum, families = _UNKNOWN_METHOD, _UNKNOWN_TUNNEL, _UNKNOWN_CHECKSUM, _DEST_FAMILIES
        for d in self.destinations:  # a plain loop: the planner asks this of every owned service
            if d.method is method or d.tunnel_type is tunnel or d.tunnel_checksum is checksum:
                return True
            if d.family not in families:
                return True
        return False


def destination_order(d: Destination) -> tuple[tuple[int, int | bytes], int, str]:
    """The canonical order of a service's real servers: by address value, then port."""
    return address_order(d.address), d.port, d.address


_FAMILIES = frozenset((AF_INET, AF_INET6))
_DEST_FAMILIES = frozenset((0, AF_INET, AF_INET6))
_UNKNOWN_METHOD, _UNKNOWN_TUNNEL, _UNKNOWN_CHECKSUM = Method.UNKNOWN, TunnelType.UNKNOWN, TunnelChecksum.UNKNOWN

IPVSState = dict[ServiceKey, VirtualService]


@dataclass(frozen=True, slots=True)
class Counters:
    """Kernel statistics of a service or real server: observed, never desired."""

    connections: int = 0
    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    cps: int = 0
    pps_in: int = 0
    pps_out: int = 0
    bps_in: int = 0
    bps_out: int = 0


@dataclass(frozen=True, slots=True)
class DestCounters:
    counters: Counters = field(default_factory=Counters)
    active_connections: int = 0
    inactive_connections: int = 0
    persistent_connections: int = 0


@dataclass(slots=True)
class Observed:
    """A dump of the kernel: the state (comparable with desired state) and the counters apart."""

    services: IPVSState = field(default_factory=dict)
    service_counters: dict[ServiceKey, Counters] = field(default_factory=dict)
    dest_counters: dict[tuple[ServiceKey, DestKey], DestCounters] = field(default_factory=dict)


def normalize_address(text: str) -> tuple[int, str]:
    """Parse an IP address; return (family, canonical text). Raises ValueError."""
    text = text.strip()
    if is_canonical_ipv4(text):  # no ipaddress object (10,000s at start-up)
        return AF_INET, text
    addr = ipaddress.ip_address(text)
    return (AF_INET if addr.version == 4 else AF_INET6), str(addr)


# A dotted quad in canonical form ("10.0.0.1", what ``str(IPv4Address)`` gives back): ASCII
# digits only, no leading zeros, each octet 0-255. One C call, where ipaddress takes ~20 µs.
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_IPV4 = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}")


def is_canonical_ipv4(text: str) -> bool:
    return _CANONICAL_IPV4.fullmatch(text) is not None


def address_text(packed: bytes) -> str:
    """The canonical text of a packed address (4 or 16 bytes): what :func:`normalize_address`
    gives for it, so that keys read from the kernel equal the keys the specs produce."""
    return str(ipaddress.ip_address(packed))


# IPv6 ranges where C's inet_ntop writes a dotted quad ("::ffff:10.0.0.1", "::10.0.0.1") but
# ipaddress does not ("::ffff:a00:1", "::a00:1"): the IPv4-mapped ::ffff:0:0/96 and the
# IPv4-compatible ::/96. Outside them the two give the same text, so a decoder may use the
# faster inet_ntop there and address_text() for addresses with these 12-byte prefixes.
NTOP_DIFFERS_PREFIXES = frozenset((bytes(10) + b"\xff\xff", bytes(12)))


def format_hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def address_order(address: str) -> tuple[int, int | bytes]:
    """An order of addresses: IPv4 by value, then IPv6 by value. Not memoised (a cache of 40,000
    addresses costs ~6 MB). A dotted quad's four octets as bytes order as its value: 0.8 µs a key
    against 1.7 µs for the canonical check and the arithmetic (the sort of a full desired state
    at 10,000 x 10 is 100,000 keys). Anything else goes to ipaddress."""
    if ":" not in address:
        try:
            return 4, bytes(map(int, address.split(".", 3)))
        except ValueError:  # not a dotted quad of octets
            pass
    return _addr_sort_other(address)


@functools.lru_cache(maxsize=1 << 12)
def _addr_sort_other(address: str) -> tuple[int, int | bytes]:
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:  # "?..." : an address of an unknown family, read from a foreign entry
        return 0, 0
    return (4, addr.packed) if addr.version == 4 else (6, int(addr))


def fast_constructor(cls: type, skip_post_init: bool = False) -> Callable[..., Any]:
    """A constructor for a frozen slots dataclass that fills the slots directly: half the cost of
    the generated ``__init__``, which goes through ``object.__setattr__`` once per field (the
    dump decoder's counters; :func:`value_class` goes further where there are 100,000s).
    Positional arguments, all of them, in field order. The result is the dataclass's own
    instance, frozen as ever. A class with ``__post_init__`` gets its own
    constructor back, unless ``skip_post_init``: then the caller guarantees what it would do."""
    fields = getattr(cls, "__dataclass_fields__", {})
    slots = getattr(cls, "__slots__", ())
    if (hasattr(cls, "__post_init__") and not skip_post_init) or tuple(fields) != tuple(slots):
        return cls
    setters = [getattr(cls, name).__set__ for name in slots]
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    namespace.update({f"_s{i}": setter for i, setter in enumerate(setters)})
    args = ", ".join(f"a{i}" for i in range(len(setters)))
    body = "; ".join(f"_s{i}(o, a{i})" for i in range(len(setters)))
    exec(f"def make({args}):\n    o = _new(_cls); {body}; return o", namespace)
    return namespace["make"]  # type: ignore[no-any-return]


# VirtualService(key, scheduler, sched_flags, persistence_timeout, netmask, destinations), every
# argument given, for destinations the caller has put in canonical order (destination_order)
# already: the constructor's sort is skipped.
make_sorted_service = fast_constructor(VirtualService, skip_post_init=True)
