"""What the informers keep of each object: equal to the trimmed object, with repeated parts shared."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from kubelvs.core.cluster import (
    EndpointState,
    SliceEndpoint,
    SlicePort,
    spec_of,
    status_of,
    trim_endpoint_slice,
    trim_node,
    trim_service,
    trim_virtual_server,
)
from kubelvs.core.model import AF_INET
from kubelvs.core.spec import Packed
from kubelvs.kube.informers import compact

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=30,
)


@given(value=json_values)
def test_compact_keeps_every_value(value: Any) -> None:
    original = copy.deepcopy(value)
    assert compact(value) == original


def _slice(name: str, addresses: list[str]) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "bench", "resourceVersion": "7", "managedFields": [{"x": 1}],
                     "labels": {"kubernetes.io/service-name": "web", "other": "x"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "appProtocol": "http"}],
        "endpoints": [
            {"addresses": [a], "conditions": {"ready": True, "serving": True, "terminating": False},
             "nodeName": "n1", "targetRef": {"kind": "Pod", "name": "p"}, "zone": "z"}
            for a in addresses
        ],
    }  # fmt: skip


def test_compact_slices_share_their_strings() -> None:
    one = compact(trim_endpoint_slice(_slice("web-1", ["10.0.0.1", "10.0.0.2"])))
    two = compact(trim_endpoint_slice(_slice("web-2", ["10.0.0.3"])))
    assert one["endpoints"][0].node is two["endpoints"][0].node
    assert one["metadata"]["namespace"] is two["metadata"]["namespace"]
    assert one["ports"][0].name is two["ports"][0].name


def test_what_the_director_reads_survives_trim_and_compact() -> None:
    """Every field desired state, status and the election read (a dropped one would silently
    change what is programmed)."""
    eps = compact(trim_endpoint_slice(_slice("web-1", ["10.0.0.1"])))
    assert eps["metadata"] == {
        "name": "web-1", "namespace": "bench", "resourceVersion": "7",
        "labels": {"kubernetes.io/service-name": "web"},
    }  # fmt: skip
    assert eps["addressType"] == "IPv4"
    assert eps["ports"] == (SlicePort("http", 80, "TCP"),)
    assert eps["endpoints"] == (SliceEndpoint(AF_INET, "10.0.0.1", EndpointState.READY, "n1"),)
    svc = compact(
        trim_service(
            {
                "metadata": {"name": "web", "namespace": "bench", "resourceVersion": "3", "annotations": {"a": "b"}},
                "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
            }
        )
    )
    assert svc == {
        "metadata": {"name": "web", "namespace": "bench", "resourceVersion": "3"},
        "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    }
    node = compact(
        trim_node(
            {
                "metadata": {"name": "n1", "resourceVersion": "9", "labels": {"role": "director"}},
                "status": {"addresses": [{"type": "InternalIP", "address": "10.0.2.15"}, {"type": "Hostname"}]},
            }
        )
    )
    assert node == {
        "metadata": {"name": "n1", "resourceVersion": "9", "labels": {"role": "director"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.0.2.15"}]},
    }
    vs_in = {
        "apiVersion": "kubelvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {
            "name": "vs", "namespace": "bench", "uid": "u", "generation": 2, "resourceVersion": "5",
            "creationTimestamp": "2026-01-01T00:00:00Z", "annotations": {"kubectl": "..."}, "managedFields": [],
        },
        "spec": {"vip": "10.1.0.1", "ports": [{"port": 80}], "backends": {"serviceRef": {"name": "web"}}},
        "status": {"conditions": [{"type": "Accepted", "status": "True", "observedGeneration": 2}],
                   "directors": [{"node": "n1", "ready": True}]},
    }  # fmt: skip
    vs = compact(trim_virtual_server(vs_in))
    assert spec_of(vs) == vs_in["spec"] and status_of(vs) == vs_in["status"]
    assert isinstance(vs["spec"], Packed) and isinstance(vs["status"], Packed)
    assert trim_virtual_server(vs) == vs  # the informer trims, then the view
    assert vs["metadata"] == {k: v for k, v in vs_in["metadata"].items() if k not in ("annotations", "managedFields")}


def test_a_listing_requests_the_next_page_while_it_trims_this_one() -> None:
    """Pages in order, each object trimmed, the last page's version; and page 2 is asked for
    before page 1 is trimmed (its trim waits for that request, or fails after 5 s)."""
    import json
    import threading

    from kubelvs.kube.informers import list_objects

    pages = {
        None: {"items": [{"n": 1}, {"n": 2}], "metadata": {"continue": "p2", "resourceVersion": "5"}},
        "p2": {"items": [{"n": 3}], "metadata": {"continue": "p3", "resourceVersion": "6"}},
        "p3": {"items": [{"n": 4}], "metadata": {"resourceVersion": "7"}},
    }
    asked: list[str | None] = []
    second_asked = threading.Event()

    class Response:
        def __init__(self, page: dict[str, Any]) -> None:
            self.data = json.dumps(page).encode()

    def call(**kwargs: Any) -> Response:
        token = kwargs.get("_continue")
        assert kwargs["limit"] > 0 and kwargs["_preload_content"] is False
        asked.append(token)
        if token == "p2":
            second_asked.set()
        return Response(pages[token])

    def trim(obj: dict[str, Any]) -> dict[str, Any]:
        if obj["n"] == 1:
            assert second_asked.wait(5), "page 2 was not requested while page 1 was trimmed"
        return {"trimmed": obj["n"]}

    items, version = list_objects(call, trim)
    assert items == [{"trimmed": n} for n in (1, 2, 3, 4)] and version == "7"
    assert asked == [None, "p2", "p3"]
