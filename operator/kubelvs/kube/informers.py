"""List, then watch, one kind of object cluster-wide: the director's lean informers.

VirtualServers, Services, EndpointSlices and Nodes come in as raw JSON, without the client's
model classes, and each object is cut down to what ``kubelvs.core`` reads before it is kept.
The initial listing is read in pages. The watch resumes from the last resourceVersion it saw
(bookmarks keep that version fresh), so a restart of the stream replays nothing. When the
version has expired (410 Gone, as a watch event or as the HTTP status of the watch request), the
informer lists again and hands over the whole new list, so what was deleted meanwhile is seen
deleted. Every request has a timeout: a half-open connection ends and is retried.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from kubelvs.core.cluster import trim_endpoint_slice, trim_node, trim_service, trim_virtual_server
from kubelvs.core.spec import GROUP, PLURAL, VERSION
from kubelvs.kube.rest import KubeApi, path

log = logging.getLogger("kubelvs.kube.informers")

Obj = dict[str, Any]
PAGE_SIZE = 500
WATCH_SECONDS = 300  # the server ends each watch after this; it is then resumed
READ_TIMEOUT = WATCH_SECONDS + 30  # no byte (not even a bookmark) for this long: the stream is dead
LIST_TIMEOUT = 60.0  # one page of a listing
BACKOFF_SECONDS = (0.5, 1, 2, 4, 8, 15)


_SHARED_FLAGS: dict[tuple[tuple[str, bool], ...], Obj] = {}  # see compact(); a few entries in practice
_SHARED_FLAGS_MAX = 256


def compact(value: Any) -> Any:
    """A trimmed object as the director keeps it: equal, with one copy of each repeated part.

    JSON parsing makes a new string for every value, and thousands of objects repeat the same
    ones (namespaces, ports, protocols, reasons and messages of status conditions): each is
    interned. Maps of flags only (an endpoint's ``conditions``) have a handful of distinct
    values: equal ones are one shared dict, which nothing in the director mutates. In place
    (the objects are fresh from the parser): a copy would double the allocations of a listing
    of 10,000s of objects, and with them the garbage collector's full passes (seconds).
    """
    kind = type(value)
    if kind is dict:
        flags_only = True
        for key, item in value.items():  # assigning to existing keys: the dict's size stays
            item_kind = type(item)
            if item_kind is str:
                value[key] = _intern(item)
                flags_only = False
            elif item_kind is dict or item_kind is list:
                kept = compact(item)
                if kept is not item:
                    value[key] = kept
                flags_only = False
            elif item_kind is not bool:
                flags_only = False
        if flags_only and value and len(value) <= 4:
            flags = tuple(value.items())
            shared = _SHARED_FLAGS.get(flags)
            if shared is not None:
                return shared
            if len(_SHARED_FLAGS) < _SHARED_FLAGS_MAX:
                _SHARED_FLAGS[flags] = value
        return value
    if kind is list:
        for index, item in enumerate(value):
            item_kind = type(item)
            if item_kind is str:
                value[index] = _intern(item)
            elif item_kind is dict or item_kind is list:
                kept = compact(item)
                if kept is not item:
                    value[index] = kept
        return value
    if kind is str:
        return _intern(value)
    return value


_intern = sys.intern


class Expired(Exception):
    """The resourceVersion is too old to watch from (HTTP 410): list again."""


def list_objects(
    call: Callable[..., Any], trim: Callable[[Obj], Obj], timeout: float = LIST_TIMEOUT
) -> tuple[list[Obj], str]:
    """Every object, read in pages and trimmed, and the resourceVersion to watch from.

    The next page is requested as soon as this one's continue token is read, and comes in
    while this one is trimmed: the API server's time per page (natively 0.45 s of the 0.65 s
    that fetching and parsing 10,000 VirtualServers takes) no longer waits behind ours."""

    def fetch(token: str | None) -> Obj:
        kwargs: dict[str, Any] = {
            "limit": PAGE_SIZE,
            "_preload_content": False,
            "_request_timeout": (min(10.0, timeout), timeout),
        }
        if token:
            kwargs["_continue"] = token
        page: Obj = json.loads(call(**kwargs).data)
        return page

    items: list[Obj] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="list") as prefetch:
        page = fetch(None)
        while True:
            meta = page.get("metadata") or {}
            token = meta.get("continue")
            following = prefetch.submit(fetch, token) if token else None
            items.extend(compact(trim(obj)) for obj in page.get("items") or [])
            if following is None:
                return items, str(meta.get("resourceVersion") or "")
            page = following.result()


@dataclass
class Informer:
    resource: str  # for logs and metrics: "services", "endpointslices", "nodes"
    call: Callable[..., Any]  # KubeApi.lister (or a typed client's list function: the same keywords)
    trim: Callable[[Obj], Obj]  # keeps what the director reads of one object
    on_event: Callable[[str, Obj], None]  # ("ADDED" | "MODIFIED" | "DELETED", trimmed object)
    on_relist: Callable[[list[Obj]], None]  # the complete set, after a re-list
    on_restart: Callable[[str, str], None] = lambda resource, reason: None
    timeout: float = LIST_TIMEOUT

    def list(self) -> tuple[list[Obj], str]:
        return list_objects(self.call, self.trim, self.timeout)

    def watch(self, version: str, deliver: Callable[[Callable[..., None], Any], None], stop: threading.Event) -> str:
        """Stream events from ``version`` until the server ends the watch; return the newest version."""
        try:
            response = self.call(
                watch=True,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_SECONDS,
                _preload_content=False,
                _request_timeout=(10, READ_TIMEOUT),
            )
        except ApiException as error:
            if error.status == 410:  # the version expired before the watch began (as client-go's reflector)
                raise Expired(str(error.reason)) from error
            raise
        try:
            for line in iter_resp_lines(response):
                if stop.is_set():
                    break
                if not line:
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Expired(obj.get("message", ""))
                    raise ApiException(status=obj.get("code"), reason=f"{obj.get('reason')}: {obj.get('message')}")
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if kind != "BOOKMARK":
                    deliver(self.on_event, (str(kind), compact(self.trim(obj))))
        finally:
            response.close()
            response.release_conn()
        return version

    def run(self, version: str, deliver: Callable[[Callable[..., None], Any], None], stop: threading.Event) -> None:
        """Watch from ``version`` (from :meth:`list`) until ``stop``; resume, re-list when expired.

        ``deliver(callback, args)`` hands an event to the thread that owns the view (the event loop).
        """
        failures = 0
        while not stop.is_set():
            try:
                if not version:
                    items, version = self.list()
                    deliver(self.on_relist, (items,))
                version = self.watch(version, deliver, stop)
                failures = 0
            except Expired:
                log.info("%s: watch expired, listing again", self.resource)
                self.on_restart(self.resource, "expired")
                version = ""
            except Exception as error:  # the API server is away: keep what we have, retry (fail static)
                delay = BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS) - 1)]
                failures += 1
                log.warning("%s: watch failed (%s); retrying in %.1f s", self.resource, error, delay)
                self.on_restart(self.resource, "error")
                stop.wait(delay)
            else:
                if not stop.is_set():
                    self.on_restart(self.resource, "timeout")

    def start(
        self, version: str, deliver: Callable[[Callable[..., None], Any], None], stop: threading.Event
    ) -> threading.Thread:
        thread = threading.Thread(
            target=self.run, args=(version, deliver, stop), name=f"watch-{self.resource}", daemon=True
        )
        thread.start()
        return thread


class ViewHandlers(Protocol):
    """What the informers feed: one handler per kind for events, one for a complete re-list."""

    def on_virtual_server(self, event_type: str, obj: Obj) -> None: ...
    def on_virtual_servers_relisted(self, listed: list[Obj]) -> None: ...
    def on_service(self, event_type: str, obj: Obj) -> None: ...
    def on_services_relisted(self, listed: list[Obj]) -> None: ...
    def on_endpoint_slice(self, event_type: str, obj: Obj) -> None: ...
    def on_endpoint_slices_relisted(self, listed: list[Obj]) -> None: ...
    def on_node(self, event_type: str, obj: Obj) -> None: ...
    def on_nodes_relisted(self, listed: list[Obj]) -> None: ...


def cluster_informers(
    api: KubeApi,
    view: ViewHandlers,
    on_restart: Callable[[str, str], None],
    timeout: float = LIST_TIMEOUT,
) -> list[Informer]:
    """The director's four informers, VirtualServers first (so that a listing of the others
    finds them)."""
    list_virtual_servers = api.lister(path("apis", GROUP, VERSION, PLURAL))
    return [
        Informer(
            "virtualservers",
            list_virtual_servers,
            trim_virtual_server,
            view.on_virtual_server,
            view.on_virtual_servers_relisted,
            on_restart,
            timeout,
        ),
        Informer(
            "services",
            api.lister("/api/v1/services"),
            trim_service,
            view.on_service,
            view.on_services_relisted,
            on_restart,
            timeout,
        ),
        Informer(
            "endpointslices",
            api.lister("/apis/discovery.k8s.io/v1/endpointslices"),
            trim_endpoint_slice,
            view.on_endpoint_slice,
            view.on_endpoint_slices_relisted,
            on_restart,
            timeout,
        ),
        Informer(
            "nodes", api.lister("/api/v1/nodes"), trim_node, view.on_node, view.on_nodes_relisted, on_restart, timeout
        ),
    ]
