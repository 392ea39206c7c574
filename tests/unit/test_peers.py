"""The direct peer heartbeat on real UDP sockets (loopback): beats, acknowledgements, restarts."""

from __future__ import annotations

import asyncio
import socket
import time

from kubelvs.director.peers import Heard, PeerChannel, PeerState


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
            # b answered at once, without a beat of its own: its acknowledgement of a's beat
            while "b" not in a.state.acked_at and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert a.state.acked_at["b"] == sent_at  # the send time of the beat b heard, on a's clock
            assert ("b", "127.0.0.1") in heard and b.state.seq == 0
            await asyncio.sleep(0.1)  # a reply is not answered: no ping-pong
            assert heard.count(("a", "127.0.0.1")) == 1 and heard.count(("b", "127.0.0.1")) == 1
            later = time.monotonic()
            b.beat(later, {("127.0.0.1", port_a)})  # b's own beats are acknowledged the same way
            while b.state.acked_at.get("a") != later and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert b.state.acked_at["a"] == later
        finally:
            a.close()
            b.close()

    asyncio.run(scenario())


def test_garbage_own_beats_and_restarts() -> None:
    state = PeerState("a")
    assert state.receive(b"not json") is None
    assert state.receive(b'{"node": "a", "seq": 1}') is None  # our own, looped back
    assert state.receive(b'{"node": "b", "seq": 7, "acks": {"a": 99}}') == Heard("b", answer=True)
    assert "b" not in state.acked_at  # 99 was never sent by us
    assert state.receive(b'{"node": "b", "seq": 1}') == Heard("b", answer=True) and state.heard["b"] == 1  # restarted
    assert state.receive(state_of("b", 1).reply()) == Heard("b", answer=False)  # replies are not answered


def state_of(node: str, seq: int) -> PeerState:
    state = PeerState(node)
    for _ in range(seq):
        state.next_beat(0.0)
    return state
