"""The IPVS client: dump the kernel's state and apply plans, many requests per round trip.

``ipvsadm`` and pyroute2's ``IPVS`` send one request and wait for its answer. Here the requests
of a plan are packed into batches sent with one ``send()`` each; the kernel handles every message
of a batch in order and queues one acknowledgement per message, so a failure is reported for its
own operation and never aborts the rest.
"""

from __future__ import annotations

import errno as errno_codes
import os
import select
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from pyroute2.netns import create_socket

from kubelvs.model import Observed, ServiceKey
from kubelvs.netlink import codec
from kubelvs.netlink.messages import ipvs_family_id
from kubelvs.plan import Operation, Verb

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
SO_RCVBUFFORCE = 33
RECEIVE_BUFFER = 8 << 20
BATCH_SIZE = 256  # requests per send(); their acks must fit the receive buffer

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


def encode(op: Operation, family_id: int, seq: int) -> bytes:
    """The request for one operation."""
    if op.verb in _SERVICE_COMMANDS:
        full = op.verb is not Verb.DELETE_SERVICE
        service = codec.service_attrs(op.service) if full else codec.service_key_attrs(op.key)
        return codec.message(family_id, _SERVICE_COMMANDS[op.verb], codec.nested(codec.CMD_ATTR_SERVICE, service), seq)
    assert op.dest is not None
    attrs = codec.nested(codec.CMD_ATTR_SERVICE, codec.service_key_attrs(op.key)) + codec.nested(
        codec.CMD_ATTR_DEST, codec.dest_attrs(op.dest, op.key.family, full=op.verb is not Verb.DELETE_DEST)
    )
    return codec.message(family_id, _DEST_COMMANDS[op.verb], attrs, seq)


class IPVSClient:
    """One generic-netlink socket to IPVS, in this network namespace or a named one."""

    def __init__(self, netns: str | None = None, batch_size: int = BATCH_SIZE) -> None:
        self.family_id = ipvs_family_id()
        self.batch_size = batch_size
        self.sock = create_socket(
            netns=netns, family=socket.AF_NETLINK, socket_type=socket.SOCK_RAW, proto=NETLINK_GENERIC
        )
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        self.sock.bind((0, 0))
        self._seq = 1

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> IPVSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        return self._seq

    # --- reading ---------------------------------------------------------------------------

    def _dump(self, cmd: int, attrs: bytes) -> list[memoryview]:
        """Run one dump; return the genl payload (after the genlmsghdr) of each answer."""
        seq = self._next_seq()
        self.sock.send(codec.message(self.family_id, cmd, attrs, seq, codec.NLM_F_REQUEST | codec.NLM_F_DUMP))
        payloads: list[memoryview] = []
        while True:
            data = self.sock.recv(1 << 20)
            for kind, _flags, msg_seq, payload in codec.iter_messages(data):
                if msg_seq != seq:
                    continue
                if kind == codec.NLMSG_DONE:
                    return payloads
                if kind == codec.NLMSG_ERROR:
                    err, message = codec.parse_error(payload)
                    if err:
                        raise IPVSError(err, f"{os.strerror(err)}{': ' + message if message else ''}")
                    return payloads
                payloads.append(payload[4:])

    def dump(self, with_counters: bool = True) -> Observed:
        """Every virtual service in the kernel with its real servers (and counters)."""
        observed = Observed()
        for payload in self._dump(codec.CMD_GET_SERVICE, b""):
            service, counters = codec.decode_service(payload)
            key = service.key
            request = codec.nested(codec.CMD_ATTR_SERVICE, codec.service_key_attrs(key))
            dests = []
            for dest_payload in self._dump(codec.CMD_GET_DEST, request):
                dest, dest_counters = codec.decode_dest(dest_payload, key.family)
                dests.append(dest)
                if with_counters:
                    observed.dest_counters[key, dest.key] = dest_counters
            observed.services[key] = replace(service, destinations=tuple(dests))
            if with_counters:
                observed.service_counters[key] = counters
        return observed

    # --- writing ---------------------------------------------------------------------------

    def apply(self, operations: Iterable[Operation]) -> ApplyResult:
        """Apply a plan: service operations first, then the real servers of services that exist.

        A real-server request for a service whose ADD_SERVICE failed is not sent, so it can never
        land in a service of the same key that somebody else created meanwhile.
        """
        ops = list(operations)
        result = ApplyResult()
        service_ops = [op for op in ops if op.verb in _SERVICE_COMMANDS]
        self._send_all(service_ops, result)
        failed_keys: set[ServiceKey] = {f.operation.key for f in result.failed if f.operation.verb is Verb.ADD_SERVICE}
        dest_ops: list[Operation] = []
        for op in ops:
            if op.verb in _DEST_COMMANDS:
                (result.skipped if op.key in failed_keys else dest_ops).append(op)
        self._send_all(dest_ops, result)
        return result

    def _send_all(self, ops: Sequence[Operation], result: ApplyResult) -> None:
        for start in range(0, len(ops), self.batch_size):
            batch = ops[start : start + self.batch_size]
            pending: dict[int, Operation] = {}
            chunks = []
            for op in batch:
                seq = self._next_seq()
                pending[seq] = op
                chunks.append(encode(op, self.family_id, seq))
            self.sock.send(b"".join(chunks))
            self._collect_acks(pending, result)

    def _collect_acks(self, pending: dict[int, Operation], result: ApplyResult) -> None:
        while pending:
            ready, _, _ = select.select([self.sock], [], [], 30.0)
            if not ready:
                raise IPVSError(errno_codes.ETIMEDOUT, f"no acknowledgement for {len(pending)} IPVS requests")
            data = self.sock.recv(1 << 20)
            for kind, _flags, seq, payload in codec.iter_messages(data):
                op = pending.pop(seq, None)
                if op is None or kind != codec.NLMSG_ERROR:
                    continue
                err, message = codec.parse_error(payload)
                if err:
                    result.failed.append(Failure(op, err, message))
                else:
                    result.succeeded.append(op)
