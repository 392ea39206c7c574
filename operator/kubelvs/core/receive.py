"""The receive side of DR and TUN: what a real server's network namespace must hold, and the
changes that get it there. Pure: the agent (``kubelvs realserver``) reads the kernel and the API,
this module decides.

A real server takes a DR or TUN packet only if the VIP is local to it, and it must never answer
ARP (or NDP) for the VIP, or the director's clients would be sent to it directly:

- DR: the VIP on ``lo`` (/32 or /128; IPv6 ``nodad``), ``arp_ignore=1`` and ``arp_announce=2``.
  The kernel applies max(all, interface) to both, so ``all`` covers every interface of the pod,
  present and future. IPv6 needs nothing more: Linux answers a neighbour solicitation only for
  an address on the receiving interface, and the VIP is on ``lo``.
- TUN ipip: the fallback device ``tunl0`` up with the VIP, and ``rp_filter=0``
  on ``all`` and ``tunl0`` (max(all, interface) again: a decapsulated packet from a client on
  another subnet fails the reverse-path check otherwise). The ARP settings as for DR, since the
  VIP is local there too.
- TUN gue: as ipip, plus a fou port in GUE mode on the VirtualServer's tunnel port (the
  decapsulated packet is IP in IP, which ``tunl0`` takes).
- TUN gre: the fallback device ``gre0`` up with the VIP, ``rp_filter=0``.
- Every TUN method: an MSS clamp on the SYN-ACKs sent from the VIP (:class:`MssClamp`), so the
  clients' segments fit the path MTU once encapsulated, with no help from ICMP.
- TUN over IPv6: not prepared (:class:`Unsupported`): a gated pod stays out of its endpoints.

What kubelvs changes is recorded (:data:`Record`: item -> the value it found before), and the
plan never removes or resets anything that is not in the record: an address that was already
there satisfies the need without becoming kubelvs's, and a sysctl goes back to what it was.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubelvs.core.model import AF_INET, Method, TunnelChecksum, TunnelType, normalize_address
from kubelvs.core.spec import ObjectRef, VirtualServerSpec, meta

READY_CONDITION = "kubelvs.io/receiver-ready"
NODE = "node"  # the target key of the node's own network namespace (pods are keyed by UID)


# --- what a namespace must hold ------------------------------------------------------------


@dataclass(frozen=True, order=True, slots=True)
class Link:
    """A tunnel device that must exist and be up (the kernel's fallback device of that kind)."""

    device: str
    kind: str  # the rtnetlink link kind that brings it: "ipip", "ip6tnl", "gre", "ip6gre"


@dataclass(frozen=True, order=True, slots=True)
class Address:
    """A host address (/32, /128 nodad) on a device."""

    device: str
    address: str
    family: int


@dataclass(frozen=True, order=True, slots=True)
class Sysctl:
    """A sysctl under /proc/sys (``net/ipv4/conf/all/arp_ignore``) that must hold ``value``."""

    path: str
    value: int


@dataclass(frozen=True, order=True, slots=True)
class FouPort:
    """A UDP port that decapsulates GUE (``ip fou add port P gue``)."""

    port: int
    family: int


@dataclass(frozen=True, order=True, slots=True)
class MssClamp:
    """TCP SYN-ACKs sent from ``address`` (the VIP) offer an MSS of at most ``mss`` (an nftables
    table of kubelvs's own in the namespace, :attr:`table`). A TUN real server answers clients
    directly, but their segments reach it encapsulated: they must fit the path MTU less the
    tunnel's header, without relying on ICMP "fragmentation needed" reaching the client (path
    MTU discovery fails wherever that is filtered)."""

    address: str
    family: int
    mss: int

    @property
    def table(self) -> str:
        """The table's name: the VIP and the MSS in it, so a changed MSS is another table."""
        return f"kubelvs_mss_{ipaddress.ip_address(self.address).packed.hex()}_{self.mss}"


@dataclass(frozen=True, order=True, slots=True)
class Unsupported:
    """A receive side kubelvs cannot set up: never planned, never in place, so a gated pod stays
    out of its endpoints (with ``reason`` in its condition) instead of receiving traffic it drops."""

    reason: str


Item = Link | Address | Sysctl | FouPort | MssClamp | Unsupported
Record = Mapping[Item, int | None]  # what kubelvs changed -> what it found (None: absent)

# Adds in this order (a device before its address and its sysctls), removals in reverse.
_ORDER = {Link: 0, FouPort: 1, Address: 2, Sysctl: 3, MssClamp: 4, Unsupported: 5}


def _sort_key(item: Item) -> tuple[int, str]:
    return _ORDER[type(item)], repr(item)


def _conf(device: str, name: str, value: int) -> Sysctl:
    return Sysctl(f"net/ipv4/conf/{device}/{name}", value)


_HIDE_VIP = (_conf("all", "arp_ignore", 1), _conf("all", "arp_announce", 2))
_TUNNEL_DEVICES = {
    (TunnelType.IPIP, AF_INET): Link("tunl0", "ipip"),
    (TunnelType.GUE, AF_INET): Link("tunl0", "ipip"),
    (TunnelType.GRE, AF_INET): Link("gre0", "gre"),
}


PATH_MTU = 1500  # between the directors and the real servers, unless the agent is told otherwise
IPV4_TCP_HEADERS = 40


def tunnel_overhead(vs: VirtualServerSpec) -> int:
    """The bytes the director's encapsulation adds (IPv4 outer header; net/netfilter/ipvs/ip_vs_xmit.c):
    ipip the outer IP header; GRE 4 more, 8 with a checksum; GUE a UDP header and GUE's 4, 8 more
    for remote checksum offload's option."""
    if vs.tunnel_type is TunnelType.GRE:
        return 20 + (8 if vs.tunnel_checksum is TunnelChecksum.CSUM else 4)
    if vs.tunnel_type is TunnelType.GUE:
        return 20 + 8 + 4 + (8 if vs.tunnel_checksum is TunnelChecksum.REMCSUM else 0)
    return 20


def receive_items(vs: VirtualServerSpec, path_mtu: int = PATH_MTU) -> frozenset[Item]:
    """What a real server of ``vs`` must hold (empty for NAT: the director rewrites the address).
    ``path_mtu``: the MTU between the directors and the real servers (TUN's MSS clamp)."""
    if vs.method is Method.DR:
        if vs.family == AF_INET:
            return frozenset((Address("lo", vs.vip, vs.family), *_HIDE_VIP))
        return frozenset((Address("lo", vs.vip, vs.family),))
    if vs.method is not Method.TUN:
        return frozenset()
    if vs.family == AF_INET:
        link = _TUNNEL_DEVICES[vs.tunnel_type, AF_INET]
        items: set[Item] = {
            link,
            Address(link.device, vs.vip, vs.family),
            _conf("all", "rp_filter", 0),
            _conf(link.device, "rp_filter", 0),
            *_HIDE_VIP,
            MssClamp(vs.vip, vs.family, path_mtu - tunnel_overhead(vs) - IPV4_TCP_HEADERS),
        }
    else:
        # The IPv6 fallback devices (ip6tnl0, ip6gre0) never get the receive capability (the
        # kernel skips ip6_tnl_link_config for them): a receiving tunnel needs the namespace's own
        # address as its local end, which this version does not set up.
        return frozenset({Unsupported(f"TUN {vs.tunnel_type.name.lower()} over IPv6 is not prepared automatically")})
    if vs.tunnel_type is TunnelType.GUE:
        items.add(FouPort(vs.tunnel_port, vs.family))
    return frozenset(items)


# --- which namespaces: the pods (and the node) that are backends -----------------------------


@dataclass(frozen=True, slots=True)
class PodInfo:
    """What the agent reads of a pod on its node."""

    namespace: str
    name: str
    uid: str
    labels: Mapping[str, str]
    ips: tuple[str, ...]  # canonical text
    host_network: bool
    gated: bool  # declares the readiness gate READY_CONDITION
    condition: bool | None  # the current status of that condition, None if unset
    terminating: bool = False

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef(self.namespace, self.name)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def pod_info(obj: Mapping[str, Any]) -> PodInfo | None:
    """A pod as the agent sees it; None for a pod without a UID (never from the API)."""
    found = meta(obj)
    uid = found.get("uid")
    if not isinstance(uid, str) or not uid:
        return None
    spec, status = _mapping(obj.get("spec")), _mapping(obj.get("status"))
    ips: list[str] = []
    for entry in status.get("podIPs") or [{"ip": status.get("podIP")}]:
        try:
            address = normalize_address(str(_mapping(entry).get("ip")))[1]
        except ValueError:
            continue
        if address not in ips:
            ips.append(address)
    gated = any(_mapping(gate).get("conditionType") == READY_CONDITION for gate in spec.get("readinessGates") or [])
    condition = None
    for entry in status.get("conditions") or []:
        if _mapping(entry).get("type") == READY_CONDITION:
            condition = _mapping(entry).get("status") == "True"
    labels = found.get("labels")
    return PodInfo(
        namespace=str(found.get("namespace") or "default"),
        name=str(found.get("name") or ""),
        uid=uid,
        labels={str(k): str(v) for k, v in _mapping(labels).items()},
        ips=tuple(ips),
        host_network=bool(spec.get("hostNetwork")),
        gated=gated,
        condition=condition,
        terminating=found.get("deletionTimestamp") is not None,
    )


def service_selector(obj: Mapping[str, Any]) -> tuple[tuple[str, str], Mapping[str, str]]:
    """A Service's key (namespace, name) and its pod selector (empty: it selects no pod)."""
    found = meta(obj)
    selector = _mapping(_mapping(obj.get("spec")).get("selector"))
    key = (str(found.get("namespace") or "default"), str(found.get("name") or ""))
    return key, {str(k): str(v) for k, v in selector.items()}


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True, slots=True)
class Target:
    """One network namespace to prepare: a pod's (keyed by its UID) or the node's (:data:`NODE`)."""

    key: str
    items: frozenset[Item]
    virtual_servers: frozenset[ObjectRef]
    pod: PodInfo | None = None  # None for the node
    needs_node: bool = False  # a pod whose traffic goes to its node (``target: Node``)


@dataclass(slots=True)
class _Building:
    items: set[Item] = field(default_factory=set)
    refs: set[ObjectRef] = field(default_factory=set)
    needs_node: bool = False


def targets(
    specs: Iterable[VirtualServerSpec],
    selectors: Mapping[tuple[str, str], Mapping[str, str]],
    pods: Iterable[PodInfo],
    node_addresses: Iterable[str] = (),
    path_mtu: int = PATH_MTU,
) -> dict[str, Target]:
    """The namespaces on this node that are DR or TUN backends, and what each must hold.

    A pod is a backend of a VirtualServer whose Service selects it (by labels, so that a pod is
    prepared before it is ready and in the EndpointSlice: that is what the readiness gate waits
    for), or whose static addresses name one of its IPs. ``target: Node``, a static address of
    the node, and host-network pods are prepared in the node's own namespace."""
    # Terminating pods stay prepared: the director drains them (weight 0) until they are gone,
    # and their established connections still arrive.
    pods = list(pods)
    node_set = set(node_addresses)
    building: dict[str, _Building] = {}
    by_uid = {pod.uid: pod for pod in pods}

    def add(key: str, vs: VirtualServerSpec, items: frozenset[Item]) -> None:
        entry = building.setdefault(key, _Building())
        entry.items |= items
        entry.refs.add(vs.ref)

    for vs in specs:
        items = receive_items(vs, path_mtu)
        if not items:
            continue
        if vs.service_name is not None:
            selector = selectors.get((vs.ref.namespace, vs.service_name), {})
            for pod in pods:
                if pod.namespace == vs.ref.namespace and _selects(selector, pod.labels):
                    add(NODE if vs.target_node or pod.host_network else pod.uid, vs, items)
                    if vs.target_node or pod.host_network:
                        # The pod waits for its node: its condition follows the node's namespace.
                        waiting = building.setdefault(pod.uid, _Building())
                        waiting.refs.add(vs.ref)
                        waiting.needs_node = True
        for backend in vs.static_backends:
            if backend.address in node_set:
                add(NODE, vs, items)
            for pod in pods:
                if backend.address in pod.ips and not pod.host_network:
                    add(pod.uid, vs, items)
    return {
        key: Target(key, frozenset(entry.items), frozenset(entry.refs), by_uid.get(key), entry.needs_node)
        for key, entry in building.items()
    }


# --- from what is there to what must be ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Observed:
    """The relevant kernel state of one namespace."""

    links: Mapping[str, bool] = field(default_factory=dict)  # device -> up
    addresses: frozenset[tuple[str, str]] = frozenset()  # (device, address)
    sysctls: Mapping[str, int] = field(default_factory=dict)  # path -> value; absent: no such file
    fou_ports: frozenset[tuple[int, int]] = frozenset()  # (port, family)
    nft_tables: frozenset[str] = frozenset()  # names of the inet tables


@dataclass(frozen=True, slots=True)
class Action:
    """``add``: make ``item`` hold (the applier records what it found first); ``remove``: undo an
    item of the record, with ``previous`` the value it found (a sysctl is put back, a device that
    kubelvs created is deleted, one it brought up is set down)."""

    op: str  # "add" | "remove"
    item: Item
    previous: int | None = None


def holds(item: Item, observed: Observed) -> bool:
    """Whether ``item`` is in place in ``observed``, whoever put it there."""
    if isinstance(item, Link):
        return observed.links.get(item.device, False)
    if isinstance(item, Address):
        return (item.device, item.address) in observed.addresses
    if isinstance(item, Sysctl):
        return observed.sysctls.get(item.path) == item.value
    if isinstance(item, FouPort):
        return (item.port, item.family) in observed.fou_ports
    if isinstance(item, MssClamp):
        return item.table in observed.nft_tables
    return False


def prepared(items: Iterable[Item], observed: Observed) -> bool:
    """Whether the namespace can take the traffic: every item in place."""
    return all(holds(item, observed) for item in items)


def plan(desired: Iterable[Item], record: Record, observed: Observed) -> list[Action]:
    """The actions that make ``desired`` hold, and undo what the record holds that is no longer
    desired. Only recorded items are ever removed; removals come first, in reverse order."""
    wanted = {item for item in desired if not isinstance(item, Unsupported)}
    removals = [Action("remove", item, record[item]) for item in record if item not in wanted]
    removals.sort(key=lambda action: _sort_key(action.item), reverse=True)
    adds = [Action("add", item, record.get(item)) for item in wanted if not holds(item, observed)]
    adds.sort(key=lambda action: _sort_key(action.item))
    return removals + adds


def previous_value(item: Item, observed: Observed) -> int | None:
    """What an add finds and records: the sysctl's value, or a device's state (0 down, None
    missing); None for an address or a fou port (absent, or it would not be added)."""
    if isinstance(item, Sysctl):
        return observed.sysctls.get(item.path)
    if isinstance(item, Link):
        up = observed.links.get(item.device)
        return None if up is None else int(up)
    return None


def restored_sysctl(item: Sysctl, previous: int | None, current: int | None) -> int | None:
    """The value to write back when ``item`` is no longer wanted: its previous value, only if it
    still holds what kubelvs set (somebody who changed it since has the last word)."""
    if previous is None or current != item.value or previous == item.value:
        return None
    return previous


def condition_changes(
    pods: Iterable[PodInfo], targets_by_key: Mapping[str, Target], ready: Mapping[str, bool]
) -> dict[str, bool]:
    """The gated pods (by UID) whose readiness-gate condition must change -> the new status: True
    when every namespace its VirtualServers need is prepared (``ready`` by target key); a gated
    pod that no DR or TUN VirtualServer targets needs nothing and is True."""
    changes: dict[str, bool] = {}
    for pod in pods:
        if not pod.gated or pod.terminating:
            continue
        target = targets_by_key.get(pod.uid)
        status = True
        if target is not None:
            status = (not target.items or ready.get(pod.uid, False)) and (
                not target.needs_node or ready.get(NODE, False)
            )
        if pod.condition is not status:
            changes[pod.uid] = status
    return changes
