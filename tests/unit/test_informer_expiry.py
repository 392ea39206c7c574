"""An expired watch (410 Gone) makes the informer list again.

A stand-in response replaces the API server here: a fresh test etcd has compacted nothing, so
the real server cannot be made to answer 410 on demand (the list/watch path itself is tested
against the real server in tests/api/test_informer.py).
"""

from __future__ import annotations

import json
import threading
from typing import Any

from kubelvs.kube.informers import Informer


class Response:
    def __init__(self, lines: list[dict[str, Any]] | None = None, data: dict[str, Any] | None = None) -> None:
        self.data = json.dumps(data or {}).encode()
        self.lines = [json.dumps(line).encode() + b"\n" for line in lines or []]

    def stream(self, amt: Any = None, decode_content: bool = False) -> Any:
        yield from self.lines

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


def test_gone_lists_again_and_hands_over_the_whole_list() -> None:
    stop = threading.Event()
    calls: list[dict[str, Any]] = []
    relisted: list[list[dict[str, Any]]] = []
    restarts: list[tuple[str, str]] = []

    def call(**kwargs: Any) -> Response:
        calls.append(kwargs)
        if kwargs.get("watch"):
            if kwargs["resource_version"] == "5":
                return Response([{"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}])
            stop.set()
            return Response([{"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "8"}}}])
        return Response(data={"metadata": {"resourceVersion": "7"}, "items": [{"metadata": {"name": "a"}}]})

    def on_relist(items: list[dict[str, Any]]) -> None:
        relisted.append(items)

    watcher = Informer("services", call, lambda o: o, lambda k, o: None, on_relist, lambda *r: restarts.append(r))
    watcher.run("5", lambda callback, args: callback(*args), stop)
    assert restarts == [("services", "expired")]
    assert relisted == [[{"metadata": {"name": "a"}}]]
    assert [c.get("resource_version") for c in calls] == ["5", None, "7"]  # watch, list, watch again


def test_gone_as_the_http_status_of_the_watch_request_lists_again() -> None:
    # client-go's reflector relists on an HTTP 410 too; this informer used to retry the expired
    # version forever.
    from kubernetes.client.exceptions import ApiException

    stop = threading.Event()
    calls: list[dict[str, Any]] = []
    restarts: list[tuple[str, str]] = []

    def call(**kwargs: Any) -> Response:
        calls.append(kwargs)
        if kwargs.get("watch"):
            if kwargs["resource_version"] == "5":
                raise ApiException(status=410, reason="Gone")
            stop.set()
            return Response([])
        return Response(data={"metadata": {"resourceVersion": "7"}, "items": []})

    watcher = Informer(
        "services", call, lambda o: o, lambda k, o: None, lambda items: None, lambda *r: restarts.append(r)
    )
    watcher.run("5", lambda callback, args: callback(*args), stop)
    assert restarts == [("services", "expired")]
    assert [c.get("resource_version") for c in calls] == ["5", None, "7"]


def test_every_list_request_has_a_timeout() -> None:
    seen: list[dict[str, Any]] = []

    def call(**kwargs: Any) -> Response:
        seen.append(kwargs)
        return Response(data={"metadata": {"resourceVersion": "1"}, "items": []})

    Informer("nodes", call, lambda o: o, lambda k, o: None, lambda items: None, timeout=12.0).list()
    assert seen[0]["_request_timeout"] == (10.0, 12.0)
