"""IPVSClient against an injected stand-in for its netlink socket: dumps that race with deletions,
error acknowledgements with and without NETLINK_CAP_ACK."""

from __future__ import annotations

import errno
import gc
import socket
import struct

import pytest
from kubelvs.collector import paused_collector as _paused_gc
from kubelvs.core.model import AF_INET, AF_INET6, Destination, Method, ServiceKey, VirtualService
from kubelvs.kernel import codec
from kubelvs.kernel.ipvs import IPVSClient, IPVSError

FAMILY_ID = 0x1F
NLMSGHDR = struct.Struct("=IHHII")

S1 = VirtualService(
    ServiceKey(AF_INET, 6, "192.0.2.1", 80),
    "rr",
    destinations=tuple(Destination(f"198.51.100.{i}", 80) for i in range(1, 6)),
)
S2 = VirtualService(
    ServiceKey(AF_INET6, 17, "2001:db8::2", 53), "wrr", destinations=(Destination("2001:db8::7", 53, 2, Method.NAT),)
)
S3 = VirtualService(
    ServiceKey(AF_INET, 6, "192.0.2.3", 443), "wlc", destinations=(Destination("198.51.100.9", 443, 4),)
)


def _error(seq: int, err: int, request: bytes = b"", text: str = "", capped: bool = True) -> bytes:
    """An NLMSG_ERROR as the kernel writes it: the request echoed (its header only when capped),
    then the extended-ack message as a TLV (and the matching header flags)."""
    echoed = request[:16] if capped else request
    flags = codec.NLM_F_CAPPED if capped else 0
    body = struct.pack("=i", -err) + echoed.ljust(16, b"\0")
    if text:
        flags |= codec.NLM_F_ACK_TLVS
        body += codec._attr(codec.NLMSGERR_ATTR_MSG, text.encode() + b"\0")
    return NLMSGHDR.pack(16 + len(body), codec.NLMSG_ERROR, flags, seq, 0) + body


def _done(seq: int) -> bytes:
    return NLMSGHDR.pack(20, codec.NLMSG_DONE, codec.NLM_F_MULTI, seq, 0) + b"\0" * 4


def _service_message(service: VirtualService, seq: int) -> bytes:
    key = service.key
    attrs = (
        codec._attr(codec.SVC_AF, struct.pack("=H", key.family))
        + codec._attr(codec.SVC_PROTOCOL, struct.pack("=H", key.protocol))
        + codec._attr(codec.SVC_ADDR, socket.inet_pton(key.family, key.address).ljust(16, b"\0"))
        + codec._attr(codec.SVC_PORT, key.port.to_bytes(2, "big"))
        + codec._attr(codec.SVC_SCHED_NAME, service.scheduler.encode() + b"\0")
        + codec._attr(codec.SVC_FLAGS, struct.pack("=II", codec.SVC_F_HASHED, 0xFFFFFFFF))
        + codec._attr(codec.SVC_TIMEOUT, struct.pack("=I", 300))
        + codec._attr(codec.SVC_NETMASK, codec._netmask(service))
    )
    return codec.message(FAMILY_ID, codec.CMD_NEW_SERVICE, codec.nested(codec.CMD_ATTR_SERVICE, attrs), seq, 2)


def _dest_message(dest: Destination, family: int, seq: int) -> bytes:
    attrs = (
        codec._attr(codec.DEST_ADDR, socket.inet_pton(family, dest.address).ljust(16, b"\0"))
        + codec._attr(codec.DEST_PORT, dest.port.to_bytes(2, "big"))
        + codec._attr(codec.DEST_FWD_METHOD, struct.pack("=I", int(dest.method)))
        + codec._attr(codec.DEST_WEIGHT, struct.pack("=I", dest.weight))
        + codec._attr(codec.DEST_U_THRESH, struct.pack("=I", 0))
        + codec._attr(codec.DEST_L_THRESH, struct.pack("=I", 0))
        + codec._attr(codec.DEST_ADDR_FAMILY, struct.pack("=H", family))
    )
    return codec.message(FAMILY_ID, codec.CMD_NEW_DEST, codec.nested(codec.CMD_ATTR_DEST, attrs), seq, 2)


class DumpingKernel:
    """Stands for IPVS behind a netlink socket for dumps: GET_SERVICE lists ``services``;
    GET_DEST of a service in ``gone`` fails with that errno (deleted after the service dump)."""

    def __init__(self, services: list[VirtualService], gone: dict[ServiceKey, int]) -> None:
        self.services = services
        self.gone = gone
        self.queue: list[bytes] = []

    def getsockopt(self, level: int, option: int) -> int:
        return 1 << 20

    def send(self, data: bytes) -> int:
        for kind, _flags, seq, payload in codec.iter_messages(data):
            assert kind == FAMILY_ID
            cmd = payload[0]
            if cmd == codec.CMD_GET_SERVICE:
                # Two datagrams: the services, then DONE.
                self.queue.append(b"".join(_service_message(s, seq) for s in self.services))
                self.queue.append(_done(seq))
                continue
            assert cmd == codec.CMD_GET_DEST
            raw = codec.parse_attrs(codec.parse_attrs(payload[4:])[codec.CMD_ATTR_SERVICE])
            family = struct.unpack_from("=H", raw[codec.SVC_AF])[0]
            address = socket.inet_ntop(family, bytes(raw[codec.SVC_ADDR]))
            port = struct.unpack_from(">H", raw[codec.SVC_PORT])[0]
            service = next(s for s in self.services if (s.key.address, s.key.port) == (address, port))
            if service.key in self.gone:
                self.queue.append(_error(seq, self.gone[service.key], bytes(data), "no such service"))
                continue
            messages = [_dest_message(d, family, seq) for d in service.destinations]
            self.queue.append(b"".join(messages[:3]))  # a dump's answer may span datagrams
            if messages[3:]:
                self.queue.append(b"".join(messages[3:]))
            self.queue.append(_done(seq))
        return len(data)

    def recv_into(self, buffer: bytearray, size: int = 0, flags: int = 0) -> int:
        data = self.queue.pop(0)
        buffer[: len(data)] = data
        return len(data)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("err", [errno.ENOENT, errno.ESRCH])
def test_dump_leaves_out_a_service_deleted_before_its_real_servers_are_read(fast: bool, err: int) -> None:
    kernel = DumpingKernel([S1, S2, S3], gone={S2.key: err})
    client = IPVSClient(sock=kernel, family_id=FAMILY_ID)  # type: ignore[arg-type]
    for with_counters in (True, False):
        observed = client.dump(with_counters, fast=fast)
        assert observed.services == {S1.key: S1, S3.key: S3}
        if with_counters:
            assert set(observed.service_counters) == {S1.key, S3.key}
            assert len(observed.dest_counters) == len(S1.destinations) + len(S3.destinations)
        assert not kernel.queue


@pytest.mark.parametrize("fast", [True, False])
def test_dump_fails_on_other_errors(fast: bool) -> None:
    kernel = DumpingKernel([S1, S2], gone={S2.key: errno.EPERM})
    client = IPVSClient(sock=kernel, family_id=FAMILY_ID)  # type: ignore[arg-type]
    with pytest.raises(IPVSError) as raised:
        client.dump(fast=fast)
    assert raised.value.errno == errno.EPERM


def test_fast_and_plain_dumps_agree() -> None:
    kernel = DumpingKernel([S1, S2, S3], gone={})
    client = IPVSClient(sock=kernel, family_id=FAMILY_ID)  # type: ignore[arg-type]
    fast, plain = client.dump(fast=True), client.dump(fast=False)
    assert fast == plain and fast.services == {s.key: s for s in (S1, S2, S3)}


class FamilyKernel:
    """Answers CTRL_CMD_GETFAMILY for IPVS."""

    def __init__(self) -> None:
        self.queue: list[bytes] = []

    def getsockopt(self, level: int, option: int) -> int:
        return 1 << 20

    def send(self, data: bytes) -> int:
        [(_kind, _flags, seq, _payload)] = list(codec.iter_messages(data))
        attrs = codec._attr(codec.CTRL_ATTR_FAMILY_ID, struct.pack("=H", 0x2A))
        answer = codec.message(codec.GENL_ID_CTRL, codec.CTRL_CMD_NEWFAMILY, attrs, seq, 0)
        self.queue.append(answer + _error(seq, 0, bytes(data)))
        return len(data)

    def recv_into(self, buffer: bytearray, size: int = 0, flags: int = 0) -> int:
        data = self.queue.pop(0)
        buffer[: len(data)] = data
        return len(data)


def test_injected_socket_is_asked_for_the_family_id() -> None:
    client = IPVSClient(sock=FamilyKernel())  # type: ignore[arg-type]
    assert client.family_id == 0x2A
    assert client.max_send == (1 << 20) - 1024


# --- error acknowledgements: where the extended-ack TLVs are --------------------------------------


def _request() -> bytes:
    attrs = codec.nested(codec.CMD_ATTR_SERVICE, codec.service_key_attrs(S1.key))
    return codec.message(FAMILY_ID, codec.CMD_NEW_SERVICE, attrs, 9)


@pytest.mark.parametrize("capped", [True, False])
def test_error_message_is_found_with_and_without_cap_ack(capped: bool) -> None:
    data = _error(9, errno.EEXIST, _request(), "Service already exists", capped=capped)
    [(kind, flags, seq, payload)] = list(codec.iter_messages(data))
    assert (kind, seq) == (codec.NLMSG_ERROR, 9)
    assert codec.parse_error(payload, flags) == (errno.EEXIST, "Service already exists")


def test_uncapped_error_without_tlvs_has_no_message() -> None:
    # Without NLM_F_ACK_TLVS, what follows the header is the echoed request, not TLVs (its
    # first attribute, the nested service, must not be read as an extended-ack message).
    data = _error(9, errno.EEXIST, _request(), capped=False)
    [(_kind, flags, _seq, payload)] = list(codec.iter_messages(data))
    assert flags == 0
    assert codec.parse_error(payload, flags) == (errno.EEXIST, "")


def test_plain_ack() -> None:
    [(_kind, flags, _seq, payload)] = list(codec.iter_messages(_error(9, 0, _request())))
    assert codec.parse_error(payload, flags) == (0, "")


def test_overlapping_dumps_resume_the_collector_once_both_are_done() -> None:
    assert gc.isenabled()
    first, second = _paused_gc(), _paused_gc()
    first.__enter__()
    second.__enter__()  # a second thread's dump, started during the first
    first.__exit__(None, None, None)
    assert not gc.isenabled()  # the first one out must not resume it under the second
    second.__exit__(None, None, None)
    assert gc.isenabled()
    gc.disable()
    try:
        with _paused_gc():
            pass
        assert not gc.isenabled()  # disabled by someone else before: left so
    finally:
        gc.enable()


def test_destinations_reads_one_service_and_nothing_for_a_deleted_one() -> None:
    kernel = DumpingKernel([S1, S2], gone={S2.key: errno.ENOENT})
    client = IPVSClient(sock=kernel, family_id=FAMILY_ID)  # type: ignore[arg-type]
    assert client.destinations(S1.key) == list(S1.destinations)
    assert client.destinations(S2.key) == []
    assert not kernel.queue
