"""The direct heartbeat between directors: small UDP beats on the segment they share.

It answers one question the API cannot answer when it is away: "do my peers still hear me?".
Each beat carries the sender's sequence number and, per peer, the newest sequence it heard
from that peer (its acknowledgements). A beat is answered at once with an acknowledgement (a
reply, never itself answered): waiting for the peer's own next beat would age the evidence by up
to a retry period, a third of the tuned renew deadline. An owner that cannot renew its heartbeat Lease keeps its
VIPs while every director it knows acknowledges its recent beats (those directors, hearing it,
will not take its VIPs over); one cut off from both the API and its peers releases. The beats
carry no authority beyond that (an unauthenticated beat can only delay a takeover, never cause
one): keep the port on the directors' segment (a reply goes to the beat's source, one for one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("kubelvs.director.peers")

MAX_BEAT = 8192
_SENT_KEPT = 256  # send times of our recent beats, to turn an acknowledged sequence into a time


@dataclass(frozen=True, slots=True)
class Heard:
    node: str
    answer: bool  # a beat, to be answered with a reply (a reply is not)


@dataclass(slots=True)
class PeerState:
    """Sequence numbers and times (the owner's monotonic clock) of the beats exchanged."""

    node: str
    seq: int = 0
    sent_at: dict[int, float] = field(default_factory=dict)  # our seq -> when we sent it
    heard: dict[str, int] = field(default_factory=dict)  # peer -> newest seq heard from it
    acked_at: dict[str, float] = field(default_factory=dict)  # peer -> send time of our newest beat it acked

    def next_beat(self, now: float) -> bytes:
        self.seq += 1
        self.sent_at[self.seq] = now
        if len(self.sent_at) > _SENT_KEPT:
            del self.sent_at[min(self.sent_at)]
        return json.dumps({"v": 1, "node": self.node, "seq": self.seq, "acks": self.heard}).encode()

    def reply(self) -> bytes:
        """Our acknowledgements now, as an answer to a beat (no new sequence number)."""
        return json.dumps({"v": 1, "node": self.node, "seq": self.seq, "acks": self.heard, "reply": True}).encode()

    def receive(self, data: bytes) -> Heard | None:
        """Take one beat or reply; return who sent it (None: not a beat, or our own)."""
        try:
            beat = json.loads(data)
            node, seq, acks = str(beat["node"]), int(beat["seq"]), beat.get("acks") or {}
        except (ValueError, KeyError, TypeError):
            return None
        if node == self.node:
            return None
        if seq > self.heard.get(node, 0) or seq == 1:  # seq 1: the peer restarted
            self.heard[node] = seq
        acked = acks.get(self.node) if isinstance(acks, dict) else None
        if isinstance(acked, int) and acked in self.sent_at:
            self.acked_at[node] = max(self.acked_at.get(node, self.sent_at[acked]), self.sent_at[acked])
        return Heard(node, answer=beat.get("reply") is not True)


class PeerChannel(asyncio.DatagramProtocol):
    """One UDP socket: beats out to every peer address, beats in from anyone."""

    def __init__(self, state: PeerState, on_beat: Callable[[str, str], None]) -> None:
        self.state = state
        self.on_beat = on_beat  # (node, source address)
        self.transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(cls, state: PeerState, port: int, on_beat: Callable[[str, str], None]) -> PeerChannel:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 peers too (mapped)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", port))
        transport, protocol = await loop.create_datagram_endpoint(lambda: cls(state, on_beat), sock=sock)
        protocol.transport = transport  # connection_made comes later, from the loop
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport (not a subclass in 3.11)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if len(data) > MAX_BEAT:
            return
        heard = self.state.receive(data)
        if heard is None:
            return
        if heard.answer and self.transport is not None:
            try:
                self.transport.sendto(self.state.reply(), addr)
            except OSError as error:
                log.debug("peer reply to %s: %s", addr[0], error)
        self.on_beat(heard.node, str(addr[0]).removeprefix("::ffff:"))

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable from a peer that is away
        log.debug("peer beat: %s", exc)

    def beat(self, now: float, addresses: set[tuple[str, int]]) -> None:
        if self.transport is None:
            return
        data = self.state.next_beat(now)
        for host, port in addresses:
            target = host if ":" in host else f"::ffff:{host}"
            try:
                self.transport.sendto(data, (target, port))
            except OSError as error:
                log.debug("peer beat to %s: %s", host, error)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
