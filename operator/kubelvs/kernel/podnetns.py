"""Finding a pod's network namespace on the node, whatever the container runtime.

The agent runs with the host's PID namespace (``hostPID``) and looks at the network namespace of
every process (``/proc/PID/ns/net``): the one that holds the pod's IP is the pod's. Chosen over
the CRI socket (``RuntimeService.PodSandboxStatus`` gives a netns path) because it needs no
runtime-specific socket path, no gRPC stubs, and works the same with containerd, CRI-O, Docker
or no runtime at all (the tests' namespaces are plain ``ip netns`` with a process inside).
Opening another process's ``ns/net`` is a ptrace-mode read check (``CAP_SYS_PTRACE`` for
processes of other users), entering it is ``setns`` (``CAP_SYS_ADMIN``).

Each distinct namespace (by inode) is entered once and its addresses cached; a later lookup
rescans only ``/proc`` (a stat per process) and enters only namespaces not seen before.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable

from kubelvs.kernel.receive import addresses_in

log = logging.getLogger("kubelvs.kernel.podnetns")
LOOPBACK = frozenset(("127.0.0.1", "::1"))  # a namespace with only these is read again (CNI not done)


class NetnsFinder:
    def __init__(self, proc: str = "/proc", read_addresses: Callable[[str], set[str]] = addresses_in) -> None:
        self.proc = proc
        self.read_addresses = read_addresses
        self.own = self._inode(f"{proc}/self/ns/net")  # the node's namespace (hostNetwork)
        self.by_inode: dict[int, tuple[str, frozenset[str]]] = {}  # inode -> (a path to it, addresses)

    @staticmethod
    def _inode(path: str) -> int | None:
        try:
            return os.stat(path).st_ino
        except OSError:  # the process is gone, or not ours to look at
            return None

    def _current(self, inode: int) -> str | None:
        entry = self.by_inode.get(inode)
        if entry is not None and self._inode(entry[0]) == inode:
            return entry[0]
        return None

    def scan(self) -> None:
        """Look at every process's namespace; enter each one not seen before; forget the gone."""
        seen: dict[int, str] = {}
        for name in os.listdir(self.proc):
            if not name.isdigit():
                continue
            path = f"{self.proc}/{name}/ns/net"
            inode = self._inode(path)
            if inode is not None and inode != self.own and inode not in seen:
                seen[inode] = path
        for inode in list(self.by_inode):
            if inode not in seen:
                del self.by_inode[inode]
        for inode, path in seen.items():
            known = self.by_inode.get(inode)
            if known is not None and known[1] - LOOPBACK:
                if known[0] != path and self._current(inode) is None:
                    self.by_inode[inode] = (path, known[1])
                continue
            try:
                self.by_inode[inode] = (path, frozenset(self.read_addresses(path)))
            except OSError as error:
                log.debug("cannot read the addresses of %s: %s", path, error)

    def _lookup(self, ips: Iterable[str]) -> tuple[str, int] | None:
        wanted = set(ips)
        for inode, (path, addresses) in self.by_inode.items():
            if wanted & addresses and self._current(inode) is not None:
                return path, inode
        return None

    def find(self, ips: Iterable[str]) -> tuple[str, int] | None:
        """The namespace holding one of ``ips`` (a path to it, and its inode), or None: from the
        cache, else after a rescan."""
        ips = tuple(ips)
        if not ips:
            return None
        found = self._lookup(ips)
        if found is None:
            self.scan()
            found = self._lookup(ips)
        return found

    def path_of(self, inode: int) -> str | None:
        """A path to the namespace ``inode`` if it still exists (after a rescan if needed)."""
        path = self._current(inode)
        if path is None:
            self.scan()
            path = self._current(inode)
        return path
