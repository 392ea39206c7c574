"""Property tests of the IPVS codec: the fast encoder against the table-driven one and pyroute2,
the dump's fast decoder against the plain one, canonical address text, unknown kernel values."""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from kubelvs.core.model import (
    AF_INET,
    AF_INET6,
    SCHEDULERS,
    Destination,
    DestKey,
    Method,
    ServiceKey,
    TunnelChecksum,
    TunnelType,
    VirtualService,
    address_text,
    normalize_address,
)
from kubelvs.core.plan import Operation, Verb, plan
from kubelvs.kernel import codec, fastdump
from kubelvs.kernel.ipvs import _encode, _encode_batch
from kubelvs.kernel.messages import IPVSMessage
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST

FAMILY_ID = 0x1F
U32 = st.integers(0, 2**32 - 1)
U16 = st.integers(0, 2**16 - 1)

# IPv6 addresses, with the IPv4-mapped and IPv4-compatible ranges (where inet_ntop's text and
# ipaddress's differ) and the edges around them drawn often.
IPV6 = st.one_of(
    st.ip_addresses(v=6),
    st.ip_addresses(network="::ffff:0:0/96"),
    st.ip_addresses(network="::/96"),
    st.ip_addresses(network="::fffe:0:0/95"),
    st.ip_addresses(network="0:0:0:0:0:1::/96"),
).map(str)
IPV4 = st.ip_addresses(v=4).map(str)
MAPPED = bytes(10) + b"\xff\xff"


def _address(family: int) -> st.SearchStrategy[str]:
    return IPV4 if family == AF_INET else IPV6


@st.composite
def services(draw: st.DrawFn, fwmark: bool = True) -> VirtualService:
    family = draw(st.sampled_from([AF_INET, AF_INET6]))
    if fwmark and draw(st.booleans()):
        key = ServiceKey(family, 0, "", 0, draw(st.integers(1, 2**32 - 1)))
    else:
        key = ServiceKey(family, draw(st.sampled_from([6, 17, 132])), draw(_address(family)), draw(U16))
    timeout = draw(st.one_of(st.just(0), st.integers(1, 2**32 - 1)))
    return VirtualService(
        key,
        draw(st.sampled_from(SCHEDULERS)),
        draw(st.sampled_from([0, 0x4, 0x8, 0x10, 0x18, 0x1C])),
        timeout,
        draw(st.integers(0, 31 if family == AF_INET else 127)),  # the full length decodes to 0
    )


@st.composite
def destinations(draw: st.DrawFn, service_family: int) -> Destination:
    method = draw(st.sampled_from([Method.DR, Method.TUN, Method.NAT, Method.LOCAL]))
    family = draw(st.sampled_from([AF_INET, AF_INET6])) if method is Method.TUN else service_family
    tunnel = method is Method.TUN
    return Destination(
        draw(_address(family)),
        draw(U16),
        draw(U32),
        method,
        draw(U32),
        draw(U32),
        draw(st.sampled_from([TunnelType.IPIP, TunnelType.GUE, TunnelType.GRE])) if tunnel else TunnelType.IPIP,
        draw(U16) if tunnel else 0,
        draw(st.sampled_from([TunnelChecksum.NONE, TunnelChecksum.CSUM, TunnelChecksum.REMCSUM]))
        if tunnel
        else TunnelChecksum.NONE,
        0 if family == service_family else family,
    )


@st.composite
def services_with_dests(draw: st.DrawFn, fwmark: bool = True) -> VirtualService:
    service = draw(services(fwmark))
    dests = draw(st.lists(destinations(service.key.family), max_size=6, unique_by=lambda d: (d.address, d.port)))
    return replace(service, destinations=tuple(dests))


# --- the fast encoder == the table-driven encoder == pyroute2 -------------------------------------

_COMMANDS = {
    Verb.ADD_SERVICE: codec.CMD_NEW_SERVICE,
    Verb.EDIT_SERVICE: codec.CMD_SET_SERVICE,
    Verb.DELETE_SERVICE: codec.CMD_DEL_SERVICE,
    Verb.ADD_DEST: codec.CMD_NEW_DEST,
    Verb.EDIT_DEST: codec.CMD_SET_DEST,
    Verb.DELETE_DEST: codec.CMD_DEL_DEST,
}


def _generic(op: Operation, seq: int, flags: int) -> bytes:
    if op.dest is None:
        full = op.verb is not Verb.DELETE_SERVICE
        body = codec.service_attrs(op.service) if full else codec.service_key_attrs(op.key)
        return codec.message(FAMILY_ID, _COMMANDS[op.verb], codec.nested(codec.CMD_ATTR_SERVICE, body), seq, flags)
    attrs = codec.nested(codec.CMD_ATTR_SERVICE, codec.service_key_attrs(op.key)) + codec.nested(
        codec.CMD_ATTR_DEST, codec.dest_attrs(op.dest, op.key.family, full=op.verb is not Verb.DELETE_DEST)
    )
    return codec.message(FAMILY_ID, _COMMANDS[op.verb], attrs, seq, flags)


def _pyroute2(op: Operation, seq: int, flags: int) -> bytes:
    """The same request encoded by pyroute2's message classes (with the TUN_PORT fix). Its
    netmask attribute is an IPv4 address, so IPv6 netmasks are appended as the raw u32."""
    service, dest, key = op.service, op.dest, op.key
    msg = IPVSMessage()
    msg["cmd"] = _COMMANDS[op.verb]
    msg["version"] = 1
    msg["header"]["type"] = FAMILY_ID
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    svc: list[tuple[str, Any]] = [("IPVS_SVC_ATTR_AF", key.family)]
    if key.fwmark:
        svc.append(("IPVS_SVC_ATTR_FWMARK", key.fwmark))
    else:
        svc += [
            ("IPVS_SVC_ATTR_PROTOCOL", key.protocol),
            ("IPVS_SVC_ATTR_ADDR", key.address),
            ("IPVS_SVC_ATTR_PORT", key.port),
        ]
    raw_netmask = b""
    if dest is None and op.verb is not Verb.DELETE_SERVICE:
        svc += [
            ("IPVS_SVC_ATTR_SCHED_NAME", service.scheduler),
            (
                "IPVS_SVC_ATTR_FLAGS",
                {"flags": service.sched_flags | (1 if service.persistence_timeout else 0), "mask": 0xFFFFFFFF},
            ),
            ("IPVS_SVC_ATTR_TIMEOUT", service.persistence_timeout),
        ]
        if key.family == AF_INET:
            mask = ipaddress.IPv4Network(f"0.0.0.0/{service.effective_netmask}").netmask
            svc.append(("IPVS_SVC_ATTR_NETMASK", str(mask)))
        else:
            raw_netmask = struct.pack("=HHI", 8, codec.SVC_NETMASK, service.effective_netmask)
    msg["attrs"] = [("IPVS_CMD_ATTR_SERVICE", {"attrs": svc})]
    if dest is not None:
        full = op.verb is not Verb.DELETE_DEST
        d: list[tuple[str, Any]] = [("IPVS_DEST_ATTR_ADDR", dest.address), ("IPVS_DEST_ATTR_PORT", dest.port)]
        if full:
            d += [
                ("IPVS_DEST_ATTR_FWD_METHOD", int(dest.method)),
                ("IPVS_DEST_ATTR_WEIGHT", dest.weight),
                ("IPVS_DEST_ATTR_U_THRESH", dest.upper_threshold),
                ("IPVS_DEST_ATTR_L_THRESH", dest.lower_threshold),
            ]
        d.append(("IPVS_DEST_ATTR_ADDR_FAMILY", dest.family or key.family))
        if full:
            d += [
                ("IPVS_DEST_ATTR_TUN_TYPE", int(dest.tunnel_type)),
                ("IPVS_DEST_ATTR_TUN_PORT", dest.tunnel_port),
                ("IPVS_DEST_ATTR_TUN_FLAGS", int(dest.tunnel_checksum)),
            ]
        msg["attrs"].append(("IPVS_CMD_ATTR_DEST", {"attrs": d}))
    msg.encode()
    data = bytearray(msg.data)
    if raw_netmask:
        data += raw_netmask
        data[0:4] = len(data).to_bytes(4, "little")
        data[20:22] = (int.from_bytes(data[20:22], "little") + len(raw_netmask)).to_bytes(2, "little")
    return bytes(data)


def _without_nested_flag(data: bytes) -> bytes:
    """pyroute2 does not set NLA_F_NESTED on the top-level nests; the kernel accepts both."""
    out = bytearray(data)
    offset = 20
    while offset + 4 <= len(out):
        length = int.from_bytes(out[offset : offset + 2], "little")
        kind = int.from_bytes(out[offset + 2 : offset + 4], "little")
        out[offset + 2 : offset + 4] = (kind & ~codec.NLA_F_NESTED).to_bytes(2, "little")
        offset += (length + 3) & ~3
    return bytes(out)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(services_with_dests(), min_size=1, max_size=4),
    st.integers(1, 2**31 - 1),
    st.sampled_from([NLM_F_REQUEST, NLM_F_REQUEST | NLM_F_ACK]),
)
def test_fast_encoder_equals_table_encoder_and_pyroute2(state: list[VirtualService], seq: int, flags: int) -> None:
    encoder = codec.RequestEncoder(FAMILY_ID)  # one per plan: its caches are shared by the services
    ops = []
    for service in state:
        ops += [Operation(verb, service) for verb in (Verb.ADD_SERVICE, Verb.EDIT_SERVICE, Verb.DELETE_SERVICE)]
        ops += [
            Operation(verb, service, dest)
            for dest in service.destinations
            for verb in (Verb.ADD_DEST, Verb.EDIT_DEST, Verb.DELETE_DEST)
        ]
    for op in ops:
        fast = _encode(encoder, op, seq, flags)
        assert fast == _generic(op, seq, flags), op
        assert _without_nested_flag(fast) == _pyroute2(op, seq, flags), op


@settings(max_examples=200, deadline=None)
@given(
    st.lists(services_with_dests(), min_size=1, max_size=4),
    st.lists(st.sampled_from(list(Verb)), min_size=1, max_size=3),
    st.integers(1, 2**31 - 2**12),
    st.integers(0, 20),
    st.integers(1, 2000),
)
def test_batch_encoding_equals_one_request_at_a_time(
    state: list[VirtualService], verbs: list[Verb], seq: int, start: int, max_bytes: int
) -> None:
    """_encode_batch (runs of real servers of one service encoded together) gives the bytes of
    _encode for each operation in turn, stops where the byte budget ends (never before the first
    request), and leaves a malformed operation to _encode (which raises)."""
    ops = [
        Operation(verb, service, dest)
        for service in state
        for verb in verbs
        for dest in (service.destinations if verb in (Verb.ADD_DEST, Verb.EDIT_DEST, Verb.DELETE_DEST) else (None,))
    ]
    assume(ops)
    start = min(start, len(ops) - 1)
    encoder = codec.RequestEncoder(FAMILY_ID)
    one_at_a_time = [_encode(encoder, op, seq + i, NLM_F_REQUEST) for i, op in enumerate(ops[start:])]
    chunks, size = _encode_batch(codec.RequestEncoder(FAMILY_ID), ops, start, len(ops), seq, NLM_F_REQUEST, max_bytes)
    fit = 1
    while fit < len(one_at_a_time) and sum(map(len, one_at_a_time[: fit + 1])) <= max_bytes:
        fit += 1
    assert chunks == one_at_a_time[:fit] and size == sum(map(len, chunks))


def test_a_malformed_operation_in_a_run_raises() -> None:
    service = VirtualService(ServiceKey(2, 6, "192.0.2.1", 80), "rr", destinations=(Destination("10.0.0.1", 80),))
    ops = [Operation(Verb.ADD_DEST, service, service.destinations[0]), Operation(Verb.ADD_DEST, service)]
    with pytest.raises(ValueError, match="without a real server"):
        _encode_batch(codec.RequestEncoder(FAMILY_ID), ops, 0, 2, 1, NLM_F_REQUEST, 1 << 20)


def test_struct_formats_are_derived_from_the_tables() -> None:
    # The layout the fast encoder packs, spelled out once here as a cross-check of the derivation.
    assert codec.struct_format(codec.DEST_TABLE, 16) == "HH16sHHH2xHHIHHIHHIHHIHHH2xHHB3xHHH2xHHH2x"
    assert codec.struct_format(codec.DEST_KEY_TABLE, 4) == "HH4sHHH2xHHH2x"
    assert codec._SERVICE_KEY[4].format == "=HHHHH2xHHH2xHH4sHHH2x"


# --- canonical address text -----------------------------------------------------------------------


def _text_forms(address: str) -> list[str]:
    """Ways to write one address: canonical, inet_ntop's (dotted quads), fully exploded."""
    parsed = ipaddress.ip_address(address)
    family = AF_INET if parsed.version == 4 else AF_INET6
    return [str(parsed), socket.inet_ntop(family, parsed.packed), parsed.exploded]


@settings(max_examples=200, deadline=None)
@given(IPV6, st.integers(0, 2**16 - 1))
def test_decoded_address_equals_normalized(address: str, port: int) -> None:
    for text in _text_forms(address):
        family, canonical = normalize_address(text)
        assert family == AF_INET6
        # A service keyed by it, encoded as a request, and as the kernel reports it in a dump.
        key = ServiceKey(AF_INET6, 6, canonical, port)
        service = VirtualService(key, "rr", destinations=(Destination(canonical, port, method=Method.NAT),))
        payload = _kernel_service_message(service, counters=False, stats64=False)
        decoded, _ = codec.decode_service(memoryview(payload)[20:])
        assert decoded.key == key
        dest_message = _kernel_dest_message(service.destinations[0], AF_INET6, [], counters=False, stats64=False)
        assert codec.decode_dest(memoryview(dest_message)[20:], AF_INET6)[0].address == canonical
        fast = fastdump.ServiceDecoder(False).decode(memoryview(payload), 0, len(payload))
        assert fast is not None and fast[0].key == key
        # The request carries the packed address, whatever the text was.
        request = codec.service_key_attrs(ServiceKey(AF_INET6, 6, text, port))
        assert codec.service_key_attrs(key) == request


@given(
    st.binary(min_size=16, max_size=16) | st.binary(min_size=4, max_size=4).map(lambda b: bytes(10) + b"\xff\xff" + b)
)
def test_codec_address_text_equals_model_address_text(packed: bytes) -> None:
    assert codec.address_text(AF_INET6, packed) == address_text(packed)
    assert codec.address_text(AF_INET6, packed) == normalize_address(socket.inet_ntop(AF_INET6, packed))[1]


def test_mapped_and_compatible_addresses_examples() -> None:
    for text, canonical in (("::ffff:10.0.0.1", "::ffff:a00:1"), ("::10.0.0.1", "::a00:1"), ("::1", "::1")):
        assert normalize_address(text)[1] == canonical
        assert codec.address_text(AF_INET6, socket.inet_pton(AF_INET6, text)) == canonical


# --- the dump's fast decoder == the plain decoders, over kernel-like messages ----------------------


def _stats(values: list[int], wide: bool) -> bytes:
    sizes = [8] * 10 if wide else [4, 4, 4, 8, 8, 4, 4, 4, 4, 4]
    return b"".join(
        codec._attr(kind, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        for kind, (value, size) in enumerate(zip(values, sizes, strict=True), 1)
    )


def _message(cmd: int, top: int, attrs: list[bytes]) -> bytes:
    return codec.message(FAMILY_ID, cmd, codec._attr(top, b"".join(attrs)), 9, codec.NLM_F_MULTI)


def _kernel_dest_attrs(
    dest: Destination,
    family: int,
    counters: list[int],
    counters_on: bool,
    stats64: bool,
    raw: dict[int, int] | None = None,
) -> list[bytes]:
    """A real server's attributes as ip_vs_genl_fill_dest() writes them (in its order);
    ``raw`` overrides the method, tunnel type and checksum codes (unknown values)."""
    raw = raw or {}
    values = counters or [0] * 10
    attrs = [
        codec._attr(codec.DEST_ADDR, socket.inet_pton(family, dest.address).ljust(16, b"\0")),
        codec._attr(codec.DEST_PORT, dest.port.to_bytes(2, "big")),
        codec._attr(codec.DEST_FWD_METHOD, struct.pack("=I", raw.get(codec.DEST_FWD_METHOD, int(dest.method)))),
        codec._attr(codec.DEST_WEIGHT, struct.pack("=I", dest.weight)),
        codec._attr(codec.DEST_TUN_TYPE, bytes([raw.get(codec.DEST_TUN_TYPE, int(dest.tunnel_type))])),
        codec._attr(codec.DEST_TUN_PORT, dest.tunnel_port.to_bytes(2, "big")),
        codec._attr(codec.DEST_TUN_FLAGS, struct.pack("=H", raw.get(codec.DEST_TUN_FLAGS, int(dest.tunnel_checksum)))),
        codec._attr(codec.DEST_U_THRESH, struct.pack("=I", dest.upper_threshold)),
        codec._attr(codec.DEST_L_THRESH, struct.pack("=I", dest.lower_threshold)),
        codec._attr(codec.DEST_ACTIVE_CONNS, struct.pack("=I", values[0] & 0xFFFF)),
        codec._attr(codec.DEST_INACT_CONNS, struct.pack("=I", values[1] & 0xFFFF)),
        codec._attr(codec.DEST_PERSIST_CONNS, struct.pack("=I", values[2] & 0xFFFF)),
        codec._attr(codec.DEST_ADDR_FAMILY, struct.pack("=H", family)),
    ]
    if counters_on:
        attrs.append(codec._attr(codec.DEST_STATS | codec.NLA_F_NESTED, _stats(values, False)))
        if stats64:
            attrs.append(codec._attr(codec.DEST_STATS64 | codec.NLA_F_NESTED, _stats(values, True)))
    return attrs


def _kernel_dest_message(
    dest: Destination, family: int, values: list[int], counters: bool = True, stats64: bool = True
) -> bytes:
    attrs = _kernel_dest_attrs(dest, family, values, counters, stats64)
    return _message(codec.CMD_NEW_DEST, codec.CMD_ATTR_DEST | codec.NLA_F_NESTED, attrs)


def _kernel_service_attrs(service: VirtualService, values: list[int], counters: bool, stats64: bool) -> list[bytes]:
    key = service.key
    attrs = [codec._attr(codec.SVC_AF, struct.pack("=H", key.family))]
    if key.fwmark:
        attrs.append(codec._attr(codec.SVC_FWMARK, struct.pack("=I", key.fwmark)))
    else:
        attrs += [
            codec._attr(codec.SVC_PROTOCOL, struct.pack("=H", key.protocol)),
            codec._attr(codec.SVC_ADDR, socket.inet_pton(key.family, key.address).ljust(16, b"\0")),
            codec._attr(codec.SVC_PORT, key.port.to_bytes(2, "big")),
        ]
    flags = service.sched_flags | codec.SVC_F_HASHED | (codec.SVC_F_PERSISTENT if service.persistence_timeout else 0)
    attrs += [
        codec._attr(codec.SVC_SCHED_NAME, service.scheduler.encode() + b"\0"),
        codec._attr(codec.SVC_FLAGS, struct.pack("=II", flags, 0xFFFFFFFF)),
        codec._attr(codec.SVC_TIMEOUT, struct.pack("=I", service.persistence_timeout or 300)),
        codec._attr(codec.SVC_NETMASK, codec._netmask(service)),
    ]
    if counters:
        attrs.append(codec._attr(codec.SVC_STATS | codec.NLA_F_NESTED, _stats(values or [0] * 10, False)))
        if stats64:
            attrs.append(codec._attr(codec.SVC_STATS64 | codec.NLA_F_NESTED, _stats(values or [0] * 10, True)))
    return attrs


def _kernel_service_message(service: VirtualService, counters: bool = True, stats64: bool = True) -> bytes:
    attrs = _kernel_service_attrs(service, [], counters, stats64)
    return _message(codec.CMD_NEW_SERVICE, codec.CMD_ATTR_SERVICE | codec.NLA_F_NESTED, attrs)


COUNTER_VALUES = st.lists(st.integers(0, 2**64 - 1), min_size=10, max_size=10)
UNKNOWN_CODES = st.fixed_dictionaries(
    {},
    optional={
        codec.DEST_FWD_METHOD: st.integers(0, 2**32 - 1),
        codec.DEST_TUN_TYPE: st.integers(0, 255),
        codec.DEST_TUN_FLAGS: st.integers(0, 2**16 - 1),
    },
)


@st.composite
def dest_dumps(draw: st.DrawFn) -> tuple[int, list[bytes]]:
    """The messages of one GET_DEST dump: real servers of one service family, their attributes
    in one order (the kernel's, or shuffled), with or without stats, some with raw codes."""
    service_family = draw(st.sampled_from([AF_INET, AF_INET6]))
    dests = draw(st.lists(destinations(service_family), min_size=1, max_size=8))
    counters_on, stats64 = draw(st.booleans()), draw(st.booleans())
    order = draw(st.permutations(range(15))) if draw(st.booleans()) else list(range(15))
    messages = []
    for dest in dests:
        family = dest.family or service_family
        raw = draw(UNKNOWN_CODES) if draw(st.integers(0, 3)) == 0 else {}
        attrs = _kernel_dest_attrs(dest, family, draw(COUNTER_VALUES), counters_on, stats64, raw)
        if draw(st.integers(0, 4)) == 0:  # an attribute left out (the tunnel's, the family, ...)
            del attrs[draw(st.integers(2, len(attrs) - 1))]
        attrs = [attrs[i] for i in order if i < len(attrs)]
        messages.append(_message(codec.CMD_NEW_DEST, codec.CMD_ATTR_DEST | codec.NLA_F_NESTED, attrs))
    return service_family, messages


@settings(max_examples=150, deadline=None)
@given(dest_dumps(), st.booleans(), st.integers(1, 4))
def test_fast_dest_decoder_equals_plain_decoder(dump: tuple[int, list[bytes]], with_counters: bool, split: int) -> None:
    family, messages = dump
    key = ServiceKey(family, 6, "192.0.2.1" if family == AF_INET else "2001:db8::1", 80)
    expected = [codec.decode_dest(memoryview(m)[20:], family) for m in messages]
    decoder = fastdump.DestDecoder(with_counters)
    # One decoder across receive buffers of ``split`` messages each, as a dump reads them.
    dests: list[Destination] = []
    counters: list[tuple[tuple[ServiceKey, DestKey], Any]] | None = [] if with_counters else None
    for start in range(0, len(messages), split):
        view = memoryview(b"".join(messages[start : start + split]))
        offset = 0
        while offset < len(view):
            length = struct.unpack_from("=I", view, offset)[0]
            after = decoder.decode_run(view, offset, length, len(view), key, dests, counters)
            if after == offset:
                dest, dest_counters = codec.decode_dest(view[offset + 20 : offset + length], family)
                dests.append(dest)
                if counters is not None:
                    counters.append(((key, dest.key), dest_counters))
                after = offset + length
            offset = after
    assert dests == [dest for dest, _ in expected]
    if counters is not None:
        assert counters == [((key, d.key), c) for d, c in expected]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(services(), min_size=1, max_size=6),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    COUNTER_VALUES,
    st.booleans(),
)
def test_fast_service_decoder_equals_plain_decoder(
    state: list[VirtualService], with_counters: bool, counters_on: bool, stats64: bool, values: list[int], shuffle: bool
) -> None:
    decoder = fastdump.ServiceDecoder(with_counters)
    for service in state:
        attrs = _kernel_service_attrs(service, values, counters_on, stats64)
        if shuffle:
            attrs = attrs[::-1]
        message = _message(codec.CMD_NEW_SERVICE, codec.CMD_ATTR_SERVICE | codec.NLA_F_NESTED, attrs)
        expected_service, expected_counters = codec.decode_service(memoryview(message)[20:])
        assert expected_service == service
        found = decoder.decode(memoryview(message), 0, len(message))
        if found is not None:
            assert found[0] == expected_service
            assert found[1] == (expected_counters if with_counters else None)
        else:
            assert service.key.fwmark  # the only messages left to the plain decoder


# --- unknown values from foreign entries: sentinels, and the planner leaves them alone --------------


def test_unknown_codes_decode_to_sentinels() -> None:
    dest = Destination("198.51.100.7", 80, 1, Method.TUN, 0, 0, TunnelType.GUE, 6080, TunnelChecksum.CSUM)
    for raw, field, sentinel in (
        ({codec.DEST_FWD_METHOD: 5}, "method", Method.UNKNOWN),
        ({codec.DEST_TUN_TYPE: 9}, "tunnel_type", TunnelType.UNKNOWN),
        ({codec.DEST_TUN_FLAGS: 4}, "tunnel_checksum", TunnelChecksum.UNKNOWN),
    ):
        attrs = _kernel_dest_attrs(dest, AF_INET, [0] * 10, True, True, raw)
        message = _message(codec.CMD_NEW_DEST, codec.CMD_ATTR_DEST | codec.NLA_F_NESTED, attrs)
        decoded, _ = codec.decode_dest(memoryview(message)[20:], AF_INET)
        assert getattr(decoded, field) is sentinel
        fast = fastdump.DestDecoder(True).decode(memoryview(message), 0, len(message), AF_INET)
        assert fast is not None and fast[0] == decoded
        assert VirtualService(ServiceKey(AF_INET, 6, "192.0.2.1", 80), destinations=(decoded,)).has_unknown_values


def test_unknown_address_family_decodes_to_a_sentinel() -> None:
    attrs = _kernel_dest_attrs(Destination("198.51.100.7", 80), AF_INET, [0] * 10, False, False)
    attrs[-1] = codec._attr(codec.DEST_ADDR_FAMILY, struct.pack("=H", 99))
    message = _message(codec.CMD_NEW_DEST, codec.CMD_ATTR_DEST | codec.NLA_F_NESTED, attrs)
    decoded, _ = codec.decode_dest(memoryview(message)[20:], AF_INET)
    assert decoded.family == 99 and decoded.address.startswith("?")
    service = VirtualService(ServiceKey(AF_INET, 6, "192.0.2.1", 80), destinations=(decoded,))
    assert service.has_unknown_values


def test_planner_leaves_services_with_unknown_values_alone() -> None:
    key = ServiceKey(AF_INET, 6, "192.0.2.1", 80)
    odd = Destination("198.51.100.7", 80, 1, Method.UNKNOWN)
    observed = {key: VirtualService(key, "rr", destinations=(odd,))}
    wanted = {key: VirtualService(key, "rr", destinations=(Destination("198.51.100.7", 80),))}
    # Even when recorded as owned: no edit (which would encode what it read), no delete.
    result = plan(wanted, observed, {key})
    assert result.operations == [] and result.conflicts == [key]
    assert plan({}, observed, {key}).operations == []
    # A service without unknown values is planned as before.
    plain = {key: VirtualService(key, "rr", destinations=(Destination("198.51.100.7", 80, method=Method.NAT),))}
    assert [op.verb for op in plan(wanted, plain, {key}).operations] == [Verb.EDIT_DEST]


def test_unknown_service_family_decodes_to_a_sentinel() -> None:
    service = VirtualService(ServiceKey(AF_INET, 6, "192.0.2.1", 80), "rr")
    attrs = _kernel_service_attrs(service, [], False, False)
    attrs[0] = codec._attr(codec.SVC_AF, struct.pack("=H", 99))
    message = _message(codec.CMD_NEW_SERVICE, codec.CMD_ATTR_SERVICE | codec.NLA_F_NESTED, attrs)
    assert fastdump.ServiceDecoder(False).decode(memoryview(message), 0, len(message)) is None
    decoded, _ = codec.decode_service(memoryview(message)[20:])
    assert decoded.key.family == 99 and decoded.key.address.startswith("?")
    assert decoded.has_unknown_values
    assert str(decoded.key).startswith("TCP ")
