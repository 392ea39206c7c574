"""The only part of kubelvs that talks to the kernel.

IPVS (generic netlink) and the VIP addresses (rtnetlink) are spoken over plain netlink sockets
with a hand-written codec (``codec``, ``fastdump``), not through pyroute2: kubelvs does not import
pyroute2 at run time. ``messages`` holds pyroute2's IPVS message classes (with a fix), which the
tests use as a reference encoding; it is imported only by the tests.
"""
