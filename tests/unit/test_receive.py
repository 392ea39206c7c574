"""The receive-side plan: idempotent, undoes exactly what it did, never touches what it did not set."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubelvs.core.model import AF_INET, AF_INET6
from kubelvs.core.receive import (
    NODE,
    READY_CONDITION,
    Action,
    Address,
    FouPort,
    Item,
    Link,
    MssClamp,
    Observed,
    Sysctl,
    Unsupported,
    condition_changes,
    plan,
    pod_info,
    prepared,
    previous_value,
    receive_items,
    restored_sysctl,
    service_selector,
    targets,
)
from kubelvs.core.spec import parse_virtual_server


def _vs(method: str = "DR", vip: str = "192.0.2.10", tunnel: dict[str, Any] | None = None, **backends: Any) -> Any:
    forwarding: dict[str, Any] = {"method": method}
    if tunnel is not None:
        forwarding["tunnel"] = tunnel
    return parse_virtual_server(
        {
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "vip": vip,
                "ports": [{"port": 80}],
                "forwarding": forwarding,
                "backends": backends or {"serviceRef": {"name": "web"}},
            },
        }
    )


def _pod(name: str = "web-1", ip: str = "10.244.0.5", gated: bool = True, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"nodeName": "n1"}
    if gated:
        spec["readinessGates"] = [{"conditionType": READY_CONDITION}]
    spec.update(extra.pop("spec", {}))
    return {
        "metadata": {"name": name, "namespace": "shop", "uid": f"uid-{name}", "labels": {"app": "web"}, **extra},
        "spec": spec,
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]},
    }


SELECTORS = {("shop", "web"): {"app": "web"}}


# --- what each method needs ------------------------------------------------------------------


def test_dr_needs_the_vip_on_lo_and_the_arp_settings() -> None:
    assert receive_items(_vs("DR")) == {
        Address("lo", "192.0.2.10", AF_INET),
        Sysctl("net/ipv4/conf/all/arp_ignore", 1),
        Sysctl("net/ipv4/conf/all/arp_announce", 2),
    }


def test_dr_ipv6_needs_only_the_vip_on_lo() -> None:
    assert receive_items(_vs("DR", vip="2001:db8::10")) == {Address("lo", "2001:db8::10", AF_INET6)}


def test_tun_needs_tunl0_up_with_the_vip_and_rp_filter_off() -> None:
    items = receive_items(_vs("TUN"))
    assert Link("tunl0", "ipip") in items
    assert Address("tunl0", "192.0.2.10", AF_INET) in items
    assert Sysctl("net/ipv4/conf/all/rp_filter", 0) in items
    assert Sysctl("net/ipv4/conf/tunl0/rp_filter", 0) in items


@pytest.mark.parametrize(
    ("tunnel", "mss"),
    [
        (None, 1440),  # ipip: 20 bytes
        ({"type": "gre"}, 1436),  # + 4
        ({"type": "gre", "checksum": "csum"}, 1432),  # + 8
        ({"type": "gue", "port": 6080}, 1428),  # IP, UDP, GUE: 32
        ({"type": "gue", "port": 6080, "checksum": "remcsum"}, 1420),  # + the remote checksum option
    ],
)
def test_tun_clamps_the_mss_to_fit_the_path_once_encapsulated(tunnel: dict[str, Any] | None, mss: int) -> None:
    (clamp,) = (i for i in receive_items(_vs("TUN", tunnel=tunnel)) if isinstance(i, MssClamp))
    assert clamp == MssClamp("192.0.2.10", AF_INET, mss)
    (lower,) = (i for i in receive_items(_vs("TUN", tunnel=tunnel), path_mtu=1450) if isinstance(i, MssClamp))
    assert lower.mss == mss - 50
    assert not any(isinstance(i, MssClamp) for i in receive_items(_vs("DR")))  # DR adds no header


def test_gue_adds_a_fou_port_and_gre_uses_gre0() -> None:
    gue = receive_items(_vs("TUN", tunnel={"type": "gue", "port": 6080}))
    assert FouPort(6080, AF_INET) in gue and Link("tunl0", "ipip") in gue  # GUE carries IP in IP
    assert Address("tunl0", "192.0.2.10", AF_INET) in gue and not any(isinstance(i, Unsupported) for i in gue)
    gre = receive_items(_vs("TUN", tunnel={"type": "gre"}))
    assert Link("gre0", "gre") in gre and Address("gre0", "192.0.2.10", AF_INET) in gre
    (unsupported,) = receive_items(_vs("TUN", vip="2001:db8::10"))
    assert isinstance(unsupported, Unsupported) and "IPv6" in unsupported.reason
    assert plan({unsupported}, {}, Observed()) == [] and not prepared({unsupported}, Observed())


def test_nat_needs_nothing() -> None:
    assert receive_items(_vs("NAT")) == frozenset()


# --- which namespaces ------------------------------------------------------------------------


def test_pods_selected_by_the_service_are_targets_ready_or_not() -> None:
    pods = [pod_info(_pod("web-1")), pod_info(_pod("other", labels={"app": "db"}))]
    found = targets([_vs("DR")], SELECTORS, [p for p in pods if p])
    assert set(found) == {"uid-web-1"}
    assert found["uid-web-1"].items == receive_items(_vs("DR"))


def test_static_address_of_a_pod_or_the_node() -> None:
    vs = _vs("DR", addresses=[{"ip": "10.244.0.5"}, {"ip": "192.168.1.7"}])
    pod = pod_info(_pod("web-1"))
    assert pod is not None
    found = targets([vs], {}, [pod], node_addresses=["192.168.1.7"])
    assert set(found) == {"uid-web-1", NODE}


def test_target_node_prepares_the_node_and_the_pod_waits_for_it() -> None:
    vs = parse_virtual_server(
        {
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "vip": "192.0.2.10",
                "ports": [{"port": 80}],
                "backends": {"serviceRef": {"name": "web"}, "target": "Node"},
            },
        }
    )
    pod = pod_info(_pod("web-1"))
    assert pod is not None
    found = targets([vs], SELECTORS, [pod])
    assert found[NODE].items == receive_items(vs)
    assert found["uid-web-1"].needs_node and not found["uid-web-1"].items
    assert condition_changes([pod], found, {NODE: False}) == {"uid-web-1": False}
    assert condition_changes([pod], found, {NODE: True}) == {"uid-web-1": True}


def test_conditions_only_for_gated_pods_and_true_when_nothing_is_needed() -> None:
    gated, plain, idle = pod_info(_pod("web-1")), pod_info(_pod("web-2", gated=False)), pod_info(_pod("x", labels={}))
    assert gated and plain and idle
    found = targets([_vs("TUN")], SELECTORS, [gated, plain, idle])
    assert condition_changes([gated, plain, idle], found, {"uid-web-1": False}) == {
        "uid-web-1": False,
        "uid-x": True,
    }


def test_service_selector_and_pod_info_read_the_api_objects() -> None:
    key, selector = service_selector(
        {"metadata": {"name": "web", "namespace": "shop"}, "spec": {"selector": {"a": "b"}}}
    )
    assert key == ("shop", "web") and selector == {"a": "b"}
    info = pod_info(_pod(conditions=None))
    assert info is not None and info.gated and info.condition is None and info.ips == ("10.244.0.5",)
    assert pod_info({"metadata": {"name": "x"}}) is None


# --- the plan, against a model of one namespace ----------------------------------------------

DEVICE_DEFAULT = 1  # the per-device sysctls a new device gets (rp_filter, arp_*), in this model


@dataclass
class Namespace:
    """A namespace as the kernel effects see it, and the applier's record (as kernel/receive.py)."""

    links: dict[str, bool]
    addresses: set[tuple[str, str]]
    sysctls: dict[str, int]
    fou_ports: set[tuple[int, int]]
    tables: set[str] = field(default_factory=set)
    record: dict[Item, int | None] = field(default_factory=dict)

    def observed(self) -> Observed:
        return Observed(
            dict(self.links),
            frozenset(self.addresses),
            dict(self.sysctls),
            frozenset(self.fou_ports),
            frozenset(self.tables),
        )

    def kernel(self) -> tuple[Any, ...]:
        return (dict(self.links), set(self.addresses), dict(self.sysctls), set(self.fou_ports), set(self.tables))

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            item = action.item
            if action.op == "add":
                self.record.setdefault(item, previous_value(item, self.observed()))
                if isinstance(item, Link):
                    if item.device not in self.links:
                        for name in ("rp_filter", "arp_ignore", "arp_announce"):
                            self.sysctls[f"net/ipv4/conf/{item.device}/{name}"] = DEVICE_DEFAULT
                    self.links[item.device] = True
                elif isinstance(item, Address):
                    self.addresses.add((item.device, item.address))
                elif isinstance(item, Sysctl):
                    self.sysctls[item.path] = item.value
                elif isinstance(item, FouPort):
                    self.fou_ports.add((item.port, item.family))
                elif isinstance(item, MssClamp):
                    self.tables.add(item.table)
                continue
            previous = self.record.pop(item)
            if isinstance(item, Link):
                if previous is None:
                    self.links.pop(item.device, None)
                    for name in ("rp_filter", "arp_ignore", "arp_announce"):
                        self.sysctls.pop(f"net/ipv4/conf/{item.device}/{name}", None)
                elif item.device in self.links:
                    self.links[item.device] = False
            elif isinstance(item, Address):
                self.addresses.discard((item.device, item.address))
            elif isinstance(item, Sysctl):
                value = restored_sysctl(item, previous, self.sysctls.get(item.path))
                if value is not None:
                    self.sysctls[item.path] = value
            elif isinstance(item, FouPort):
                self.fou_ports.discard((item.port, item.family))
            elif isinstance(item, MssClamp):
                self.tables.discard(item.table)

    def converge(self, desired: frozenset[Item]) -> None:
        self.apply(plan(desired, self.record, self.observed()))


VIPS = st.sampled_from(["192.0.2.10", "192.0.2.11", "2001:db8::10"])
SPECS = st.builds(
    lambda method, vip, tunnel: _vs(method, vip, tunnel if method == "TUN" else None),
    st.sampled_from(["DR", "TUN", "NAT"]),
    VIPS,
    st.sampled_from([None, {"type": "ipip"}, {"type": "gue", "port": 6080}, {"type": "gre"}]),
)
DESIRED = st.lists(SPECS, max_size=3).map(lambda specs: frozenset().union(*(receive_items(s) for s in specs)))


@st.composite
def namespaces(draw: st.DrawFn) -> Namespace:
    """A namespace with what somebody else set: any of the devices, addresses, sysctl values."""
    links = draw(st.dictionaries(st.sampled_from(["tunl0", "gre0", "ip6tnl0"]), st.booleans()))
    sysctls = {
        f"net/ipv4/conf/all/{name}": draw(st.integers(0, 2)) for name in ("rp_filter", "arp_ignore", "arp_announce")
    }
    for device in links:
        for name in ("rp_filter", "arp_ignore", "arp_announce"):
            sysctls[f"net/ipv4/conf/{device}/{name}"] = draw(st.integers(0, 2))
    devices = ["lo", *links]
    addresses = draw(st.sets(st.tuples(st.sampled_from(devices), VIPS), max_size=3))
    fou = draw(st.sets(st.tuples(st.just(6080), st.sampled_from([AF_INET, AF_INET6])), max_size=1))
    tables = draw(st.sets(st.sampled_from(["filter", "somebody_else"]), max_size=2))  # never kubelvs's names
    return Namespace(dict(links), set(addresses), sysctls, set(fou), set(tables))


@settings(max_examples=300, deadline=None)
@given(namespaces(), DESIRED)
def test_one_round_prepares_and_a_second_plans_nothing(ns: Namespace, desired: frozenset[Item]) -> None:
    ns.converge(desired)
    assert prepared(desired, ns.observed()) == (not any(isinstance(item, Unsupported) for item in desired))
    assert plan(desired, ns.record, ns.observed()) == []  # idempotent; a restart with the record: no change


@settings(max_examples=300, deadline=None)
@given(namespaces(), DESIRED, DESIRED)
def test_removing_everything_gives_back_the_namespace_as_it_was(
    ns: Namespace, first: frozenset[Item], second: frozenset[Item]
) -> None:
    before = ns.kernel()
    ns.converge(first)
    ns.converge(second)  # the VirtualServers change
    ns.converge(frozenset())  # and go away
    assert ns.kernel() == before
    assert ns.record == {}


@settings(max_examples=300, deadline=None)
@given(namespaces(), DESIRED)
def test_never_removes_or_changes_what_it_did_not_set(ns: Namespace, desired: frozenset[Item]) -> None:
    foreign_addresses = set(ns.addresses)
    ns.converge(desired)
    for action in plan(frozenset(), ns.record, ns.observed()):
        assert action.item in ns.record
    assert foreign_addresses <= ns.addresses
    for device, address in foreign_addresses:
        assert Address(device, address, AF_INET6 if ":" in address else AF_INET) not in ns.record


@settings(max_examples=200, deadline=None)
@given(namespaces(), DESIRED)
def test_a_value_changed_by_hand_after_kubelvs_is_not_put_back(ns: Namespace, desired: frozenset[Item]) -> None:
    ns.converge(desired)
    changed = [item for item in ns.record if isinstance(item, Sysctl) and item.path.startswith("net/ipv4/conf/all/")]
    for item in changed:
        ns.sysctls[item.path] = 7  # somebody else's value now
    ns.converge(frozenset())
    for item in changed:
        assert ns.sysctls[item.path] == 7


def test_a_terminating_pod_stays_prepared_while_it_drains() -> None:
    pod = pod_info(_pod("web-1", deletionTimestamp="2026-01-01T00:00:00Z"))
    assert pod is not None and pod.terminating
    assert set(targets([_vs("DR")], SELECTORS, [pod])) == {"uid-web-1"}
    assert condition_changes([pod], {}, {}) == {}  # its gate is left alone
