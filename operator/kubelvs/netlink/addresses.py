"""Local VIPs: the addresses a director must own so that IPVS sees packets sent to them.

VIPs live on a dummy interface of kubelvs's own (like kube-proxy's ``kube-ipvs0``), so adding
and removing them never disturbs the node's real interfaces, and what kubelvs added is easy to
tell from what was there before.
"""

from __future__ import annotations

from pyroute2 import IPRoute

from kubelvs.model import AF_INET

DEFAULT_INTERFACE = "kubelvs0"
IFA_F_NODAD = 0x02


class VipInterface:
    def __init__(self, name: str = DEFAULT_INTERFACE, netns: str | None = None) -> None:
        self.name = name
        self.netns = netns  # a named network namespace (tests), or the caller's own

    def _index(self, ipr: IPRoute, create: bool) -> int | None:
        links = ipr.link_lookup(ifname=self.name)
        if links:
            return int(links[0])
        if not create:
            return None
        ipr.link("add", ifname=self.name, kind="dummy")
        index = int(ipr.link_lookup(ifname=self.name)[0])
        ipr.link("set", index=index, state="up")
        return index

    def addresses(self) -> set[str]:
        with IPRoute(netns=self.netns) as ipr:
            index = self._index(ipr, create=False)
            if index is None:
                return set()
            return {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index)}

    def add(self, address: str, family: int) -> bool:
        """Make ``address`` local; return False if it already was on this interface."""
        with IPRoute(netns=self.netns) as ipr:
            index = self._index(ipr, create=True)
            present = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index)}
            if address in present:
                return False
            prefix = 32 if family == AF_INET else 128
            extra = {} if family == AF_INET else {"flags": IFA_F_NODAD}
            ipr.addr("add", index=index, address=address, prefixlen=prefix, **extra)
            return True

    def remove(self, address: str, family: int) -> None:
        with IPRoute(netns=self.netns) as ipr:
            index = self._index(ipr, create=False)
            if index is None:
                return
            prefix = 32 if family == AF_INET else 128
            present = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index)}
            if address in present:
                ipr.addr("del", index=index, address=address, prefixlen=prefix)
