"""The cluster index: trimming, robust reads of raw objects, and no memory kept for what is gone."""

from __future__ import annotations

from typing import Any

import pytest
from kubelvs.core.cluster import Cluster, NodeAddresses, endpoint_address, service_name_of
from kubelvs.core.model import AF_INET, AF_INET6
from kubelvs.core.spec import ObjectRef, meta
from test_spec import endpoint, eps


def test_slices_index_is_pruned_when_the_last_slice_goes() -> None:
    cluster = Cluster()
    for ns in ("ci-1", "ci-2"):
        for name in ("a", "b"):
            obj = eps(name, endpoint("10.0.0.1"))
            obj["metadata"]["namespace"] = ns
            cluster.put_slice(obj)
    assert set(cluster.slices) == {("ci-1", "web"), ("ci-2", "web")}
    for ns in ("ci-1", "ci-2"):
        for name in ("a", "b"):
            obj = eps(name, endpoint("10.0.0.1"))
            obj["metadata"]["namespace"] = ns
            cluster.remove_slice(obj)
        assert (ns, "web") not in cluster.slices
    assert cluster.slices == {}
    cluster.remove_slice(eps("never-added", endpoint("10.0.0.1")))  # no error, nothing created
    assert cluster.slices == {}


@pytest.mark.parametrize("obj", [{}, {"metadata": None}, {"metadata": "x"}, {"metadata": [1]}, "not an object"])
def test_meta_of_junk_is_empty(obj: Any) -> None:
    assert meta(obj) == {}
    if isinstance(obj, dict):
        assert ObjectRef.of(obj) == ObjectRef("default", "")


def test_service_name_label_is_read_in_one_place() -> None:
    assert service_name_of(eps("a")) == "web"
    for labels in (None, "x", {"kubernetes.io/service-name": ["web"]}, {"kubernetes.io/service-name": ""}):
        assert service_name_of({"metadata": {"labels": labels}}) is None


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("10.0.0.1", (AF_INET, "10.0.0.1")),
        ("2001:DB8::1", (AF_INET6, "2001:db8::1")),
        ("node-1.example", None),
        ("::ffff:10.0.0.1", None),  # IPv4-mapped
        ("::10.0.0.1", None),  # IPv4-compatible
        ("::", None),
        ("::1", None),
        (" 10.0.0.1", None),
        ("fe80::1%eth0", None),
        ("", None),
        (167772161, None),  # an int is not an address here
        (None, None),
        (["10.0.0.1"], None),
    ],
)
def test_endpoint_address(text: Any, parsed: tuple[int, str] | None) -> None:
    assert endpoint_address(text) == parsed


def test_node_addresses_are_parsed_once_and_junk_kept_apart() -> None:
    cluster = Cluster()
    cluster.put_node(
        {
            "metadata": {"name": "n1"},
            "status": {
                "addresses": [
                    {"type": "Hostname", "address": "n1"},
                    {"type": "InternalIP", "address": "node-1.example"},
                    {"type": "InternalIP", "address": "2001:db8::7"},
                    {"type": "InternalIP", "address": "172.16.0.1"},
                    {"type": "InternalIP", "address": ["x"]},
                    "junk",
                ]
            },
        }
    )
    addresses = cluster.node_addresses["n1"]
    assert addresses == NodeAddresses(
        ((AF_INET6, "2001:db8::7"), (AF_INET, "172.16.0.1")), ("'node-1.example'", "['x']")
    )
    assert (addresses.first(AF_INET), addresses.first(AF_INET6)) == ("172.16.0.1", "2001:db8::7")
    version = cluster.nodes_version
    cluster.put_node({"metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "x"}]}})
    assert cluster.nodes_version == version + 1
    for junk in (
        {"metadata": {"name": ["n"]}},
        {"metadata": "x"},
        {"status": "x"},
        {"metadata": {"name": "n2"}, "status": 5},
    ):
        cluster.put_node(junk)
    assert set(cluster.node_addresses) == {"n1", "n2"}
    assert cluster.node_addresses["n2"] == NodeAddresses()
