"""pyroute2's IPVS message classes, extended where they fall short of the kernel's API: the
tests' reference encoding of IPVS messages (never imported at run time).

- ``IPVS_DEST_ATTR_TUN_PORT`` is big-endian in the kernel (``nla_get_be16``); pyroute2 declares
  it ``uint16``, which would program GUE tunnels to the byte-swapped port.
"""

from __future__ import annotations

from pyroute2.netlink.generic.ipvs import ipvsmsg


class IPVSMessage(ipvsmsg):
    class dest(ipvsmsg.dest):
        nla_map = tuple(
            (name, "be16") if name == "IPVS_DEST_ATTR_TUN_PORT" else (name, kind) for name, kind in ipvsmsg.dest.nla_map
        )
