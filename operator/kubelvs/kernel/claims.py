"""The owner's claim on a VIP: a host address on the uplink with a finite lifetime.

Every director keeps each VIP on its dummy interface (:mod:`kubelvs.kernel.addresses`), so IPVS
sees the packets whoever owns the VIP. The uplink runs with ``arp_ignore=1`` and
``arp_announce=2`` (:class:`ArpGuard`), so nobody answers ARP for the dummy's copy, and Linux
answers a neighbour solicitation only for addresses on the receiving interface. Only the owner
also holds ``VIP/32`` (``VIP/128``, nodad, preferred_lft 0: never a source address) on the uplink:
that address is the claim, and moving it moves the VIP.

A claim carries a lifetime (IFA_CACHEINFO) that every successful renewal refreshes: an owner
that freezes or dies stops answering when the lifetime ends, with no process acting (the
kernel's own dead man's switch). Claims are tagged ``IFA_PROTO`` :data:`ADDRESS_PROTO` like the
dummy's addresses, and an address without the tag is somebody else's: never refreshed, never
removed (:class:`ForeignAddressError`).

Hand-written rtnetlink like :mod:`kubelvs.kernel.addresses` (measured 10x cheaper than
pyroute2); the requests are checked byte for byte against pyroute2's in tests/unit/test_codec.py.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from kubelvs.core.model import AF_INET, AF_INET6
from kubelvs.kernel import codec
from kubelvs.kernel.addresses import (
    ADDRESS_PROTO,
    DEFAULT_INTERFACE,
    IFA_F_NODAD,
    RtnlSessions,
    _Rtnl,
    supports_address_proto,
)
from kubelvs.kernel.sysctls import OwnedSysctls

FOREVER = 0xFFFFFFFF  # IFA_CACHEINFO's "no lifetime"
IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x1, 0x8, 0x40
IFLA_ADDRESS, IFLA_IFNAME, IFLA_OPERSTATE = 1, 3, 16
IF_OPER_UNKNOWN, IF_OPER_UP = 0, 6
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_CACHEINFO = struct.Struct("=II")  # ifa_prefered, ifa_valid (then cstamp, tstamp)


@dataclass(frozen=True)
class Uplink:
    name: str
    index: int
    mac: str  # "aa:bb:cc:dd:ee:ff"
    up: bool  # administratively up and running (operational state up or unknown)


class ValidityEnded(OSError):
    """A claim address not added nor refreshed: the caller's validity had ended just before the
    request went out (see :meth:`ClaimAddresses.hold`)."""


class ForeignAddressError(OSError):
    """The address is on the interface without kubelvs's mark: somebody else's."""

    def __init__(self, address: str, interface: str) -> None:
        super().__init__(
            errno.EEXIST,
            f"{address} is already on {interface} without kubelvs's mark (IFA_PROTO {ADDRESS_PROTO}): "
            "somebody else's address, left alone",
        )
        self.address = address
        self.interface = interface


@dataclass(frozen=True)
class _Address:
    index: int
    family: int
    prefix: int
    address: str
    proto: int  # 0: none (or a kernel before 6.1)
    valid: int  # remaining valid lifetime in seconds, FOREVER if none


def _canonical(address: str, family: int) -> str:
    return codec.address_text(family, socket.inet_pton(family, address))


def _host_prefix(family: int) -> int:
    return 32 if family == AF_INET else 128


def _links(rtnl: _Rtnl) -> list[tuple[Uplink, int]]:
    """Every interface, with its ifi_flags."""
    links = []
    for kind, payload in rtnl.request(codec.get_links_request):
        if kind != codec.RTM_NEWLINK:
            continue
        _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(payload, 0)
        attrs = codec.parse_attrs(payload[_IFINFOMSG.size :])
        name = attrs.get(IFLA_IFNAME)
        if name is None:
            continue
        raw_mac = attrs.get(IFLA_ADDRESS)
        operstate = attrs.get(IFLA_OPERSTATE)
        oper = operstate[0] if operstate is not None and len(operstate) else IF_OPER_UNKNOWN
        up = bool(flags & IFF_UP) and bool(flags & IFF_RUNNING) and oper in (IF_OPER_UP, IF_OPER_UNKNOWN)
        mac = ":".join(f"{byte:02x}" for byte in bytes(raw_mac)) if raw_mac is not None else ""
        links.append((Uplink(bytes(name).rstrip(b"\0").decode(), index, mac, up), flags))
    return links


def _addresses(rtnl: _Rtnl, index: int | None = None) -> list[_Address]:
    """Every IPv4 and IPv6 address (of interface ``index`` if given)."""
    found = []
    for kind, payload in rtnl.request(codec.get_addresses_request):
        if kind != codec.RTM_NEWADDR:
            continue
        family, prefix, _flags, _scope, owner = _IFADDRMSG.unpack_from(payload, 0)
        if family not in (AF_INET, AF_INET6) or (index is not None and owner != index):
            continue
        attrs = codec.parse_attrs(payload[_IFADDRMSG.size :])
        raw = attrs.get(codec.IFA_LOCAL)  # IPv4's own address (IFA_ADDRESS is the peer on ptp links)
        if raw is None:
            raw = attrs.get(codec.IFA_ADDRESS)
        if raw is None:
            continue
        proto = attrs.get(codec.IFA_PROTO)
        cacheinfo = attrs.get(codec.IFA_CACHEINFO)
        valid = _CACHEINFO.unpack_from(cacheinfo)[1] if cacheinfo is not None else FOREVER
        address = codec.address_text(family, raw)
        found.append(_Address(owner, family, prefix, address, proto[0] if proto else 0, valid))
    return found


# Where VIPs go: the interface named (with ``named``), or every candidate subnet with its link,
# the longest prefix first. Hashable: equal tables give equal answers.
UplinkTable = tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Uplink], ...] | Uplink | None


def uplink_table(netns: str | None = None, named: str | None = None) -> UplinkTable:
    """One dump of the links and one of the addresses: what :func:`match_uplinks` needs."""
    rtnl = _Rtnl(netns)
    try:
        links = _links(rtnl)
        if named is not None:
            return next((link for link, _flags in links if link.name == named), None)
        candidates = {
            link.index: link
            for link, flags in links
            if not flags & IFF_LOOPBACK and link.name not in ("lo", DEFAULT_INTERFACE)
        }
        subnets = [
            (ipaddress.ip_network(f"{address.address}/{address.prefix}", strict=False), candidates[address.index])
            for address in _addresses(rtnl)
            if address.index in candidates and address.prefix < _host_prefix(address.family)
        ]
    finally:
        rtnl.close()
    subnets.sort(key=lambda entry: -entry[0].prefixlen)  # the longest prefix first
    return tuple(subnets)


def match_uplinks(vips: Iterable[str], table: UplinkTable) -> dict[str, Uplink | None]:
    """The uplink of each VIP in ``table`` (None: no subnet contains it)."""
    if not isinstance(table, tuple):  # an interface named, found or not
        return dict.fromkeys(vips, table)
    found: dict[str, Uplink | None] = {}
    for vip in vips:
        target = ipaddress.ip_address(vip)
        found[vip] = next(
            (link for subnet, link in table if subnet.version == target.version and target in subnet), None
        )
    return found


def uplinks_for(vips: Iterable[str], netns: str | None = None, named: str | None = None) -> dict[str, Uplink | None]:
    """:func:`uplink_for` of each VIP, from one dump of the links and one of the addresses."""
    return match_uplinks(vips, uplink_table(netns, named))


def uplink_for(vip: str, netns: str | None = None, named: str | None = None) -> Uplink | None:
    """The interface ``named``, or else the one whose subnet (an address with a prefix shorter
    than a host's) contains ``vip``: the longest such prefix; never ``lo`` or the VIPs' dummy.
    None if there is none."""
    return uplinks_for([vip], netns, named)[vip]


def held_claims(netns: str | None = None) -> dict[str, str]:
    """Every claim in the namespace -> the interface holding it: the host addresses tagged
    :data:`ADDRESS_PROTO` with a finite lifetime, wherever they are (a restarted director finds
    the claims its predecessor left). The dummy's VIPs are tagged too but have no lifetime."""
    rtnl = _Rtnl(netns)
    try:
        names = {link.index: link.name for link, _flags in _links(rtnl)}
        return {
            address.address: names[address.index]
            for address in _addresses(rtnl)
            if address.proto == ADDRESS_PROTO
            and address.valid != FOREVER
            and address.prefix == _host_prefix(address.family)
            and names.get(address.index, DEFAULT_INTERFACE) != DEFAULT_INTERFACE
        }
    finally:
        rtnl.close()


def _check(still_valid: Callable[[], bool], address: str) -> None:
    if not still_valid():
        raise ValidityEnded(errno.ETIMEDOUT, f"{address}: our validity ended before the request")


class ClaimAddresses(RtnlSessions):
    """The claims (host addresses with a lifetime, tagged :data:`ADDRESS_PROTO`) on one interface."""

    def __init__(self, interface: str, netns: str | None = None) -> None:
        self.interface = interface
        self.netns = netns
        self._session: _Rtnl | None = None
        # Added by this object: ours even where the kernel drops IFA_PROTO (before 6.1).
        self._added: set[str] = set()
        self._tags_kept = supports_address_proto()

    def _index(self, rtnl: _Rtnl) -> int | None:
        if rtnl.index is None:
            try:
                answers = rtnl.request(codec.get_link_request, self.interface)
            except OSError as error:
                if error.errno != errno.ENODEV:
                    raise
                return None
            rtnl.index = next(codec.decode_link_index(p) for kind, p in answers if kind == codec.RTM_NEWLINK)
        return rtnl.index

    @staticmethod
    def _read(rtnl: _Rtnl, index: int) -> dict[str, int]:
        """The interface's addresses -> IFA_PROTO (a host prefix's entry wins over another
        prefix's for the same address), kept for the session."""
        present: dict[str, int] = {}
        for address in sorted(_addresses(rtnl, index), key=lambda a: a.prefix):
            present[address.address] = address.proto
        rtnl.present = present
        return present

    def _ours(self, address: str, proto: int) -> bool:
        return proto == ADDRESS_PROTO or (not self._tags_kept and address in self._added)

    def hold(self, vip: str, family: int, lifetime: int, still_valid: Callable[[], bool] = lambda: True) -> bool:
        """Hold ``vip`` on the interface for ``lifetime`` more seconds: added if missing, its
        lifetime refreshed if present. True if it was added (not there before).
        Raises ForeignAddressError if it is there without kubelvs's mark, OSError (ENODEV) if
        the interface is missing, ValidityEnded if ``still_valid()`` is false just before a
        request: asked right before each send, not once before the call, because a process
        frozen between a check and its request sends it when it thaws (a refresh is a create
        exclusive, then a replace: two round trips after a single check). One such late
        refresh, its claim address added again after its lifetime had ended and another
        director had taken the VIP, was a moment with two answers in the VM (a SIGSTOP)."""
        if lifetime < 1:
            raise ValueError(f"lifetime {lifetime}: whole seconds, at least 1")
        address = _canonical(vip, family)
        prefix = _host_prefix(family)
        # IPv6: no duplicate address detection (the address is moved on purpose), and deprecated
        # at once so that it is never chosen as a source address.
        flags, preferred = (0, lifetime) if family == AF_INET else (IFA_F_NODAD, 0)
        with self._rtnl() as rtnl:
            index = self._index(rtnl)
            if index is None:
                raise OSError(errno.ENODEV, f"{self.interface}: no such interface")
            request = (index, address, family, prefix, flags, lifetime, preferred, ADDRESS_PROTO)
            # Create exclusively first: only an address proven ours is ever refreshed. Our own
            # claim can end its lifetime between the refused create and the read (a renewal
            # late under load): then it is gone from the read, and created again.
            present: dict[str, int] = {}
            for _attempt in range(3):
                try:
                    _check(still_valid, address)
                    rtnl.request(codec.lifetime_address_request, False, *request)
                except OSError as error:
                    if error.errno != errno.EEXIST:
                        raise
                else:
                    self._added.add(address)
                    if rtnl.present is not None:
                        rtnl.present[address] = ADDRESS_PROTO
                    return True
                cached = rtnl.present
                present = cached if cached is not None and address in cached else self._read(rtnl, index)
                if address in present:
                    break
            if not self._ours(address, present.get(address, 0)):
                raise ForeignAddressError(address, self.interface)
            _check(still_valid, address)
            rtnl.request(codec.lifetime_address_request, True, *request)
            return False

    def release(self, vip: str, family: int) -> None:
        """Remove the claim on ``vip`` if there is one; an address without kubelvs's mark stays."""
        for _vip, error in self.release_many([(vip, family)]):
            raise error

    def release_many(self, vips: Iterable[tuple[str, int]]) -> list[tuple[str, OSError]]:
        """``release`` for many (VIP, family) at once, after one fresh read of the interface
        (never a stale view; one read, not one per VIP: a lapse drops hundreds). The failures."""
        failed: list[tuple[str, OSError]] = []
        with self._rtnl() as rtnl:
            index = self._index(rtnl)
            if index is None:
                return failed
            present = self._read(rtnl, index)
            for vip, family in vips:
                address = _canonical(vip, family)
                if address not in present or not self._ours(address, present[address]):
                    continue
                try:
                    rtnl.request(codec.address_request, False, index, address, family, _host_prefix(family), 0)
                except OSError as error:
                    if error.errno != errno.EADDRNOTAVAIL:  # expired or removed meanwhile
                        failed.append((vip, error))
                        continue
                present.pop(address, None)
                self._added.discard(address)
        return failed

    def held(self) -> dict[str, int]:
        """The claims on the interface -> their remaining valid lifetime in seconds
        (:data:`FOREVER` for none)."""
        with self._rtnl() as rtnl:
            index = self._index(rtnl)
            if index is None:
                return {}
            addresses = _addresses(rtnl, index)
            rtnl.present = {a.address: a.proto for a in sorted(addresses, key=lambda a: a.prefix)}
            return {
                a.address: a.valid
                for a in addresses
                if a.prefix == _host_prefix(a.family) and self._ours(a.address, a.proto)
            }


# --- the uplink's ARP sysctls -----------------------------------------------------------------

_WANTED = {"arp_ignore": 1, "arp_announce": 2}


class ArpGuard:
    """``arp_ignore=1`` (answer ARP only for addresses on the receiving interface: the claim, not
    the dummy's copy) and ``arp_announce=2`` (never a VIP as ARP sender address) on the uplink.

    The kernel applies max(all, interface): raising the interface's own value is enough. What
    kubelvs changed is recorded in ``state_dir/sysctls.json`` before it is changed (a restart
    finds it), and :meth:`restore` puts back exactly that, unless somebody changed it since
    (:class:`~kubelvs.kernel.sysctls.OwnedSysctls`)."""

    def __init__(self, state_dir: Path, netns: str | None = None) -> None:
        self.owned = OwnedSysctls(state_dir, netns)
        self.path = self.owned.path
        self.netns = netns

    def ensure(self, interface: str) -> None:
        """Raise ``interface``'s arp_ignore to 1 and arp_announce to 2 where they are lower."""
        wanted = {f"net/ipv4/conf/{interface}/{name}": value for name, value in _WANTED.items()}
        self.owned.ensure(wanted, acceptable=lambda current, value: int(current) >= int(value))

    def restore(self) -> None:
        """Put back the ARP values :meth:`ensure` changed, where they are still what it set."""
        self.owned.restore(lambda path: path.startswith("net/ipv4/conf/"))
