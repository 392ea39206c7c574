"""The director's O(touched) paths agree with the full computations they shortcut."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubelvs.core import desired as desired_module
from kubelvs.core.cluster import (
    Cluster,
    EndpointState,
    SliceEndpoint,
    spec_of,
    trim_endpoint_slice,
    trim_service,
    trim_virtual_server,
)
from kubelvs.core.desired import DesiredState, Memo, desired_state, update_desired
from kubelvs.core.model import AF_INET, ServiceKey
from kubelvs.core.spec import ObjectRef
from kubelvs.state.ownership import Ownership
from test_spec import endpoint, eps, service, vs


def versioned(obj: dict[str, Any], version: int) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["metadata"]["resourceVersion"] = str(version)
    return obj


def _outcomes(state: DesiredState) -> dict[ObjectRef, tuple[Any, ...]]:
    return {
        r: (
            x.keys,
            x.vip,
            x.ready_backends,
            x.draining_backends,
            x.selected,
            x.generation,
            x.problem,
            x.error and (x.error.reason, x.error.path, x.error.message),
        )
        for r, x in state.resolutions.items()
    }


def same(a: DesiredState, b: DesiredState) -> None:
    assert a.services == b.services
    assert a.vips == b.vips
    assert a.vip_ports == b.vip_ports
    assert a.origins == b.origins
    assert _outcomes(a) == _outcomes(b)


def world() -> tuple[dict[ObjectRef, dict[str, Any]], Cluster]:
    servers = {
        ObjectRef("ns", f"web{i}"): versioned(
            vs(f"web{i}", vip=f"192.0.2.{10 + i}", backends={"serviceRef": {"name": f"web{i}"}}), i + 1
        )
        for i in range(3)
    }
    cluster = Cluster.build(
        [versioned(service(f"web{i}"), 10 + i) for i in range(3)],
        [versioned(eps(f"web{i}-a", endpoint("10.0.0.1"), service_name=f"web{i}"), 20 + i) for i in range(3)],
    )
    return servers, cluster


def test_an_endpoint_change_updates_one_virtual_server_like_a_full_pass() -> None:
    servers, cluster = world()
    memo: Memo = {}
    before = desired_state(servers.values(), cluster, None, memo)
    cluster.put_slice(versioned(eps("web1-a", endpoint("10.0.0.1"), endpoint("10.0.0.2"), service_name="web1"), 99))
    quick = update_desired(before, servers, [ObjectRef("ns", "web1")], cluster, None, memo)
    assert quick is not None
    same(quick, desired_state(servers.values(), cluster, None, {}))
    assert len(quick.services[ServiceKey(AF_INET, 6, "192.0.2.11", 80)].destinations) == 2
    assert len(before.services[ServiceKey(AF_INET, 6, "192.0.2.11", 80)].destinations) == 1  # not mutated


def test_an_endpoint_change_reuses_the_parsed_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the backends changed: the VirtualServer is resolved again from the spec parsed
    before (same uid and generation), not parsed again; a new generation is parsed."""
    servers, cluster = world()
    memo: Memo = {}
    for obj in servers.values():
        obj["metadata"].update(uid=obj["metadata"]["name"], generation=1)
    before = desired_state(servers.values(), cluster, None, memo)
    parsed: list[str] = []
    real_parse = desired_module.parse_virtual_server

    def counting(obj: dict[str, Any]) -> Any:
        parsed.append(obj["metadata"]["name"])
        return real_parse(obj)

    monkeypatch.setattr(desired_module, "parse_virtual_server", counting)
    cluster.put_slice(versioned(eps("web1-a", endpoint("10.0.0.1"), endpoint("10.0.0.2"), service_name="web1"), 99))
    quick = update_desired(before, servers, [ObjectRef("ns", "web1")], cluster, None, memo)
    assert quick is not None and parsed == []
    same(quick, desired_state(servers.values(), cluster, None, {}))
    parsed.clear()
    servers[ObjectRef("ns", "web1")]["metadata"]["generation"] = 2
    assert update_desired(quick, servers, [ObjectRef("ns", "web1")], cluster, None, memo) is not None
    assert parsed == ["web1"]


def test_changes_that_could_move_a_conflict_need_a_full_pass() -> None:
    servers, cluster = world()
    memo: Memo = {}
    before = desired_state(servers.values(), cluster, None, memo)
    moved = dict(servers)
    moved[ObjectRef("ns", "web2")] = versioned(vs("web2", vip="192.0.2.10"), 50)  # now claims web0's VIP
    assert update_desired(before, moved, [ObjectRef("ns", "web2")], cluster, None, memo) is None
    added = {**servers, ObjectRef("ns", "new"): versioned(vs("new", vip="192.0.2.99"), 51)}
    assert update_desired(before, added, [ObjectRef("ns", "new")], cluster, None, memo) is None
    gone = {r: o for r, o in servers.items() if r.name != "web0"}
    assert update_desired(before, gone, [ObjectRef("ns", "web0")], cluster, None, memo) is None
    # Selection is part of the outcome too.
    labelled = dict(servers)
    labelled[ObjectRef("ns", "web1")] = versioned(
        vs("web1", vip="192.0.2.11", backends={"serviceRef": {"name": "web1"}}, directors={"nodeSelector": {"a": "b"}}),
        52,
    )
    assert update_desired(before, labelled, [ObjectRef("ns", "web1")], cluster, {}, memo) is None


def test_trimmed_objects_keep_what_desired_state_reads() -> None:
    raw_service = versioned(service(), 1)
    raw_service["metadata"]["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]
    raw_service["spec"]["clusterIP"] = "10.96.0.10"
    raw_slice = versioned(eps("a", endpoint("10.0.0.1", node="n1")), 2)
    raw_slice["endpoints"][0]["targetRef"] = {"kind": "Pod", "name": "web-1", "uid": "u"}
    raw_slice["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] = "endpointslice-controller"
    raw_vs = versioned(vs(), 3)
    raw_vs["metadata"]["annotations"] = {"kubectl.kubernetes.io/last-applied-configuration": "{...}"}
    assert "managedFields" not in trim_service(raw_service)["metadata"]
    assert trim_service(raw_service)["spec"] == {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    trimmed = trim_endpoint_slice(raw_slice)
    assert trimmed["endpoints"] == (SliceEndpoint(AF_INET, "10.0.0.1", EndpointState.READY, "n1"),)
    assert trim_endpoint_slice(trimmed) == trimmed  # the informer trims, then the view
    assert trimmed["metadata"]["labels"] == {"kubernetes.io/service-name": "web"}
    assert "annotations" not in trim_virtual_server(raw_vs)["metadata"]
    assert spec_of(trim_virtual_server(raw_vs)) == raw_vs["spec"]
    full = desired_state([raw_vs], Cluster.build([raw_service], [raw_slice]))
    lean = desired_state([trim_virtual_server(raw_vs)], Cluster.build([trim_service(raw_service)], [trimmed]))
    same(full, lean)


def test_ownership_index_follows_own_and_disown() -> None:
    a, b = ServiceKey(AF_INET, 6, "192.0.2.1", 80), ServiceKey(AF_INET, 6, "192.0.2.1", 443)
    owned = Ownership({a: "ns/x"})
    assert owned.keys_of("ns/x") == {a}
    assert owned.own(b, "ns/x") and not owned.own(b, "ns/x")
    assert owned.keys_of("ns/x") == {a, b}
    assert owned.own(b, "ns/y")  # moved to another VirtualServer
    assert owned.keys_of("ns/x") == {a} and owned.keys_of("ns/y") == {b}
    assert owned.disown(a) and not owned.disown(a)
    assert owned.keys_of("ns/x") == set()
    assert Ownership.from_json(owned.to_json()).services == {b: "ns/y"}


# --- update_desired against desired_state over random change sequences ------------------------

VIPS = ("192.0.2.1", "192.0.2.2")
SERVICES = ("web0", "web1")
NODES = ("n1", "n2")
POD_IPS = ("10.0.0.1", "10.0.0.2", "10.0.0.3", "node-1.example")

_endpoints = st.lists(
    st.builds(
        endpoint,
        st.sampled_from(POD_IPS),
        ready=st.sampled_from([True, False, None]),
        serving=st.sampled_from([True, False, None]),
        terminating=st.sampled_from([True, None]),
        node=st.sampled_from(NODES),
    ),
    max_size=3,
)
_vs_spec = st.fixed_dictionaries(
    {
        "vip": st.sampled_from(VIPS),
        "ports": st.lists(st.sampled_from([80, 443]), min_size=1, max_size=2, unique=True).map(
            lambda ps: [{"name": "http" if p == 80 else "https", "port": p} for p in ps]
        ),
        "backends": st.one_of(
            st.builds(
                lambda name, target: {"serviceRef": {"name": name}, "target": target},
                st.sampled_from(SERVICES),
                st.sampled_from(["Pod", "Node"]),
            ),
            st.just({"addresses": [{"ip": "10.9.0.1"}]}),
        ),
        "directors": st.sampled_from([{}, {"nodeSelector": {"role": "lvs"}}, {"nodeSelector": {"role": "other"}}]),
    }
)
_change = st.one_of(
    st.tuples(st.just("slice"), st.sampled_from(SERVICES), st.sampled_from(["a", "b"]), _endpoints),
    st.tuples(st.just("remove-slice"), st.sampled_from(SERVICES), st.sampled_from(["a", "b"])),
    st.tuples(st.just("service"), st.sampled_from(SERVICES), st.sampled_from([80, 8080])),
    st.tuples(st.just("remove-service"), st.sampled_from(SERVICES)),
    st.tuples(st.just("node"), st.sampled_from(NODES), st.sampled_from(["172.16.0.1", "172.16.0.2", "junk"])),
    st.tuples(st.just("vs"), st.integers(0, 3), _vs_spec),
    st.tuples(st.just("remove-vs"), st.integers(0, 3)),
)


def _slice(service_name: str, name: str, endpoints: list[dict[str, Any]], version: int) -> dict[str, Any]:
    return versioned(eps(f"{service_name}-{name}", *endpoints, service_name=service_name), version)


def _node(name: str, address: str, version: int) -> dict[str, Any]:
    status = {"addresses": [{"type": "InternalIP", "address": address}]}
    return versioned({"metadata": {"name": name}, "status": status}, version)


@settings(max_examples=150, deadline=None)
@given(specs=st.lists(_vs_spec, min_size=4, max_size=4), changes=st.lists(_change, max_size=12))
def test_update_desired_agrees_with_desired_state_over_random_changes(
    specs: list[dict[str, Any]], changes: list[tuple[Any, ...]]
) -> None:
    version = iter(range(1, 10_000))
    servers = {
        ObjectRef("ns", f"v{i}"): versioned(vs(f"v{i}", created=f"2026-01-0{i + 1}T00:00:00Z", **spec), next(version))
        for i, spec in enumerate(specs)
    }
    cluster = Cluster.build(
        [versioned(service(name), next(version)) for name in SERVICES],
        [_slice(name, "a", [endpoint("10.0.0.1", node="n1")], next(version)) for name in SERVICES],
        [_node(n, f"172.16.0.{i + 1}", next(version)) for i, n in enumerate(NODES)],
    )
    labels = {"role": "lvs"}
    memo: Memo = {}
    state = desired_state(servers.values(), cluster, labels, memo)

    def users(service_name: str) -> set[ObjectRef]:
        return {
            ref
            for ref, obj in servers.items()
            if obj["spec"]["backends"].get("serviceRef", {}).get("name") == service_name
        }

    for change in changes:
        kind = change[0]
        if kind == "slice":
            cluster.put_slice(_slice(change[1], change[2], change[3], next(version)))
            changed = users(change[1])
        elif kind == "remove-slice":
            cluster.remove_slice(_slice(change[1], change[2], [], next(version)))
            changed = users(change[1])
        elif kind == "service":
            ports = [{"name": "http", "port": change[2], "protocol": "TCP"}, {"name": "https", "port": 443}]
            cluster.put_service(versioned(service(change[1], ports), next(version)))
            changed = users(change[1])
        elif kind == "remove-service":
            cluster.remove_service("ns", change[1])
            changed = users(change[1])
        elif kind == "node":
            cluster.put_node(_node(change[1], change[2], next(version)))
            changed = {ref for ref, obj in servers.items() if obj["spec"]["backends"].get("target") == "Node"}
        elif kind == "vs":
            ref = ObjectRef("ns", f"v{change[1]}")
            created = f"2026-01-0{change[1] + 1}T00:00:00Z"
            servers[ref] = versioned(vs(ref.name, created=created, **change[2]), next(version))
            changed = {ref}
        else:
            ref = ObjectRef("ns", f"v{change[1]}")
            servers.pop(ref, None)
            memo.pop(ref, None)
            changed = {ref}
        quick = update_desired(state, servers, changed, cluster, labels, memo)
        full = desired_state(servers.values(), cluster, labels)  # no memo at all
        if quick is not None:
            same(quick, full)
        state = quick if quick is not None else desired_state(servers.values(), cluster, labels, memo)
        same(state, full)
