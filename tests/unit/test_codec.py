"""The byte-level IPVS codec against pyroute2's encoding and decoding of the same messages."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from kubelvs.model import (
    AF_INET,
    AF_INET6,
    Destination,
    Method,
    ServiceKey,
    TunnelChecksum,
    TunnelType,
    VirtualService,
)
from kubelvs.netlink import codec
from kubelvs.netlink.ipvs import encode
from kubelvs.netlink.messages import IPVSMessage
from kubelvs.plan import Operation, Verb
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST

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
