"""Who answers for a VIP, and when: an ARP/NDP capture, an active prober, and the analysis.

Standard library only (also used by bench/ha_bench.py and unit-tested on the host).

**Where to capture.** ``Capture(netns="<p>sw")`` listens on every port of the switch's bridge at
once (one unbound ``AF_PACKET`` socket in the switch namespace) and keeps each frame once, on the
port it *entered* the bridge by (frames the bridge sends out of a port, ``PACKET_OUTGOING``, and
copies delivered to ``br0`` itself are skipped). That is the place to prove "at no moment do two
directors answer": it sees every director's frames, including ARP replies unicast to someone else
and announcements a director sends while its link to the client is fine, and it names the
sender by bridge port as well as by MAC (a director forging another's MAC would still show).
A client-side capture (``iface="eth0"`` in the client's namespace) sees only what reaches the
client; it is supported, but the bridge is the default in the HA tests and benchmark.

**What is recorded** (``Event.kind``), for the watched VIPs only:

- ``probe``: a broadcast ARP request / multicast neighbour solicitation for the VIP (the
  :class:`Prober`'s, or any other node's): the start of a probe round;
- ``reply``: an ARP reply whose sender IP is the VIP (an answer to someone's request);
- ``garp``: a gratuitous ARP (sender IP == target IP == VIP, request or reply form);
- ``claim``: an ARP request or NS that uses the VIP as its sender address (it updates the
  receivers' caches just like an announcement);
- ``na``: a neighbour advertisement for the VIP; ``solicited`` tells an answer (S flag) from an
  unsolicited announcement.

Times are monotonic seconds (``time.monotonic()``'s clock), from the kernel's receive timestamp
(SO_TIMESTAMPNS, mapped from the real-time clock), so a capture thread starved by the emulator
does not shift them.

**Analysis** (pure functions of the events, unit-tested in tests/unit/test_capture_analysis.py):
:func:`responders`, :func:`overlaps`, :func:`first_answer_after`, :func:`transitions`.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import ipaddress
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

ETH_P_ALL = 0x0003
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
PACKET_OUTGOING = 4
SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_TIMESTAMPNS = 35
SO_ATTACH_FILTER = 26
CLONE_NEWNET = 0x40000000
BROADCAST = "ff:ff:ff:ff:ff:ff"
NA_SOLICITED = 0x40000000
NA_OVERRIDE = 0x20000000

ANSWER_KINDS = frozenset({"reply", "garp", "claim", "na"})

SO_RCVBUFFORCE = 33
SKF_AD_PKTTYPE = 0xFFFFF000 + 4  # classic BPF ancillary loads (SKF_AD_OFF + ...)
SKF_AD_IFINDEX = 0xFFFFF000 + 8


def bpf_program(drop_outgoing: bool, drop_ifindex: int) -> list[tuple[int, int, int, int]]:
    """Classic BPF: keep ARP and ICMPv6 (IPv6 next header 58, no extension headers), drop the
    rest, so HTTP probes and keepalived's VRRP never wake the capture thread.  On a capture of
    every bridge port, also drop in the kernel what would be skipped anyway: the copies the
    bridge sends out of the other ports (PACKET_OUTGOING) and those delivered to the bridge
    device itself (``drop_ifindex``): a broadcast would otherwise be read once per port."""
    return [
        (0x20, 0, 0, SKF_AD_PKTTYPE),  # ld pkttype
        (0x15, 8, 0, PACKET_OUTGOING if drop_outgoing else 0xFFFF),  # jeq OUTGOING -> drop
        (0x20, 0, 0, SKF_AD_IFINDEX),  # ld ifindex
        (0x15, 6, 0, drop_ifindex or 0xFFFFFFFF),  # jeq excluded -> drop
        (0x28, 0, 0, 12),  # ldh [12]  ethertype
        (0x15, 3, 0, ETH_P_ARP),  # jeq ARP -> accept
        (0x15, 0, 3, ETH_P_IPV6),  # jeq IPv6 else drop
        (0x30, 0, 0, 20),  # ldb [20]  IPv6 next header
        (0x15, 0, 1, 58),  # jeq ICMPv6 else drop
        (0x06, 0, 0, 0x40000),  # accept
        (0x06, 0, 0, 0),  # drop
    ]


@dataclass(frozen=True, slots=True)
class Event:
    """One frame about a watched VIP.  ``mac`` is the hardware address a client would learn
    (ARP sender / NA target link-layer option, else the Ethernet source); ``src_mac`` the
    Ethernet source; ``port`` the bridge port it entered by ("" on a one-interface capture)."""

    t: float
    kind: str
    vip: str
    mac: str
    src_mac: str = ""
    port: str = ""
    solicited: bool = False

    @property
    def is_answer(self) -> bool:
        return self.kind in ANSWER_KINDS

    @property
    def answers_probe(self) -> bool:
        """An answer to a request (ARP reply, solicited NA), as opposed to an announcement."""
        return self.kind == "reply" or (self.kind == "na" and self.solicited)


@dataclass(frozen=True, slots=True)
class Overlap:
    """Two MACs answering for one VIP at one moment.  ``kind``: ``same-probe`` (both answered
    one probe round), ``interleaved`` (one answered on both sides of the other's answer or
    announcement, i.e. it still answered after the other claimed the VIP), or ``simultaneous``
    (two answers with the same timestamp)."""

    t: float
    vip: str
    kind: str
    macs: tuple[str, ...]
    detail: str = ""


# =========================================================================== analysis (pure)


def _for_vip(events: Iterable[Event], vip: str | None) -> list[Event]:
    return sorted((e for e in events if vip is None or e.vip == _norm(vip)), key=lambda e: e.t)


def _norm(addr: str) -> str:
    return str(ipaddress.ip_address(addr))


def responders(
    events: Iterable[Event], since: float = float("-inf"), until: float = float("inf"), vip: str | None = None
) -> dict[str, list[float]]:
    """MAC -> times of its answers and announcements for ``vip`` (all VIPs if None) in
    [since, until)."""
    out: dict[str, list[float]] = {}
    for e in _for_vip(events, vip):
        if e.is_answer and since <= e.t < until:
            out.setdefault(e.mac, []).append(e.t)
    return out


def first_answer_after(
    events: Iterable[Event], t: float, mac: str | None = None, vip: str | None = None
) -> Event | None:
    """The first answer or announcement at or after ``t`` (from ``mac`` if given)."""
    for e in _for_vip(events, vip):
        if e.t >= t and e.is_answer and (mac is None or e.mac == mac):
            return e
    return None


def transitions(events: Iterable[Event], vip: str | None = None) -> list[tuple[float, str]]:
    """(time, mac) each time the answering MAC changes, starting with the first answer."""
    out: list[tuple[float, str]] = []
    for e in _for_vip(events, vip):
        if e.is_answer and (not out or out[-1][1] != e.mac):
            out.append((e.t, e.mac))
    return out


def overlaps(events: Iterable[Event], window: float = 0.15, vip: str | None = None) -> list[Overlap]:
    """Moments when two distinct MACs answered for one VIP (split brain), per VIP.

    A probe round is the time from one ``probe`` event to the next (``window`` seconds stand in
    for rounds where there are no probes).  Reported:

    - ``same-probe``: two MACs answered requests (ARP reply / solicited NA) within one round;
    - ``interleaved``: MAC X answered or announced, and MAC Y answered both before and after it
      within consecutive rounds (or ``window`` seconds): Y still answered after X claimed the
      VIP.  A clean handover (every answer of the old MAC before every answer of the new one,
      however close) is not an overlap;
    - ``simultaneous``: answers of two MACs with the very same timestamp.

    Consecutive findings for the same MACs and kind within one window are reported once.
    """
    evs = list(events)
    vips = sorted({e.vip for e in evs}) if vip is None else [_norm(vip)]
    found: list[Overlap] = []
    for v in vips:
        found += _overlaps_one(_for_vip(evs, v), v, window)
    return sorted(found, key=lambda o: o.t)


def _overlaps_one(evs: list[Event], vip: str, window: float) -> list[Overlap]:
    probes = [e.t for e in evs if e.kind == "probe"]
    answers = [e for e in evs if e.is_answer]

    def round_of(t: float) -> int:
        # Round k starts at the k-th probe (k >= 0); -1 before the first one.
        if probes:
            return bisect.bisect_right(probes, t) - 1
        return int(t // window) if window > 0 else 0

    raw: list[Overlap] = []
    # same-probe: two MACs answering requests in one round.
    by_round: dict[int, dict[str, float]] = {}
    for e in answers:
        if e.answers_probe:
            by_round.setdefault(round_of(e.t), {}).setdefault(e.mac, e.t)
    same: set[tuple[int, str]] = set()  # (round, mac) already reported as same-probe
    for r, macs in sorted(by_round.items()):
        if len(macs) > 1 and (r >= 0 or not probes):
            t = min(macs.values())
            raw.append(Overlap(t, vip, "same-probe", tuple(sorted(macs)), f"round {r}"))
            same.update((r, m) for m in macs)
    # interleaved / simultaneous: Y answering on both sides of X's answer.
    times: dict[str, list[float]] = {}
    for e in answers:
        times.setdefault(e.mac, []).append(e.t)
    for x in answers:
        if (round_of(x.t), x.mac) in same:
            continue  # the same moment, already a same-probe finding
        for mac, ts in times.items():
            if mac == x.mac:
                continue
            i = bisect.bisect_left(ts, x.t)
            if i < len(ts) and ts[i] == x.t:
                raw.append(Overlap(x.t, vip, "simultaneous", tuple(sorted((x.mac, mac))), f"{x.kind} at {x.t:.3f}"))
                continue
            if i == 0 or i == len(ts):
                continue
            before, after = ts[i - 1], ts[i]
            if after - before <= window or (probes and round_of(after) - round_of(before) <= 1):
                raw.append(
                    Overlap(
                        x.t,
                        vip,
                        "interleaved",
                        tuple(sorted((x.mac, mac))),
                        f"{mac} answered at {before:.3f} and {after:.3f}, around {x.mac}'s {x.kind} at {x.t:.3f}",
                    )
                )
    raw.sort(key=lambda o: o.t)
    out: list[Overlap] = []
    last: dict[tuple[str, tuple[str, ...]], float] = {}
    for o in raw:
        key = (o.kind, o.macs)
        if key in last and o.t - last[key] <= max(window, 0.0) * 2:
            last[key] = o.t
            continue
        last[key] = o.t
        out.append(o)
    return out


def describe(
    events: Sequence[Event], since: float = float("-inf"), names: Mapping[str, str] | None = None, limit: int = 40
) -> str:
    """The answers and announcements since ``since``, and the probe count, as text for a
    failure message (MACs shown with their node names)."""
    names = names or {}
    evs = [e for e in events if e.t >= since]
    probes = sum(1 for e in evs if e.kind == "probe")
    answers = [e for e in evs if e.is_answer]
    lines = [f"{len(answers)} answers/announcements, {probes} probes since {since:.3f}"]
    for mac, ts in responders(evs).items():
        lines.append(f"  {names.get(mac, mac)} ({mac}): {len(ts)} from {ts[0]:.3f} to {ts[-1]:.3f}")
    for e in answers[-limit:]:
        who = names.get(e.mac, e.mac)
        lines.append(f"  {e.t:.3f} {e.kind}{'(S)' if e.solicited else ''} {e.vip} by {who} via port {e.port or '-'}")
    return "\n".join(lines)


# =========================================================================== frame decoding


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def parse_frame(frame: bytes, vips: frozenset[str]) -> list[tuple[str, str, str, str, bool]]:
    """(kind, vip, mac, src_mac, solicited) for a frame about one of ``vips`` (normalised
    addresses); empty for anything else."""
    if len(frame) < 14:
        return []
    src = _mac(frame[6:12])
    dst = _mac(frame[0:6])
    etype = struct.unpack_from("!H", frame, 12)[0]
    if etype == ETH_P_ARP and len(frame) >= 42:
        htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", frame, 14)
        if htype != 1 or ptype != 0x0800 or hlen != 6 or plen != 4:
            return []
        sha = _mac(frame[22:28])
        spa = socket.inet_ntoa(frame[28:32])
        tpa = socket.inet_ntoa(frame[38:42])
        if spa in vips and tpa == spa:
            return [("garp", spa, sha, src, False)]
        if spa in vips and op == 2:
            return [("reply", spa, sha, src, False)]
        if spa in vips:
            return [("claim", spa, sha, src, False)]
        if op == 1 and tpa in vips and dst == BROADCAST:
            return [("probe", tpa, sha, src, False)]
        return []
    if etype == ETH_P_IPV6 and len(frame) >= 54 + 24 and frame[20] == 58:
        ip_src = socket.inet_ntop(socket.AF_INET6, frame[22:38])
        icmp = frame[54:]
        typ = icmp[0]
        if typ not in (135, 136) or len(icmp) < 24:
            return []
        target = socket.inet_ntop(socket.AF_INET6, icmp[8:24])
        lladdr = ""
        opts = icmp[24:]
        want = 2 if typ == 136 else 1  # target / source link-layer address option
        while len(opts) >= 8 and opts[1]:
            if opts[0] == want and len(opts) >= 8:
                lladdr = _mac(opts[2:8])
            opts = opts[opts[1] * 8 :]
        if typ == 136 and target in vips:
            flags = struct.unpack_from("!I", icmp, 4)[0]
            return [("na", target, lladdr or src, src, bool(flags & NA_SOLICITED))]
        if typ == 135 and ip_src in vips:
            return [("claim", ip_src, lladdr or src, src, False)]
        if typ == 135 and target in vips and frame[0] == 0x33:  # multicast solicitation
            return [("probe", target, lladdr or src, src, False)]
    return []


# =========================================================================== sockets in a netns

_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(netns: str | None) -> Iterator[None]:
    """Run the body with the calling thread in ``netns`` (a name under /run/netns); sockets
    made there stay in it.  ``setns`` changes only the calling thread."""
    if netns is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(netns if netns.startswith("/") else f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {netns}: {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:  # never leave this thread elsewhere
                err = ctypes.get_errno()
                raise OSError(err, f"setns back: {os.strerror(err)}")
    finally:
        os.close(target)
        os.close(own)


def enter_netns(netns: str) -> None:
    """Move the calling thread into ``netns`` for good (for a dedicated thread that makes all
    its sockets there)."""
    fd = os.open(netns if netns.startswith("/") else f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {netns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _attach_bpf(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    prog = (ctypes.c_ubyte * (8 * len(program)))()
    for i, (code, jt, jf, k) in enumerate(program):
        struct.pack_into("=HBBI", prog, 8 * i, code, jt, jf, k)
    fprog = struct.pack("@HP", len(program), ctypes.addressof(prog))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


# =========================================================================== capture


@dataclass
class Capture:
    """Background capture of ARP/NDP frames about ``vips`` in ``netns``.

    ``iface`` None: every interface of the namespace except ``exclude`` (the bridge device), each
    frame taken on the port it entered by; else that interface only.  ``names`` maps MACs to
    node names for messages.  Use as a context manager, or start()/stop().
    """

    netns: str | None
    vips: Iterable[str]
    iface: str | None = None
    exclude: tuple[str, ...] = ("br0",)
    names: dict[str, str] = field(default_factory=dict)
    _events: list[Event] = field(default_factory=list, init=False, repr=False)
    _times: list[float] = field(default_factory=list, init=False, repr=False)
    _marks: list[tuple[float, str]] = field(default_factory=list, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _sock: socket.socket | None = field(default=None, init=False, repr=False)
    error: BaseException | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.vips = frozenset(_norm(v) for v in self.vips)

    def watch(self, *vips: str) -> None:
        """Watch more VIPs from now on."""
        with self._lock:
            self.vips = frozenset({*self.vips, *(_norm(v) for v in vips)})

    def start(self) -> Capture:
        with in_netns(self.netns):
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            excluded = 0
            if self.iface is None and self.exclude:
                with contextlib.suppress(OSError):
                    excluded = socket.if_nametoindex(self.exclude[0])
        try:  # past net.core.rmem_max (we are root): an emulated VM can starve this thread
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        _attach_bpf(sock, bpf_program(self.iface is None, excluded))
        if self.iface is not None:
            with in_netns(self.netns):
                sock.bind((self.iface, ETH_P_ALL))
        # Drain what arrived before the filter was attached.
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                sock.recv(65535)
        self._sock = sock
        self._offset = time.monotonic() - time.time()
        self._thread = threading.Thread(target=self._run, name=f"capture-{self.netns}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        sock = self._sock
        assert sock is not None
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([sock], [], [], 0.2)
                if not ready:
                    continue
                while True:
                    try:
                        frame, anc, _flags, addr = sock.recvmsg(65535, 64)
                    except BlockingIOError:
                        break
                    self._handle(frame, anc, addr)
        except BaseException as exc:  # reported by stop() and check()
            self.error = exc

    def _handle(self, frame: bytes, anc: list[tuple[int, int, bytes]], addr: tuple[object, ...]) -> None:
        ifname, pkttype = str(addr[0]), int(addr[2])  # type: ignore[call-overload]
        if pkttype == PACKET_OUTGOING or (self.iface is None and ifname in self.exclude):
            return
        t = None
        for level, ctype, data in anc:
            if level == socket.SOL_SOCKET and ctype == SO_TIMESTAMPNS and len(data) >= 16:
                sec, nsec = struct.unpack("@qq", data[:16])
                t = sec + nsec / 1e9 + self._offset
        if t is None:
            t = time.monotonic()
        vips = self.vips
        assert isinstance(vips, frozenset)
        for kind, vip, mac, src, solicited in parse_frame(frame, vips):
            ev = Event(t, kind, vip, mac, src, ifname if self.iface is None else "", solicited)
            with self._lock:
                self._events.append(ev)
                self._times.append(t)

    def stats(self) -> tuple[int, int]:
        """(frames, drops) the kernel counted for this socket since the last call."""
        if self._sock is None:
            return (0, 0)
        raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        packets, drops = struct.unpack("=II", raw)
        return packets, drops

    def check(self) -> None:
        """Raise if the capture thread died."""
        if self.error is not None:
            raise RuntimeError(f"capture in {self.netns} failed: {self.error!r}") from self.error

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- queries
    def mark(self, label: str) -> float:
        """Record a labelled moment (a fault, a heal) and return its monotonic time."""
        t = time.monotonic()
        with self._lock:
            self._marks.append((t, label))
        return t

    @property
    def marks(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self._marks)

    # Frames arrive nearly in timestamp order (a few ms apart across ports at most): searching
    # this much earlier than ``since`` finds them all without scanning a long run's history.
    _ORDER_SLACK = 1.0

    def events(self, since: float = float("-inf"), until: float = float("inf")) -> list[Event]:
        with self._lock:
            start = bisect.bisect_left(self._times, since - self._ORDER_SLACK) if since > float("-inf") else 0
            return [e for e in self._events[start:] if since <= e.t < until]

    def clear(self) -> None:
        with self._lock:
            self._events.clear()
            self._times.clear()
            self._marks.clear()

    def responders(
        self, since: float = float("-inf"), until: float = float("inf"), vip: str | None = None
    ) -> dict[str, list[float]]:
        return responders(self.events(since, until), since, until, vip)

    def overlaps(
        self, window: float = 0.15, since: float = float("-inf"), until: float = float("inf"), vip: str | None = None
    ) -> list[Overlap]:
        return overlaps(self.events(since, until), window, vip)

    def first_answer_after(self, t: float, mac: str | None = None, vip: str | None = None) -> Event | None:
        return first_answer_after(self.events(t), t, mac, vip)

    def describe(self, since: float = float("-inf"), limit: int = 40) -> str:
        text = describe(self.events(since), since, self.names, limit)
        marks = [f"{t:.3f} {label}" for t, label in self.marks if t >= since]
        return text + ("\n  marks: " + "; ".join(marks) if marks else "")

    def name(self, mac: str) -> str:
        return self.names.get(mac, mac)


# =========================================================================== prober


@dataclass
class Prober:
    """Every ``interval`` seconds, out of ``iface`` in ``netns`` (the client's port), a broadcast
    ARP request for each IPv4 VIP and a multicast neighbour solicitation for each IPv6 VIP, so
    every node that would answer for a VIP shows in the capture, announcing or not.

    The probes carry an identity of their own (``mac``, ``ip4``, ``ip6``: addresses no node has),
    not the client's: the answers are unicast to that MAC, which the client's kernel drops, so
    probing never rewrites the client's neighbour entry for the VIP (a standby answering a probe
    would otherwise pull the client's traffic to itself, and the measurement would cause the
    failure it looks for)."""

    netns: str | None
    iface: str
    vips: Iterable[str]
    mac: str
    ip4: str
    ip6: str = "fe80::1"
    interval: float = 0.1
    sent: int = field(default=0, init=False)
    error: BaseException | None = field(default=None, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    def start(self) -> Prober:
        with in_netns(self.netns):
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # send only
            self._sock.bind((self.iface, 0))
        self._frames = [self.frame(v) for v in self.vips]
        self._thread = threading.Thread(target=self._run, name=f"prober-{self.netns}", daemon=True)
        self._thread.start()
        return self

    def frame(self, vip: str) -> bytes:
        """The probe frame for ``vip``: an ARP request, or a neighbour solicitation."""
        mac = bytes.fromhex(self.mac.replace(":", ""))
        addr = ipaddress.ip_address(vip)
        if addr.version == 4:
            eth = b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP)
            arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + socket.inet_aton(self.ip4)
            arp += b"\0" * 6 + addr.packed
            return eth + arp + b"\0" * 18  # padded to the 60-byte minimum
        group = _solicited_node(addr)
        src = ipaddress.IPv6Address(self.ip6)
        # Type 135, code 0, checksum, reserved, target, source link-layer address option.
        body = struct.pack("!BBHI", 135, 0, 0, 0) + addr.packed + bytes([1, 1]) + mac
        pseudo = src.packed + group.packed + struct.pack("!I3xB", len(body), 58)
        body = body[:2] + struct.pack("!H", _checksum(pseudo + body)) + body[4:]
        ip6 = struct.pack("!IHBB", 0x60000000, len(body), 58, 255) + src.packed + group.packed
        eth = b"\x33\x33" + group.packed[12:] + mac + struct.pack("!H", ETH_P_IPV6)
        return eth + ip6 + body

    def _run(self) -> None:
        try:
            next_at = time.monotonic()
            while not self._stop.is_set():
                for frame in self._frames:
                    with contextlib.suppress(OSError):  # link down: keep probing
                        self._sock.send(frame)
                self.sent += 1
                next_at += self.interval
                delay = next_at - time.monotonic()
                if delay < 0:  # starved: skip the rounds we missed instead of bursting
                    next_at = time.monotonic()
                    delay = 0
                self._stop.wait(delay)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> Prober:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _solicited_node(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(b"\xff\x02" + b"\0" * 9 + b"\x01\xff" + addr.packed[13:])


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
