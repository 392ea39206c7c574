"""The director's O(touched) paths agree with the full computations they shortcut."""

from __future__ import annotations

import copy
from typing import Any

from kubelvs.core.cluster import Cluster, trim_endpoint_slice, trim_service, trim_virtual_server
from kubelvs.core.desired import DesiredState, Memo, desired_state, update_desired
from kubelvs.core.model import AF_INET, ServiceKey
from kubelvs.core.spec import ObjectRef
from kubelvs.state.ownership import Ownership
from test_spec import endpoint, eps, service, vs


def versioned(obj: dict[str, Any], version: int) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["metadata"]["resourceVersion"] = str(version)
    return obj


def same(a: DesiredState, b: DesiredState) -> None:
    assert a.services == b.services
    assert a.vips == b.vips
    assert a.origins == b.origins
    assert {
        r: (x.keys, x.ready_backends, x.draining_backends, x.selected, x.generation) for r, x in a.resolutions.items()
    } == {
        r: (x.keys, x.ready_backends, x.draining_backends, x.selected, x.generation) for r, x in b.resolutions.items()
    }


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
    assert trimmed["endpoints"] == [{"addresses": ["10.0.0.1"], "conditions": {"ready": True}, "nodeName": "n1"}]
    assert trimmed["metadata"]["labels"] == {"kubernetes.io/service-name": "web"}
    assert "annotations" not in trim_virtual_server(raw_vs)["metadata"]
    assert trim_virtual_server(raw_vs)["spec"] == raw_vs["spec"]
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
