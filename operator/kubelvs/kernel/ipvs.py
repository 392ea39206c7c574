"""The IPVS client: dump the kernel's state and apply plans, many requests per round trip.

``ipvsadm`` and pyroute2's ``IPVS`` send one request and wait for its answer. Here the requests
of a plan are packed into batches sent with one ``send()`` each. The kernel handles every message
of a batch in order, within that ``send()``, and a failure is reported for its own operation and
never aborts the rest. Only the last request of a batch asks for an acknowledgement: the kernel
answers every failed request anyway (with its errno), so the one ack tells that the whole batch
was handled, and each error that came before it names the request that failed. That spares the
kernel and us one acknowledgement (and one ``recv()``) per request.
"""

from __future__ import annotations

import errno as errno_codes
import os
import select
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from kubelvs.collector import paused_collector
from kubelvs.core.model import Counters, DestCounters, Destination, DestKey, Observed, ServiceKey, VirtualService
from kubelvs.core.plan import Operation, Verb
from kubelvs.kernel import codec, fastdump
from kubelvs.kernel.codec import NETLINK_CAP_ACK, NETLINK_EXT_ACK, SOL_NETLINK
from kubelvs.kernel.netns import netlink_socket

NETLINK_GENERIC = 16
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
RECEIVE_BUFFER = 8 << 20
SEND_BUFFER = 4 << 20
BATCH_SIZE = 1024  # requests per send()
RECV_SIZE = 1 << 20
ACK_TIMEOUT = 30.0
GENL_NAME = "IPVS"

_SERVICE_COMMANDS = {
    Verb.ADD_SERVICE: codec.CMD_NEW_SERVICE,
    Verb.EDIT_SERVICE: codec.CMD_SET_SERVICE,
    Verb.DELETE_SERVICE: codec.CMD_DEL_SERVICE,
}
_DEST_COMMANDS = {
    Verb.ADD_DEST: codec.CMD_NEW_DEST,
    Verb.EDIT_DEST: codec.CMD_SET_DEST,
    Verb.DELETE_DEST: codec.CMD_DEL_DEST,
}
_MSG_HEAD = struct.Struct("=IHHI")  # nlmsghdr's length, type, flags, seq
_GONE = (errno_codes.ENOENT, errno_codes.ESRCH)  # a GET_DEST whose service was deleted meanwhile


class IPVSError(OSError):
    pass


@dataclass(frozen=True, slots=True)
class Failure:
    operation: Operation
    errno: int
    message: str

    def __str__(self) -> str:
        detail = f": {self.message}" if self.message else ""
        return (
            f"{self.operation}: {os.strerror(self.errno)} ({errno_codes.errorcode.get(self.errno, self.errno)}){detail}"
        )


@dataclass(slots=True)
class ApplyResult:
    succeeded: list[Operation] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    skipped: list[Operation] = field(default_factory=list)  # dest ops of a service that failed

    @property
    def ok(self) -> bool:
        return not self.failed and not self.skipped


def _encode(encoder: codec.RequestEncoder, op: Operation, seq: int, flags: int) -> bytes:
    verb = op.verb
    # Identity tests: Enum members hash in Python code, which a dict lookup per request pays.
    if verb is Verb.ADD_DEST or verb is Verb.EDIT_DEST or verb is Verb.DELETE_DEST:
        dest = op.dest
        if dest is None:
            raise ValueError(f"{op}: a real-server operation without a real server")
        cmd = codec.CMD_NEW_DEST if verb is Verb.ADD_DEST else _DEST_COMMANDS[verb]
        return encoder.dest(cmd, op.service, dest, verb is not Verb.DELETE_DEST, seq, flags)
    return encoder.service(_SERVICE_COMMANDS[verb], op.service, verb is not Verb.DELETE_SERVICE, seq, flags)


def _encode_batch(
    encoder: codec.RequestEncoder,
    ops: Sequence[Operation],
    start: int,
    end: int,
    first: int,
    flags: int,
    max_bytes: int,
) -> tuple[list[bytes], int]:
    """The requests for ``ops[start:end]`` (sequence numbers from ``first`` on), or for as many
    of them as fit in ``max_bytes`` (at least one), and their size. Runs of real-server
    operations of one verb and one service are encoded together (RequestEncoder.dests)."""
    chunks: list[bytes] = []
    size = 0
    index = start
    while index < end:
        op = ops[index]
        verb = op.verb
        cmd = _DEST_COMMANDS.get(verb)
        if cmd is None or op.dest is None:
            encoded = [_encode(encoder, op, first + index - start, flags)]
        else:
            service = op.service
            run_end = index + 1
            while run_end < end and (after := ops[run_end]).service is service and after.verb is verb:
                if after.dest is None:
                    break  # a malformed operation: encoded on its own, _encode raises for it
                run_end += 1
            run: list[Destination] = [o.dest for o in ops[index:run_end]]  # type: ignore[misc]
            encoded = encoder.dests(cmd, service, run, verb is not Verb.DELETE_DEST, first + index - start, flags)
        for chunk in encoded:
            if chunks and size + len(chunk) > max_bytes:
                return chunks, size
            chunks.append(chunk)
            size += len(chunk)
        index += len(encoded)
    return chunks, size


def encode(op: Operation, family_id: int, seq: int) -> bytes:
    """The request for one operation (asking for an acknowledgement)."""
    return _encode(codec.RequestEncoder(family_id), op, seq, codec.NLM_F_REQUEST | codec.NLM_F_ACK)


def _raise_error(err: int, message: str) -> None:
    raise IPVSError(err, f"{os.strerror(err)}{': ' + message if message else ''}")


class IPVSClient:
    """One generic-netlink socket to IPVS, in this network namespace or a named one."""

    def __init__(
        self,
        netns: str | None = None,
        batch_size: int = BATCH_SIZE,
        *,
        sock: socket.socket | None = None,
        family_id: int | None = None,
    ) -> None:
        """Open a socket to IPVS in ``netns`` (None: this thread's namespace), or use ``sock``:
        a netlink socket (or a stand-in for one, in tests) that is already set up and bound,
        with NETLINK_CAP_ACK and NETLINK_EXT_ACK. ``family_id`` skips the family lookup."""
        own = sock is None
        self.sock = netlink_socket(NETLINK_GENERIC, netns) if sock is None else sock
        try:
            if own:
                self._set_up()
            # What one send() may carry, and how many failures the receive buffer can hold
            # (each failed request of a batch queues an error before the batch's final ack).
            self.max_send = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - 1024
            rcvbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            self.batch_size = max(1, min(batch_size, rcvbuf // codec.ERROR_ACK_SPACE - 1))
            self._seq = 1
            self._buffer = bytearray(RECV_SIZE)
            self.family_id = self._family_id(GENL_NAME) if family_id is None else family_id
        except BaseException:
            if own:
                self.sock.close()
            raise

    def _set_up(self) -> None:
        for force, plain, size in (
            (SO_RCVBUFFORCE, socket.SO_RCVBUF, RECEIVE_BUFFER),
            (SO_SNDBUFFORCE, socket.SO_SNDBUF, SEND_BUFFER),
        ):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, force, size)
            except PermissionError:
                self.sock.setsockopt(socket.SOL_SOCKET, plain, size)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        self.sock.bind((0, 0))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> IPVSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        return self._seq

    def _recv(self) -> memoryview:
        """The next datagram (one skb of kernel messages), in a buffer the next call reuses.

        The kernel answers within the send() (and produces a dump's next part within the recv()
        of the previous one), so the answer is nearly always there: one syscall, no select()."""
        try:
            size = self.sock.recv_into(self._buffer, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            if not select.select([self.sock], [], [], ACK_TIMEOUT)[0]:
                raise IPVSError(errno_codes.ETIMEDOUT, "no answer from the kernel's IPVS") from None
            size = self.sock.recv_into(self._buffer)
        return memoryview(self._buffer)[:size]

    def _family_id(self, name: str) -> int:
        """The generic-netlink family id of IPVS (asking for it loads ip_vs if it is a module)."""
        seq = self._next_seq()
        self.sock.send(codec.get_family_request(name, seq))
        family_id = None
        while True:
            for kind, flags, msg_seq, payload in codec.iter_messages(self._recv()):
                if msg_seq != seq:
                    continue
                if kind == codec.GENL_ID_CTRL:
                    family_id = codec.decode_family_id(payload[4:])
                elif kind == codec.NLMSG_ERROR:
                    err, message = codec.parse_error(payload, flags)
                    if err:
                        _raise_error(err, message or f"generic netlink family {name}")
                    if family_id is None:
                        raise IPVSError(errno_codes.ENOENT, f"no generic netlink family {name}")
                    return family_id

    # --- reading ---------------------------------------------------------------------------

    def _dump(
        self, request: bytes, seq: int, decode: Callable[[memoryview, int, int, int], int], gone_ok: bool = False
    ) -> bool:
        """Run one dump; ``decode(view, offset, length, end)`` decodes the answer message at
        ``offset`` (and maybe more, up to ``end``) and returns the offset after what it took.

        True when the dump ran to its end; False when it failed with ENOENT or ESRCH and
        ``gone_ok`` says that means "gone" (the service of a GET_DEST deleted meanwhile)."""
        self.sock.send(request)
        head = _MSG_HEAD.unpack_from
        while True:
            view = self._recv()
            end = len(view)
            offset = 0
            while offset + 16 <= end:
                length, kind, flags, msg_seq = head(view, offset)
                if length < 16:
                    break
                if msg_seq == seq:
                    if kind == codec.NLMSG_DONE:
                        return True
                    if kind == codec.NLMSG_ERROR:
                        err, message = codec.parse_error(view[offset + 16 : offset + length], flags)
                        if err:
                            if gone_ok and err in _GONE:
                                return False
                            _raise_error(err, message)
                        return True
                    offset = decode(view, offset, length, end)
                else:
                    offset += (length + 3) & ~3

    def _get_services_request(self, seq: int) -> bytes:
        return codec.message(self.family_id, codec.CMD_GET_SERVICE, b"", seq, codec.NLM_F_REQUEST | codec.NLM_F_DUMP)

    def count_services(self) -> int:
        """How many virtual services the kernel holds (one dump, nothing decoded; for the benches)."""
        count = 0

        def on_service(view: memoryview, offset: int, length: int, end: int) -> int:
            nonlocal count
            count += 1
            return offset + ((length + 3) & ~3)

        seq = self._next_seq()
        self._dump(self._get_services_request(seq), seq, on_service)
        return count

    def destinations(self, key: ServiceKey) -> list[Destination]:
        """The real servers of one virtual service (a dump of that service only: the director
        benchmark polls one rule per change, where a full dump would be the measurement)."""
        found: list[Destination] = []

        def on_dest(view: memoryview, offset: int, length: int, end: int) -> int:
            found.append(codec.decode_dest(view[offset + 20 : offset + length], key.family)[0])
            return offset + ((length + 3) & ~3)

        seq = self._next_seq()
        self._dump(codec.RequestEncoder(self.family_id).get_dests(key, seq), seq, on_dest, gone_ok=True)
        return found

    def dump(self, with_counters: bool = True, *, fast: bool = True) -> Observed:
        """Every virtual service in the kernel with its real servers (and counters).

        A foreign service deleted between the service dump and its real-server dump is left
        out. ``fast=False`` decodes every message with the plain decoders (for the benches and
        tests; the result is the same)."""
        with paused_collector():
            if fast:
                return self._dump_fast(with_counters)
            return self._dump_plain(with_counters)

    def _dump_plain(self, with_counters: bool) -> Observed:
        observed = Observed()
        heads: list[tuple[VirtualService, Counters]] = []

        def on_service(view: memoryview, offset: int, length: int, end: int) -> int:
            heads.append(codec.decode_service(view[offset + 20 : offset + length]))
            return offset + ((length + 3) & ~3)

        seq = self._next_seq()
        self._dump(self._get_services_request(seq), seq, on_service)

        encoder = codec.RequestEncoder(self.family_id)
        found: list[tuple[Destination, DestCounters]] = []
        family = 0

        def on_dest(view: memoryview, offset: int, length: int, end: int) -> int:
            found.append(codec.decode_dest(view[offset + 20 : offset + length], family))
            return offset + ((length + 3) & ~3)

        for service, service_counters in heads:
            key = service.key
            family = key.family
            seq = self._next_seq()
            found.clear()
            if not self._dump(encoder.get_dests(key, seq), seq, on_dest, gone_ok=True):
                continue
            observed.services[key] = replace(service, destinations=tuple(dest for dest, _ in found))
            if with_counters:
                observed.service_counters[key] = service_counters
                for dest, dest_counters in found:
                    observed.dest_counters[key, dest.key] = dest_counters
        return observed

    def _dump_fast(self, with_counters: bool) -> Observed:
        observed = Observed()
        heads: list[fastdump.ServiceSettings] = []
        services = fastdump.ServiceDecoder(with_counters)
        dests = fastdump.DestDecoder(with_counters)

        def on_service(view: memoryview, offset: int, length: int, end: int) -> int:
            decoded = services.decode_settings(view, offset, length)
            if decoded is None:
                service, counters = codec.decode_service(view[offset + 20 : offset + length])
                decoded = (
                    service.key,
                    service.scheduler,
                    service.sched_flags,
                    service.persistence_timeout,
                    service.netmask,
                    counters,
                )
            heads.append(decoded)
            return offset + ((length + 3) & ~3)

        seq = self._next_seq()
        self._dump(self._get_services_request(seq), seq, on_service)

        encoder = codec.RequestEncoder(self.family_id)
        found: list[Destination] = []
        counters: list[tuple[tuple[ServiceKey, DestKey], DestCounters]] | None = [] if with_counters else None
        key = ServiceKey(0, 0, "", 0)

        def on_dest(view: memoryview, offset: int, length: int, end: int) -> int:
            after = dests.decode_run(view, offset, length, end, key, found, counters)
            if after == offset:  # a message the fast path does not decode
                dest, dest_counters = codec.decode_dest(view[offset + 20 : offset + length], key.family)
                found.append(dest)
                if counters is not None:
                    counters.append(((key, dest.key), dest_counters))
                after = offset + ((length + 3) & ~3)
            return after

        all_services = observed.services
        for key, scheduler, sched_flags, timeout, netmask, service_counters in heads:
            seq = self._next_seq()
            found.clear()
            if counters is not None:
                counters.clear()
            if not self._dump(encoder.get_dests(key, seq), seq, on_dest, gone_ok=True):
                continue
            all_services[key] = VirtualService(key, scheduler, sched_flags, timeout, netmask, tuple(found))
            if counters is not None:
                assert service_counters is not None
                observed.service_counters[key] = service_counters
                observed.dest_counters.update(counters)
        return observed

    # --- writing ---------------------------------------------------------------------------

    def apply(self, operations: Iterable[Operation]) -> ApplyResult:
        """Apply a plan: service operations first, then the real servers of services that exist.

        A real-server request for a service whose ADD_SERVICE failed is not sent, so it can never
        land in a service of the same key that somebody else created meanwhile.
        """
        ops = list(operations)
        result = ApplyResult()
        encoder = codec.RequestEncoder(self.family_id)
        service_ops = [op for op in ops if op.verb in _SERVICE_COMMANDS]
        self._send_all(encoder, service_ops, result)
        failed_keys: set[ServiceKey] = {f.operation.key for f in result.failed if f.operation.verb is Verb.ADD_SERVICE}
        if failed_keys:
            dest_ops: list[Operation] = []
            for op in ops:
                if op.verb in _DEST_COMMANDS:
                    (result.skipped if op.key in failed_keys else dest_ops).append(op)
        else:
            dest_ops = [op for op in ops if op.verb in _DEST_COMMANDS]
        self._send_all(encoder, dest_ops, result)
        return result

    def _send_all(self, encoder: codec.RequestEncoder, ops: Sequence[Operation], result: ApplyResult) -> None:
        flags = codec.NLM_F_REQUEST
        total = len(ops)
        start = 0
        while start < total:
            if self._seq + self.batch_size >= 0x7FFFFFFF:
                self._seq = 0  # keep a batch's sequence numbers consecutive
            first = self._seq + 1
            chunks, size = _encode_batch(
                encoder, ops, start, min(total, start + self.batch_size), first, flags, self.max_send
            )
            # The last request of the batch asks for the acknowledgement that closes it.
            data = bytearray().join(chunks)
            codec.NLMSG_FLAGS.pack_into(data, size - len(chunks[-1]) + 6, flags | codec.NLM_F_ACK)
            self._seq = first + len(chunks) - 1
            self.sock.send(data)
            self._collect(ops, start, first, len(chunks), result)
            start += len(chunks)

    def _collect(self, ops: Sequence[Operation], start: int, first: int, count: int, result: ApplyResult) -> None:
        """Read the answers of one batch: errors of failed requests, then the final ack."""
        last = first + count - 1
        failures: dict[int, tuple[int, str]] = {}
        while True:
            try:
                view = self._recv()
            except OSError as error:
                if error.errno == errno_codes.ENOBUFS:
                    raise IPVSError(
                        errno_codes.ENOBUFS, "IPVS answers were lost (receive buffer overrun): the outcome is unknown"
                    ) from error
                raise
            for kind, msg_flags, seq, payload in codec.iter_messages(view):
                if kind != codec.NLMSG_ERROR or not first <= seq <= last:
                    continue
                err, message = codec.parse_error(payload, msg_flags)
                if err:
                    failures[seq - first] = (err, message)
                if seq == last:
                    batch = ops[start : start + count]
                    if not failures:
                        result.succeeded.extend(batch)
                        return
                    for index, op in enumerate(batch):
                        failure = failures.get(index)
                        if failure is None:
                            result.succeeded.append(op)
                        else:
                            result.failed.append(Failure(op, *failure))
                    return
