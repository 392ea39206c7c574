"""tests/kernel/capture.py's analysis on synthetic events, and its frame decoder on hand-built
frames: what counts as two directors answering for one VIP, and what is a clean handover."""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel"))
from capture import (
    PACKET_OUTGOING,
    SKF_AD_IFINDEX,
    SKF_AD_PKTTYPE,
    Event,
    bpf_program,
    describe,
    first_answer_after,
    overlaps,
    parse_frame,
    responders,
    transitions,
)

VIP = "10.77.1.200"
A, B, C = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c"
CLIENT = "02:00:00:00:00:10"


def probes(start: float, stop: float, every: float = 0.1, vip: str = VIP) -> list[Event]:
    n = round((stop - start) / every)
    return [Event(round(start + i * every, 6), "probe", vip, CLIENT) for i in range(n)]


def replies(mac: str, start: float, stop: float, every: float = 0.1, delay: float = 0.004) -> list[Event]:
    """``mac`` answering each probe of [start, stop) ``delay`` after it."""
    return [Event(round(p.t + delay, 6), "reply", VIP, mac) for p in probes(start, stop, every)]


def garp(mac: str, t: float) -> Event:
    return Event(t, "garp", VIP, mac)


def test_clean_failover_is_no_overlap() -> None:
    # A answers until 1.0 s, nobody for 0.7 s, then B announces and answers.
    events = probes(0, 3) + replies(A, 0, 1.0) + [garp(B, 1.73)] + replies(B, 1.8, 3)
    assert overlaps(events) == []
    assert transitions(events) == [(0.004, A), (1.73, B)]
    first = first_answer_after(events, 1.05)
    assert first is not None and first.mac == B and first.t == 1.73


def test_fast_graceful_handover_within_one_round_is_no_overlap() -> None:
    # A answered probe 10 (t=1.004), released; B announced 20 ms later, in the same round.
    events = probes(0, 2) + replies(A, 0, 1.01) + [garp(B, 1.024)] + replies(B, 1.1, 2)
    assert overlaps(events) == []


def test_both_answering_one_probe_is_same_probe() -> None:
    events = probes(0, 1) + replies(A, 0, 1) + [Event(0.507, "reply", VIP, B)]
    found = overlaps(events)
    assert [(o.kind, o.macs) for o in found] == [("same-probe", (A, B))]
    assert found[0].t == pytest.approx(0.504)


def test_announcing_while_the_other_still_answers_is_interleaved() -> None:
    # B announces at 0.55 while A keeps answering every round: A answered at 0.504 and 0.604.
    events = probes(0, 1) + replies(A, 0, 1) + [garp(B, 0.55)]
    found = overlaps(events)
    assert [(o.kind, o.macs) for o in found] == [("interleaved", (A, B))]
    assert "0.504" in found[0].detail and "0.604" in found[0].detail


def test_interleaving_uses_rounds_when_probes_are_late() -> None:
    # The prober was starved for 0.5 s: A's consecutive answers are 0.5 s apart but in
    # consecutive rounds, so B's announcement between them is still an overlap.
    ps = [Event(t, "probe", VIP, CLIENT) for t in (0.0, 0.1, 0.6, 0.7)]
    events = [*ps, *(Event(p.t + 0.004, "reply", VIP, A) for p in ps), garp(B, 0.3)]
    assert [o.kind for o in overlaps(events, window=0.15)] == ["interleaved"]


def test_flap_without_overlap() -> None:
    # A, then B, then A again, each exclusively for several rounds: transitions, no overlap.
    events = probes(0, 3) + replies(A, 0, 1) + replies(B, 1, 2) + replies(A, 2, 3)
    assert overlaps(events) == []
    assert [m for _, m in transitions(events)] == [A, B, A]


def test_simultaneous_answers() -> None:
    events = [garp(A, 1.0), garp(B, 1.0)]
    assert [o.kind for o in overlaps(events)] == ["simultaneous"]


def test_no_probes_falls_back_to_time_windows() -> None:
    # GARP trains of two directors interleaving (both think they own the VIP).
    events = [garp(A, t) for t in (0.0, 0.1, 0.2)] + [garp(B, t) for t in (0.05, 0.15)]
    found = overlaps(events, window=0.15)
    assert found and all(o.macs == (A, B) for o in found)


def test_overlaps_are_per_vip_and_deduplicated() -> None:
    other = "10.77.1.201"
    events = probes(0, 1) + replies(A, 0, 1)
    events += [Event(e.t, "probe", other, CLIENT) for e in probes(0, 1)]
    events += [Event(e.t + 0.004, "reply", other, B) for e in probes(0, 1)]
    assert overlaps(events) == []  # A has one VIP, B the other
    # B answering VIP every round along with A: one report per run of rounds, not one per round.
    events += replies(B, 0, 1, delay=0.006)
    found = overlaps(events, vip=VIP)
    assert len(found) == 1 and found[0].kind == "same-probe"


def test_responders_window_and_kinds() -> None:
    events = probes(0, 1) + replies(A, 0, 0.5) + [garp(B, 0.7), Event(0.8, "na", VIP, C, solicited=True)]
    got = responders(events, since=0.3, until=0.75)
    assert set(got) == {A, B} and got[B] == [0.7] and all(0.3 <= t < 0.75 for t in got[A])
    assert CLIENT not in responders(events)  # probes are not answers
    text = describe(events, names={A: "dirA"})
    assert "dirA" in text and "probes" in text


def test_solicited_na_counts_as_probe_answer() -> None:
    vip6 = "fd77::200"
    events = [Event(0.0, "probe", vip6, CLIENT), Event(0.01, "na", vip6, A, solicited=True)]
    events.append(Event(0.02, "na", vip6, B, solicited=True))
    assert [o.kind for o in overlaps(events)] == ["same-probe"]
    # Unsolicited NAs are announcements: a handover, not an overlap.
    events = [Event(0.0, "na", vip6, A), Event(0.5, "na", vip6, B)]
    assert overlaps(events) == []


# ---------------------------------------------------------------------- frame decoding


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def arp_frame(op: int, sha: str, spa: str, tha: str, tpa: str, dst: str = "ff:ff:ff:ff:ff:ff") -> bytes:
    eth = mac_bytes(dst) + mac_bytes(sha) + struct.pack("!H", 0x0806)
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + mac_bytes(sha) + socket.inet_aton(spa)
    return eth + body + mac_bytes(tha) + socket.inet_aton(tpa)


def nd_frame(typ: int, src_mac: str, src: str, target: str, flags: int = 0, dst: str = "33:33:ff:00:02:00") -> bytes:
    opt_type = 2 if typ == 136 else 1
    icmp = struct.pack("!BBHI", typ, 0, 0, flags) + ipaddress.IPv6Address(target).packed
    icmp += bytes([opt_type, 1]) + mac_bytes(src_mac)
    ip6 = struct.pack("!IHBB", 0x60000000, len(icmp), 58, 255) + ipaddress.IPv6Address(src).packed
    ip6 += ipaddress.IPv6Address("ff02::1").packed
    return mac_bytes(dst) + mac_bytes(src_mac) + struct.pack("!H", 0x86DD) + ip6 + icmp


VIPS = frozenset({VIP, "fd77::200"})


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (arp_frame(1, CLIENT, "10.77.1.10", "00:00:00:00:00:00", VIP), ("probe", VIP, CLIENT, CLIENT, False)),
        (arp_frame(2, A, VIP, CLIENT, "10.77.1.10", dst=CLIENT), ("reply", VIP, A, A, False)),
        (arp_frame(1, A, VIP, "00:00:00:00:00:00", VIP), ("garp", VIP, A, A, False)),
        (arp_frame(2, A, VIP, A, VIP), ("garp", VIP, A, A, False)),
        (arp_frame(1, B, VIP, "00:00:00:00:00:00", "10.77.1.101"), ("claim", VIP, B, B, False)),
        (nd_frame(136, A, "fd77::2", "fd77::200", 0x60000000), ("na", "fd77::200", A, A, True)),
        (nd_frame(136, A, "fd77::2", "fd77::200", 0x20000000), ("na", "fd77::200", A, A, False)),
        (nd_frame(135, CLIENT, "fd77::10", "fd77::200"), ("probe", "fd77::200", CLIENT, CLIENT, False)),
    ],
)
def test_parse_frame(frame: bytes, expected: tuple[str, str, str, str, bool]) -> None:
    assert parse_frame(frame, VIPS) == [expected]


def test_parse_frame_ignores_other_addresses_and_unicast_requests() -> None:
    assert parse_frame(arp_frame(2, A, "10.77.1.2", CLIENT, "10.77.1.10"), VIPS) == []
    # A unicast re-confirmation from the client's kernel is not a probe round.
    assert parse_frame(arp_frame(1, CLIENT, "10.77.1.10", A, VIP, dst=A), VIPS) == []
    assert parse_frame(b"\0" * 10, VIPS) == []


# ---------------------------------------------------------------------- the kernel-side filter


def run_bpf(program: list[tuple[int, int, int, int]], frame: bytes, pkttype: int, ifindex: int) -> int:
    """A classic BPF interpreter for the few instructions the capture uses."""
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        if code == 0x20:  # ld word: only the ancillary loads are used
            acc = {SKF_AD_PKTTYPE: pkttype, SKF_AD_IFINDEX: ifindex}[k]
        elif code == 0x28:
            acc = struct.unpack_from("!H", frame, k)[0]
        elif code == 0x30:
            acc = frame[k]
        elif code == 0x15:
            pc += jt if acc == k else jf
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
        pc += 1


def test_bpf_keeps_arp_and_icmpv6_entering_a_port() -> None:
    program = bpf_program(drop_outgoing=True, drop_ifindex=7)
    arp = arp_frame(1, CLIENT, "10.77.1.10", "00:00:00:00:00:00", VIP)
    na = nd_frame(136, A, "fd77::2", "fd77::200", 0x60000000)
    tcp = arp[:12] + struct.pack("!H", 0x0800) + bytes(40)
    udp6 = na[:20] + bytes([17]) + na[21:]
    assert run_bpf(program, arp, 0, 3) and run_bpf(program, na, 1, 3)
    assert not run_bpf(program, tcp, 0, 3) and not run_bpf(program, udp6, 0, 3)
    assert not run_bpf(program, arp, PACKET_OUTGOING, 3)  # the bridge's copy out of another port
    assert not run_bpf(program, arp, 1, 7)  # delivered to the bridge device
    # One interface: outgoing frames (the client's own probes) are kept.
    assert run_bpf(bpf_program(drop_outgoing=False, drop_ifindex=0), arp, PACKET_OUTGOING, 3)
