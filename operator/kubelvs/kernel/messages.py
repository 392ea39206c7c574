"""pyroute2's IPVS message classes, extended where they fall short of the kernel's API.

- ``IPVS_DEST_ATTR_TUN_PORT`` is big-endian in the kernel (``nla_get_be16``); pyroute2 declares
  it ``uint16``, which would program GUE tunnels to the byte-swapped port.
"""

from __future__ import annotations

from pyroute2.netlink.generic import GenericNetlinkSocket
from pyroute2.netlink.generic.ipvs import GENL_NAME, ipvsmsg


class IPVSMessage(ipvsmsg):
    class dest(ipvsmsg.dest):
        nla_map = tuple(
            (name, "be16") if name == "IPVS_DEST_ATTR_TUN_PORT" else (name, kind) for name, kind in ipvsmsg.dest.nla_map
        )


def ipvs_family_id() -> int:
    """The generic-netlink family id of IPVS (asking for it loads ip_vs if it is a module)."""
    with GenericNetlinkSocket() as sock:
        sock.bind(GENL_NAME, IPVSMessage)
        return int(sock.prid)
