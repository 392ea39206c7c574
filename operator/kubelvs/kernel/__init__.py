"""The only part of kubelvs that talks to the kernel.

IPVS (generic netlink) and the VIP addresses (rtnetlink) are spoken over plain netlink sockets
with a hand-written codec (``codec``, ``fastdump``): benchmarks prove both paths hot (IPVS
programming and dumps, ``bench/results.json``; one address per VIP at a cold start, see
``addresses``), and every request is checked byte for byte against pyroute2's messages in the
tests (``messages`` holds pyroute2's IPVS message classes, with a fix, and the sync daemon's
attributes pyroute2 lacks). pyroute2 itself serves the cold paths (the sync daemons, the real
servers' receive side); only the submodules used are imported (see :mod:`kubelvs.lazypackages`).
``vipfilter`` keeps kubelvs's nftables table with ``nft``; ``netns`` opens sockets in a named
network namespace without forking.
"""

from kubelvs.lazypackages import defer

defer("pyroute2")
