"""The byte-level IPVS codec against pyroute2's encoding and decoding of the same messages."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from kubelvs.core.model import (
    AF_INET,
    AF_INET6,
    Counters,
    DestCounters,
    Destination,
    DestKey,
    Method,
    ServiceKey,
    TunnelChecksum,
    TunnelType,
    VirtualService,
)
from kubelvs.core.plan import Operation, Verb
from kubelvs.kernel import codec, fastdump
from kubelvs.kernel.ipvs import IPVSClient, _encode, encode
from kubelvs.kernel.messages import IPVSMessage
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, ctrlmsg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

FAMILY_ID = 0x1F

V4 = VirtualService(ServiceKey(AF_INET, 6, "192.0.2.10", 80), "wrr", 0, 0, 0)
V4_PERSISTENT = VirtualService(ServiceKey(AF_INET, 17, "192.0.2.10", 53), "sh", 0x18, 300, 24)
V6 = VirtualService(ServiceKey(AF_INET6, 132, "2001:db8::10", 443), "mh", 0x08, 60, 64)
DR = Destination("198.51.100.7", 80, 3, Method.DR, 100, 10)
GUE = Destination("198.51.100.8", 80, 1, Method.TUN, 0, 0, TunnelType.GUE, 6080, TunnelChecksum.REMCSUM)
NAT6 = Destination("2001:db8::7", 8443, 65535, Method.NAT)


def _service_attrs(service: VirtualService, full: bool) -> list[tuple[str, object]]:
    key = service.key
    attrs: list[tuple[str, object]] = [
        ("IPVS_SVC_ATTR_AF", key.family),
        ("IPVS_SVC_ATTR_PROTOCOL", key.protocol),
        ("IPVS_SVC_ATTR_ADDR", key.address),
        ("IPVS_SVC_ATTR_PORT", key.port),
    ]
    if full:
        flags = service.sched_flags | (1 if service.persistence_timeout else 0)
        attrs += [
            ("IPVS_SVC_ATTR_SCHED_NAME", service.scheduler),
            ("IPVS_SVC_ATTR_FLAGS", {"flags": flags, "mask": 0xFFFFFFFF}),
            ("IPVS_SVC_ATTR_TIMEOUT", service.persistence_timeout),
        ]
    return attrs


def _pyroute2_request(cmd: int, service: VirtualService, dest: Destination | None, full: bool) -> IPVSMessage:
    msg = IPVSMessage()
    msg["cmd"] = cmd
    msg["version"] = 1
    msg["header"]["type"] = FAMILY_ID
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg["header"]["sequence_number"] = 42
    service_full = full and dest is None
    svc = _service_attrs(service, service_full)
    msg["attrs"] = [("IPVS_CMD_ATTR_SERVICE", {"attrs": svc})]
    if dest is not None:
        d: list[tuple[str, object]] = [("IPVS_DEST_ATTR_ADDR", dest.address), ("IPVS_DEST_ATTR_PORT", dest.port)]
        if full:
            d += [
                ("IPVS_DEST_ATTR_FWD_METHOD", int(dest.method)),
                ("IPVS_DEST_ATTR_WEIGHT", dest.weight),
                ("IPVS_DEST_ATTR_U_THRESH", dest.upper_threshold),
                ("IPVS_DEST_ATTR_L_THRESH", dest.lower_threshold),
            ]
        d.append(("IPVS_DEST_ATTR_ADDR_FAMILY", service.key.family))
        if full:
            d += [
                ("IPVS_DEST_ATTR_TUN_TYPE", int(dest.tunnel_type)),
                ("IPVS_DEST_ATTR_TUN_PORT", dest.tunnel_port),
                ("IPVS_DEST_ATTR_TUN_FLAGS", int(dest.tunnel_checksum)),
            ]
        msg["attrs"].append(("IPVS_CMD_ATTR_DEST", {"attrs": d}))
    return msg


def _without_nested_flag(data: bytes) -> bytes:
    """pyroute2 does not set NLA_F_NESTED; the kernel's IPVS parser accepts both."""
    out = bytearray(data)
    offset = 20  # the top-level attributes follow the nlmsghdr and genlmsghdr
    while offset + 4 <= len(out):
        length = int.from_bytes(out[offset : offset + 2], "little")
        kind = int.from_bytes(out[offset + 2 : offset + 4], "little")
        out[offset + 2 : offset + 4] = (kind & ~codec.NLA_F_NESTED).to_bytes(2, "little")
        offset += (length + 3) & ~3
    return bytes(out)


@pytest.mark.parametrize(
    ("verb", "service", "dest"),
    [
        (Verb.DELETE_SERVICE, V4, None),
        (Verb.DELETE_SERVICE, V6, None),
        (Verb.ADD_DEST, V4, DR),
        (Verb.EDIT_DEST, V4, GUE),
        (Verb.ADD_DEST, V6, NAT6),
        (Verb.DELETE_DEST, V4, DR),
        (Verb.DELETE_DEST, V6, NAT6),
    ],
)
def test_requests_match_pyroute2(verb: Verb, service: VirtualService, dest: Destination | None) -> None:
    cmd = {
        Verb.DELETE_SERVICE: codec.CMD_DEL_SERVICE,
        Verb.ADD_DEST: codec.CMD_NEW_DEST,
        Verb.EDIT_DEST: codec.CMD_SET_DEST,
        Verb.DELETE_DEST: codec.CMD_DEL_DEST,
    }[verb]
    full = verb in (Verb.ADD_DEST, Verb.EDIT_DEST)
    expected = _pyroute2_request(cmd, service, dest, full)
    expected.encode()
    ours = encode(Operation(verb, service, dest), FAMILY_ID, 42)
    assert _without_nested_flag(ours) == bytes(expected.data)


@pytest.mark.parametrize("service", [V4, V4_PERSISTENT, V6])
@pytest.mark.parametrize("verb", [Verb.ADD_SERVICE, Verb.EDIT_SERVICE])
def test_full_service_requests_match_pyroute2(verb: Verb, service: VirtualService) -> None:
    cmd = codec.CMD_NEW_SERVICE if verb is Verb.ADD_SERVICE else codec.CMD_SET_SERVICE
    ours = encode(Operation(verb, service), FAMILY_ID, 42)
    expected = _pyroute2_request(cmd, service, None, True)
    # The netmask is last. pyroute2 types it as an IPv4 address, which cannot carry IPv6's
    # prefix length, so it is appended as the raw attribute the kernel reads (a 32-bit value).
    if service.key.family == AF_INET:
        expected["attrs"][0][1]["attrs"].append(
            ("IPVS_SVC_ATTR_NETMASK", str(ipaddress.IPv4Network(f"0.0.0.0/{service.effective_netmask}").netmask))
        )
        expected.encode()
        assert _without_nested_flag(ours) == bytes(expected.data)
    else:
        expected.encode()
        reference = bytearray(expected.data)
        netmask_attr = (8).to_bytes(2, "little") + codec.SVC_NETMASK.to_bytes(2, "little")
        netmask_attr += service.effective_netmask.to_bytes(4, "little")
        reference += netmask_attr
        reference[0:4] = len(reference).to_bytes(4, "little")
        outer = 20  # the nested service attribute's length grows by the netmask attribute
        length = int.from_bytes(reference[outer : outer + 2], "little") + 8
        reference[outer : outer + 2] = length.to_bytes(2, "little")
        assert _without_nested_flag(ours) == bytes(reference)


def test_pyroute2_decodes_our_requests() -> None:
    data = encode(Operation(Verb.ADD_DEST, V4, GUE), FAMILY_ID, 7)
    msg = IPVSMessage(data)
    msg.decode()
    dest = msg.get_attr("IPVS_CMD_ATTR_DEST")
    assert dest.get_attr("IPVS_DEST_ATTR_ADDR") == "198.51.100.8"
    assert dest.get_attr("IPVS_DEST_ATTR_PORT") == 80
    assert dest.get_attr("IPVS_DEST_ATTR_TUN_PORT") == 6080  # big-endian, as the kernel reads it
    assert dest.get_attr("IPVS_DEST_ATTR_TUN_TYPE") == int(TunnelType.GUE)
    assert dest.get_attr("IPVS_DEST_ATTR_FWD_METHOD") == int(Method.TUN)
    svc = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
    assert svc.get_attr("IPVS_SVC_ATTR_ADDR") == "192.0.2.10"


def _kernel_style_dump(cmd: int, attrs: list[tuple[str, object]], nla: str) -> memoryview:
    msg = IPVSMessage()
    msg["cmd"] = cmd
    msg["version"] = 1
    msg["header"]["type"] = FAMILY_ID
    msg["attrs"] = [(nla, {"attrs": attrs})]
    msg.encode()
    return memoryview(bytes(msg.data))[20:]


def test_decode_service_as_pyroute2_encodes_it() -> None:
    stats = {"attrs": [("IPVS_STATS_ATTR_CONNS", 5), ("IPVS_STATS_ATTR_INPKTS", 50), ("IPVS_STATS_ATTR_INBYTES", 5000)]}
    payload = _kernel_style_dump(
        codec.CMD_NEW_SERVICE,
        [
            ("IPVS_SVC_ATTR_AF", AF_INET),
            ("IPVS_SVC_ATTR_PROTOCOL", socket.IPPROTO_UDP),
            ("IPVS_SVC_ATTR_ADDR", "192.0.2.10"),
            ("IPVS_SVC_ATTR_PORT", 53),
            ("IPVS_SVC_ATTR_SCHED_NAME", "sh"),
            ("IPVS_SVC_ATTR_FLAGS", {"flags": 0x1 | 0x2 | 0x18, "mask": 0xFFFFFFFF}),
            ("IPVS_SVC_ATTR_TIMEOUT", 300),
            ("IPVS_SVC_ATTR_NETMASK", "255.255.255.0"),
            ("IPVS_SVC_ATTR_STATS64", stats),
        ],
        "IPVS_CMD_ATTR_SERVICE",
    )
    service, counters = codec.decode_service(payload)
    assert service == V4_PERSISTENT
    assert (counters.connections, counters.packets_in, counters.bytes_in) == (5, 50, 5000)


def test_decode_dest_as_pyroute2_encodes_it() -> None:
    payload = _kernel_style_dump(
        codec.CMD_NEW_DEST,
        [
            ("IPVS_DEST_ATTR_ADDR", "198.51.100.8"),
            ("IPVS_DEST_ATTR_PORT", 80),
            ("IPVS_DEST_ATTR_FWD_METHOD", int(Method.TUN)),
            ("IPVS_DEST_ATTR_WEIGHT", 1),
            ("IPVS_DEST_ATTR_U_THRESH", 0),
            ("IPVS_DEST_ATTR_L_THRESH", 0),
            ("IPVS_DEST_ATTR_ACTIVE_CONNS", 4),
            ("IPVS_DEST_ATTR_INACT_CONNS", 2),
            ("IPVS_DEST_ATTR_PERSIST_CONNS", 1),
            ("IPVS_DEST_ATTR_STATS", {"attrs": [("IPVS_STATS_ATTR_CONNS", 9)]}),
            ("IPVS_DEST_ATTR_ADDR_FAMILY", AF_INET),
            ("IPVS_DEST_ATTR_TUN_TYPE", int(TunnelType.GUE)),
            ("IPVS_DEST_ATTR_TUN_PORT", 6080),
            ("IPVS_DEST_ATTR_TUN_FLAGS", int(TunnelChecksum.REMCSUM)),
        ],
        "IPVS_CMD_ATTR_DEST",
    )
    dest, counters = codec.decode_dest(payload, AF_INET)
    assert dest == GUE
    assert (counters.active_connections, counters.inactive_connections, counters.persistent_connections) == (4, 2, 1)
    assert counters.counters.connections == 9


def test_error_ack_is_parsed() -> None:
    # struct nlmsgerr with -EEXIST, the capped original header, and an extended-ack message.
    original = struct.pack("=IHHII", 40, FAMILY_ID, 5, 9, 0)
    tlv = codec._attr(codec.NLMSGERR_ATTR_MSG, b"Service already exists\0")
    payload = struct.pack("=i", -17) + original + tlv
    data = struct.pack("=IHHII", 16 + len(payload), codec.NLMSG_ERROR, 0x300, 9, 0) + payload
    [(kind, _flags, seq, body)] = list(codec.iter_messages(data))
    assert (kind, seq) == (codec.NLMSG_ERROR, 9)
    assert codec.parse_error(body) == (17, "Service already exists")


# --- the fast request encoder -------------------------------------------------------------------

V6_FWMARK = VirtualService(ServiceKey(AF_INET6, 0, "", 0, 77), "wlc")
TUN6_IN_V4 = Destination(
    "2001:db8::8", 80, 2, Method.TUN, 7, 3, TunnelType.GRE, 0, TunnelChecksum.CSUM, family=AF_INET6
)
NAT4 = Destination("198.51.100.9", 8080, 0, Method.NAT, 2**31 - 1, 2**31 - 1)
ALL_SERVICES = [V4, V4_PERSISTENT, V6, V6_FWMARK]


def _dests_for(service: VirtualService) -> list[Destination]:
    if service.key.family == AF_INET:
        return [DR, GUE, NAT4, TUN6_IN_V4]
    return [NAT6, Destination("2001:db8::9", 443, 5, Method.TUN, 0, 0, TunnelType.GUE, 1, TunnelChecksum.NOCSUM)]


def _generic_request(op: Operation, seq: int, flags: int) -> bytes:
    """The same request built attribute by attribute with the codec's generic helpers."""
    cmd = {
        Verb.ADD_SERVICE: codec.CMD_NEW_SERVICE,
        Verb.EDIT_SERVICE: codec.CMD_SET_SERVICE,
        Verb.DELETE_SERVICE: codec.CMD_DEL_SERVICE,
        Verb.ADD_DEST: codec.CMD_NEW_DEST,
        Verb.EDIT_DEST: codec.CMD_SET_DEST,
        Verb.DELETE_DEST: codec.CMD_DEL_DEST,
    }[op.verb]
    if op.dest is None:
        full = op.verb is not Verb.DELETE_SERVICE
        body = codec.service_attrs(op.service) if full else codec.service_key_attrs(op.key)
        return codec.message(FAMILY_ID, cmd, codec.nested(codec.CMD_ATTR_SERVICE, body), seq, flags)
    attrs = codec.nested(codec.CMD_ATTR_SERVICE, codec.service_key_attrs(op.key)) + codec.nested(
        codec.CMD_ATTR_DEST, codec.dest_attrs(op.dest, op.key.family, full=op.verb is not Verb.DELETE_DEST)
    )
    return codec.message(FAMILY_ID, cmd, attrs, seq, flags)


def _all_operations() -> list[Operation]:
    ops = []
    for service in ALL_SERVICES:
        ops += [Operation(verb, service) for verb in (Verb.ADD_SERVICE, Verb.EDIT_SERVICE, Verb.DELETE_SERVICE)]
        for dest in _dests_for(service):
            ops += [Operation(verb, service, dest) for verb in (Verb.ADD_DEST, Verb.EDIT_DEST, Verb.DELETE_DEST)]
    return ops


def test_request_encoder_matches_generic_encoding() -> None:
    encoder = codec.RequestEncoder(FAMILY_ID)
    for seq, op in enumerate(_all_operations() * 2, start=1):  # twice: the second time from its caches
        for flags in (NLM_F_REQUEST, NLM_F_REQUEST | NLM_F_ACK):
            assert _encode(encoder, op, seq, flags) == _generic_request(op, seq, flags), op


@pytest.mark.parametrize("service", ALL_SERVICES)
def test_pyroute2_decodes_fast_dest_requests(service: VirtualService) -> None:
    encoder = codec.RequestEncoder(FAMILY_ID)
    for dest in _dests_for(service):
        for verb in (Verb.ADD_DEST, Verb.DELETE_DEST):
            msg = IPVSMessage(_encode(encoder, Operation(verb, service, dest), 5, NLM_F_REQUEST))
            msg.decode()
            assert msg["header"]["sequence_number"] == 5
            assert msg["header"]["flags"] == NLM_F_REQUEST
            svc = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
            assert svc.get_attr("IPVS_SVC_ATTR_AF") == service.key.family
            if service.key.fwmark:
                assert svc.get_attr("IPVS_SVC_ATTR_FWMARK") == service.key.fwmark
            else:
                assert svc.get_attr("IPVS_SVC_ATTR_ADDR") == service.key.address
                assert svc.get_attr("IPVS_SVC_ATTR_PORT") == service.key.port
                assert svc.get_attr("IPVS_SVC_ATTR_PROTOCOL") == service.key.protocol
            attrs = msg.get_attr("IPVS_CMD_ATTR_DEST")
            assert attrs.get_attr("IPVS_DEST_ATTR_ADDR_FAMILY") == (dest.family or service.key.family)
            assert attrs.get_attr("IPVS_DEST_ATTR_ADDR") == dest.address
            assert attrs.get_attr("IPVS_DEST_ATTR_PORT") == dest.port
            if verb is Verb.ADD_DEST:
                assert attrs.get_attr("IPVS_DEST_ATTR_FWD_METHOD") == int(dest.method)
                assert attrs.get_attr("IPVS_DEST_ATTR_WEIGHT") == dest.weight
                assert attrs.get_attr("IPVS_DEST_ATTR_U_THRESH") == dest.upper_threshold
                assert attrs.get_attr("IPVS_DEST_ATTR_L_THRESH") == dest.lower_threshold
                assert attrs.get_attr("IPVS_DEST_ATTR_TUN_TYPE") == int(dest.tunnel_type)
                assert attrs.get_attr("IPVS_DEST_ATTR_TUN_PORT") == dest.tunnel_port
                assert attrs.get_attr("IPVS_DEST_ATTR_TUN_FLAGS") == int(dest.tunnel_checksum)
            else:
                assert attrs.get_attr("IPVS_DEST_ATTR_WEIGHT") is None


@pytest.mark.parametrize("service", [V4, V6])
def test_get_dests_request_matches_pyroute2(service: VirtualService) -> None:
    ours = codec.RequestEncoder(FAMILY_ID).get_dests(service.key, 42)
    expected = _pyroute2_request(codec.CMD_GET_DEST, service, None, False)
    expected["header"]["flags"] = NLM_F_REQUEST | codec.NLM_F_DUMP
    expected.encode()
    assert _without_nested_flag(ours) == bytes(expected.data)


# --- dump decoding: the layout-compiled fast path against the generic decoders and pyroute2 ---


def _nla(kind: int, payload: bytes) -> bytes:
    return codec._attr(kind, payload)


def _stats(values: list[int], wide: bool) -> bytes:
    sizes = [8] * 10 if wide else [4, 4, 4, 8, 8, 4, 4, 4, 4, 4]
    return b"".join(
        _nla(kind, value.to_bytes(size, "little"))
        for kind, (value, size) in enumerate(zip(values, sizes, strict=True), 1)
    )


def _kernel_dest(dest: Destination, family: int, counters: list[int], conns: tuple[int, int, int]) -> bytes:
    """A NEW_DEST dump message laid out as Linux's ip_vs_genl_fill_dest() writes it (16-byte
    address, tunnel attributes, thresholds, connections, address family, both stats nests)."""
    raw = socket.inet_pton(family, dest.address).ljust(16, b"\0")
    attrs = (
        _nla(codec.DEST_ADDR, raw)
        + _nla(codec.DEST_PORT, dest.port.to_bytes(2, "big"))
        + _nla(codec.DEST_FWD_METHOD, struct.pack("=I", int(dest.method)))
        + _nla(codec.DEST_WEIGHT, struct.pack("=I", dest.weight))
        + _nla(codec.DEST_TUN_TYPE, bytes([int(dest.tunnel_type)]))
        + _nla(codec.DEST_TUN_PORT, dest.tunnel_port.to_bytes(2, "big"))
        + _nla(codec.DEST_TUN_FLAGS, struct.pack("=H", int(dest.tunnel_checksum)))
        + _nla(codec.DEST_U_THRESH, struct.pack("=I", dest.upper_threshold))
        + _nla(codec.DEST_L_THRESH, struct.pack("=I", dest.lower_threshold))
        + _nla(codec.DEST_ACTIVE_CONNS, struct.pack("=I", conns[0]))
        + _nla(codec.DEST_INACT_CONNS, struct.pack("=I", conns[1]))
        + _nla(codec.DEST_PERSIST_CONNS, struct.pack("=I", conns[2]))
        + _nla(codec.DEST_ADDR_FAMILY, struct.pack("=H", family))
        + _nla(codec.DEST_STATS, _stats([v & 0xFFFFFFFF for v in counters], False))
        + _nla(codec.DEST_STATS64, _stats(counters, True))
    )
    return codec.message(FAMILY_ID, codec.CMD_NEW_DEST, _nla(codec.CMD_ATTR_DEST, attrs), 9, codec.NLM_F_MULTI)


def _kernel_service(service: VirtualService, counters: list[int]) -> bytes:
    """A NEW_SERVICE dump message laid out as Linux's ip_vs_genl_fill_service() writes it."""
    key = service.key
    attrs = _nla(codec.SVC_AF, struct.pack("=H", key.family))
    if key.fwmark:
        attrs += _nla(codec.SVC_FWMARK, struct.pack("=I", key.fwmark))
    else:
        attrs += (
            _nla(codec.SVC_PROTOCOL, struct.pack("=H", key.protocol))
            + _nla(codec.SVC_ADDR, socket.inet_pton(key.family, key.address).ljust(16, b"\0"))
            + _nla(codec.SVC_PORT, key.port.to_bytes(2, "big"))
        )
    flags = service.sched_flags | codec.SVC_F_HASHED | (codec.SVC_F_PERSISTENT if service.persistence_timeout else 0)
    attrs += (
        _nla(codec.SVC_SCHED_NAME, service.scheduler.encode() + b"\0")
        + _nla(codec.SVC_FLAGS, struct.pack("=II", flags, 0xFFFFFFFF))
        + _nla(codec.SVC_TIMEOUT, struct.pack("=I", service.persistence_timeout or 300))
        + _nla(codec.SVC_NETMASK, codec._netmask(service))
        + _nla(codec.SVC_STATS, _stats([v & 0xFFFFFFFF for v in counters], False))
        + _nla(codec.SVC_STATS64, _stats(counters, True))
    )
    return codec.message(FAMILY_ID, codec.CMD_NEW_SERVICE, _nla(codec.CMD_ATTR_SERVICE, attrs), 9, codec.NLM_F_MULTI)


def _decode_all(decoder: fastdump.DestDecoder, data: bytes, family: int) -> list[object]:
    """Decode every message of a buffer as IPVSClient.dump does: fast path, else generic."""
    view = memoryview(data)
    out = []
    offset = 0
    while offset < len(view):
        length = struct.unpack_from("=I", view, offset)[0]
        decoded = decoder.decode(view, offset, length, family)
        out.append(
            decoded
            if decoded is not None
            else ("generic", codec.decode_dest(view[offset + 20 :][: length - 20], family))
        )
        offset += length
    return out


DEST_CASES = [
    (AF_INET, DR, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], (4, 2, 1)),
    (AF_INET, GUE, [0] * 10, (0, 0, 0)),
    (AF_INET, NAT4, [2**40, 2**33, 7, 2**63, 1, 0, 0, 0, 0, 5], (9, 9, 9)),
    (AF_INET, TUN6_IN_V4, [3] * 10, (1, 0, 0)),
    (AF_INET6, NAT6, [11] * 10, (0, 1, 0)),
]


def test_fast_dest_decoder_matches_generic_and_pyroute2() -> None:
    for with_counters in (True, False):
        decoder = fastdump.DestDecoder(with_counters)
        for _round in range(2):  # the first message of a shape teaches the layout, the rest use it
            for family, dest, counters, conns in DEST_CASES:
                data = _kernel_dest(dest, dest.family or family, counters, conns)
                view = memoryview(data)
                fast = decoder.decode(view, 0, len(data), family)
                generic = codec.decode_dest(view[20:], family)
                assert fast is not None
                assert fast[0] == generic[0] == dest
                if with_counters:
                    assert fast[1] == generic[1]
                    assert fast[1] == DestCounters(Counters(*counters), *conns)
                else:
                    assert fast[1] is None
                # pyroute2 reads the same values from the same bytes.
                msg = IPVSMessage(data)
                msg.decode()
                attrs = msg.get_attr("IPVS_CMD_ATTR_DEST")
                assert attrs.get_attr("IPVS_DEST_ATTR_PORT") == dest.port
                assert attrs.get_attr("IPVS_DEST_ATTR_WEIGHT") == dest.weight
                assert attrs.get_attr("IPVS_DEST_ATTR_ACTIVE_CONNS") == conns[0]
                stats = attrs.get_attr("IPVS_DEST_ATTR_STATS64")
                assert stats.get_attr("IPVS_STATS_ATTR_OUTBYTES") == counters[4]


def test_fast_dest_decoder_learns_each_shape() -> None:
    decoder = fastdump.DestDecoder(True)
    first = _kernel_dest(DR, AF_INET, [1] * 10, (0, 0, 0))
    assert decoder.decode(memoryview(first), 0, len(first), AF_INET) is not None
    # Same length, two attributes swapped: the layout must not apply.
    swapped = bytearray(first)
    a = 20 + 4  # the first attribute inside CMD_ATTR_DEST is the 20-byte address; then the port
    port_at = a + 20
    weight_at = port_at + 8 + 8
    swapped[port_at : port_at + 8], swapped[weight_at : weight_at + 8] = (
        bytes(swapped[weight_at : weight_at + 8]),
        bytes(swapped[port_at : port_at + 8]),
    )
    other = bytes(swapped)
    fast = decoder.decode(memoryview(other), 0, len(other), AF_INET)
    assert fast is not None  # a second shape of the same length, learnt from this message
    assert fast == codec.decode_dest(memoryview(other)[20:], AF_INET)
    assert fast[0] == DR
    assert len(decoder._shapes[len(first)]) == 2
    # Beyond MAX_SHAPES shapes of one length, the generic decoder takes the rest.
    full = fastdump.DestDecoder(True)
    full.MAX_SHAPES = 1
    assert full.decode(memoryview(first), 0, len(first), AF_INET) is not None
    assert full.decode(memoryview(other), 0, len(other), AF_INET) is None
    # pyroute2's own encoding (4-byte address, other order) is another shape: learnt and decoded.
    payload = _kernel_style_dump(
        codec.CMD_NEW_DEST,
        [
            ("IPVS_DEST_ATTR_ADDR", "198.51.100.7"),
            ("IPVS_DEST_ATTR_PORT", 80),
            ("IPVS_DEST_ATTR_FWD_METHOD", int(Method.DR)),
            ("IPVS_DEST_ATTR_WEIGHT", 3),
            ("IPVS_DEST_ATTR_U_THRESH", 100),
            ("IPVS_DEST_ATTR_L_THRESH", 10),
            ("IPVS_DEST_ATTR_ADDR_FAMILY", AF_INET),
        ],
        "IPVS_CMD_ATTR_DEST",
    )
    data = struct.pack("=IHHIIBBH", 20 + len(payload), FAMILY_ID, 2, 9, 0, codec.CMD_NEW_DEST, 1, 0) + bytes(payload)
    fast = decoder.decode(memoryview(data), 0, len(data), AF_INET)
    assert fast is not None
    assert fast == codec.decode_dest(payload, AF_INET)
    assert fast[0] == DR
    assert fast[1] == DestCounters()
    # Several messages back to back, of two shapes, as one receive buffer holds them.
    buffer = first + data + first
    decoded = _decode_all(fastdump.DestDecoder(True), buffer, AF_INET)
    assert [d[0] for d in decoded] == [DR, DR, DR]  # type: ignore[index]


SERVICE_CASES = [
    (V4, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
    (V4_PERSISTENT, [0] * 10),
    (V6, [2**50] * 10),
    (VirtualService(ServiceKey(AF_INET, 6, "192.0.2.1", 443), "rr", 0x04, 0, 0), [5] * 10),
    (VirtualService(ServiceKey(AF_INET6, 17, "2001:db8::1", 53), "sh", 0x10, 30, 0), [5] * 10),
]


def test_fast_service_decoder_matches_generic() -> None:
    for with_counters in (True, False):
        decoder = fastdump.ServiceDecoder(with_counters)
        for _round in range(2):
            for service, counters in SERVICE_CASES:
                data = _kernel_service(service, counters)
                view = memoryview(data)
                fast = decoder.decode(view, 0, len(data))
                generic = codec.decode_service(view[20:])
                assert fast is not None
                assert fast[0] == generic[0] == service
                assert fast[1] == (generic[1] if with_counters else None)
                if with_counters:
                    assert generic[1] == Counters(*counters)
                msg = IPVSMessage(data)
                msg.decode()
                svc = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
                assert svc.get_attr("IPVS_SVC_ATTR_SCHED_NAME") == service.scheduler
                assert svc.get_attr("IPVS_SVC_ATTR_PORT") == service.key.port


def test_fast_service_decoder_leaves_fwmark_services_to_the_generic_decoder() -> None:
    data = _kernel_service(V6_FWMARK, [0] * 10)
    assert fastdump.ServiceDecoder(True).decode(memoryview(data), 0, len(data)) is None
    assert codec.decode_service(memoryview(data)[20:])[0] == V6_FWMARK


def test_fast_constructors_equal_the_dataclasses() -> None:
    args = ("10.0.0.1", 80, 5, Method.TUN, 1, 2, TunnelType.GUE, 6080, TunnelChecksum.CSUM, AF_INET6)
    made = fastdump._make_destination(*args)
    assert made == Destination(*args[:9], family=AF_INET6)
    assert hash(made) == hash(Destination(*args[:9], family=AF_INET6))
    assert fastdump._make_counters(*range(10)) == Counters(*range(10))
    assert fastdump._make_dest_counters(Counters(), 1, 2, 3) == DestCounters(Counters(), 1, 2, 3)
    with pytest.raises(AttributeError):
        fastdump._make_counters(*range(10)).packets_in = 1  # type: ignore[misc]


# --- generic netlink controller and rtnetlink -----------------------------------------------------


def test_get_family_request_matches_pyroute2() -> None:
    msg = ctrlmsg()
    msg["cmd"] = codec.CTRL_CMD_GETFAMILY
    msg["version"] = 1
    msg["header"]["type"] = codec.GENL_ID_CTRL
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg["header"]["sequence_number"] = 3
    msg["attrs"] = [("CTRL_ATTR_FAMILY_NAME", "IPVS")]
    msg.encode()
    assert codec.get_family_request("IPVS", 3) == bytes(msg.data)


def test_family_id_decoded_as_pyroute2_encodes_it() -> None:
    msg = ctrlmsg()
    msg["cmd"] = codec.CTRL_CMD_NEWFAMILY
    msg["version"] = 2
    msg["header"]["type"] = codec.GENL_ID_CTRL
    msg["attrs"] = [("CTRL_ATTR_FAMILY_NAME", "IPVS"), ("CTRL_ATTR_FAMILY_ID", 0x25), ("CTRL_ATTR_VERSION", 1)]
    msg.encode()
    [(kind, _flags, _seq, payload)] = list(codec.iter_messages(bytes(msg.data)))
    assert kind == codec.GENL_ID_CTRL
    assert codec.decode_family_id(payload[4:]) == 0x25


def _ifinfmsg(kind: int, nl_flags: int, seq: int, attrs: list[tuple[str, object]], **fields: int) -> bytes:
    msg = ifinfmsg()
    msg["header"]["type"] = kind
    msg["header"]["flags"] = nl_flags
    msg["header"]["sequence_number"] = seq
    for name, value in fields.items():
        msg[name] = value
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data)


def test_link_requests_match_pyroute2() -> None:
    ack = NLM_F_REQUEST | NLM_F_ACK
    assert codec.get_link_request("kubelvs0", 4) == _ifinfmsg(codec.RTM_GETLINK, ack, 4, [("IFLA_IFNAME", "kubelvs0")])
    create = ack | codec.NLM_F_CREATE | codec.NLM_F_EXCL
    expected = _ifinfmsg(
        codec.RTM_NEWLINK,
        create,
        5,
        [("IFLA_IFNAME", "kubelvs0"), ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "dummy")]})],
    )
    assert codec.new_link_request("kubelvs0", "dummy", 5) == expected
    assert codec.set_link_up_request(7, 6) == _ifinfmsg(codec.RTM_NEWLINK, ack, 6, [], index=7, flags=1, change=1)


def test_link_index_decoded_as_pyroute2_encodes_it() -> None:
    data = _ifinfmsg(codec.RTM_NEWLINK, 0, 4, [("IFLA_IFNAME", "kubelvs0"), ("IFLA_MTU", 1500)], index=12)
    [(kind, _flags, _seq, payload)] = list(codec.iter_messages(data))
    assert kind == codec.RTM_NEWLINK
    assert codec.decode_link_index(payload) == 12


def _ifaddrmsg(kind: int, nl_flags: int, seq: int, attrs: list[tuple[str, object]], **fields: int) -> bytes:
    msg = ifaddrmsg()
    msg["header"]["type"] = kind
    msg["header"]["flags"] = nl_flags
    msg["header"]["sequence_number"] = seq
    for name, value in fields.items():
        msg[name] = value
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data)


def test_address_requests_match_pyroute2() -> None:
    # As pyroute2's IPRoute.addr() sends them (captured with strace): IPv4 with IFA_LOCAL too,
    # IPv6's flags as IFA_FLAGS.
    create = NLM_F_REQUEST | NLM_F_ACK | codec.NLM_F_CREATE | codec.NLM_F_EXCL
    v4 = {"family": AF_INET, "prefixlen": 32, "index": 3}
    v6 = {"family": AF_INET6, "prefixlen": 128, "index": 3}
    assert codec.address_request(True, 3, "192.0.2.10", AF_INET, 32, 0, 8) == _ifaddrmsg(
        codec.RTM_NEWADDR, create, 8, [("IFA_ADDRESS", "192.0.2.10"), ("IFA_LOCAL", "192.0.2.10")], **v4
    )
    assert codec.address_request(True, 3, "2001:db8::10", AF_INET6, 128, 2, 9) == _ifaddrmsg(
        codec.RTM_NEWADDR, create, 9, [("IFA_ADDRESS", "2001:db8::10"), ("IFA_FLAGS", 2)], **v6
    )
    ack = NLM_F_REQUEST | NLM_F_ACK
    assert codec.address_request(False, 3, "192.0.2.10", AF_INET, 32, 0, 10) == _ifaddrmsg(
        codec.RTM_DELADDR, ack, 10, [("IFA_ADDRESS", "192.0.2.10"), ("IFA_LOCAL", "192.0.2.10")], **v4
    )
    assert codec.address_request(False, 3, "2001:db8::10", AF_INET6, 128, 2, 11) == _ifaddrmsg(
        codec.RTM_DELADDR, ack, 11, [("IFA_ADDRESS", "2001:db8::10")], **v6
    )
    assert codec.get_addresses_request(12) == _ifaddrmsg(codec.RTM_GETADDR, NLM_F_REQUEST | codec.NLM_F_DUMP, 12, [])


@pytest.mark.parametrize(("family", "address"), [(AF_INET, "192.0.2.10"), (AF_INET6, "2001:db8::10")])
def test_address_decoded_as_pyroute2_encodes_it(family: int, address: str) -> None:
    data = _ifaddrmsg(
        codec.RTM_NEWADDR,
        codec.NLM_F_MULTI,
        4,
        [("IFA_ADDRESS", address), ("IFA_LABEL", "kubelvs0"), ("IFA_FLAGS", 0x80)],
        family=family,
        prefixlen=32,
        index=6,
    )
    [(kind, _flags, _seq, payload)] = list(codec.iter_messages(data))
    assert kind == codec.RTM_NEWADDR
    assert codec.decode_address(payload) == (6, address)


# --- batching: one acknowledgement per batch, errors mapped to their operations ------------------


class FakeKernel:
    """Stands for IPVS behind a netlink socket: handles every message of a send() in order,
    answers failures always and successes only when asked (NLM_F_ACK), one datagram each."""

    def __init__(self, failing: set[int]) -> None:
        self.failing = failing  # indexes (in arrival order) of the requests that fail
        self.requests: list[tuple[int, int, bytes]] = []  # (flags, seq, message)
        self.sends: list[int] = []
        self.queue: list[bytes] = []
        self.send_buffer = 4 << 20

    def send(self, data: bytes) -> int:
        self.sends.append(len(data))
        for _kind, flags, seq, payload in codec.iter_messages(data):
            index = len(self.requests)
            self.requests.append((flags, seq, bytes(payload)))
            err = -17 if index in self.failing else 0
            if err or flags & NLM_F_ACK:
                header = struct.pack("=IHHII", 36, FAMILY_ID, flags, seq, 0)
                body = struct.pack("=i", err) + header
                self.queue.append(struct.pack("=IHHII", 16 + len(body), codec.NLMSG_ERROR, 0x100, seq, 0) + body)
        return len(data)

    def recv_into(self, buffer: bytearray, size: int = 0, flags: int = 0) -> int:
        data = self.queue.pop(0)
        buffer[: len(data)] = data
        return len(data)

    def getsockopt(self, level: int, option: int) -> int:
        return self.send_buffer if option == socket.SO_SNDBUF else 8 << 20


def _client(kernel: FakeKernel, batch_size: int, max_send: int = 1 << 20) -> IPVSClient:
    kernel.send_buffer = max_send + 1024  # IPVSClient keeps 1 KiB of SO_SNDBUF spare
    client = IPVSClient(batch_size=batch_size, sock=kernel, family_id=FAMILY_ID)  # type: ignore[arg-type]
    assert (client.batch_size, client.max_send) == (batch_size, max_send)
    client._seq = 0x7FFFFFFF - 5  # batches must stay consecutive across the wrap
    return client


def test_batches_ask_for_one_ack_and_map_errors_to_operations() -> None:
    service_ops = [Operation(Verb.ADD_SERVICE, s) for s in (V4, V4_PERSISTENT, V6)]
    dest_ops = [
        Operation(Verb.ADD_DEST, s, d) for s in (V4, V4_PERSISTENT, V6) for d in _dests_for(s) for _ in range(5)
    ]
    sent_dests = [op for op in dest_ops if op.key != V4_PERSISTENT.key]
    # Request indexes in arrival order; V4_PERSISTENT's ADD_SERVICE fails, so its dests are skipped.
    failing = {1, 3 + 4, 3 + 10, 3 + len(sent_dests) - 1}
    kernel = FakeKernel(failing)
    result = _client(kernel, batch_size=4).apply(service_ops + dest_ops)
    assert result.skipped == [op for op in dest_ops if op.key == V4_PERSISTENT.key]
    sent = service_ops + sent_dests
    assert len(kernel.requests) == len(sent)
    failed_indexes = sorted(failing)
    assert [f.operation for f in result.failed] == [sent[i] for i in failed_indexes]
    assert all(f.errno == 17 for f in result.failed)
    assert result.succeeded == [op for i, op in enumerate(sent) if i not in failing]
    # Only the last request of each batch (at most 4 per send) asks for an acknowledgement.
    acked = [i for i, (flags, _seq, _msg) in enumerate(kernel.requests) if flags & NLM_F_ACK]
    assert acked == [2] + [3 + i for i in range(len(sent_dests)) if i % 4 == 3 or i == len(sent_dests) - 1]
    assert all(flags & NLM_F_REQUEST for flags, _seq, _msg in kernel.requests)
    seqs = [seq for _flags, seq, _msg in kernel.requests]
    assert all(0 < seq <= 0x7FFFFFFF for seq in seqs) and len(set(seqs)) == len(seqs)
    # Apart from the flags, each request is the one encode() gives.
    for op, (flags, seq, _msg) in zip(sent, kernel.requests, strict=True):
        expected = bytearray(encode(op, FAMILY_ID, seq))
        expected[6:8] = flags.to_bytes(2, "little")
        assert bytes(_msg) == bytes(expected[16:])


def test_batches_are_split_to_fit_the_send_buffer() -> None:
    ops = [Operation(Verb.ADD_DEST, V4, DR)] * 50
    size = len(encode(ops[0], FAMILY_ID, 1))
    kernel = FakeKernel(set())
    result = _client(kernel, batch_size=1024, max_send=size * 16 + 3).apply(ops)
    assert result.ok and len(result.succeeded) == 50
    assert kernel.sends == [size * 16] * 3 + [size * 2]


def test_decode_run_takes_same_shaped_messages_at_once() -> None:
    cases = [(DR, [1] * 10), (NAT4, [2**40] * 10), (GUE, list(range(10))), (TUN6_IN_V4, [0] * 10)]
    kernel = [_kernel_dest(dest, dest.family or AF_INET, counters, (1, 2, 3)) for dest, counters in cases]
    # A pyroute2-shaped message (4-byte address, fewer attributes): another shape.
    payload = _kernel_style_dump(
        codec.CMD_NEW_DEST,
        [
            ("IPVS_DEST_ATTR_ADDR", "198.51.100.7"),
            ("IPVS_DEST_ATTR_PORT", 80),
            ("IPVS_DEST_ATTR_WEIGHT", 3),
            ("IPVS_DEST_ATTR_ADDR_FAMILY", AF_INET),
        ],
        "IPVS_CMD_ATTR_DEST",
    )
    other = struct.pack("=IHHIIBBH", 20 + len(payload), FAMILY_ID, 2, 9, 0, codec.CMD_NEW_DEST, 1, 0) + bytes(payload)
    for messages, expected_runs in (
        ([*kernel, kernel[0]], [5]),  # one receive buffer of one shape: checked and unpacked at once
        ([kernel[0], kernel[1], other, kernel[2], kernel[3]], None),  # mixed: correct, in shorter runs
    ):
        buffer = memoryview(b"".join(messages))
        for with_counters in (True, False):
            decoder = fastdump.DestDecoder(with_counters)
            key = ServiceKey(AF_INET, 6, "192.0.2.1", 80)
            dests: list[Destination] = []
            counters: list[tuple[tuple[ServiceKey, DestKey], DestCounters]] | None = [] if with_counters else None
            offset, runs = 0, []
            while offset < len(buffer):
                length = struct.unpack_from("=I", buffer, offset)[0]
                after = decoder.decode_run(buffer, offset, length, len(buffer), key, dests, counters)
                assert after > offset
                runs.append((after - offset) // length)
                offset = after
            if expected_runs is not None:
                assert runs == expected_runs
            expected = [codec.decode_dest(memoryview(m)[20:], AF_INET) for m in messages]
            assert dests == [dest for dest, _ in expected]
            if counters is not None:
                assert counters == [((key, DestKey(d.address, d.port)), c) for d, c in expected]


def test_the_owner_mark_is_appended_as_pyroute2_encodes_ifa_proto() -> None:
    # kernel/addresses.py appends IFA_PROTO to the hand-written request (the hot path at a cold
    # start with 10,000 VIPs); the bytes must be pyroute2's.
    from kubelvs.kernel.addresses import ADDRESS_PROTO, _with_proto

    create = NLM_F_REQUEST | NLM_F_ACK | codec.NLM_F_CREATE | codec.NLM_F_EXCL
    request = _with_proto(codec.address_request(True, 3, "192.0.2.10", AF_INET, 32, 0, 8), ADDRESS_PROTO)
    assert request == _ifaddrmsg(
        codec.RTM_NEWADDR,
        create,
        8,
        [("IFA_ADDRESS", "192.0.2.10"), ("IFA_LOCAL", "192.0.2.10"), ("IFA_PROTO", ADDRESS_PROTO)],
        family=AF_INET,
        prefixlen=32,
        index=3,
    )


def test_link_dump_request_matches_pyroute2() -> None:
    dump = NLM_F_REQUEST | codec.NLM_F_DUMP
    assert codec.get_links_request(13) == _ifinfmsg(codec.RTM_GETLINK, dump, 13, [])


@pytest.mark.parametrize("replace", [False, True])
def test_lifetime_address_requests_match_pyroute2(replace: bool) -> None:
    # kernel/claims.py: a claim created exclusively, or refreshed (NLM_F_REPLACE), with its
    # lifetime in IFA_CACHEINFO and the owner mark in IFA_PROTO.
    flags = NLM_F_REQUEST | NLM_F_ACK | codec.NLM_F_CREATE | (codec.NLM_F_REPLACE if replace else codec.NLM_F_EXCL)
    assert codec.NLM_F_REPLACE == 0x100
    v4 = codec.lifetime_address_request(replace, 3, "192.0.2.10", AF_INET, 32, 0, 5, 5, 107, 8)
    assert v4 == _ifaddrmsg(
        codec.RTM_NEWADDR,
        flags,
        8,
        [
            ("IFA_ADDRESS", "192.0.2.10"),
            ("IFA_LOCAL", "192.0.2.10"),
            ("IFA_CACHEINFO", {"ifa_preferred": 5, "ifa_valid": 5, "cstamp": 0, "tstamp": 0}),
            ("IFA_PROTO", 107),
        ],
        family=AF_INET,
        prefixlen=32,
        index=3,
    )
    v6 = codec.lifetime_address_request(replace, 4, "2001:db8::10", AF_INET6, 128, 2, 7, 0, 107, 9)
    assert v6 == _ifaddrmsg(
        codec.RTM_NEWADDR,
        flags,
        9,
        [
            ("IFA_ADDRESS", "2001:db8::10"),
            ("IFA_FLAGS", 2),
            ("IFA_CACHEINFO", {"ifa_preferred": 0, "ifa_valid": 7, "cstamp": 0, "tstamp": 0}),
            ("IFA_PROTO", 107),
        ],
        family=AF_INET6,
        prefixlen=128,
        index=4,
    )


def test_lifetime_address_request_is_decoded_by_pyroute2() -> None:
    data = codec.lifetime_address_request(False, 3, "192.0.2.10", AF_INET, 32, 0, 30, 20, 107, 8)
    msg = ifaddrmsg(data)
    msg.decode()
    assert msg["header"]["length"] == len(data)
    assert msg.get_attr("IFA_CACHEINFO")["ifa_valid"] == 30
    assert msg.get_attr("IFA_CACHEINFO")["ifa_preferred"] == 20
    assert msg.get_attr("IFA_PROTO") == 107
