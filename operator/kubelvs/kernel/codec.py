"""Byte-level encoding and decoding of IPVS generic-netlink messages (and the few rtnetlink ones
the VIPs need).

pyroute2's request objects cost ~150 us per message to encode, which makes programming 10,000
services take minutes; packing the same bytes with ``struct`` costs ~2 us, and ~0.5 us with
:class:`RequestEncoder`, which packs a real server's whole request with one precompiled
``struct.Struct`` and encodes each service's key once. The attributes sent are declared once,
in the attribute tables (``DEST_TABLE``, ...): the generic encoders walk them and the fast
encoder's struct formats are derived from them.

Dumps are decoded by :func:`decode_service` and :func:`decode_dest` (and, faster, by
``kubelvs.kernel.fastdump``). Codes this version does not know (a forwarding method, tunnel
type or checksum mode, an address family) decode to the model's ``UNKNOWN`` sentinels, never
to an exception: one odd foreign entry must not fail every dump. Addresses decode to the
canonical text of :func:`kubelvs.core.model.address_text`.

The layout follows pyroute2's ``ipvsmsg`` definitions (see ``kubelvs.kernel.messages``), and
``tests/unit/test_codec*.py`` check the encoders and decoders here against pyroute2's own
encoding and decoding of the same messages, and against each other over random messages.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from kubelvs.core.model import (
    AF_INET,
    AF_INET6,
    NTOP_DIFFERS_PREFIXES,
    SVC_F_HASHED,
    SVC_F_PERSISTENT,
    Counters,
    DestCounters,
    Destination,
    Method,
    ServiceKey,
    TunnelChecksum,
    TunnelType,
    VirtualService,
)
from kubelvs.core.model import address_text as model_address_text

# Netlink and generic netlink framing (linux/netlink.h, linux/genetlink.h).
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_REPLACE = 0x100  # in a NEW request: change the object if it exists
NLM_F_CAPPED = 0x100  # in an NLMSG_ERROR's header: the request's payload was left out
NLM_F_ACK_TLVS = 0x200  # in an NLMSG_ERROR's header: extended-ack TLVs follow
NLA_F_NESTED = 0x8000
NLMSGERR_ATTR_MSG = 1
GENL_VERSION = 1
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

# The generic-netlink controller (linux/genetlink.h).
GENL_ID_CTRL = 0x10
CTRL_CMD_NEWFAMILY, CTRL_CMD_GETFAMILY = 1, 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 1, 2

# linux/ip_vs.h
CMD_NEW_SERVICE, CMD_SET_SERVICE, CMD_DEL_SERVICE, CMD_GET_SERVICE = 1, 2, 3, 4
CMD_NEW_DEST, CMD_SET_DEST, CMD_DEL_DEST, CMD_GET_DEST = 5, 6, 7, 8
CMD_ATTR_SERVICE, CMD_ATTR_DEST = 1, 2
SVC_AF, SVC_PROTOCOL, SVC_ADDR, SVC_PORT, SVC_FWMARK = 1, 2, 3, 4, 5
SVC_SCHED_NAME, SVC_FLAGS, SVC_TIMEOUT, SVC_NETMASK, SVC_STATS = 6, 7, 8, 9, 10
SVC_PE_NAME, SVC_STATS64 = 11, 12
DEST_ADDR, DEST_PORT, DEST_FWD_METHOD, DEST_WEIGHT, DEST_U_THRESH, DEST_L_THRESH = 1, 2, 3, 4, 5, 6
DEST_ACTIVE_CONNS, DEST_INACT_CONNS, DEST_PERSIST_CONNS, DEST_STATS = 7, 8, 9, 10
DEST_ADDR_FAMILY, DEST_STATS64, DEST_TUN_TYPE, DEST_TUN_PORT, DEST_TUN_FLAGS = 11, 12, 13, 14, 15
STATS_FIELDS = 10  # CONNS .. OUTBPS

# rtnetlink (linux/rtnetlink.h, linux/if_link.h, linux/if_addr.h)
RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
IFLA_IFNAME, IFLA_LINKINFO, IFLA_INFO_KIND = 3, 18, 1
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_CACHEINFO, IFA_PROTO = 6, 11
IFF_UP = 0x1

_HEADER = struct.Struct("=IHHIIBBH")  # nlmsghdr + genlmsghdr
_NLMSGHDR = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
_BE16 = struct.Struct(">H")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_IFA_CACHEINFO = struct.Struct("=IIII")  # ifa_prefered, ifa_valid, cstamp, tstamp

_htons = socket.htons
_pton = socket.inet_pton
_ntop = socket.inet_ntop


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * (-length & 3)


def _netmask(service: VirtualService) -> bytes:
    prefix = service.effective_netmask
    if service.key.family == AF_INET:
        return struct.pack(">I", (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF)
    return _U32.pack(prefix)  # IPv6: the prefix length, host order (as ipvsadm sends it)


# --- the attribute tables ---------------------------------------------------------------------
#
# Every attribute the encoders send, in the order they send it: (attribute id, kernel type,
# field of the model object). The generic encoders below walk these tables and the fast encoder's
# struct formats are derived from them, so an attribute is added in one place (plus, for the fast
# encoder, its value in RequestEncoder.dest's pack call, which passes each attribute's length, id
# and value in table order; the tests check the two byte for byte, and against pyroute2).
#
# Kernel types, as linux/ip_vs.h and ip_vs_ctl.c's policies read them:
#   u8, u16, u32 (host order); be16 (network order); addr (struct in_addr / in6_addr, 4 or 16
#   bytes); string (NUL-terminated); flags (struct ip_vs_flags: the flags, then the mask of the
#   flags to set); netmask (IPv4: a be32 mask; IPv6: the prefix length as a u32).

Attr = tuple[int, str, str]

SERVICE_KEY_TABLE: tuple[Attr, ...] = (
    (SVC_AF, "u16", "family"),
    (SVC_PROTOCOL, "u16", "protocol"),
    (SVC_ADDR, "addr", "address"),
    (SVC_PORT, "be16", "port"),
)
FWMARK_KEY_TABLE: tuple[Attr, ...] = (
    (SVC_AF, "u16", "family"),
    (SVC_FWMARK, "u32", "fwmark"),
)
SERVICE_SETTINGS_TABLE: tuple[Attr, ...] = (  # after the key: the rest of a full service entry
    (SVC_SCHED_NAME, "string", "scheduler"),
    (SVC_FLAGS, "flags", "sched_flags"),
    (SVC_TIMEOUT, "u32", "persistence_timeout"),
    (SVC_NETMASK, "netmask", "netmask"),
)
DEST_KEY_TABLE: tuple[Attr, ...] = (  # what identifies a real server (deletes)
    (DEST_ADDR, "addr", "address"),
    (DEST_PORT, "be16", "port"),
    (DEST_ADDR_FAMILY, "u16", "family"),
)
DEST_TABLE: tuple[Attr, ...] = (  # the full entry that NEW_DEST and SET_DEST require
    (DEST_ADDR, "addr", "address"),
    (DEST_PORT, "be16", "port"),
    (DEST_FWD_METHOD, "u32", "method"),
    (DEST_WEIGHT, "u32", "weight"),
    (DEST_U_THRESH, "u32", "upper_threshold"),
    (DEST_L_THRESH, "u32", "lower_threshold"),
    (DEST_ADDR_FAMILY, "u16", "family"),
    (DEST_TUN_TYPE, "u8", "tunnel_type"),
    (DEST_TUN_PORT, "be16", "tunnel_port"),
    (DEST_TUN_FLAGS, "u16", "tunnel_checksum"),
)

_FLAGS_PAIR = struct.Struct("=II")
NLMSG_FLAGS = struct.Struct("=H")  # nlmsghdr.nlmsg_flags, at offset 6
ERROR_ACK_SPACE = 2048  # receive-buffer bytes an error acknowledgement may take (skb overhead)
# kernel type: (its payload from the field's value, its struct format in the fast encoder:
# payload and padding to 4 bytes, "{}" the address size; None: not in a fast-encoded table).
_KERNEL_TYPES: dict[str, tuple[Callable[[Any], bytes], str | None]] = {
    "u8": (lambda value: bytes((value,)), "B3x"),
    "u16": (_U16.pack, "H2x"),
    "be16": (_BE16.pack, "H2x"),  # the fast encoder packs htons(value) as a native u16
    "u32": (_U32.pack, "I"),
    "addr": (bytes, "{}s"),  # the value: the packed address
    "string": (lambda value: value.encode() + b"\0", None),
    "flags": (lambda value: _FLAGS_PAIR.pack(value, 0xFFFFFFFF), None),
    "netmask": (bytes, None),  # the value: packed by _netmask
}


def encode_attrs(table: tuple[Attr, ...], obj: object, values: dict[str, Any]) -> bytes:
    """The attributes of ``table``, each with ``values[field]`` if given, else ``obj.field``."""
    out = []
    for kind, kernel_type, name in table:
        value = values[name] if name in values else getattr(obj, name)
        out.append(_attr(kind, _KERNEL_TYPES[kernel_type][0](value)))
    return b"".join(out)


def struct_format(table: tuple[Attr, ...], addr_size: int) -> str:
    """The ``struct`` format of ``table``'s attributes (each: length and id, then its payload)."""
    formats = []
    for _kind, kernel_type, _name in table:
        payload = _KERNEL_TYPES[kernel_type][1]
        if payload is None:
            raise ValueError(f"{kernel_type}: not a fixed-size type")
        formats.append("HH" + payload.format(addr_size))
    return "".join(formats)


def service_key_attrs(key: ServiceKey) -> bytes:
    if key.fwmark:
        return encode_attrs(FWMARK_KEY_TABLE, key, {})
    return encode_attrs(SERVICE_KEY_TABLE, key, {"address": _pton(key.family, key.address)})


def service_settings_attrs(service: VirtualService) -> bytes:
    flags = service.sched_flags | (SVC_F_PERSISTENT if service.persistence_timeout else 0)
    return encode_attrs(SERVICE_SETTINGS_TABLE, service, {"sched_flags": flags, "netmask": _netmask(service)})


def service_attrs(service: VirtualService) -> bytes:
    """The full service entry that NEW_SERVICE and SET_SERVICE require."""
    return service_key_attrs(service.key) + service_settings_attrs(service)


def dest_attrs(dest: Destination, service_family: int, full: bool = True) -> bytes:
    family = dest.family or service_family
    values = {"address": _pton(family, dest.address), "family": family}
    return encode_attrs(DEST_TABLE if full else DEST_KEY_TABLE, dest, values)


def message(family_id: int, cmd: int, attrs: bytes, seq: int, flags: int = NLM_F_REQUEST | NLM_F_ACK) -> bytes:
    return _HEADER.pack(20 + len(attrs), family_id, flags, seq, 0, cmd, GENL_VERSION, 0) + attrs


def nested(kind: int, payload: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, payload)


# --- fast request encoding --------------------------------------------------------------------

# The nested service key (CMD_ATTR_SERVICE with AF, PROTOCOL, ADDR, PORT) in one pack, by
# address size; be16 values are packed as the native u16 of their byte-swapped value.
_SERVICE_KEY = {size: struct.Struct("=HH" + struct_format(SERVICE_KEY_TABLE, size)) for size in (4, 16)}


def encode_service_key(key: ServiceKey) -> bytes:
    """``nested(CMD_ATTR_SERVICE, service_key_attrs(key))``, packed in one call."""
    if key.fwmark:
        return nested(CMD_ATTR_SERVICE, service_key_attrs(key))
    addr = _pton(key.family, key.address)
    st = _SERVICE_KEY[len(addr)]
    return st.pack(
        st.size,
        CMD_ATTR_SERVICE | NLA_F_NESTED,
        6,
        SVC_AF,
        key.family,
        6,
        SVC_PROTOCOL,
        key.protocol,
        4 + len(addr),
        SVC_ADDR,
        addr,
        6,
        SVC_PORT,
        _htons(key.port),
    )


class RequestEncoder:
    """Encodes the requests of one plan: each service's key once, each real server in one pack.

    Byte for byte the same as ``message(family_id, cmd, nested(...) + nested(...), seq, flags)``
    built from :func:`service_key_attrs`, :func:`service_attrs` and :func:`dest_attrs`.
    """

    def __init__(self, family_id: int) -> None:
        self.family_id = family_id
        self._keys: dict[ServiceKey, bytes] = {}
        self._last: tuple[object, bytes] = (None, b"")
        self._structs: dict[tuple[int, int], tuple[struct.Struct, int]] = {}
        self._settings: dict[tuple[int, str, int, int, int], bytes] = {}

    def service_key(self, service: VirtualService) -> bytes:
        """The nested service key attribute of ``service`` (cached: a plan's real-server
        operations of one service usually share its VirtualService object)."""
        last, encoded = self._last
        if last is service:
            return encoded
        key = service.key
        encoded = self._keys.get(key)  # type: ignore[assignment]
        if encoded is None:
            encoded = self._keys[key] = encode_service_key(key)
        self._last = (service, encoded)
        return encoded

    def service(self, cmd: int, service: VirtualService, full: bool, seq: int, flags: int) -> bytes:
        if not full:
            return message(self.family_id, cmd, self.service_key(service), seq, flags)
        # The settings' attributes, cached: the services of a plan share a few combinations.
        settings_key = (
            service.key.family,
            service.scheduler,
            service.sched_flags,
            service.persistence_timeout,
            service.netmask,
        )
        settings = self._settings.get(settings_key)
        if settings is None:
            settings = self._settings[settings_key] = service_settings_attrs(service)
        attrs = nested(CMD_ATTR_SERVICE, self.service_key(service)[4:] + settings)
        return message(self.family_id, cmd, attrs, seq, flags)

    def _struct(self, key_size: int, addr_size: int) -> tuple[struct.Struct, int]:
        """The layout of a full real-server request (a delete's goes by the attribute tables)."""
        attrs = struct_format(DEST_TABLE, addr_size)
        st = struct.Struct(f"{_HEADER.format}{key_size}sHH{attrs}")  # CMD_ATTR_DEST's header, then its attrs
        entry = self._structs[key_size, addr_size] = (st, st.size - _HEADER.size - key_size)
        return entry

    def dest(self, cmd: int, service: VirtualService, dest: Destination, full: bool, seq: int, flags: int) -> bytes:
        return self.dests(cmd, service, (dest,), full, seq, flags)[0]

    def dests(
        self, cmd: int, service: VirtualService, dests: Iterable[Destination], full: bool, seq: int, flags: int
    ) -> list[bytes]:
        """The requests for real servers of one service, sequence numbers from ``seq`` on: the
        service's key and the message layout are looked up once for the run (a full plan's
        real-server requests come ten or more to a service), each request one pack (a delete,
        which names the real server only, is rare and goes by the attribute tables)."""
        key = self.service_key(service)
        service_family = service.key.family
        family_id = self.family_id
        nest = CMD_ATTR_DEST | NLA_F_NESTED
        layouts: dict[int, tuple[struct.Struct, int, int]] = {}  # address family -> (struct, nest size, addr attr size)
        encoded: list[bytes] = []
        for dest in dests:
            family = dest.family or service_family
            layout = layouts.get(family)
            if layout is None and full:
                addr_size = 4 if family == AF_INET else 16
                entry = self._structs.get((len(key), addr_size))
                st, size = entry if entry is not None else self._struct(len(key), addr_size)
                layout = layouts[family] = (st, size, 4 + addr_size)
            if layout is not None:
                st, size, addr_attr = layout
                encoded.append(
                    st.pack(
                        st.size,
                        family_id,
                        flags,
                        seq,
                        0,
                        cmd,
                        GENL_VERSION,
                        0,
                        key,
                        size,
                        nest,
                        addr_attr,
                        DEST_ADDR,
                        _pton(family, dest.address),
                        6,
                        DEST_PORT,
                        _htons(dest.port),
                        8,
                        DEST_FWD_METHOD,
                        dest.method,
                        8,
                        DEST_WEIGHT,
                        dest.weight,
                        8,
                        DEST_U_THRESH,
                        dest.upper_threshold,
                        8,
                        DEST_L_THRESH,
                        dest.lower_threshold,
                        6,
                        DEST_ADDR_FAMILY,
                        family,
                        5,
                        DEST_TUN_TYPE,
                        dest.tunnel_type,
                        6,
                        DEST_TUN_PORT,
                        _htons(dest.tunnel_port),
                        6,
                        DEST_TUN_FLAGS,
                        dest.tunnel_checksum,
                    )
                )
            else:  # a delete names the real server only: rare, encoded by the attribute tables
                attrs = nested(CMD_ATTR_DEST, dest_attrs(dest, service_family, full=False))
                encoded.append(message(family_id, cmd, key + attrs, seq, flags))
            seq += 1
        return encoded

    def get_dests(self, key: ServiceKey, seq: int) -> bytes:
        """The GET_DEST dump request for the real servers of ``key``."""
        attrs = self._keys.get(key)
        if attrs is None:
            attrs = self._keys[key] = encode_service_key(key)
        return message(self.family_id, CMD_GET_DEST, attrs, seq, NLM_F_REQUEST | NLM_F_DUMP)


# --- decoding -------------------------------------------------------------------------------


def iter_messages(data: bytes | bytearray | memoryview) -> Iterator[tuple[int, int, int, memoryview]]:
    """Split a receive buffer into (type, flags, seq, payload after the nlmsghdr)."""
    view = memoryview(data)
    offset = 0
    end = len(view)
    while offset + 16 <= end:
        length, kind, flags, seq, _pid = _NLMSGHDR.unpack_from(view, offset)
        if length < 16:
            break
        yield kind, flags, seq, view[offset + 16 : offset + length]
        offset += (length + 3) & ~3


def parse_attrs(payload: memoryview | bytes) -> dict[int, memoryview]:
    attrs: dict[int, memoryview] = {}
    view = memoryview(payload)
    offset = 0
    end = len(view)
    while offset + 4 <= end:
        length, kind = _NLA.unpack_from(view, offset)
        if length < 4:
            break
        attrs[kind & 0x3FFF] = view[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return attrs


def parse_error(payload: memoryview | bytes, flags: int | None = None) -> tuple[int, str]:
    """(errno, extended-ack message) of an NLMSG_ERROR payload; errno 0 is a plain ack.

    ``flags`` are the NLMSG_ERROR's own header flags: NLM_F_CAPPED says the request is echoed
    as its header only (NETLINK_CAP_ACK), otherwise whole; NLM_F_ACK_TLVS says extended-ack
    attributes follow it. None (for callers that do not pass them yet) assumes a socket with
    NETLINK_CAP_ACK set, and TLVs if there are bytes after the echoed header."""
    (error,) = _I32.unpack_from(payload, 0)
    if flags is None:
        flags = NLM_F_CAPPED | NLM_F_ACK_TLVS
    if not flags & NLM_F_ACK_TLVS:
        return -error, ""
    # struct nlmsgerr: the error, then the request (capped: its nlmsghdr only), then TLVs.
    if flags & NLM_F_CAPPED:
        tlv_start = 4 + _NLMSGHDR.size
    else:
        (orig_len,) = _U32.unpack_from(payload, 4)
        tlv_start = 4 + ((max(orig_len, _NLMSGHDR.size) + 3) & ~3)
    raw = parse_attrs(payload[tlv_start:]).get(NLMSGERR_ATTR_MSG) if len(payload) > tlv_start else None
    message = bytes(raw).rstrip(b"\0").decode(errors="replace") if raw is not None else ""
    return -error, message


def address_text(family: int, raw: memoryview | bytes) -> str:
    """The canonical text (:func:`kubelvs.core.model.address_text`) of a kernel address
    attribute, with inet_ntop wherever that gives the same text (all but two /96 ranges).

    An address family other than IPv4 and IPv6 (never reported by today's kernels) gives
    ``"?"`` and the raw bytes in hex: a key nothing desired can equal."""
    if family == AF_INET:
        return _ntop(AF_INET, bytes(raw[:4]))
    if family == AF_INET6:
        packed = bytes(raw[:16])
        if packed[:12] in NTOP_DIFFERS_PREFIXES:
            return model_address_text(packed)
        return _ntop(AF_INET6, packed)
    return "?" + bytes(raw).hex()


def netmask_prefix(family: int, netmask: int) -> int:
    """The prefix length of SVC_NETMASK read as a native u32 (IPv4: a big-endian mask, whose
    bit count is its prefix length; IPv6: the prefix length), 0 for the whole address."""
    prefix = netmask.bit_count() if family == AF_INET else netmask
    return 0 if prefix == (32 if family == AF_INET else 128) else prefix


# Codes the kernel may report that this version does not know decode to the enums' UNKNOWN.
METHODS = tuple(Method(v) if v in Method._value2member_map_ else Method.UNKNOWN for v in range(8))
_TUNNEL_TYPES = {int(t): t for t in TunnelType if t is not TunnelType.UNKNOWN}
_CHECKSUMS = {int(c): c for c in TunnelChecksum if c is not TunnelChecksum.UNKNOWN}


def tunnel_type(value: int) -> TunnelType:
    return _TUNNEL_TYPES.get(value, TunnelType.UNKNOWN)


def tunnel_checksum(value: int) -> TunnelChecksum:
    return _CHECKSUMS.get(value, TunnelChecksum.UNKNOWN)


def _counters(raw: memoryview | None, wide: bool) -> Counters:
    if raw is None:
        return Counters()
    attrs = parse_attrs(raw)
    values = []
    for kind in range(1, STATS_FIELDS + 1):
        value = attrs.get(kind)
        if value is None:
            values.append(0)
        elif wide or len(value) == 8:
            values.append(struct.unpack_from("=Q", value)[0])
        else:
            values.append(_U32.unpack_from(value)[0])
    return Counters(*values)


def decode_service(genl_payload: memoryview) -> tuple[VirtualService, Counters]:
    """Decode a NEW_SERVICE message of a dump (its payload after the genlmsghdr)."""
    svc = parse_attrs(parse_attrs(genl_payload)[CMD_ATTR_SERVICE])
    family = _U16.unpack_from(svc[SVC_AF])[0]
    if SVC_FWMARK in svc and _U32.unpack_from(svc[SVC_FWMARK])[0]:
        key = ServiceKey(family, 0, "", 0, _U32.unpack_from(svc[SVC_FWMARK])[0])
    else:
        key = ServiceKey(
            family,
            _U16.unpack_from(svc[SVC_PROTOCOL])[0],
            address_text(family, svc[SVC_ADDR]),
            _BE16.unpack_from(svc[SVC_PORT])[0],
        )
    flags, _mask = struct.unpack_from("=II", svc[SVC_FLAGS])
    timeout = _U32.unpack_from(svc[SVC_TIMEOUT])[0] if flags & SVC_F_PERSISTENT else 0
    netmask = netmask_prefix(family, _U32.unpack_from(svc[SVC_NETMASK])[0])
    service = VirtualService(
        key,
        bytes(svc[SVC_SCHED_NAME]).rstrip(b"\0").decode(),
        flags & ~(SVC_F_PERSISTENT | SVC_F_HASHED),
        timeout,
        netmask,
    )
    stats64 = svc.get(SVC_STATS64)
    return service, _counters(stats64 if stats64 is not None else svc.get(SVC_STATS), stats64 is not None)


def decode_dest(genl_payload: memoryview, service_family: int) -> tuple[Destination, DestCounters]:
    dest = parse_attrs(parse_attrs(genl_payload)[CMD_ATTR_DEST])
    family_raw = dest.get(DEST_ADDR_FAMILY)
    family = _U16.unpack_from(family_raw)[0] if family_raw is not None else service_family
    u32 = lambda kind: _U32.unpack_from(dest[kind])[0] if kind in dest else 0  # noqa: E731
    method = METHODS[u32(DEST_FWD_METHOD) & 0x7]
    tunnel = method is Method.TUN
    destination = Destination(
        address_text(family, dest[DEST_ADDR]),
        _BE16.unpack_from(dest[DEST_PORT])[0],
        u32(DEST_WEIGHT),
        method,
        u32(DEST_U_THRESH),
        u32(DEST_L_THRESH),
        tunnel_type(dest[DEST_TUN_TYPE][0]) if tunnel and DEST_TUN_TYPE in dest else TunnelType.IPIP,
        _BE16.unpack_from(dest[DEST_TUN_PORT])[0] if tunnel and DEST_TUN_PORT in dest else 0,
        tunnel_checksum(_U16.unpack_from(dest[DEST_TUN_FLAGS])[0])
        if tunnel and DEST_TUN_FLAGS in dest
        else TunnelChecksum.NONE,
        family=0 if family == service_family else family,
    )
    stats64 = dest.get(DEST_STATS64)
    counters = DestCounters(
        _counters(stats64 if stats64 is not None else dest.get(DEST_STATS), stats64 is not None),
        u32(DEST_ACTIVE_CONNS),
        u32(DEST_INACT_CONNS),
        u32(DEST_PERSIST_CONNS),
    )
    return destination, counters


# --- generic netlink controller ---------------------------------------------------------------


def get_family_request(name: str, seq: int) -> bytes:
    """CTRL_CMD_GETFAMILY for one family by name (the kernel loads its module if needed)."""
    attrs = _attr(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0")
    return message(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, attrs, seq, NLM_F_REQUEST | NLM_F_ACK)


def decode_family_id(genl_payload: memoryview) -> int:
    """The family id of a CTRL_CMD_NEWFAMILY answer (its payload after the genlmsghdr)."""
    return int(_U16.unpack_from(parse_attrs(genl_payload)[CTRL_ATTR_FAMILY_ID])[0])


# --- rtnetlink: links and addresses -----------------------------------------------------------


def _rtnl(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return _NLMSGHDR.pack(16 + len(body), kind, flags, seq, 0) + body


def get_link_request(name: str, seq: int) -> bytes:
    """RTM_GETLINK of one interface by name (answered with RTM_NEWLINK, or ENODEV)."""
    body = _IFINFOMSG.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, name.encode() + b"\0")
    return _rtnl(RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK, seq, body)


def new_link_request(name: str, kind: str, seq: int) -> bytes:
    """RTM_NEWLINK creating interface ``name`` of ``kind`` (e.g. dummy); EEXIST if it exists."""
    info = _attr(IFLA_INFO_KIND, kind.encode() + b"\0")
    body = _IFINFOMSG.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, name.encode() + b"\0") + _attr(IFLA_LINKINFO, info)
    return _rtnl(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, seq, body)


def set_link_up_request(index: int, seq: int) -> bytes:
    return _rtnl(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq, _IFINFOMSG.pack(0, 0, index, IFF_UP, IFF_UP))


def decode_link_index(payload: memoryview) -> int:
    """ifi_index of an RTM_NEWLINK message (its payload after the nlmsghdr)."""
    return int(_IFINFOMSG.unpack_from(payload, 0)[2])


def get_addresses_request(seq: int) -> bytes:
    """RTM_GETADDR dump of every address of every family (filtered by the caller)."""
    return _rtnl(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, _IFADDRMSG.pack(0, 0, 0, 0, 0))


def address_request(add: bool, index: int, address: str, family: int, prefix: int, flags: int, seq: int) -> bytes:
    """RTM_NEWADDR (create, EEXIST if present) or RTM_DELADDR of one address, as pyroute2's
    ``addr()`` sends them: IFA_LOCAL too for IPv4, ``flags`` as IFA_FLAGS."""
    raw = _pton(family, address)
    attrs = _attr(IFA_ADDRESS, raw)
    if family == AF_INET:
        attrs += _attr(IFA_LOCAL, raw)
    if add and flags:
        attrs += _attr(IFA_FLAGS, _U32.pack(flags))
    kind, request_flags = (
        (RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)
        if add
        else (RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK)
    )
    return _rtnl(kind, request_flags, seq, _IFADDRMSG.pack(family, prefix, 0, 0, index) + attrs)


def decode_address(payload: memoryview) -> tuple[int, str | None]:
    """(interface index, IFA_ADDRESS as text) of an RTM_NEWADDR message (after the nlmsghdr)."""
    family, _prefix, _flags, _scope, index = _IFADDRMSG.unpack_from(payload, 0)
    raw = parse_attrs(payload[_IFADDRMSG.size :]).get(IFA_ADDRESS)
    if raw is None or family not in (AF_INET, AF_INET6):
        return index, None
    return index, address_text(family, raw)


def get_links_request(seq: int) -> bytes:
    """RTM_GETLINK dump of every interface."""
    return _rtnl(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq, _IFINFOMSG.pack(0, 0, 0, 0, 0))


def lifetime_address_request(
    replace: bool,
    index: int,
    address: str,
    family: int,
    prefix: int,
    flags: int,
    valid: int,
    preferred: int,
    proto: int,
    seq: int,
) -> bytes:
    """RTM_NEWADDR of one address with a finite lifetime (IFA_CACHEINFO, whole seconds) and an
    owner mark (IFA_PROTO): created (EEXIST if present), or with ``replace`` created or its
    lifetime refreshed. The attributes of :func:`address_request`, then IFA_CACHEINFO and IFA_PROTO."""
    raw = _pton(family, address)
    attrs = _attr(IFA_ADDRESS, raw)
    if family == AF_INET:
        attrs += _attr(IFA_LOCAL, raw)
    if flags:
        attrs += _attr(IFA_FLAGS, _U32.pack(flags))
    attrs += _attr(IFA_CACHEINFO, _IFA_CACHEINFO.pack(preferred, valid, 0, 0))
    attrs += _attr(IFA_PROTO, bytes((proto,)))
    request_flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | (NLM_F_REPLACE if replace else NLM_F_EXCL)
    return _rtnl(RTM_NEWADDR, request_flags, seq, _IFADDRMSG.pack(family, prefix, 0, 0, index) + attrs)
