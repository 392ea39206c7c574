"""The only part of kubelvs that talks to the kernel.

IPVS (generic netlink) and the VIP addresses (rtnetlink) are spoken over plain netlink sockets
with a hand-written codec (``codec``, ``fastdump``): benchmarks prove both paths hot (IPVS
programming and dumps, ``bench/results.json``; one address per VIP at a cold start, see
``addresses``), and every request is checked byte for byte against pyroute2's messages in the
tests (``messages`` holds pyroute2's IPVS message classes, with a fix). kubelvs does not import
pyroute2 at run time. ``vipfilter`` keeps kubelvs's nftables table with ``nft``; ``netns`` opens
sockets in a named network namespace without forking.
"""
