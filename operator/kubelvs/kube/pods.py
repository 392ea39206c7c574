"""What the real-server agent reads and writes in the API: the pods on its node (a field
selector on ``spec.nodeName``: a node's agent never lists the cluster's pods), the Services'
selectors, the VirtualServers, its Node's addresses; and the pod condition
``kubelvs.io/receiver-ready`` (status subresource, the only write)."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from kubelvs.core.cluster import trim_virtual_server
from kubelvs.core.receive import READY_CONDITION
from kubelvs.core.spec import GROUP, PLURAL, VERSION, meta
from kubelvs.kube.informers import LIST_TIMEOUT, Informer, Obj
from kubelvs.kube.rest import KubeApi, path


def _meta(obj: Obj, *keys: str) -> dict[str, Any]:
    found = meta(obj)
    return {k: found[k] for k in ("name", "namespace", "resourceVersion", *keys) if found.get(k) is not None}


def trim_pod(pod: Obj) -> Obj:
    """What the agent reads of a pod: labels, IPs, host networking, the readiness gate and condition."""
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    return {
        "metadata": _meta(pod, "uid", "labels", "deletionTimestamp"),
        "spec": {k: spec[k] for k in ("nodeName", "hostNetwork", "readinessGates") if k in spec},
        "status": {
            "podIP": status.get("podIP"),
            "podIPs": status.get("podIPs") or [],
            "conditions": [c for c in status.get("conditions") or [] if c.get("type") == READY_CONDITION],
        },
    }


def trim_service_selector(svc: Obj) -> Obj:
    """A Service's name and pod selector."""
    return {"metadata": _meta(svc), "spec": {"selector": (svc.get("spec") or {}).get("selector") or {}}}


class AgentHandlers(Protocol):
    def on_event(self, kind: str, event_type: str, obj: Obj) -> None: ...
    def on_relisted(self, kind: str, listed: list[Obj]) -> None: ...


def realserver_informers(
    api: KubeApi,
    handlers: AgentHandlers,
    node_name: str,
    on_restart: Callable[[str, str], None] = lambda resource, reason: None,
    timeout: float = LIST_TIMEOUT,
) -> list[Informer]:
    """Informers on VirtualServers, Services (selectors) and this node's pods."""
    list_virtual_servers = api.lister(path("apis", GROUP, VERSION, PLURAL))
    list_pods = api.lister("/api/v1/pods", field_selector=f"spec.nodeName={node_name}")

    def informer(kind: str, call: Callable[..., Any], trim: Callable[[Obj], Obj]) -> Informer:
        return Informer(
            kind,
            call,
            trim,
            lambda event_type, obj: handlers.on_event(kind, event_type, obj),
            lambda listed: handlers.on_relisted(kind, listed),
            on_restart,
            timeout,
        )

    return [
        informer("virtualservers", list_virtual_servers, trim_virtual_server),
        informer("services", api.lister("/api/v1/services"), trim_service_selector),
        informer("pods", list_pods, trim_pod),
    ]


def node_addresses(api: KubeApi, node_name: str) -> list[str]:
    """The Node's InternalIP and ExternalIP addresses (static backends that name the node)."""
    node = api.call("GET", path("api", "v1", "nodes", node_name), timeout=(10, LIST_TIMEOUT))
    return [
        str(entry.get("address"))
        for entry in (node.get("status") or {}).get("addresses") or []
        if entry.get("type") in ("InternalIP", "ExternalIP")
    ]


def set_receiver_ready(
    api: KubeApi, pod: Mapping[str, str], ready: bool, message: str, now: datetime.datetime | None = None
) -> None:
    """Patch the pod condition ``kubelvs.io/receiver-ready`` (a strategic merge: conditions merge by
    type, so the kubelet's own conditions are untouched)."""
    stamp = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    condition = {
        "type": READY_CONDITION,
        "status": "True" if ready else "False",
        "reason": "Prepared" if ready else "WaitingForReceiveSide",
        "message": message,
        "lastTransitionTime": stamp,
    }
    api.call(
        "PATCH",
        path("api", "v1", "namespaces", pod["namespace"], "pods", pod["name"], "status"),
        body={"status": {"conditions": [condition]}},
        content_type="application/strategic-merge-patch+json",
        timeout=(10, LIST_TIMEOUT),
    )
