"""The only part of kubelvs that talks to the kernel.

IPVS (generic netlink) is spoken over a plain netlink socket with a hand-written codec
(``codec``, ``fastdump``): a benchmark proves that path hot (``bench/results.json``), and the
codec is checked byte for byte against pyroute2's IPVS messages (``messages``, with a fix; used
by the tests). Everything else goes through pyroute2: the VIP addresses on the dummy interface
(``addresses``, rtnetlink). ``vipfilter`` keeps kubelvs's nftables table with ``nft``;
``netns`` opens sockets in a named network namespace without forking.
"""
