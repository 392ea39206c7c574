"""Resolving VirtualServers against the cluster: endpoint conditions, Node targets, and junk in
cluster objects (free strings, wrong types) that must only ever affect the VirtualServer using it."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubelvs.core.cluster import Cluster, EndpointState, endpoint_state, trim_endpoint_slice, trim_node, trim_service
from kubelvs.core.desired import DesiredState, desired_state
from kubelvs.core.model import AF_INET, Destination, Method, ServiceKey, VirtualService, destination_order
from kubelvs.core.resolve import _slice_port, check_ports_kept
from kubelvs.core.spec import ObjectRef, PortSpec, SpecError, parse_virtual_server
from test_spec import KEY, endpoint, eps, service, vs

READY, DRAINING, WAITING = EndpointState.READY, EndpointState.DRAINING, EndpointState.WAITING


def node(name: str, *addresses: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]},
    }


# --- the conditions' truth table --------------------------------------------------------------


@pytest.mark.parametrize(
    ("conditions", "state"),
    [
        ({}, READY),  # ready nil = ready
        (None, READY),
        ({"ready": True}, READY),
        ({"ready": True, "serving": None}, READY),  # serving nil = as ready
        ({"ready": False}, WAITING),  # not ready, not terminating: left out, counted as waiting
        ({"ready": False, "serving": False}, WAITING),
        ({"ready": False, "serving": True}, WAITING),  # serving but not terminating: not ready yet
        ({"ready": False, "serving": True, "terminating": True}, DRAINING),  # weight 0
        ({"serving": True, "terminating": True}, DRAINING),
        ({"ready": True, "terminating": True}, DRAINING),  # serving nil follows ready
        ({"ready": False, "serving": False, "terminating": True}, None),
        ({"ready": False, "terminating": True}, None),
        ("junk", READY),  # not an object: as if unset
    ],
)
def test_endpoint_state_truth_table(conditions: Any, state: EndpointState | None) -> None:
    assert endpoint_state(conditions) is state


def test_a_pod_ready_in_one_slice_and_draining_in_another_counts_ready() -> None:
    for order in ((True, False), (False, True)):
        slices = [
            eps(f"s{i}", endpoint("10.0.0.1", ready=ready, serving=True, terminating=not ready))
            for i, ready in enumerate(order)
        ]
        state = desired_state([vs()], Cluster.build([service()], slices))
        assert [(d.address, d.weight) for d in state.services[KEY].destinations] == [("10.0.0.1", 1)]
        resolution = state.resolutions[ObjectRef("ns", "web")]
        assert (resolution.ready_backends, resolution.draining_backends) == (1, 0)


def test_endpoints_not_ready_yet_are_left_out_and_counted_as_waiting() -> None:
    """A pod whose readiness gate (kubelvs.io/receiver-ready) is not True yet is in the slice
    with ready=false: never a real server, counted in status.waitingBackends."""
    slices = [
        eps(
            "s0",
            endpoint("10.0.0.1"),
            endpoint("10.0.0.2", ready=False, serving=False, terminating=False),
            endpoint("10.0.0.3", ready=False, serving=False, terminating=True),  # going away: not waiting
        ),
        eps("s1", endpoint("10.0.0.2", ready=False, serving=False, terminating=False)),  # counted once
    ]
    state = desired_state([vs()], Cluster.build([service()], slices))
    assert [d.address for d in state.services[KEY].destinations] == ["10.0.0.1"]
    resolution = state.resolutions[ObjectRef("ns", "web")]
    assert (resolution.ready_backends, resolution.draining_backends, resolution.waiting_backends) == (1, 0, 1)


def test_slice_port_matches_name_and_protocol() -> None:
    entry = PortSpec(80, parse_virtual_server(vs()).ports[0].protocol, "http")

    def port(ports: Any, name: str | None = "http") -> int | None:
        return _slice_port(trim_endpoint_slice({"ports": ports}), name, entry)

    assert port([{"name": "http", "port": 8080, "protocol": "TCP"}]) == 8080
    assert port([{"port": 8080}], None) == 8080  # unnamed, TCP by default
    assert port([{"name": "http", "port": 8080, "protocol": "UDP"}]) is None
    assert port([{"name": "other", "port": 8080}]) is None
    for junk in ("80", None, 0, 70000, True, [80]):
        assert port([{"name": "http", "port": junk}]) is None
    assert port("junk") is None


def test_port_mismatch_is_a_separate_check() -> None:
    dr = parse_virtual_server(vs())
    entry = dr.ports[0]
    check_ports_kept(dr, entry, [Destination("10.0.0.1", 80)])
    with pytest.raises(SpecError) as info:
        check_ports_kept(dr, entry, [Destination("10.0.0.1", 8080)])
    assert (info.value.reason, info.value.path) == ("PortMismatch", "spec.backends.serviceRef.port")
    nat = parse_virtual_server(vs(forwarding={"method": "NAT"}))
    check_ports_kept(nat, nat.ports[0], [Destination("10.0.0.1", 8080, method=Method.NAT)])


# --- bad addresses in cluster objects -----------------------------------------------------------


def statics(n: int) -> list[dict[str, Any]]:
    return [vs(f"static{i}", vip=f"192.0.2.{20 + i}", backends={"addresses": [{"ip": "10.9.0.1"}]}) for i in range(n)]


def test_a_node_whose_internal_ip_is_not_an_ip_affects_only_its_node_targets() -> None:
    # Probe 3: this used to fail every VirtualServer with ValueError.
    nodes = [node("node-1", "node-1.example"), node("node-2", "172.16.0.2")]
    slices = [eps("a", endpoint("10.0.0.1", node="node-1"), endpoint("10.0.0.2", node="node-2"))]
    node_target = vs(backends={"serviceRef": {"name": "web"}, "target": "Node"})
    pod_target = vs("pods", vip="192.0.2.11")
    state = desired_state([node_target, pod_target, *statics(3)], Cluster.build([service()], slices, nodes))
    assert not state.errors
    assert len(state.services) == 5
    resolution = state.resolutions[ObjectRef("ns", "web")]
    assert resolution.accepted
    assert resolution.problem is not None and resolution.problem.reason == "InvalidNodeAddress"
    assert "Node node-1" in resolution.problem.message
    assert "status.addresses[].address" in resolution.problem.message
    assert "'node-1.example'" in resolution.problem.message
    assert [d.address for d in state.services[KEY].destinations] == ["172.16.0.2"]  # the good Node stays
    pods = state.resolutions[ObjectRef("ns", "pods")]
    assert pods.problem is None and pods.ready_backends == 2  # Pod targets do not read Nodes


def test_a_node_with_a_good_address_of_the_family_is_used_despite_a_bad_one() -> None:
    nodes = [node("node-1", "junk", "172.16.0.1")]
    cluster = Cluster.build([service()], [eps("a", endpoint("10.0.0.1", node="node-1"))], nodes)
    state = desired_state([vs(backends={"serviceRef": {"name": "web"}, "target": "Node"})], cluster)
    assert [d.address for d in state.services[KEY].destinations] == ["172.16.0.1"]
    assert state.resolutions[ObjectRef("ns", "web")].problem is None


@pytest.mark.parametrize(
    "bad",
    ["node-1.example", "::ffff:10.0.0.3", "::10.0.0.3", "::1", "10.0.0.3 ", "fe80::1%eth0", "", "2001:db8::3"],
)
def test_an_endpoint_address_that_is_not_a_usable_ip_is_skipped(bad: str) -> None:
    slices = [eps("a", endpoint("10.0.0.1"), endpoint(bad), {"addresses": bad, "conditions": {}})]
    state = desired_state([vs(), *statics(2)], Cluster.build([service()], slices))
    assert not state.errors
    assert [d.address for d in state.services[KEY].destinations] == ["10.0.0.1"]
    assert state.resolutions[ObjectRef("ns", "web")].problem is None


# --- junk never raises, and never affects VirtualServers that do not use it ------------------

_JUNK_TEXT = st.text(alphabet="xyz:./-0123456789 %", max_size=10)  # no "web", no "n1": never referenced
_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=False), _JUNK_TEXT)
JUNK = st.recursive(
    _SCALAR, lambda c: st.lists(c, max_size=3) | st.dictionaries(_JUNK_TEXT, c, max_size=3), max_leaves=6
)
ADDRESS = st.sampled_from(
    ["10.0.0.7", "10.0.0.1", "::ffff:10.0.0.1", "::10.0.0.1", "node-1.example", " 10.0.0.1", "2001:db8::1", "fe80::1%x"]
)
VALUE = st.one_of(JUNK, ADDRESS, st.sampled_from(["InternalIP", "IPv4", "IPv6", "TCP", "http", 80, 8080, "bad"]))

# Realistic objects that only the victim below refers to (Service "junk", Node "bad"); the
# strategies replace a few of their values, at any depth, by junk.
_TEMPLATES = {
    "service": [service("junk"), service("junk", ports=[{"name": "http", "port": 80}, {"port": 81}])],
    "slice": [
        eps("junk-a", endpoint("10.0.0.7", node="bad"), endpoint("10.0.0.8", node="n1"), service_name="junk"),
        eps(
            "junk-b", endpoint("10.0.0.7", ready=False, serving=True, terminating=True, node="bad"), service_name="junk"
        ),
        eps("junk-6", endpoint("2001:db8::7", node="bad"), service_name="junk", family="IPv6"),
    ],
    "node": [
        node("bad", "172.16.0.9", "2001:db8::9"),
        {
            "metadata": {"name": "bad", "labels": {"a": "b"}},
            "status": {"addresses": [{"type": "Hostname", "address": "x"}]},
        },
    ],
}


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found += _paths(child, (*prefix, key))
    return found


@st.composite
def junked(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    obj = copy.deepcopy(draw(st.sampled_from(_TEMPLATES[kind])))
    for _ in range(draw(st.integers(0, 4))):
        paths = _paths(obj)[1:]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent: Any = obj
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(VALUE)
    return obj


def clean_world() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    servers = [
        vs("pods"),
        vs("nodes", vip="192.0.2.11", backends={"serviceRef": {"name": "web"}, "target": "Node"}),
        *statics(2),
        # The one VirtualServer that uses the junk: it may get a problem, never raise.
        # NAT: junk ports are then remapped, not a PortMismatch (which refuses a DR VirtualServer
        # whose endpoints listen elsewhere: a documented refusal, not a crash).
        vs(
            "victim",
            vip="192.0.2.99",
            forwarding={"method": "NAT"},
            backends={"serviceRef": {"name": "junk"}, "target": "Node"},
        ),
    ]
    services = [service()]
    slices = [eps("a", endpoint("10.0.0.1", node="n1"), endpoint("10.0.0.2", node="n1"))]
    nodes = [node("n1", "172.16.0.1")]
    return servers, services, slices, nodes


def outcome(state: DesiredState, ref: ObjectRef) -> tuple[Any, ...]:
    resolution = state.resolutions[ref]
    services = tuple(state.services.get(k) for k in resolution.keys)
    error = resolution.error and (resolution.error.reason, resolution.error.path)
    return resolution.keys, services, resolution.ready_backends, resolution.draining_backends, resolution.problem, error


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    junk_services=st.lists(junked("service"), max_size=2),
    junk_slices=st.lists(junked("slice"), max_size=3),
    junk_nodes=st.lists(junked("node"), max_size=2),
)
def test_junk_in_cluster_objects_never_raises_nor_touches_other_virtual_servers(
    junk_services: list[dict[str, Any]], junk_slices: list[dict[str, Any]], junk_nodes: list[dict[str, Any]]
) -> None:
    servers, services, slices, nodes = clean_world()
    baseline = desired_state(servers, Cluster.build(services, slices, nodes))
    for j in junk_services:
        trim_service(copy.deepcopy(j))
    for j in junk_slices:
        trim_endpoint_slice(copy.deepcopy(j))
    for j in junk_nodes:
        trim_node(copy.deepcopy(j))
    cluster = Cluster.build([*services, *junk_services], [*slices, *junk_slices], [*nodes, *junk_nodes])
    state = desired_state(servers, cluster, memo={})
    for ref in baseline.resolutions:
        if ref.name != "victim":
            assert outcome(state, ref) == outcome(baseline, ref)
    victim = state.resolutions[ObjectRef("ns", "victim")]
    assert victim.error is None, victim.error  # junk is a backend problem at worst (NAT)
    for resolution in state.resolutions.values():
        assert resolution.error is None or resolution.error.reason != "ResolutionFailed"
    for eps_obj in junk_slices:
        cluster.remove_slice(eps_obj)
    for node_obj in junk_nodes:
        cluster.put_node(node_obj)
    assert state.vips == baseline.vips | {"192.0.2.99": AF_INET}
    assert ServiceKey(AF_INET, 6, "192.0.2.99", 80) in state.services


# --- static backends: sorted once per VirtualServer ---------------------------------------------

STATIC_IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.10", "9.0.0.1", "10.0.1.1", "2001:db8::1"]


@settings(max_examples=300, deadline=None)
@given(
    backends=st.lists(
        st.tuples(
            st.sampled_from(STATIC_IPS),
            st.one_of(st.none(), st.integers(1000, 1003)),
            st.one_of(st.none(), st.integers(0, 3)),
        ),
        min_size=1,
        max_size=6,
    ),
    ports=st.lists(st.integers(1000, 1003), min_size=1, max_size=3, unique=True),
    method=st.sampled_from(["DR", "TUN", "NAT"]),
    target_port=st.one_of(st.none(), st.integers(2000, 2001)),
)
def test_static_backends_come_out_as_the_constructor_sorts_them(
    backends: list[tuple[str, int | None, int | None]], ports: list[int], method: str, target_port: int | None
) -> None:
    """Each port's real servers are built in the order sorted once per VirtualServer (and the
    constructor's sort skipped when the addresses are distinct): the services equal those the
    VirtualService constructor builds, sorting each port's list itself."""
    addresses = [
        {"ip": ip, **({} if port is None else {"port": port}), **({} if weight is None else {"weight": weight})}
        for ip, port, weight in backends
    ]
    port_entries = [
        {"port": p, **({"targetPort": target_port} if method == "NAT" and target_port else {})} for p in ports
    ]
    manifest = vs(
        ports=port_entries, backends={"addresses": addresses}, forwarding={"method": method}, scheduler="mh"
    )
    state = desired_state([manifest], Cluster.build([], []))
    if state.errors:  # refused (a remapped port under DR, an address listed twice): nothing built
        assert not state.services
        return
    assert len(state.services) == len(ports)
    for service_ in state.services.values():
        rebuilt = VirtualService(
            service_.key,
            service_.scheduler,
            service_.sched_flags,
            service_.persistence_timeout,
            service_.netmask,
            tuple(reversed(service_.destinations)),
        )
        assert rebuilt == service_ and rebuilt.destinations == service_.destinations
        assert list(service_.destinations) == sorted(service_.destinations, key=destination_order)
        # Each backend's port: its own, else the VIP port's; under NAT a numeric targetPort for all.
        nat_target = target_port if method == "NAT" and target_port else None
        expected = sorted(
            (ip, nat_target or port or service_.key.port, 1 if weight is None else weight)
            for ip, port, weight in backends
        )
        assert sorted((d.address, d.port, d.weight) for d in service_.destinations) == expected
