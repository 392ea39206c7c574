"""A VIP answers only on its configured ports: an nftables filter (kubernetes#72236).

kubelvs makes every VIP local (on the dummy interface kubelvs0), so every host listener bound to
0.0.0.0 or :: (sshd, the kubelet, the director's own metrics port) also answers on every VIP,
on ports no IPVS virtual service covers. This module keeps one nftables table, ``inet kubelvs``,
owned entirely by kubelvs, whose input chain drops TCP, UDP and SCTP packets to a VIP whose
(protocol, port) is not a virtual service of that VIP:

    table inet kubelvs {
        set vips4    { type ipv4_addr; elements = { 192.0.2.10 } }
        set allowed4 { type ipv4_addr . inet_proto . inet_service; elements = { 192.0.2.10 . 6 . 80 } }
        chain input {
            type filter hook input priority 0; policy accept;
            iif != "lo" meta l4proto { 6, 17, 132 } ip daddr @vips4 \\
                ip daddr . meta l4proto . th dport != @allowed4 counter drop
        }
    }

(and ``vips6``/``allowed6`` with ``ip6 daddr`` for IPv6 VIPs). The rule count is constant (one
rule per address family); VIPs and ports are set elements, looked up by hash.

- **Against IPVS.** IPVS sees a packet for a VIP in LOCAL_IN at priority NF_IP_PRI_NAT_SRC - 2
  (98); this chain (priority 0) runs before it. It drops only what no virtual service of that VIP
  covers, so every service port still reaches IPVS, and everything else to the VIP never reaches
  a socket. Addresses other than the VIPs are not matched at all.
- **What stays open.** ICMP and ICMPv6 (and any protocol other than TCP, UDP, SCTP): ping, path
  MTU discovery (ICMP "fragmentation needed" / "packet too big" for the VIP's own connections)
  and IPVS's own handling of ICMP errors about its connections need them, and they open no
  listener to the world. IPv4 fragments are reassembled before LOCAL_IN; IPv6 non-first fragments
  carry no ports and pass, but their datagram is never reassembled when its first fragment was
  dropped.
- **The host's own traffic** (arriving on ``lo``) is not filtered: a host process reaches 127.0.0.1
  anyway, and a connection from the host to its own VIP has the VIP as its source too, so its
  replies (to an ephemeral port of the VIP) must pass. Packets from the network never arrive on
  ``lo``.
- **No conntrack.** The chain does not use ``ct``, which would load conntrack into the director's
  network namespace and track every IPVS flow. The price: a connection that the host itself opens
  *from* a VIP to a remote host gets its replies dropped unless they come to a service port. The
  kernel picks a VIP (a /32 or /128 on the dummy) as the source of an outgoing connection only
  when asked to (a bind, or a route's ``src``).
- **Ownership.** Only the table ``inet kubelvs`` is ever created, replaced or deleted; nothing else
  in the ruleset is read or changed. A drop in this table cannot be overridden by another table's
  accept, and an accept here (the policy) does not override another table's drop.
- **Atomic.** ``sync`` replaces the whole table in one nft transaction (``add table``, ``delete
  table``, the new table, all in one ``nft -f -`` run): no packet ever sees a half-built table.
  An unchanged mapping is not re-applied while the ruleset's generation id (a netlink query, no
  process) is the one after kubelvs's last change; any other change to the ruleset (say, ``nft
  flush ruleset`` by a firewall reload) makes the next ``sync`` apply again.

Why the ``nft`` binary (Debian package ``nftables``, nft >= 0.9.3 for ``th``) and not pyroute2:
pyroute2 0.9.x's ``pyroute2.nftables`` sends each table/chain/set/rule command as its own
transaction (no multi-message batch, so no atomic replacement), does not know concatenated set
keys, and rules must be written as raw register expressions (payload loads, a lookup with the
invert flag). ``nft -f -`` takes the same text a person reads in ``nft list table inet kubelvs``.
The director's image needs the ``nftables`` package. In a named network namespace, ``nft`` runs
under ``nsenter --net`` (util-linux).
"""

from __future__ import annotations

import ipaddress
import shutil
import struct
import subprocess
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from socket import AF_INET, AF_INET6, inet_aton

from kubelvs.core.model import is_canonical_ipv4
from kubelvs.kernel.netns import netlink_socket


def nft_binary() -> str | None:
    """The ``nft`` binary (also in /usr/sbin when PATH lacks it, as a container's may), or None."""
    return shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")


TABLE = "inet kubelvs"
CHAIN = "input"
PRIORITY = 0  # before IPVS's LOCAL_IN hook (NF_IP_PRI_NAT_SRC - 2 = 98)
PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp"}
COMMENT = "kubelvs: a VIP answers only on its virtual-service ports"

Allowed = Mapping[str, Collection[tuple[int, int]]]


class VipFilterError(RuntimeError):
    """nft failed (missing, or the kernel refused the ruleset)."""


# ------------------------------------------------------------------------------- pure helpers


def normalize_allowed(allowed: Allowed) -> dict[int, dict[str, tuple[tuple[int, int], ...]]]:
    """``allowed`` checked and canonical: family -> {VIP: sorted (protocol, port)}, VIPs sorted.

    Raises ValueError for a VIP that is not an IP address, a protocol other than TCP/UDP/SCTP
    (6/17/132) or a port outside 1..65535: nothing unchecked ever reaches nft's input."""
    by_family: dict[int, dict[bytes, tuple[str, set[tuple[int, int]]]]] = {}
    for vip, ports in allowed.items():
        if is_canonical_ipv4(vip):  # what kubelvs's VIPs are: no ipaddress object (10,000 of them)
            family, packed, text = AF_INET, inet_aton(vip), vip
        else:
            addr = ipaddress.ip_address(vip.strip())  # as normalize_address, parsed once
            family, packed, text = (AF_INET if addr.version == 4 else AF_INET6), addr.packed, str(addr)
        entry = by_family.setdefault(family, {}).setdefault(packed, (text, set()))[1]
        for protocol, port in ports:
            if protocol not in PROTOCOLS:
                raise ValueError(f"VIP {vip}: protocol {protocol!r} is not TCP (6), UDP (17) or SCTP (132)")
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                raise ValueError(f"VIP {vip}: port {port!r} is not in 1..65535")
            entry.add((protocol, port))
    return {
        family: {vips[key][0]: tuple(sorted(vips[key][1])) for key in sorted(vips)}
        for family, vips in sorted(by_family.items())
    }


def _elements(items: list[str]) -> str:
    """A set's ``elements = { ... }`` line (eight to a line); an empty set has none."""
    if not items:
        return ""
    lines = [", ".join(items[i : i + 8]) for i in range(0, len(items), 8)]
    return "\t\telements = { " + ",\n\t\t\t".join(lines) + " }\n"


def render_table(allowed: Allowed) -> str:
    """The table's definition (``table inet kubelvs { ... }``) for ``allowed``, deterministic.
    Empty ``allowed``: an empty string (no table)."""
    families = normalize_allowed(allowed)
    if not families:
        return ""
    sets: list[str] = []
    rules: list[str] = []
    protocols = ", ".join(str(p) for p in sorted(PROTOCOLS))
    for family, vips in families.items():
        v, addr_type, match = ("4", "ipv4_addr", "ip daddr") if family == AF_INET else ("6", "ipv6_addr", "ip6 daddr")
        triples = [f"{vip} . {protocol} . {port}" for vip, ports in vips.items() for protocol, port in ports]
        sets.append(f"\tset vips{v} {{\n\t\ttype {addr_type}\n{_elements(list(vips))}\t}}\n")
        sets.append(
            f"\tset allowed{v} {{\n\t\ttype {addr_type} . inet_proto . inet_service\n{_elements(triples)}\t}}\n"
        )
        rules.append(
            f'\t\tiif != "lo" meta l4proto {{ {protocols} }} {match} @vips{v} '
            f'{match} . meta l4proto . th dport != @allowed{v} counter drop comment "{COMMENT}"\n'
        )
    hook = f"\t\ttype filter hook input priority {PRIORITY}; policy accept;\n"
    chain = f"\tchain {CHAIN} {{\n" + hook + "".join(rules) + "\t}\n"
    return f"table {TABLE} {{\n" + "".join(sets) + chain + "}\n"


def render_sync(allowed: Allowed) -> str:
    """One nft script (one transaction) that replaces the table with ``allowed``'s, or removes it
    when ``allowed`` is empty. ``add`` first, so that ``delete`` never fails on a missing table."""
    return f"add table {TABLE}\ndelete table {TABLE}\n" + render_table(allowed)


def render_remove() -> str:
    return render_sync({})


# ------------------------------------------------------------------------------- the effect

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")


def parse_genid(data: bytes) -> int | None:
    """NFTA_GEN_ID from an NFT_MSG_NEWGEN reply; None if ``data`` holds none (or an error)."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            return None
        if msg_type == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
            attr = offset + _NLMSGHDR.size + _NFGENMSG.size
            end = offset + length
            while attr + 4 <= end:
                alen, atype = struct.unpack_from("=HH", data, attr)
                if alen < 4:
                    return None
                if atype & 0x3FFF == NFTA_GEN_ID and alen >= 8:
                    return int(struct.unpack_from(">I", data, attr + 4)[0])
                attr += (alen + 3) & ~3
        offset += (length + 3) & ~3
    return None


@dataclass(slots=True)
class _Background:
    """A sync begun in the background: the mapping it applies, its thread, how it ended."""

    snapshot: dict[str, frozenset[tuple[int, int]]]
    thread: threading.Thread | None = None
    error: Exception | None = None


class VipPortFilter:
    """The ``inet kubelvs`` table of one network namespace (``netns``: a name under /run/netns or
    a path, as in ``kernel.netns``; None: this process's)."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        # What the last sync applied, and the ruleset's generation id right after it.
        self._applied: dict[str, frozenset[tuple[int, int]]] | None = None
        self._genid: int | None = None
        self._background: _Background | None = None

    def sync(self, allowed: Mapping[str, Collection[tuple[int, int]]]) -> None:
        """allowed: VIP text (canonical, as kubelvs.core.model.normalize_address gives) -> {(protocol
        number 6/17/132, port)}; replace the table's contents atomically (one nft transaction) so
        that exactly these VIPs are filtered; an empty mapping removes the table.

        Raises ValueError for a bad VIP, protocol or port (nothing applied), VipFilterError when
        nft fails (the kernel keeps what it had)."""
        snapshot = {vip: frozenset(ports) for vip, ports in allowed.items()}
        background = self._join_background()
        if background is not None and background.snapshot == snapshot and background.error is None:
            self._applied, self._genid = snapshot, self._generation()  # begun with this very mapping
            return
        if not self._in_place(snapshot):
            self._apply(render_sync(allowed), snapshot)

    def begin(self, allowed: Mapping[str, Collection[tuple[int, int]]]) -> None:
        """Start what ``sync(allowed)`` would do and return at once: nft runs in its own process
        (a thread only waits for it), so a large sync can program IPVS meanwhile. The next
        ``sync`` waits for it, and has nothing left to do when asked for the same mapping; any
        error is that sync's (it applies again, and raises)."""
        self._join_background()
        snapshot = {vip: frozenset(ports) for vip, ports in allowed.items()}
        if self._in_place(snapshot):
            return
        self._applied = None
        background = self._background = _Background(snapshot)
        # Rendered in the thread too: 1.2 s for 10,000 VIPs under emulation, beside the applier
        # (whose time is mostly the kernel's) rather than before it.
        background.thread = threading.Thread(target=self._run_in_background, args=(background,), daemon=True)
        background.thread.start()

    def _in_place(self, snapshot: dict[str, frozenset[tuple[int, int]]]) -> bool:
        """The last applied mapping, and nothing changed the ruleset since (its generation)."""
        return snapshot == self._applied and self._genid is not None and self._generation() == self._genid

    def _run_in_background(self, background: _Background) -> None:
        try:
            self._run(render_sync(background.snapshot))
        except Exception as error:  # a bad value or nft's failure: the sync that follows applies again (and raises)
            background.error = error

    def _join_background(self) -> _Background | None:
        background, self._background = self._background, None
        if background is not None and background.thread is not None:
            background.thread.join()
        return background

    def remove(self) -> None:
        """Delete the table (nothing if there is none)."""
        self._join_background()
        self._apply(render_remove(), {})

    # ---------------------------------------------------------------------------- internals
    def _apply(self, script: str, snapshot: dict[str, frozenset[tuple[int, int]]]) -> None:
        self._applied = None
        self._run(script)
        self._applied = snapshot
        self._genid = self._generation()

    def _command(self) -> list[str]:
        nft = nft_binary()
        if nft is None:
            raise VipFilterError("nft not found: install the nftables package (the VIP port filter needs it)")
        if self.netns is None:
            return [nft]
        path = self.netns if self.netns.startswith("/") else f"/run/netns/{self.netns}"
        nsenter = shutil.which("nsenter") or shutil.which("nsenter", path="/usr/bin:/bin")
        if nsenter is None:
            raise VipFilterError("nsenter not found (util-linux): needed to run nft in a network namespace")
        return [nsenter, f"--net={path}", nft]

    def _run(self, script: str) -> None:
        argv = [*self._command(), "-f", "-"]
        try:
            done = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise VipFilterError(f"{argv[-3]}: {exc}") from exc
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip()
            raise VipFilterError(f"nft -f - (table {TABLE}) failed with status {done.returncode}: {detail[:2000]}")

    def _generation(self) -> int | None:
        """The ruleset's generation id (bumped by every nftables transaction), or None."""
        try:
            sock = netlink_socket(NETLINK_NETFILTER, self.netns)
        except OSError:
            return None
        try:
            sock.settimeout(5)
            header = _NLMSGHDR.pack(
                _NLMSGHDR.size + _NFGENMSG.size, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, NLM_F_REQUEST, 1, 0
            )
            sock.send(header + _NFGENMSG.pack(0, 0, 0))
            return parse_genid(sock.recv(65536))
        except OSError:  # (a timeout too) unknown: the next sync applies again
            return None
        finally:
            sock.close()


__all__ = [
    "COMMENT",
    "PROTOCOLS",
    "TABLE",
    "VipFilterError",
    "VipPortFilter",
    "normalize_allowed",
    "parse_genid",
    "render_remove",
    "render_sync",
    "render_table",
]
