"""Netlink sockets in a named network namespace, without forking.

pyroute2's ``create_socket(netns=...)`` forks a helper process to open the socket. In a process
whose event loop handles signals (the director's asyncio loop), the forked child inherits the loop's signal wake-up
socket, and the SIGTERM that ends the helper reaches the parent's loop as if it were its own:
the operator stops. ``setns`` changes the namespace of the calling thread only, so opening the
socket between two ``setns`` calls is enough, and a socket keeps the namespace it was made in.
"""

from __future__ import annotations

import ctypes
import os
import socket

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


def netlink_socket(proto: int, netns: str | None = None) -> socket.socket:
    """A raw netlink socket of ``proto``, in ``netns`` (a name under /run/netns, or a path)."""
    if netns is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, proto)
    path = netns if netns.startswith("/") else f"/run/netns/{netns}"
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
        try:
            _setns(target)
            try:
                return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, proto)
            finally:
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)
