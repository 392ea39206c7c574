"""pyroute2's IPVS message classes, extended where they fall short of the kernel's API.

- ``IPVS_DEST_ATTR_TUN_PORT`` is big-endian in the kernel (``nla_get_be16``); pyroute2 declares
  it ``uint16``, which would program GUE tunnels to the byte-swapped port. (The tests' reference
  encoding of services and real servers: the director encodes those by hand, kubelvs.kernel.codec.)
- ``IPVS_CMD_ATTR_DAEMON`` is raw bytes in pyroute2: here it is the nested daemon attribute of
  the connection-sync commands (``IPVS_CMD_NEW_DAEMON``/``DEL_DAEMON``/``GET_DAEMON``), as
  include/uapi/linux/ip_vs.h defines it. :mod:`kubelvs.kernel.syncdaemon` encodes and decodes
  those messages with this class at run time (a few messages at start-up: no hot path).
"""

from __future__ import annotations

from pyroute2.netlink import nla
from pyroute2.netlink.generic.ipvs import ipvsmsg


class IPVSMessage(ipvsmsg):
    nla_map = tuple(
        (name, "daemon") if name == "IPVS_CMD_ATTR_DAEMON" else (name, kind) for name, kind in ipvsmsg.nla_map
    )

    class dest(ipvsmsg.dest):
        nla_map = tuple(
            (name, "be16") if name == "IPVS_DEST_ATTR_TUN_PORT" else (name, kind) for name, kind in ipvsmsg.dest.nla_map
        )

    class daemon(nla):
        prefix = "IPVS_DAEMON_ATTR_"
        nla_map = (
            ("IPVS_DAEMON_ATTR_UNSPEC", "none"),
            ("IPVS_DAEMON_ATTR_STATE", "uint32"),  # IP_VS_STATE_MASTER 1, IP_VS_STATE_BACKUP 2
            ("IPVS_DAEMON_ATTR_MCAST_IFN", "asciiz"),  # the multicast interface (IP_VS_IFNAME_MAXLEN 16)
            ("IPVS_DAEMON_ATTR_SYNC_ID", "uint32"),  # 0..255: the sync messages carry one byte
            # The newer attributes (Linux 4.3): all optional in a request, always in a dump.
            ("IPVS_DAEMON_ATTR_SYNC_MAXLEN", "uint16"),  # UDP payload bytes per sync message
            ("IPVS_DAEMON_ATTR_MCAST_GROUP", "ip4addr"),
            ("IPVS_DAEMON_ATTR_MCAST_GROUP6", "ip6addr"),
            ("IPVS_DAEMON_ATTR_MCAST_PORT", "uint16"),  # host order (the kernel does the htons)
            ("IPVS_DAEMON_ATTR_MCAST_TTL", "uint8"),
        )
