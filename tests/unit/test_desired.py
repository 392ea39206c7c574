"""Desired state: the memo (what it may reuse), shared frozen resolutions, and vip_ports."""

from __future__ import annotations

import dataclasses

import pytest
from kubelvs.core.cluster import Cluster
from kubelvs.core.desired import Memo, MemoEntry, desired_state
from kubelvs.core.model import AF_INET, ServiceKey
from kubelvs.core.spec import ObjectRef
from test_incremental import versioned
from test_spec import KEY, endpoint, eps, service, vs

REF = ObjectRef("ns", "web")


def test_objects_without_resource_version_are_not_memoised() -> None:
    # Manifests have no resourceVersion. The memo used to key them by id(obj): an object edited
    # in place (or a new one that reuses a collected object's id) got the stale result.
    obj = vs(backends={"addresses": [{"ip": "10.0.0.1"}]})
    memo: Memo = {}
    first = desired_state([obj], memo=memo)
    assert [d.address for d in first.services[KEY].destinations] == ["10.0.0.1"]
    assert memo == {}
    obj["spec"]["backends"]["addresses"][0]["ip"] = "10.0.0.2"  # same object, same id
    second = desired_state([obj], memo=memo)
    assert [d.address for d in second.services[KEY].destinations] == ["10.0.0.2"]


def test_a_versioned_virtual_server_with_unversioned_backends_is_not_memoised() -> None:
    cluster = Cluster.build([service()], [eps("a", endpoint("10.0.0.1"))])  # no resourceVersion
    memo: Memo = {}
    desired_state([versioned(vs(), 1)], cluster, memo=memo)
    assert memo == {}


def test_memo_entries_are_reused_while_versions_hold() -> None:
    cluster = Cluster.build([versioned(service(), 1)], [versioned(eps("a", endpoint("10.0.0.1")), 2)])
    obj = versioned(vs(), 3)
    memo: Memo = {}
    first = desired_state([obj], cluster, memo=memo)
    entry = memo[REF]
    assert isinstance(entry, MemoEntry) and entry.version == "3"
    second = desired_state([obj], cluster, memo=memo)
    assert second.resolutions[REF] is first.resolutions[REF]  # shared: hence frozen
    assert second.services[KEY] is first.services[KEY]
    cluster.put_slice(versioned(eps("a", endpoint("10.0.0.1"), endpoint("10.0.0.2")), 4))
    third = desired_state([obj], cluster, memo=memo)
    assert third.resolutions[REF].ready_backends == 2 and first.resolutions[REF].ready_backends == 1
    assert memo[REF] is not entry
    # Node selection differs per director; the shared resolution is copied, not changed.
    labelled = versioned(vs(directors={"nodeSelector": {"lvs": "yes"}}), 5)
    desired_state([labelled], cluster, {"lvs": "yes"}, memo)
    excluded = desired_state([labelled], cluster, {"lvs": "no"}, memo)
    assert not excluded.resolutions[REF].selected and memo[REF].resolution.selected
    assert excluded.resolutions[REF].generation == 3


def test_resolutions_are_frozen() -> None:
    state = desired_state([vs(backends={"addresses": [{"ip": "10.0.0.1"}]})])
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.resolutions[REF].selected = False  # type: ignore[misc]


def static(name: str, vip: str, *ports: tuple[int, str], created: str = "2026-01-01T00:00:00Z", **spec: object) -> dict:
    return vs(
        name,
        created=created,
        vip=vip,
        ports=[{"port": p, "protocol": proto} for p, proto in ports],
        backends={"addresses": [{"ip": "2001:db8::7" if ":" in vip else "10.0.0.1"}]},
        **spec,
    )


def test_vip_ports_are_the_selected_accepted_ports_of_each_vip() -> None:
    servers = [
        static("a", "192.0.2.1", (80, "TCP"), (53, "UDP")),
        static("b", "192.0.2.1", (443, "TCP")),  # shares the VIP on another port
        static("c", "192.0.2.1", (80, "TCP"), created="2026-02-01T00:00:00Z"),  # VIPConflict: refused
        static("d", "192.0.2.1", (8080, "TCP"), directors={"nodeSelector": {"role": "other"}}),  # not here
        static("e", "2001:db8::1", (80, "SCTP")),
        static("f", "192.0.2.2", (80, "TCP"), directors={"nodeSelector": {"role": "other"}}),
        vs("g", vip="192.0.2.3", scheduler="nope"),  # invalid
    ]
    state = desired_state(servers, node_labels={"role": "lvs"})
    assert state.vip_ports == {"192.0.2.1": {(6, 80), (17, 53), (6, 443)}, "2001:db8::1": {(132, 80)}}
    assert set(state.vips) == set(state.vip_ports)  # today vips is the same set of addresses
    assert ServiceKey(AF_INET, 6, "192.0.2.1", 8080) in state.origins  # claimed, yet not on this VIP here
