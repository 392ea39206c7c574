"""The direct peer heartbeat on real UDP sockets (loopback): beats, acknowledgements, restarts."""

from __future__ import annotations

import asyncio
import socket
import time

from kubelvs.director.peers import PeerChannel, PeerState


def _free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind(("::", 0))
        return int(sock.getsockname()[1])


def test_beats_are_heard_and_acknowledged() -> None:
    async def scenario() -> None:
        port_a, port_b = _free_port(), _free_port()
        heard: list[tuple[str, str]] = []
        a = await PeerChannel.open(PeerState("a"), port_a, lambda node, source: heard.append((node, source)))
        b = await PeerChannel.open(PeerState("b"), port_b, lambda node, source: heard.append((node, source)))
        try:
            sent_at = time.monotonic()
            a.beat(sent_at, {("127.0.0.1", port_b)})
            deadline = time.monotonic() + 5
            while ("a", "127.0.0.1") not in heard and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert ("a", "127.0.0.1") in heard
            b.beat(time.monotonic(), {("127.0.0.1", port_a)})  # carries b's acknowledgement of a's beat
            while "b" not in a.state.acked_at and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert a.state.acked_at["b"] == sent_at  # the send time of the beat b heard, on a's clock
        finally:
            a.close()
            b.close()

    asyncio.run(scenario())


def test_garbage_own_beats_and_restarts() -> None:
    state = PeerState("a")
    assert state.receive(b"not json") is None
    assert state.receive(b'{"node": "a", "seq": 1}') is None  # our own, looped back
    assert state.receive(b'{"node": "b", "seq": 7, "acks": {"a": 99}}') == "b"
    assert "b" not in state.acked_at  # 99 was never sent by us
    assert state.receive(b'{"node": "b", "seq": 1}') == "b" and state.heard["b"] == 1  # b restarted
