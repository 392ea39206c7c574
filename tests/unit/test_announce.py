"""Gratuitous ARP, unsolicited NA, probes and the conflict monitor: the frame builders and parsers
on bytes, then for real on the host: network namespaces on a bridge (needs root; skipped
otherwise), where a client's neighbour entry must follow the announcements."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import select
import shutil
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubelvs.core.model import AF_INET, AF_INET6
from kubelvs.kernel import announce
from kubelvs.kernel.announce import (
    NA_OVERRIDE,
    NA_SOLICITED,
    Announcer,
    ArpPacket,
    Conflict,
    ConflictMonitor,
    NeighborAdvert,
    arp_probe_frame,
    garp_frames,
    na_packet,
    ns_probe_frame,
    parse_arp,
    parse_na,
    probe,
)
from kubelvs.kernel.claims import ArpGuard, ClaimAddresses
from kubelvs.kernel.netns import socket_in

OWN = "02:00:00:00:00:0a"
OTHER = "02:00:00:00:00:0b"


def _icmpv6_checksum(source: bytes, destination: bytes, icmp: bytes) -> int:
    """RFC 4443's checksum, written independently of the module's (for the tests' frames)."""
    data = source + destination + len(icmp).to_bytes(4, "big") + b"\0\0\0\x3a" + icmp
    data += b"\0" * (len(data) % 2)
    total = 0
    for i in range(0, len(data), 2):
        total += int.from_bytes(data[i : i + 2], "big")
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _na_frame(target: str, mac: str | None, flags: int = NA_OVERRIDE, source_mac: str = OTHER) -> bytes:
    """An Ethernet frame carrying a Neighbor Advertisement (with a target link-layer option if
    ``mac``), with its checksum."""
    option = bytes((2, 1)) + bytes.fromhex(mac.replace(":", "")) if mac else b""
    icmp = struct.pack(">BBHI16s", 136, 0, 0, flags, socket.inet_pton(AF_INET6, target)) + option
    src, dst = socket.inet_pton(AF_INET6, "fe80::1"), socket.inet_pton(AF_INET6, "ff02::1")
    icmp = icmp[:2] + _icmpv6_checksum(src, dst, icmp).to_bytes(2, "big") + icmp[4:]
    ip = struct.pack(">IHBB16s16s", 6 << 28, len(icmp), 58, 255, src, dst)
    return bytes.fromhex("333300000001" + source_mac.replace(":", "")) + b"\x86\xdd" + ip + icmp


# --- frames on bytes -----------------------------------------------------------------------------


def test_gratuitous_arp_in_both_forms() -> None:
    request, reply = garp_frames(OWN, "192.0.2.10")
    for frame in (request, reply):
        assert len(frame) == 60  # padded to Ethernet's minimum
        assert frame[:6] == b"\xff" * 6  # broadcast
        assert frame[6:12] == bytes.fromhex("02000000000a")
        assert frame[12:14] == b"\x08\x06"
        assert frame[14:20] == bytes.fromhex("000108000604")  # Ethernet, IPv4, 6, 4
    assert parse_arp(request) == ArpPacket(1, OWN, "192.0.2.10", "00:00:00:00:00:00", "192.0.2.10", OWN)
    assert parse_arp(reply) == ArpPacket(2, OWN, "192.0.2.10", OWN, "192.0.2.10", OWN)


def test_arp_probe_claims_nothing() -> None:
    frame = arp_probe_frame(OWN, "192.0.2.10")
    assert frame[:6] == b"\xff" * 6
    assert parse_arp(frame) == ArpPacket(1, OWN, "0.0.0.0", "00:00:00:00:00:00", "192.0.2.10", OWN)
    assert announce._claimant(frame, {socket.inet_aton("192.0.2.10")}) is None  # not a claim
    assert announce._claimant(frame, {socket.inet_aton("0.0.0.0")}) is not None  # (only a watched sender counts)


def test_parse_arp_rejects_what_is_not_ethernet_ipv4_arp() -> None:
    request = garp_frames(OWN, "192.0.2.10")[0]
    assert parse_arp(request[:40]) is None  # truncated
    assert parse_arp(request[:12] + b"\x08\x00" + request[14:]) is None  # IPv4, not ARP
    assert parse_arp(request[:14] + b"\x00\x06" + request[16:]) is None  # IEEE 802 hardware type
    assert parse_arp(b"") is None
    tagged = request[:12] + b"\x81\x00\x00\x64" + request[12:]  # VLAN 100
    assert parse_arp(tagged) == parse_arp(request)


def test_unsolicited_neighbour_advertisement() -> None:
    packet = na_packet(OWN, "2001:db8::10")
    assert len(packet) == 32
    kind, code, checksum, flags = struct.unpack_from(">BBHI", packet)
    assert (kind, code, checksum) == (136, 0, 0)  # the kernel fills in the checksum
    assert flags == NA_OVERRIDE == 0x20000000  # Override, not Solicited, not Router
    assert packet[8:24] == socket.inet_pton(AF_INET6, "2001:db8::10")
    assert packet[24:] == bytes.fromhex("0201") + bytes.fromhex("02000000000a")  # target link-layer address


def test_parse_na() -> None:
    frame = _na_frame("2001:db8::10", OWN, source_mac=OTHER)
    assert parse_na(frame) == NeighborAdvert("2001:db8::10", OWN, NA_OVERRIDE, OTHER)
    no_option = parse_na(_na_frame("2001:db8:0::10", None, NA_SOLICITED, source_mac=OTHER))
    assert no_option == NeighborAdvert("2001:db8::10", OTHER, NA_SOLICITED, OTHER)  # the Ethernet source
    assert parse_na(frame[:60]) is None  # truncated
    assert parse_na(garp_frames(OWN, "192.0.2.10")[0]) is None
    solicitation = frame[:54] + b"\x87" + frame[55:]
    assert parse_na(solicitation) is None
    udp = frame[:20] + b"\x11" + frame[21:]
    assert parse_na(udp) is None
    zero_length_option = frame[:-7] + b"\x00" + frame[-6:]
    assert parse_na(zero_length_option) == NeighborAdvert("2001:db8::10", OTHER, NA_OVERRIDE, OTHER)


def test_neighbour_solicitation_probe_is_duplicate_address_detection() -> None:
    vip = "2001:db8::1:2:3"
    frame = ns_probe_frame(OWN, vip)
    group = ipaddress.IPv6Address(
        int(ipaddress.IPv6Address("ff02::1:ff00:0")) | int(ipaddress.IPv6Address(vip)) & 0xFFFFFF
    )
    assert frame[:6] == bytes.fromhex("3333") + group.packed[12:]
    assert frame[6:12] == bytes.fromhex("02000000000a")
    assert frame[12:14] == b"\x86\xdd"
    version, length, next_header, hops, source, destination = struct.unpack_from(">IHBB16s16s", frame, 14)
    assert (version >> 28, next_header, hops) == (6, 58, 255)
    assert source == bytes(16)  # "::": no source link-layer option
    assert destination == group.packed
    icmp = frame[54:]
    assert length == len(icmp) == 24
    assert struct.unpack_from(">BBHI16s", icmp) == (
        135,
        0,
        _icmpv6_checksum(source, destination, icmp[:2] + b"\0\0" + icmp[4:]),
        0,
        socket.inet_pton(AF_INET6, vip),
    )


def test_what_claims_a_vip() -> None:
    vip4, vip6 = socket.inet_aton("192.0.2.10"), socket.inet_pton(AF_INET6, "2001:db8::10")
    watched = {vip4, vip6}
    request, reply = garp_frames(OTHER, "192.0.2.10")
    assert announce._claimant(request, watched) == (vip4, OTHER, "arp-request")
    assert announce._claimant(reply, watched) == (vip4, OTHER, "arp-reply")
    assert announce._claimant(_na_frame("2001:db8::10", OTHER), watched) == (vip6, OTHER, "na")
    assert announce._claimant(garp_frames(OTHER, "192.0.2.11")[0], watched) is None  # not watched
    assert announce._claimant(_na_frame("2001:db8::11", OTHER), watched) is None
    assert announce._claimant(request, watched, AF_INET6) is None  # a probe's family only
    assert announce._claimant(ns_probe_frame(OTHER, "2001:db8::10"), watched) is None  # a solicitation


def test_mac_text() -> None:
    assert announce.mac_text(announce.mac_bytes("02-00-00-00-00-0A")) == "02:00:00:00:00:0a"
    with pytest.raises(ValueError):
        announce.mac_bytes("02:00:00:00:00")


# --- on the host: namespaces on a bridge ------------------------------------------------------------


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


def _must(*args: str) -> str:
    done = _ip(*args)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"
    return done.stdout


@dataclass(frozen=True)
class Host:
    netns: str
    mac: str
    ip4: str
    ip6: str


@dataclass(frozen=True)
class Lan:
    """Hosts ``a`` (the owner), ``b`` (another director) and ``c`` (a client), each with ``eth0``
    on one bridge, in 10.70.0.0/24 and fd70::/64."""

    a: Host
    b: Host
    c: Host
    vip4: str = "10.70.0.100"
    vip6: str = "fd70::100"


@pytest.fixture
def lan() -> Iterator[Lan]:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's ip to create network namespaces")
    suffix = uuid.uuid4().hex[:6]
    names = {role: f"kubelvs-ut-{role}{suffix}" for role in ("sw", "a", "b", "c")}
    made: list[str] = []
    try:
        for name in names.values():
            created = _ip("netns", "add", name)
            if created.returncode != 0:
                pytest.skip(f"no network namespace support: ip netns add: {created.stderr.strip()}")
            made.append(name)
        sw = names["sw"]
        # Multicast snooping off: solicited-node multicast reaches every port, as on a plain switch.
        bridge = _ip("-n", sw, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        if bridge.returncode != 0:
            pytest.skip(f"no bridge interfaces: {bridge.stderr.strip()}")
        _must("-n", sw, "link", "set", "br0", "up")
        hosts = {}
        for number, role in enumerate(("a", "b", "c"), start=1):
            netns = names[role]
            # No duplicate address detection: addresses (and link-locals) usable at once.
            subprocess.run(
                ["ip", "netns", "exec", netns, "sh", "-c", "echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad"],
                check=True,
                timeout=10,
            )
            mac = f"02:00:00:00:00:{number:02x}"
            _must(
                "-n",
                netns,
                "link",
                "add",
                "eth0",
                "address",
                mac,
                "type",
                "veth",
                "peer",
                "name",
                f"p{role}",
                "netns",
                sw,
            )
            _must("-n", sw, "link", "set", f"p{role}", "master", "br0", "up")
            _must("-n", netns, "link", "set", "eth0", "up")
            _must("-n", netns, "addr", "add", f"10.70.0.{number}/24", "dev", "eth0")
            _must("-n", netns, "addr", "add", f"fd70::{number}/64", "dev", "eth0", "nodad")
            hosts[role] = Host(netns, mac, f"10.70.0.{number}", f"fd70::{number}")
        yield Lan(hosts["a"], hosts["b"], hosts["c"])
    finally:
        for name in made:
            _ip("netns", "del", name)


def _neighbour(host: Host, address: str) -> str:
    """The host's neighbour entry for ``address`` ("" if none)."""
    return _must("-n", host.netns, "neigh", "show", address, "dev", "eth0").strip()


def _until(check: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _send(host: Host, frame: bytes) -> None:
    """Put ``frame`` on the host's eth0 as it is."""
    with contextlib.closing(socket_in(host.netns, socket.AF_PACKET, socket.SOCK_RAW, 0)) as sock:
        sock.bind(("eth0", 0))
        sock.send(frame)


def _drain(monitor: ConflictMonitor, until: Callable[[list[Conflict]], bool], timeout: float = 3.0) -> list[Conflict]:
    seen: list[Conflict] = []
    deadline = time.monotonic() + timeout
    while not until(seen) and time.monotonic() < deadline:
        select.select([monitor], [], [], 0.05)
        seen += monitor.read()
    return seen


@pytest.mark.parametrize("form", ["request", "reply"])
def test_each_gratuitous_arp_form_moves_a_client_entry(lan: Lan, form: str) -> None:
    _must("-n", lan.c.netns, "neigh", "replace", lan.vip4, "lladdr", "02:00:00:00:00:ee", "dev", "eth0", "nud", "stale")
    assert "02:00:00:00:00:ee" in _neighbour(lan.c, lan.vip4)
    _send(lan.a, garp_frames(lan.a.mac, lan.vip4)[0 if form == "request" else 1])
    assert _until(lambda: lan.a.mac in _neighbour(lan.c, lan.vip4)), _neighbour(lan.c, lan.vip4)


def test_announcer_moves_clients_ipv4_and_ipv6(lan: Lan) -> None:
    claims = ClaimAddresses("eth0", netns=lan.a.netns)
    claims.hold(lan.vip4, AF_INET, 30)
    claims.hold(lan.vip6, AF_INET6, 30)
    _must("-n", lan.c.netns, "neigh", "replace", lan.vip4, "lladdr", "02:00:00:00:00:ee", "dev", "eth0", "nud", "stale")
    _must(
        "-n",
        lan.c.netns,
        "-6",
        "neigh",
        "replace",
        lan.vip6,
        "lladdr",
        "02:00:00:00:00:ee",
        "dev",
        "eth0",
        "nud",
        "stale",
    )
    with Announcer("eth0", lan.a.mac, netns=lan.a.netns) as announcer:
        assert announcer.announce(lan.vip4, AF_INET) == 2
        assert announcer.announce(lan.vip6, AF_INET6) == 1
    assert _until(lambda: lan.a.mac in _neighbour(lan.c, lan.vip4)), _neighbour(lan.c, lan.vip4)
    assert _until(lambda: lan.a.mac in _neighbour(lan.c, lan.vip6)), _neighbour(lan.c, lan.vip6)


def test_an_announcement_creates_no_entry_on_a_client_without_one(lan: Lan) -> None:
    # arp_accept=0 and accept_untracked_na=0: only clients already talking to the VIP move. The
    # client's own monitor proves the frames arrived before the neighbour table is looked at.
    with ConflictMonitor("eth0", lan.c.mac, netns=lan.c.netns) as monitor:
        monitor.watch({lan.vip4, lan.vip6})
        with Announcer("eth0", lan.a.mac, netns=lan.a.netns) as announcer:
            announcer.announce(lan.vip4, AF_INET)
            announcer.announce(lan.vip6, AF_INET6)
        seen = _drain(monitor, lambda seen: len(seen) >= 3)
    assert sorted(c.kind for c in seen) == ["arp-reply", "arp-request", "na"]
    for vip in (lan.vip4, lan.vip6):
        entry = _neighbour(lan.c, vip)
        assert lan.a.mac not in entry, entry


def test_the_monitor_reports_other_macs_claiming_a_watched_vip(lan: Lan) -> None:
    with ConflictMonitor("eth0", lan.b.mac, netns=lan.b.netns) as monitor:
        monitor.watch({lan.vip4, "fd70:0::100"})  # reported as given
        # Not conflicts: our own announcements, an unwatched VIP, a probe, our MAC from elsewhere.
        with Announcer("eth0", lan.b.mac, netns=lan.b.netns) as own:
            own.announce(lan.vip4, AF_INET)
            own.announce(lan.vip6, AF_INET6)
        with Announcer("eth0", lan.a.mac, netns=lan.a.netns) as other:
            other.announce("10.70.0.101", AF_INET)
            other.announce("fd70::101", AF_INET6)
        _send(lan.c, arp_probe_frame(lan.c.mac, lan.vip4))
        _send(lan.c, garp_frames(lan.b.mac, lan.vip4)[1])
        time.sleep(0.2)
        with Announcer("eth0", lan.a.mac, netns=lan.a.netns) as other:
            other.announce(lan.vip4, AF_INET)
            other.announce(lan.vip6, AF_INET6)
        seen = _drain(monitor, lambda seen: len(seen) >= 3)
        time.sleep(0.1)
        seen += monitor.read()
    assert sorted((c.vip, c.mac, c.kind) for c in seen) == [
        (lan.vip4, lan.a.mac, "arp-reply"),
        (lan.vip4, lan.a.mac, "arp-request"),
        ("fd70:0::100", lan.a.mac, "na"),
    ]
    assert all(c.at <= time.monotonic() for c in seen)


def test_the_monitor_serves_an_event_loop_and_watches_what_it_is_told(lan: Lan) -> None:
    async def run() -> list[Conflict]:
        loop = asyncio.get_running_loop()
        found: asyncio.Queue[Conflict] = asyncio.Queue()
        with ConflictMonitor("eth0", lan.b.mac, netns=lan.b.netns) as monitor:

            def readable() -> None:
                for conflict in monitor.read():
                    found.put_nowait(conflict)

            loop.add_reader(monitor, readable)
            try:
                with Announcer("eth0", lan.a.mac, netns=lan.a.netns) as other:
                    other.announce(lan.vip4, AF_INET)  # nothing watched yet
                    await asyncio.sleep(0.2)
                    monitor.watch({lan.vip4})
                    other.announce(lan.vip4, AF_INET)
                    first = await asyncio.wait_for(found.get(), 3)
                    second = await asyncio.wait_for(found.get(), 3)
                    monitor.watch(set())
                    other.announce(lan.vip4, AF_INET)
                    await asyncio.sleep(0.2)
                return [first, second, *[found.get_nowait() for _ in range(found.qsize())]]
            finally:
                loop.remove_reader(monitor)

    seen = asyncio.run(run())
    assert sorted(c.kind for c in seen) == ["arp-reply", "arp-request"]


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_probe_finds_the_holder_and_nobody_else(lan: Lan, family: int) -> None:
    vip = lan.vip4 if family == AF_INET else lan.vip6
    start = time.monotonic()
    assert probe("eth0", lan.b.mac, vip, family, 0.5, netns=lan.b.netns) == set()  # nobody holds it
    assert 0.5 <= time.monotonic() - start < 1.5
    ClaimAddresses("eth0", netns=lan.a.netns).hold(vip, family, 30)
    assert probe("eth0", lan.b.mac, vip, family, 0.5, netns=lan.b.netns) == {lan.a.mac}
    # The holder's own probe does not find itself.
    assert probe("eth0", lan.a.mac, vip, family, 0.3, netns=lan.a.netns) == set()


def test_one_probe_window_serves_many_vips(lan: Lan) -> None:
    held = ClaimAddresses("eth0", netns=lan.a.netns)
    held.hold(lan.vip4, AF_INET, 30)
    held.hold(lan.vip6, AF_INET6, 30)
    free4 = str(ipaddress.ip_address(lan.vip4) + 1)
    start = time.monotonic()
    found = announce.probe_many(
        "eth0", lan.b.mac, [(lan.vip4, AF_INET), (free4, AF_INET), (lan.vip6, AF_INET6)], 0.5, netns=lan.b.netns
    )
    assert 0.5 <= time.monotonic() - start < 1.5  # one window, not one per VIP
    assert found == {lan.vip4: {lan.a.mac}, free4: set(), lan.vip6: {lan.a.mac}}


def test_only_the_claim_answers_once_the_uplink_is_guarded(lan: Lan, tmp_path: Path) -> None:
    """The design end to end: both directors keep the VIP on a second interface (the dummy's
    stand-in: this kernel may lack dummy interfaces); the owner also holds the claim on eth0."""
    for host in (lan.a, lan.b):
        _must("-n", host.netns, "link", "add", "kubelvs0", "type", "veth", "peer", "name", "kubelvs0p")
        _must("-n", host.netns, "link", "set", "kubelvs0p", "up")
        _must("-n", host.netns, "link", "set", "kubelvs0", "up")
        _must("-n", host.netns, "addr", "add", f"{lan.vip4}/32", "dev", "kubelvs0")
        _must("-n", host.netns, "addr", "add", f"{lan.vip6}/128", "dev", "kubelvs0", "nodad")
    # Default sysctls: both answer ARP for the VIP on their second interface (split brain)...
    assert probe("eth0", lan.c.mac, lan.vip4, AF_INET, 0.5, netns=lan.c.netns) == {lan.a.mac, lan.b.mac}
    # ... while IPv6 is answered only for addresses on the receiving interface: nobody.
    assert probe("eth0", lan.c.mac, lan.vip6, AF_INET6, 0.5, netns=lan.c.netns) == set()
    for host in (lan.a, lan.b):
        ArpGuard(tmp_path / host.netns, netns=host.netns).ensure("eth0")
    assert probe("eth0", lan.c.mac, lan.vip4, AF_INET, 0.5, netns=lan.c.netns) == set()
    claims = ClaimAddresses("eth0", netns=lan.a.netns)
    claims.hold(lan.vip4, AF_INET, 30)
    claims.hold(lan.vip6, AF_INET6, 30)
    assert probe("eth0", lan.c.mac, lan.vip4, AF_INET, 0.5, netns=lan.c.netns) == {lan.a.mac}
    assert probe("eth0", lan.c.mac, lan.vip6, AF_INET6, 0.5, netns=lan.c.netns) == {lan.a.mac}
    claims.release(lan.vip4, AF_INET)
    claims.release(lan.vip6, AF_INET6)
    ClaimAddresses("eth0", netns=lan.b.netns).hold(lan.vip4, AF_INET, 30)  # ownership moved
    assert probe("eth0", lan.c.mac, lan.vip4, AF_INET, 0.5, netns=lan.c.netns) == {lan.b.mac}


def test_the_listener_filter_passes_only_arp_and_advertisements(lan: Lan) -> None:
    with contextlib.closing(announce._listener("eth0", lan.b.netns)) as sock:
        _must("-n", lan.b.netns, "neigh", "flush", "dev", "eth0")
        # UDP to a closed port of a: neighbour resolution first, then the datagrams out and
        # ICMP port-unreachable errors back, which the filter must keep out.
        for family, address in ((AF_INET, lan.a.ip4), (AF_INET6, lan.a.ip6)):
            with contextlib.closing(socket_in(lan.b.netns, family, socket.SOCK_DGRAM)) as udp:
                for _ in range(3):
                    udp.sendto(b"x" * 100, (address, 9))
                    time.sleep(0.1)
        frames = []
        while select.select([sock], [], [], 0.2)[0]:
            frames.append(sock.recvfrom(65535))
    kinds = [(parse_arp(frame) is not None, parse_na(frame) is not None) for frame, _address in frames]
    assert kinds, "the ARP and NDP exchanges were not seen"
    assert all(arp or na for arp, na in kinds)  # no datagram and no ICMP error got through
    assert any(arp for arp, _na in kinds)
    assert any(na for _arp, na in kinds)
    assert {address[2] for _frame, address in frames} >= {announce.PACKET_OUTGOING}  # own frames marked


def test_announcer_and_monitor_leave_the_caller_in_its_namespace(lan: Lan) -> None:
    own = os.stat("/proc/thread-self/ns/net").st_ino
    with Announcer("eth0", lan.a.mac, netns=lan.a.netns) as announcer:
        assert announcer.index == int(_must("-n", lan.a.netns, "-o", "link", "show", "dev", "eth0").split(":")[0])
    with ConflictMonitor("eth0", lan.a.mac, netns=lan.a.netns):
        pass
    assert os.stat("/proc/thread-self/ns/net").st_ino == own
    with pytest.raises(OSError):
        Announcer("nosuch0", lan.a.mac, netns=lan.a.netns)


class _QueueFullSocket:
    """A socket whose transmit queue is full for the first ``full`` sends (ENOBUFS)."""

    def __init__(self, full: int, errno_: int = errno.ENOBUFS) -> None:
        self.full, self.errno, self.sent = full, errno_, []

    def sendto(self, frame: bytes, address: tuple[object, ...]) -> int:
        if self.full:
            self.full -= 1
            raise OSError(self.errno, os.strerror(self.errno))
        self.sent.append(frame)
        return len(frame)


def test_a_full_transmit_queue_delays_a_frame_instead_of_losing_it() -> None:
    """A thousand VIPs claimed at once overflowed the queue in the VM and killed the election."""
    sock = _QueueFullSocket(full=3)
    announce.send_frame(sock, b"frame", ("eth0", 0x0806))  # type: ignore[arg-type]
    assert sock.sent == [b"frame"]
    with pytest.raises(OSError) as refused:  # a queue that never drains: given up, not forever
        announce.send_frame(_QueueFullSocket(full=10**9), b"frame", ("eth0", 0x0806), patience=0.05)  # type: ignore[arg-type]
    assert refused.value.errno == errno.ENOBUFS
    with pytest.raises(OSError) as other:  # any other error at once
        announce.send_frame(_QueueFullSocket(full=1, errno_=errno.ENETDOWN), b"frame", ("eth0", 0x0806))  # type: ignore[arg-type]
    assert other.value.errno == errno.ENETDOWN
