"""Telling the link who owns a VIP, asking who does, and noticing when somebody else claims one.

- :class:`Announcer`: a gratuitous ARP in both forms (request and reply) for IPv4, an unsolicited
  Neighbor Advertisement with the Override flag for IPv6. Either moves a neighbour's existing
  entry to our MAC at once; neither creates one (``arp_accept=0``, ``accept_untracked_na=0``),
  so only clients already talking to the VIP are moved, which is what a takeover needs.
  Without Override a client keeps the old MAC.
- :func:`probe`: who answers for a VIP, before taking it (an RFC 5227 ARP probe; a neighbour
  solicitation from ``::`` as in duplicate address detection, answered to all nodes).
- :class:`ConflictMonitor`: every ARP packet sent from a watched VIP, and every advertisement
  of one, by another MAC: somebody else claims it.

Standard library only, on raw sockets (CAP_NET_RAW): no arping or ndsend to start in the
critical path of a failover. Receiving is done on AF_PACKET sockets bound to the interface, which
see frames whatever the kernel's own stack makes of them, with a classic BPF filter so that the
uplink's service traffic never reaches user space.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import select
import socket
import struct
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Literal

from kubelvs.core.model import AF_INET, AF_INET6
from kubelvs.kernel.netns import socket_in

ETH_P_ALL, ETH_P_ARP, ETH_P_IPV6, ETH_P_8021Q = 0x0003, 0x0806, 0x86DD, 0x8100
PACKET_OUTGOING = 4  # sll_pkttype of a frame this host sent
SO_ATTACH_FILTER = 26
SIOCGIFINDEX = 0x8933
IPPROTO_ICMPV6 = 58
ICMP6_FILTER = 1
ICMPV6_NS, ICMPV6_NA = 135, 136
NA_ROUTER, NA_SOLICITED, NA_OVERRIDE = 0x80000000, 0x40000000, 0x20000000
ND_OPT_SOURCE_LL, ND_OPT_TARGET_LL = 1, 2
ARP_REQUEST, ARP_REPLY = 1, 2
BROADCAST = b"\xff" * 6
_ZERO_MAC = b"\0" * 6
_ETH = struct.Struct(">6s6sH")
_ARP = struct.Struct(">HHBBH6s4s6s4s")  # htype, ptype, hlen, plen, op, sha, spa, tha, tpa
_IPV6 = struct.Struct(">IHBB16s16s")  # version/class/flow, payload length, next header, hops, src, dst
_ICMPV6_ND = struct.Struct(">BBHI16s")  # type, code, checksum, flags (NA) or reserved (NS), target
_MIN_FRAME = 60  # Ethernet's minimum, without the FCS
ConflictKind = Literal["arp-reply", "arp-request", "na"]

# Classic BPF: accept ARP, and ICMPv6 neighbour advertisements right after the IPv6 header;
# drop everything else in the kernel. (code, jt, jf, k); jumps count from the next instruction.
_FILTER = (
    (0x28, 0, 0, 12),  # ldh [12]          ethertype
    (0x15, 5, 0, ETH_P_ARP),  # jeq ARP     -> accept
    (0x15, 0, 5, ETH_P_IPV6),  # jeq IPv6   else -> drop
    (0x30, 0, 0, 20),  # ldb [20]          next header
    (0x15, 0, 3, IPPROTO_ICMPV6),  # jeq 58 else -> drop
    (0x30, 0, 0, 54),  # ldb [54]          ICMPv6 type
    (0x15, 0, 1, ICMPV6_NA),  # jeq 136    else -> drop
    (0x06, 0, 0, 0x40000),  # ret whole frame
    (0x06, 0, 0, 0),  # ret 0: drop
)


def mac_bytes(mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    if len(raw) != 6:
        raise ValueError(f"{mac!r}: not a MAC address")
    return raw


def mac_text(raw: bytes) -> str:
    return ":".join(f"{byte:02x}" for byte in raw)


# --- frames -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArpPacket:
    op: int
    sender_mac: str
    sender_ip: str
    target_mac: str
    target_ip: str
    source_mac: str  # the Ethernet source


@dataclass(frozen=True)
class NeighborAdvert:
    target: str
    mac: str  # the target link-layer address option, else the Ethernet source
    flags: int  # NA_ROUTER | NA_SOLICITED | NA_OVERRIDE
    source_mac: str  # the Ethernet source


def _arp(op: int, mac: bytes, sender_ip: bytes, target_mac: bytes, target_ip: bytes) -> bytes:
    frame = _ETH.pack(BROADCAST, mac, ETH_P_ARP) + _ARP.pack(1, 0x0800, 6, 4, op, mac, sender_ip, target_mac, target_ip)
    return frame.ljust(_MIN_FRAME, b"\0")


def garp_frames(mac: str, vip: str) -> list[bytes]:
    """The two gratuitous ARP frames for ``vip`` at ``mac`` (sender IP = target IP = VIP): the
    request form (target MAC zero) and the reply form (target MAC ours), both broadcast. Each
    alone moved a client's entry; both are sent because some stacks honour only one."""
    own, address = mac_bytes(mac), socket.inet_aton(vip)
    return [_arp(ARP_REQUEST, own, address, _ZERO_MAC, address), _arp(ARP_REPLY, own, address, own, address)]


def arp_probe_frame(mac: str, vip: str) -> bytes:
    """An RFC 5227 ARP probe: who has ``vip``, from sender IP 0.0.0.0 (claims nothing)."""
    return _arp(ARP_REQUEST, mac_bytes(mac), b"\0" * 4, _ZERO_MAC, socket.inet_aton(vip))


def na_packet(mac: str, vip: str) -> bytes:
    """An unsolicited Neighbor Advertisement (the ICMPv6 message; the kernel fills in the
    checksum on a raw ICMPv6 socket): Override set, Solicited clear, target ``vip``, and the
    target link-layer address option with ``mac``."""
    target = socket.inet_pton(AF_INET6, vip)
    return _ICMPV6_ND.pack(ICMPV6_NA, 0, 0, NA_OVERRIDE, target) + bytes((ND_OPT_TARGET_LL, 1)) + mac_bytes(mac)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ns_probe_frame(mac: str, vip: str) -> bytes:
    """A neighbour solicitation for ``vip`` as duplicate address detection sends it: from ``::``
    (so without a source link-layer option) to the VIP's solicited-node group. A holder answers
    to all nodes (ff02::1) with Override set, which an AF_PACKET socket sees."""
    target = socket.inet_pton(AF_INET6, vip)
    group = bytes.fromhex("ff02" + "0000" * 4 + "0001ff") + target[13:]
    source = b"\0" * 16
    icmp = _ICMPV6_ND.pack(ICMPV6_NS, 0, 0, 0, target)
    pseudo = source + group + struct.pack(">I3xB", len(icmp), IPPROTO_ICMPV6)
    icmp = icmp[:2] + struct.pack(">H", _checksum(pseudo + icmp)) + icmp[4:]
    ip = _IPV6.pack(6 << 28, len(icmp), IPPROTO_ICMPV6, 255, source, group)
    return _ETH.pack(b"\x33\x33" + group[12:], mac_bytes(mac), ETH_P_IPV6) + ip + icmp


def _payload(frame: bytes, ethertype: int) -> tuple[bytes, memoryview] | None:
    """(Ethernet source, payload) of ``frame`` if it carries ``ethertype`` (one VLAN tag skipped)."""
    if len(frame) < _ETH.size:
        return None
    _dst, src, kind = _ETH.unpack_from(frame, 0)
    offset = _ETH.size
    if kind == ETH_P_8021Q and len(frame) >= offset + 4:
        (kind,) = struct.unpack_from(">H", frame, offset + 2)
        offset += 4
    return (src, memoryview(frame)[offset:]) if kind == ethertype else None


def parse_arp(frame: bytes) -> ArpPacket | None:
    """The Ethernet/IPv4 ARP packet in ``frame``, or None."""
    found = _payload(frame, ETH_P_ARP)
    if found is None or len(found[1]) < _ARP.size:
        return None
    src, payload = found
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(payload, 0)
    if (htype, ptype, hlen, plen) != (1, 0x0800, 6, 4):
        return None
    return ArpPacket(op, mac_text(sha), socket.inet_ntoa(spa), mac_text(tha), socket.inet_ntoa(tpa), mac_text(src))


def parse_na(frame: bytes) -> NeighborAdvert | None:
    """The Neighbor Advertisement in ``frame`` (ICMPv6 right after the IPv6 header), or None."""
    found = _payload(frame, ETH_P_IPV6)
    if found is None or len(found[1]) < _IPV6.size + _ICMPV6_ND.size:
        return None
    src, payload = found
    _vtf, length, next_header, _hops, _src, _dst = _IPV6.unpack_from(payload, 0)
    if next_header != IPPROTO_ICMPV6:
        return None
    icmp = payload[_IPV6.size : _IPV6.size + length]
    if len(icmp) < _ICMPV6_ND.size:
        return None
    kind, code, _sum, flags, target = _ICMPV6_ND.unpack_from(icmp, 0)
    if kind != ICMPV6_NA or code != 0:
        return None
    mac = bytes(src)
    offset = _ICMPV6_ND.size
    while offset + 2 <= len(icmp):
        option, units = icmp[offset], icmp[offset + 1]
        if units == 0:
            break  # malformed: RFC 4861 says discard, the Ethernet source stands
        if option == ND_OPT_TARGET_LL and units == 1 and offset + 8 <= len(icmp):
            mac = bytes(icmp[offset + 2 : offset + 8])
        offset += units * 8
    return NeighborAdvert(socket.inet_ntop(AF_INET6, target), mac_text(mac), flags, mac_text(bytes(src)))


# --- sockets ----------------------------------------------------------------------------------


def _ifindex(sock: socket.socket, interface: str) -> int:
    """The index of ``interface`` in the socket's own namespace."""
    request = struct.pack("16si", interface.encode(), 0)
    return int(struct.unpack("16si", fcntl.ioctl(sock.fileno(), SIOCGIFINDEX, request))[1])


def _listener(interface: str, netns: str | None) -> socket.socket:
    """An AF_PACKET socket receiving the interface's ARP and neighbour advertisements, both
    directions (outgoing ones are marked PACKET_OUTGOING); it can send frames too."""
    sock = socket_in(netns, socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: receives nothing yet
    try:
        program = b"".join(struct.pack("=HBBI", *insn) for insn in _FILTER)
        buffer = ctypes.create_string_buffer(program)
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HL", len(_FILTER), ctypes.addressof(buffer)))
        sock.bind((interface, ETH_P_ALL))  # filtered from its first frame, and on this interface only
    except BaseException:
        sock.close()
        raise
    return sock


# A burst of frames (a director claiming a thousand VIPs at once) can overflow the interface's
# transmit queue: the kernel refuses the frame with ENOBUFS instead of blocking. Wait for the
# queue to drain, this long at most per frame, rather than lose the frame or fail the burst.
SEND_PATIENCE = 2.0
_SEND_BACKOFF = 0.002


def send_frame(sock: socket.socket, frame: bytes, address: tuple[object, ...], patience: float = SEND_PATIENCE) -> None:
    """``sock.sendto(frame, address)``, retried while the transmit queue is full (ENOBUFS)."""
    deadline: float | None = None
    while True:
        try:
            sock.sendto(frame, address)
            return
        except OSError as error:
            if error.errno != errno.ENOBUFS:
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + patience
            elif now >= deadline:
                raise
            time.sleep(_SEND_BACKOFF)


def _canonical(vip: str) -> tuple[int, bytes]:
    family = AF_INET6 if ":" in vip else AF_INET
    return family, socket.inet_pton(family, vip)


class Announcer:
    """Sends the announcements of the VIPs this director owns, on one interface."""

    def __init__(self, interface: str, mac: str, netns: str | None = None) -> None:
        self.interface = interface
        self.mac = mac_text(mac_bytes(mac))
        # Protocol 0: a send-only socket, the kernel queues nothing on it.
        self._packet = socket_in(netns, socket.AF_PACKET, socket.SOCK_RAW, 0)
        self._icmp6: socket.socket | None = None
        try:
            self._packet.bind((interface, 0))
            self.index = _ifindex(self._packet, interface)
            try:
                icmp6 = socket_in(netns, socket.AF_INET6, socket.SOCK_RAW, IPPROTO_ICMPV6)
            except OSError:
                icmp6 = None  # no IPv6 in this kernel: IPv4 announcements still work
            if icmp6 is not None:
                self._icmp6 = icmp6
                icmp6.setsockopt(IPPROTO_ICMPV6, ICMP6_FILTER, b"\xff" * 32)  # send only: block every type
                icmp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)  # NDP requires 255
                icmp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, self.index)
                icmp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        except BaseException:
            self.close()
            raise

    def announce(self, vip: str, family: int) -> int:
        """Announce ``vip`` at our MAC on the interface; return the number of frames sent."""
        if family == AF_INET:
            frames = garp_frames(self.mac, vip)
            for frame in frames:
                send_frame(self._packet, frame, (self.interface, ETH_P_ARP))
            return len(frames)
        if self._icmp6 is None:
            raise OSError(errno.EAFNOSUPPORT, "IPv6 is not available: no unsolicited neighbour advertisement")
        # The kernel picks the source (the interface's link-local) and fills in the checksum.
        send_frame(self._icmp6, na_packet(self.mac, vip), ("ff02::1", 0, 0, self.index))
        return 1

    def close(self) -> None:
        self._packet.close()
        if self._icmp6 is not None:
            self._icmp6.close()

    def __enter__(self) -> Announcer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _claimant(
    frame: bytes, vips: Collection[bytes], family: int | None = None
) -> tuple[bytes, str, ConflictKind] | None:
    """(the VIP, the MAC, the kind) if ``frame`` claims one of ``vips``: an ARP packet sent
    from it (never a probe: its sender IP is 0.0.0.0), or an advertisement of it."""
    if family in (None, AF_INET):
        arp = parse_arp(frame)
        if arp is not None:
            sender = socket.inet_aton(arp.sender_ip)
            if sender in vips:
                return sender, arp.sender_mac, "arp-reply" if arp.op == ARP_REPLY else "arp-request"
            return None
    if family in (None, AF_INET6):
        advert = parse_na(frame)
        if advert is not None:
            target = socket.inet_pton(AF_INET6, advert.target)
            if target in vips:
                return target, advert.mac, "na"
    return None


def probe(interface: str, mac: str, vip: str, family: int, timeout: float, netns: str | None = None) -> set[str]:
    """The MACs other than ``mac`` that answer for ``vip`` within ``timeout`` seconds (or claim
    it meanwhile). The probe is sent twice, at the start and halfway, against a lost frame."""
    return probe_many(interface, mac, [(vip, family)], timeout, netns)[vip]


def probe_many(
    interface: str, mac: str, vips: Iterable[tuple[str, int]], timeout: float, netns: str | None = None
) -> dict[str, set[str]]:
    """:func:`probe` for many VIPs at once, in one listening window: a director taking over
    hundreds of VIPs waits ``timeout`` once, not once per VIP. VIP -> the other MACs."""
    own = mac_text(mac_bytes(mac))
    wanted = list(vips)
    by_packed = {socket.inet_pton(family, vip): vip for vip, family in wanted}
    found: dict[str, set[str]] = {vip: set() for vip, _family in wanted}
    if not wanted:
        return found
    frames = [
        (arp_probe_frame(own, vip), ETH_P_ARP) if family == AF_INET else (ns_probe_frame(own, vip), ETH_P_IPV6)
        for vip, family in wanted
    ]
    with contextlib.closing(_listener(interface, netns)) as sock:

        def send_all() -> None:
            for frame, ethertype in frames:
                send_frame(sock, frame, (interface, ethertype))

        # The window counts from the end of the first burst (a thousand probes can take a
        # while to leave): every VIP is listened for ``timeout`` after its probe went out.
        send_all()
        start = time.monotonic()
        deadline = start + timeout
        sends = [start + timeout / 2]
        while True:
            now = time.monotonic()
            if sends and sends[0] <= now:
                sends.pop(0)
                send_all()
                now = time.monotonic()
            if now >= deadline + timeout:  # a busy segment: what was queued is read by now
                return found
            # Past the deadline, still read what is queued (answers that came during a burst).
            wait = max(0.0, min([deadline, *sends]) - now)
            readable, _, _ = select.select([sock], [], [], wait)
            if not readable:
                if now >= deadline:
                    return found
                continue
            data, address = sock.recvfrom(65535)
            if address[2] == PACKET_OUTGOING:
                continue
            claim = _claimant(data, by_packed)
            if claim is not None and claim[1] != own:
                found[by_packed[claim[0]]].add(claim[1])


@dataclass(frozen=True)
class Conflict:
    vip: str
    mac: str
    kind: ConflictKind
    at: float  # time.monotonic() when read


class ConflictMonitor:
    """Reports other MACs claiming a watched VIP on the interface. Non-blocking: an event loop
    calls :meth:`read` when :meth:`fileno` is readable (``loop.add_reader``)."""

    def __init__(self, interface: str, mac: str, netns: str | None = None) -> None:
        self.interface = interface
        self.mac = mac_text(mac_bytes(mac))
        self._sock = _listener(interface, netns)
        self._sock.setblocking(False)
        self._vips: dict[bytes, str] = {}

    def fileno(self) -> int:
        return self._sock.fileno()

    def watch(self, vips: set[str]) -> None:
        """Report claims on these VIPs (from now on, replacing the previous set)."""
        self._vips = {_canonical(vip)[1]: vip for vip in vips}

    def read(self, limit: int = 1000) -> list[Conflict]:
        """Drain what arrived (at most ``limit`` frames, not to starve the loop in a storm)."""
        conflicts: list[Conflict] = []
        for _ in range(limit):
            try:
                data, address = self._sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            if address[2] == PACKET_OUTGOING or not self._vips:
                continue
            claim = _claimant(data, self._vips.keys())
            if claim is not None and claim[1] != self.mac:
                vip, mac, kind = claim
                conflicts.append(Conflict(self._vips[vip], mac, kind, time.monotonic()))
        return conflicts

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ConflictMonitor:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
