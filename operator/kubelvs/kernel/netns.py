"""Netlink sockets in a named network namespace, without forking.

pyroute2's ``create_socket(netns=...)`` forks a helper process to open the socket. In a process
whose event loop handles signals (the director's asyncio loop), the forked child inherits the loop's signal wake-up
socket, and the SIGTERM that ends the helper reaches the parent's loop as if it were its own:
the operator stops. ``setns`` changes the namespace of the calling thread only, so opening the
socket between two ``setns`` calls is enough, and a socket keeps the namespace it was made in.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_T = TypeVar("_T")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


def netlink_socket(proto: int, netns: str | None = None) -> socket.socket:
    """A raw netlink socket of ``proto``, in ``netns`` (a name under /run/netns, or a path)."""
    return socket_in(netns, socket.AF_NETLINK, socket.SOCK_RAW, proto)


@contextlib.contextmanager
def _entered(netns: str) -> Iterator[None]:
    """The calling thread in ``netns`` for the block, then back in its own namespace."""
    path = netns if netns.startswith("/") else f"/run/netns/{netns}"
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)


def socket_in(netns: str | None, family: int, kind: int, proto: int = 0) -> socket.socket:
    """``socket.socket(family, kind, proto)`` made in ``netns`` (as :func:`netlink_socket`)."""
    if netns is None:
        return socket.socket(family, kind, proto)
    with _entered(netns):
        return socket.socket(family, kind, proto)


def call_in(netns: str | None, fn: Callable[[], _T]) -> _T:
    """``fn()`` run in ``netns``: in a short-lived thread of its own, so the caller's thread never
    changes namespace (what /proc/sys/net shows depends on the namespace of the opening thread)."""
    if netns is None:
        return fn()
    result: list[_T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            with _entered(netns):
                result.append(fn())
        except BaseException as caught:
            error.append(caught)

    thread = threading.Thread(target=run, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
