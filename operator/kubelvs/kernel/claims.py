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

import contextlib
import errno
import ipaddress
import json
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from kubelvs.kernel.netns import call_in

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


def uplinks_for(vips: Iterable[str], netns: str | None = None, named: str | None = None) -> dict[str, Uplink | None]:
    """:func:`uplink_for` of each VIP, from one dump of the links and one of the addresses."""
    vips = list(vips)
    rtnl = _Rtnl(netns)
    try:
        links = _links(rtnl)
        if named is not None:
            link = next((link for link, _flags in links if link.name == named), None)
            return dict.fromkeys(vips, link)
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
    found: dict[str, Uplink | None] = {}
    for vip in vips:
        target = ipaddress.ip_address(vip)
        found[vip] = next(
            (link for subnet, link in subnets if subnet.version == target.version and target in subnet), None
        )
    return found


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

    def hold(self, vip: str, family: int, lifetime: int) -> bool:
        """Hold ``vip`` on the interface for ``lifetime`` more seconds: added if missing, its
        lifetime refreshed if present. True if it was added (not there before).
        Raises ForeignAddressError if it is there without kubelvs's mark, OSError (ENODEV) if
        the interface is missing."""
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
            # Create exclusively first: only an address proven ours is ever refreshed.
            try:
                rtnl.request(codec.lifetime_address_request, False, *request)
            except OSError as error:
                if error.errno != errno.EEXIST:
                    raise
            else:
                self._added.add(address)
                if rtnl.present is not None:
                    rtnl.present[address] = ADDRESS_PROTO
                return True
            present = rtnl.present
            if present is None or address not in present:
                present = self._read(rtnl, index)
            if not self._ours(address, present.get(address, 0)):
                raise ForeignAddressError(address, self.interface)
            rtnl.request(codec.lifetime_address_request, True, *request)
            return False

    def release(self, vip: str, family: int) -> None:
        """Remove the claim on ``vip`` if there is one; an address without kubelvs's mark stays."""
        address = _canonical(vip, family)
        with self._rtnl() as rtnl:
            index = self._index(rtnl)
            if index is None:
                return
            present = self._read(rtnl, index)  # fresh: never remove on a stale view
            if address not in present or not self._ours(address, present[address]):
                return
            try:
                rtnl.request(codec.address_request, False, index, address, family, _host_prefix(family), 0)
            except OSError as error:
                if error.errno != errno.EADDRNOTAVAIL:  # expired or removed meanwhile
                    raise
            present.pop(address, None)
            self._added.discard(address)

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


def _read_sysctl(path: str) -> int:
    with open(f"/proc/sys/{path}") as file:
        return int(file.read().split()[0])


def _write_sysctl(path: str, value: int) -> None:
    with open(f"/proc/sys/{path}", "w") as file:
        file.write(f"{value}\n")


class ArpGuard:
    """``arp_ignore=1`` (answer ARP only for addresses on the receiving interface: the claim, not
    the dummy's copy) and ``arp_announce=2`` (never a VIP as ARP sender address) on the uplink.

    The kernel applies max(all, interface): raising the interface's own value is enough. What
    kubelvs changed is recorded in ``state_dir/sysctls.json`` before it is changed (a restart
    finds it), and :meth:`restore` puts back exactly that, unless somebody changed it since."""

    def __init__(self, state_dir: Path, netns: str | None = None) -> None:
        self.path = Path(state_dir) / "sysctls.json"
        self.netns = netns

    def _load(self) -> dict[str, dict[str, int]]:
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return {key: {"previous": int(v["previous"]), "set": int(v["set"])} for key, v in data["sysctls"].items()}

    def _save(self, records: dict[str, dict[str, int]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(temporary, "w") as file:
            json.dump({"version": 1, "sysctls": records}, file, indent=1, sort_keys=True)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def ensure(self, interface: str) -> None:
        """Raise ``interface``'s arp_ignore to 1 and arp_announce to 2 where they are lower."""
        paths = {f"net/ipv4/conf/{interface}/{name}": wanted for name, wanted in _WANTED.items()}
        current = call_in(self.netns, lambda: {path: _read_sysctl(path) for path in paths})
        changes = {path: wanted for path, wanted in paths.items() if current[path] < wanted}
        if not changes:
            return
        records = self._load()
        for path, wanted in changes.items():
            records[path] = {"previous": current[path], "set": wanted}
        self._save(records)  # first: a crash after the write must still find the old value

        def write() -> None:
            for path, wanted in changes.items():
                _write_sysctl(path, wanted)

        call_in(self.netns, write)

    def restore(self) -> None:
        """Put back the values :meth:`ensure` changed, where they are still what it set."""
        records = self._load()
        if records:

            def put_back() -> None:
                for path, record in records.items():
                    try:
                        if _read_sysctl(path) == record["set"]:
                            _write_sysctl(path, record["previous"])
                    except FileNotFoundError:
                        pass  # the interface is gone, and its settings with it

            call_in(self.netns, put_back)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
