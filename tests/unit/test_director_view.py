"""The director's view of the cluster, fed watch events by hand (no API server or kernel needed:
this is the bookkeeping between events and desired state)."""

from __future__ import annotations

from pathlib import Path

from kubelvs.core.model import AF_INET, ServiceKey
from kubelvs.core.spec import ObjectRef, unpacked
from kubelvs.director.view import ClusterView
from test_incremental import versioned
from test_spec import endpoint, eps, service, vs

KEY = ServiceKey(AF_INET, 6, "192.0.2.10", 80)


def director(tmp_path: Path) -> ClusterView:
    return ClusterView("n1")


def test_a_virtual_server_created_after_its_service_finds_the_endpoints(tmp_path: Path) -> None:
    d = director(tmp_path)
    d.on_service("ADDED", versioned(service(), 1))
    d.on_endpoint_slice("ADDED", versioned(eps("web-a", endpoint("10.0.0.1")), 2))
    d.on_virtual_server("ADDED", versioned(vs(), 3))
    assert [x.address for x in d.compute_desired().services[KEY].destinations] == ["10.0.0.1"]


def test_replayed_events_mark_nothing_and_changes_mark_their_users(tmp_path: Path) -> None:
    d = director(tmp_path)
    d.on_virtual_server("ADDED", versioned(vs(), 3))
    d.on_service("ADDED", versioned(service(), 1))
    d.on_endpoint_slice("ADDED", versioned(eps("web-a", endpoint("10.0.0.1")), 2))
    d.dirty.clear()
    d.on_virtual_server("MODIFIED", versioned(vs(), 3))  # kopf replaying its listing
    d.on_endpoint_slice("MODIFIED", versioned(eps("web-a", endpoint("10.0.0.1")), 2))
    assert not d.dirty
    d.on_endpoint_slice("MODIFIED", versioned(eps("web-a", endpoint("10.0.0.2")), 4))
    assert d.dirty == {ObjectRef("ns", "web")}


def test_a_relist_deletes_what_vanished_meanwhile(tmp_path: Path) -> None:
    d = director(tmp_path)
    d.on_virtual_server("ADDED", versioned(vs(), 3))
    d.on_service("ADDED", versioned(service(), 1))
    d.on_endpoint_slice("ADDED", versioned(eps("web-a", endpoint("10.0.0.1")), 2))
    d.on_endpoint_slice("ADDED", versioned(eps("web-b", endpoint("10.0.0.2")), 5))
    d.on_endpoint_slices_relisted([versioned(eps("web-b", endpoint("10.0.0.2")), 5)])
    assert [x.address for x in d.compute_desired().services[KEY].destinations] == ["10.0.0.2"]


def test_a_virtual_server_deleted_while_the_watch_was_down_is_removed_by_the_relist(tmp_path: Path) -> None:
    # The old VirtualServer watch (kopf) produced no DELETED event on a re-list after 410 Gone:
    # its rules and VIP stayed until the director restarted.
    d = director(tmp_path)
    d.on_virtual_server("ADDED", versioned(vs(), 3))
    other = vs()
    other["metadata"] = {**other["metadata"], "name": "other"}
    d.on_virtual_server("ADDED", versioned(other, 4))
    d.dirty.clear()
    d.on_virtual_servers_relisted([versioned(other, 4)])
    assert ObjectRef("ns", "web") not in d.virtual_servers
    assert d.dirty == {ObjectRef("ns", "web")}


def test_the_service_index_is_pruned_when_its_last_user_goes(tmp_path: Path) -> None:
    d = director(tmp_path)
    d.on_virtual_server("ADDED", versioned(vs(), 3))
    assert d.refs_by_service
    d.on_virtual_server("DELETED", versioned(vs(), 4))
    assert not d.refs_by_service


def test_own_node_labels_and_address_are_read_from_the_node(tmp_path: Path) -> None:
    d = director(tmp_path)
    node = {
        "metadata": {"name": "n1", "labels": {"role": "lb"}, "resourceVersion": "1"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.7"}]},
    }
    d.on_node("ADDED", node)
    assert d.node_seen and d.node_labels == {"role": "lb"} and d.node_address == "192.0.2.7"
    d.on_node("DELETED", node)
    assert not d.node_seen and d.node_labels == {}


def test_a_new_object_under_the_same_name_is_marked(tmp_path: Path) -> None:
    d = director(tmp_path)
    first = versioned(vs(), 3)
    first["metadata"]["uid"] = "uid-1"
    d.on_virtual_server("ADDED", first)
    d.dirty.clear()
    again = versioned(vs(), 9)  # same generation, a new object (relisted after a watch gap)
    again["metadata"]["uid"] = "uid-2"
    d.on_virtual_servers_relisted([again])
    assert d.dirty == {ObjectRef("ns", "web")}


def test_virtual_servers_sharing_a_vip_must_select_a_director_in_common(tmp_path: Path) -> None:
    d = director(tmp_path)
    d.on_node("ADDED", {"metadata": {"name": "n1", "labels": {"zone": "a"}}, "status": {}})
    d.on_node("ADDED", {"metadata": {"name": "n2", "labels": {"zone": "b"}}, "status": {}})
    d.set_director_nodes({"n1", "n2"})
    old = vs("web", "2026-01-01T00:00:00Z", directors={"nodeSelector": {"zone": "a"}})
    new = vs(
        "dns", "2026-01-02T00:00:00Z", ports=[{"name": "dns", "port": 53}], directors={"nodeSelector": {"zone": "b"}}
    )
    d.on_virtual_server("ADDED", versioned(old, 3))
    d.on_virtual_server("ADDED", versioned(new, 4))
    desired = d.compute_desired()
    refused = desired.resolutions[ObjectRef("ns", "dns")].error
    assert refused is not None and refused.reason == "DirectorSelectionConflict", refused
    assert "ns/web" in refused.message and refused.path == "spec.directors.nodeSelector"
    assert desired.resolutions[ObjectRef("ns", "web")].error is None
    # A director in both zones resolves it; the verdict never depends on itself (both still count).
    d.on_node("ADDED", {"metadata": {"name": "n3", "labels": {"zone": "b"}}, "status": {}})
    d.on_node("MODIFIED", {"metadata": {"name": "n1", "labels": {"zone": "a"}}, "status": {}})
    d.set_director_nodes({"n1", "n2", "n3"})
    assert d.compute_desired().resolutions[ObjectRef("ns", "dns")].error is not None
    d.on_virtual_server(
        "MODIFIED", versioned(vs("dns", "2026-01-02T00:00:00Z", ports=[{"name": "dns", "port": 53}]), 5)
    )
    assert d.compute_desired().resolutions[ObjectRef("ns", "dns")].error is None


def test_without_the_election_there_is_no_selection_conflict(tmp_path: Path) -> None:
    d = director(tmp_path)
    d.on_virtual_server("ADDED", versioned(vs("web", directors={"nodeSelector": {"zone": "a"}}), 3))
    other = vs(
        "dns", "2026-01-02T00:00:00Z", ports=[{"name": "dns", "port": 53}], directors={"nodeSelector": {"x": "y"}}
    )
    d.on_virtual_server("ADDED", versioned(other, 4))
    assert d.compute_desired().resolutions[ObjectRef("ns", "dns")].error is None


def test_a_status_write_keeps_the_packed_spec_and_the_memo(tmp_path: Path) -> None:
    """A status write comes back as a new resourceVersion at the same generation: the spec is
    not packed again, nothing is marked, and the next full pass reuses the parsed spec."""
    d = director(tmp_path)
    d.on_service("ADDED", versioned(service(), 1))
    d.on_endpoint_slice("ADDED", versioned(eps("web-a", endpoint("10.0.0.1")), 2))
    obj = versioned(vs(), 3)
    obj["metadata"]["uid"] = "u1"
    d.on_virtual_server("ADDED", obj)
    first = d.compute_desired().resolutions[ObjectRef("ns", "web")]
    spec_before = d.virtual_servers[ObjectRef("ns", "web")]["spec"]
    d.dirty.clear()
    written = versioned(obj, 7)
    written["status"] = {"owner": "n1"}
    d.on_virtual_server("MODIFIED", written)
    assert not d.dirty
    kept = d.virtual_servers[ObjectRef("ns", "web")]
    assert kept["spec"] is spec_before and kept["metadata"]["resourceVersion"] == "7"
    assert d.compute_desired().resolutions[ObjectRef("ns", "web")] is first  # from the memo
    # A new generation is a new spec: marked, packed, parsed again.
    changed = versioned(vs(scheduler="wlc"), 8)
    changed["metadata"].update(uid="u1", generation=4)
    d.on_virtual_server("MODIFIED", changed)
    assert d.dirty == {ObjectRef("ns", "web")}
    again = d.compute_desired()
    assert again.resolutions[ObjectRef("ns", "web")] is not first
    assert again.services[KEY].scheduler == "wlc"


def test_selection_conflicts_follow_a_new_generation_of_a_kept_spec(tmp_path: Path) -> None:
    """The VIP and nodeSelector of each VirtualServer are kept per generation: a new one is read."""
    d = director(tmp_path)
    d.on_node("ADDED", {"metadata": {"name": "n1", "labels": {"zone": "a"}}, "status": {}})
    d.on_node("ADDED", {"metadata": {"name": "n2", "labels": {"zone": "b"}}, "status": {}})
    d.set_director_nodes({"n1", "n2"})
    web = versioned(vs("web", "2026-01-01T00:00:00Z", directors={"nodeSelector": {"zone": "a"}}), 3)
    dns = versioned(
        vs(
            "dns",
            "2026-01-02T00:00:00Z",
            ports=[{"name": "dns", "port": 53}],
            directors={"nodeSelector": {"zone": "b"}},
        ),
        4,
    )
    web["metadata"]["uid"], dns["metadata"]["uid"] = "u-web", "u-dns"
    d.on_virtual_server("ADDED", web)
    d.on_virtual_server("ADDED", dns)
    assert d.compute_desired().resolutions[ObjectRef("ns", "dns")].error is not None
    status_only = versioned(dns, 5)
    status_only["status"] = {"owner": ""}
    d.on_virtual_server("MODIFIED", status_only)
    assert d.compute_desired().resolutions[ObjectRef("ns", "dns")].error is not None
    fixed = versioned(vs("dns", "2026-01-02T00:00:00Z", ports=[{"name": "dns", "port": 53}]), 6)
    fixed["metadata"].update(uid="u-dns", generation=4)
    d.on_virtual_server("MODIFIED", fixed)
    assert d.compute_desired().resolutions[ObjectRef("ns", "dns")].error is None
    d.on_virtual_server("DELETED", fixed)
    assert ObjectRef("ns", "dns") not in d._spec_facts


def test_a_status_write_updates_the_kept_object_in_place(tmp_path: Path) -> None:
    """A status write changes the kept copy's resourceVersion and status only, in place (a new
    copy per status event fragmented the allocator's pools: see ``refresh_status``)."""
    d = director(tmp_path)
    ref = ObjectRef("ns", "web")
    obj = versioned(vs(), 3)
    obj["metadata"]["uid"] = "u1"
    d.on_virtual_server("ADDED", obj)
    kept = d.virtual_servers[ref]
    d.dirty.clear()
    written = versioned(obj, 7)
    written["status"] = {"owner": "n1"}
    d.on_virtual_server("MODIFIED", written)
    assert d.virtual_servers[ref] is kept and not d.dirty
    assert unpacked(kept["status"]) == {"owner": "n1"} and kept["metadata"]["resourceVersion"] == "7"
    d.on_virtual_server("MODIFIED", versioned(obj, 8))  # the status removed
    assert d.virtual_servers[ref] is kept and "status" not in kept and not d.dirty
    assert kept["metadata"]["resourceVersion"] == "8"
    # Anything else kept that differs at the same uid and generation: a new trimmed copy.
    other_metadata = versioned(obj, 9)
    other_metadata["metadata"]["creationTimestamp"] = "2027-01-01T00:00:00Z"
    d.on_virtual_server("MODIFIED", other_metadata)
    assert d.virtual_servers[ref] is not kept
    assert d.virtual_servers[ref]["metadata"]["creationTimestamp"] == "2027-01-01T00:00:00Z"
