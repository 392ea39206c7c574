"""The node side of VIP ownership, on the real kernel: the claim address on the uplink (with its
lifetime), gratuitous ARP / unsolicited NA, the probe before a claim, and the conflict monitor.

Sockets are opened once per uplink and kept (a takeover must not wait for set-up). The uplinks
are found again at each evaluation (one dump of links and addresses for all VIPs): an
interface that goes down or away makes the VIPs it carried unfit, and the election hands them
over.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from kubelvs.director.election import ClaimLost
from kubelvs.kernel.announce import Announcer, ConflictMonitor, probe_many
from kubelvs.kernel.claims import (
    ArpGuard,
    ClaimAddresses,
    Uplink,
    UplinkTable,
    ValidityEnded,
    held_claims,
    match_uplinks,
    uplink_table,
)

log = logging.getLogger("kubelvs.director.vipnet")


class KernelVipNet:
    def __init__(self, state_dir: Path, netns: str | None = None, interface: str = "") -> None:
        self.netns = netns
        self.named = interface or None
        self.links: dict[str, Uplink] = {}  # by name, as last found
        self.claims: dict[str, ClaimAddresses] = {}
        self.announcers: dict[str, Announcer] = {}
        self.monitors: dict[str, ConflictMonitor] = {}
        self.arp_guard = ArpGuard(state_dir, netns)
        # The last uplink table, each VIP's match in it, and the last answer with what it was for.
        self._table: UplinkTable | object = object()
        self._matched: dict[str, tuple[str, bool] | None] = {}
        self._asked: frozenset[str] = frozenset()
        self._answer: dict[str, tuple[str, bool] | None] = {}

    def guard_arp(self) -> None:
        """Before any VIP is made local: the node answers ARP only for addresses on the
        interface that asks (``arp_ignore=1``), so the VIPs on the dummy interface stay silent
        and only the owner's claim address answers; and never uses a VIP as the sender of its
        own requests (``arp_announce=2``). Set on ``all``: the kernel takes the larger of ``all``
        and the interface's value, so this covers interfaces added later. Recorded, and put
        back by ``kubelvs release-node``."""
        self.arp_guard.ensure("all")

    def uplinks(self, vips: Iterable[str]) -> dict[str, tuple[str, bool] | None]:
        """Each VIP's interface and whether it is up. Read every retry period: the links and
        subnets are dumped each time (a few), but matched against every VIP again only when
        they changed (10,000 VIPs: a second of CPU under emulation, twice a second)."""
        vips = frozenset(vips)
        table = uplink_table(self.netns, self.named)
        if table != self._table:
            self._table, self._matched, self._answer = table, {}, {}
            links = [table] if isinstance(table, Uplink) else [link for _subnet, link in table or ()]
            self.links.update({link.name: link for link in links})
        elif vips == self._asked:
            return self._answer  # the same object: its reader tells "unchanged" by identity
        missing = [vip for vip in vips if vip not in self._matched]
        for vip, link in match_uplinks(missing, table).items():
            self._matched[vip] = (link.name, link.up) if link is not None else None
        self._asked = vips
        self._answer = {vip: self._matched[vip] for vip in vips}
        return self._answer

    def _claims(self, interface: str) -> ClaimAddresses:
        claims = self.claims.get(interface)
        if claims is None:
            claims = self.claims[interface] = ClaimAddresses(interface, self.netns)
        return claims

    def hold(
        self,
        interface: str,
        vips: list[tuple[str, int]],
        lifetime: int,
        still_valid: Callable[[], bool],
    ) -> list[tuple[str, OSError]]:
        """Add or refresh the claim addresses of many (VIP, family) on one interface: one socket
        and one read of the interface for all of them (a renewal refreshes every claim address,
        hundreds at a time on a busy director). ``still_valid`` is asked before each request:
        a process frozen with this call queued or half done must not, once continued, give
        life to claims another director has taken since. The failures."""
        failed: list[tuple[str, OSError]] = []
        claims = self._claims(interface)
        with claims.session():
            for vip, family in vips:
                try:
                    claims.hold(vip, family, lifetime, still_valid)  # asked before each request
                except ValidityEnded:
                    failed.append((vip, ClaimLost(vip, "our validity ended before the request")))
                except OSError as error:
                    failed.append((vip, error))
        return failed

    def release(self, interface: str, vips: list[tuple[str, int]]) -> list[tuple[str, OSError]]:
        return self._claims(interface).release_many(vips)

    def held(self) -> dict[str, str]:
        return held_claims(self.netns)

    def probe(self, interface: str, vips: list[tuple[str, int]], timeout: float) -> dict[str, set[str]]:
        link = self.links.get(interface)
        if link is None:
            return {vip: set() for vip, _family in vips}
        return probe_many(interface, link.mac, vips, timeout, self.netns)

    def announce(
        self, interface: str, vips: list[tuple[str, int]], still_valid: Callable[[], bool] = lambda: True
    ) -> tuple[int, list[tuple[str, OSError]]]:
        """Gratuitous ARP / unsolicited NA for each; the frames sent and the failures.
        ``still_valid`` is asked before each VIP: an announcement queued before the process froze
        must not go out when it thaws, after another director took the VIP over."""
        announcer = self.announcers.get(interface)
        if announcer is None:
            link = self.links[interface]
            announcer = self.announcers[interface] = Announcer(interface, link.mac, self.netns)
        sent, failed = 0, []
        for vip, family in vips:
            if not still_valid():
                break
            try:
                sent += announcer.announce(vip, family)
            except OSError as error:
                failed.append((vip, error))
        if failed and len(failed) == len(vips):  # the interface went away: open anew next time
            self.announcers.pop(interface, None)
            announcer.close()
        return sent, failed

    def monitor(self, interface: str) -> ConflictMonitor | None:
        """The conflict monitor of ``interface`` (opened at the first need)."""
        monitor = self.monitors.get(interface)
        if monitor is None and interface in self.links:
            monitor = self.monitors[interface] = ConflictMonitor(interface, self.links[interface].mac, self.netns)
        return monitor

    def close(self) -> None:
        for announcer in self.announcers.values():
            announcer.close()
        for monitor in self.monitors.values():
            monitor.close()
        self.announcers.clear()
        self.monitors.clear()
