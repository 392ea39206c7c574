"""Local VIPs: the addresses a director must own so that IPVS sees packets sent to them.

VIPs live on a dummy interface of kubelvs's own (like kube-proxy's ``kube-ipvs0``), so adding
and removing them never disturbs the node's real interfaces, and what kubelvs added is easy to
tell from what was there before.

The requests go through pyroute2's ``IPRoute`` (``link("get"/"add"/"set")``, ``addr("dump"/
"add"/"del")``), the project's netlink library for rtnetlink. Within :meth:`VipInterface.session`
one ``IPRoute`` (one socket) serves every call, and the interface's index and addresses are read
once. pyroute2 is imported at the first session, not with this module (which the reconciler
imports for :data:`ADDRESS_PROTO`): its import takes a few hundred milliseconds.

Named network namespaces: kubelvs never lets pyroute2 open the socket there itself
(``IPRoute(netns=...)`` forks a helper process, whose SIGTERM once stopped the director's
asyncio loop, see :mod:`kubelvs.kernel.netns`). The socket is opened by
:func:`kubelvs.kernel.netns.netlink_socket`, between two ``setns`` calls of the calling thread,
and handed to pyroute2 as ``IPRoute(use_socket=...)`` (typed ``SOCK_DGRAM``, which netlink
treats like ``SOCK_RAW`` and asyncio's datagram endpoint requires): a socket keeps the namespace
it was made in, and the sync ``IPRoute`` runs its requests on an event loop of the calling thread
(no thread or process of its own), so the socket is made and used by the same thread. That loop is why a
:class:`VipInterface` must not be called from a thread that runs an asyncio loop (the director
syncs in executor threads).

Every address kubelvs adds carries a kernel-native owner mark: ``IFA_PROTO`` (Linux 6.1+) set to
:data:`ADDRESS_PROTO` (pyroute2's ``ifaddrmsg`` knows the attribute as ``proto``);
``ip -d addr show dev kubelvs0`` shows it as ``proto 107``, and :meth:`VipInterface.tagged` reads
it back (``kubelvs adopt`` trusts only tagged addresses where the kernel keeps the tag). Older
kernels ignore the attribute.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Iterator
from typing import Any

from kubelvs.core.model import AF_INET, normalize_address
from kubelvs.kernel.netns import netlink_socket

DEFAULT_INTERFACE = "kubelvs0"
IFA_F_NODAD = 0x02
NETLINK_ROUTE = 0
ADDRESS_PROTO = 107  # kubelvs's IFA_PROTO value (0-3 are the kernel's own: unspec, lo, ra, ll)


def supports_address_proto(release: str | None = None) -> bool:
    """Whether this kernel keeps IFA_PROTO (6.1 and later): then an untagged address is not ours."""
    release = release or os.uname().release
    try:
        major, minor = (int(part) for part in release.split("-", 1)[0].split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (6, 1)


class _Rtnl:
    """One pyroute2 ``IPRoute`` on a socket of the namespace: request, answer."""

    def __init__(self, netns: str | None) -> None:
        from pyroute2 import IPRoute  # imported at the first session: it takes a few 100 ms

        raw = netlink_socket(NETLINK_ROUTE, netns)
        # The same socket as SOCK_DGRAM (netlink treats the two alike): asyncio's datagram
        # endpoint, which pyroute2 sets up on it, accepts no other type.
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE, fileno=raw.detach())
        try:
            self.ipr = IPRoute(use_socket=self.sock)
        except BaseException:
            self.sock.close()
            raise
        # Per session: the interface's index and its addresses (-> IFA_PROTO, 0 if none), read at
        # the first need.
        self.index: int | None = None
        self.present: dict[str, int] | None = None

    def close(self) -> None:
        try:
            self.ipr.close()
        finally:
            self.sock.close()

    def call(self, method: str, *args: object, **kwargs: object) -> Any:
        """``IPRoute.<method>(*args, **kwargs)``; kernel errors as OSError with their errno."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            return getattr(self.ipr, method)(*args, **kwargs)
        except NetlinkError as error:
            raise OSError(error.code, str(error.args[1] if len(error.args) > 1 else error)) from None


class VipInterface:
    def __init__(self, name: str = DEFAULT_INTERFACE, netns: str | None = None) -> None:
        self.name = name
        self.netns = netns  # a named network namespace (tests), or the caller's own
        self._session: _Rtnl | None = None
        self._in_session = False

    @contextlib.contextmanager
    def session(self) -> Iterator[VipInterface]:
        """Serve every call within the block with one socket (and one read of the addresses).
        The socket is opened at the first call: an incremental sync whose VIPs are all known to
        be local makes none, and costs nothing here."""
        if self._in_session:
            yield self
            return
        self._in_session = True
        try:
            yield self
        finally:
            self._in_session = False
            if self._session is not None:
                self._session.close()
                self._session = None

    @contextlib.contextmanager
    def _rtnl(self) -> Iterator[_Rtnl]:
        if self._in_session:
            if self._session is None:
                self._session = _Rtnl(self.netns)
            yield self._session
            return
        rtnl = _Rtnl(self.netns)
        try:
            yield rtnl
        finally:
            rtnl.close()

    def _lookup(self, rtnl: _Rtnl) -> int | None:
        try:
            links = rtnl.call("link", "get", ifname=self.name)
        except OSError as error:
            if error.errno != errno.ENODEV:
                raise
            return None
        return int(links[0]["index"]) if links else None

    def _index(self, rtnl: _Rtnl, create: bool) -> int | None:
        if rtnl.index is not None:
            return rtnl.index
        index = self._lookup(rtnl)
        if index is not None:
            rtnl.index = index
            return index
        if not create:
            return None
        rtnl.call("link", "add", ifname=self.name, kind="dummy")
        index = self._lookup(rtnl)
        if index is None:
            raise OSError(errno.ENODEV, f"{self.name}: created, then not found")
        rtnl.call("link", "set", index=index, state="up")
        rtnl.index = index
        rtnl.present = {}
        return index

    @staticmethod
    def _present(rtnl: _Rtnl, index: int) -> dict[str, int]:
        if rtnl.present is None:
            present: dict[str, int] = {}
            for msg in rtnl.call("addr", "dump"):
                if msg["index"] != index:
                    continue
                address = msg.get("IFA_ADDRESS")
                if address is not None:
                    present[normalize_address(address)[1]] = msg.get("IFA_PROTO") or 0
            rtnl.present = present
        return rtnl.present

    def addresses(self) -> set[str]:
        return set(self.tagged())

    def tagged(self) -> dict[str, int]:
        """The addresses on the interface -> their IFA_PROTO (0: none, or a kernel before 6.1)."""
        with self._rtnl() as rtnl:
            index = self._index(rtnl, create=False)
            if index is None:
                return {}
            return dict(self._present(rtnl, index))

    def add(self, address: str, family: int) -> bool:
        """Make ``address`` local (tagged with :data:`ADDRESS_PROTO`); return False if it already
        was on this interface (then it is not kubelvs's)."""
        with self._rtnl() as rtnl:
            index = self._index(rtnl, create=True)
            assert index is not None
            present = self._present(rtnl, index)
            if address in present:
                return False
            prefix = 32 if family == AF_INET else 128
            extra = {} if family == AF_INET else {"flags": IFA_F_NODAD}
            try:
                rtnl.call(
                    "addr",
                    "add",
                    index=index,
                    family=family,
                    address=address,
                    prefixlen=prefix,
                    proto=ADDRESS_PROTO,
                    **extra,
                )
            except OSError as error:
                if error.errno != errno.EEXIST:
                    raise
                present[address] = 0
                return False  # added by somebody else since the interface was read
            present[address] = ADDRESS_PROTO
            return True

    def remove(self, address: str, family: int) -> None:
        with self._rtnl() as rtnl:
            index = self._index(rtnl, create=False)
            if index is None:
                return
            prefix = 32 if family == AF_INET else 128
            present = self._present(rtnl, index)
            if address in present:
                try:
                    rtnl.call("addr", "del", index=index, family=family, address=address, prefixlen=prefix)
                except OSError as error:
                    if error.errno != errno.EADDRNOTAVAIL:
                        raise  # EADDRNOTAVAIL: gone already
                present.pop(address, None)
