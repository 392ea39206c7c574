"""The director's informer against a real kube-apiserver: paged listing, then a watch from its version."""

from __future__ import annotations

import queue
import threading
from typing import Any

from kubelvs.core.cluster import trim_service
from kubelvs.kube import informers as informer_module
from kubelvs.kube.informers import Informer


def _service(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"ports": [{"name": "http", "port": 80}]}}


def test_lists_in_pages_then_watches_from_the_listing(api_client, namespace, monkeypatch) -> None:
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    for i in range(7):
        core.create_namespaced_service(namespace, _service(f"s{i}"))
    monkeypatch.setattr(informer_module, "PAGE_SIZE", 2)  # 7 Services of this namespace: several pages
    events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
    restarts: list[tuple[str, str]] = []
    relisted: list[list[dict[str, Any]]] = []

    def mine(obj: dict[str, Any]) -> bool:
        return obj["metadata"]["namespace"] == namespace

    watcher = Informer(
        "services",
        core.list_service_for_all_namespaces,
        trim_service,
        lambda kind, obj: events.put((kind, obj)) if mine(obj) else None,
        relisted.append,
        lambda resource, reason: restarts.append((resource, reason)),
    )
    items, version = watcher.list()
    assert sorted(o["metadata"]["name"] for o in items if mine(o)) == [f"s{i}" for i in range(7)]
    assert all("managedFields" not in o["metadata"] and "clusterIP" not in o["spec"] for o in items)

    stop = threading.Event()
    watcher.start(version, lambda callback, args: callback(*args), stop)
    try:
        core.create_namespaced_service(namespace, _service("late"))
        core.delete_namespaced_service("s0", namespace)
        seen = [events.get(timeout=30) for _ in range(2)]
        # Nothing listed before is replayed: the watch starts at the listing's version.
        assert [(kind, obj["metadata"]["name"]) for kind, obj in seen] == [("ADDED", "late"), ("DELETED", "s0")]
        assert seen[0][1]["spec"] == {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    finally:
        stop.set()
    assert not relisted and not restarts
