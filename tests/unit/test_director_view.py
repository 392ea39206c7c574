"""The director's view of the cluster, fed watch events by hand (no API server or kernel needed:
this is the bookkeeping between events and desired state)."""

from __future__ import annotations

from pathlib import Path

from kubelvs.core.model import AF_INET, ServiceKey
from kubelvs.core.spec import ObjectRef
from kubelvs.director.agent import Director, DirectorConfig
from kubelvs.director.metrics import Metrics
from prometheus_client import CollectorRegistry
from test_incremental import versioned
from test_spec import endpoint, eps, service, vs

KEY = ServiceKey(AF_INET, 6, "192.0.2.10", 80)


def director(tmp_path: Path) -> Director:
    return Director(DirectorConfig(node_name="n1", state_dir=tmp_path), Metrics(CollectorRegistry()))


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
