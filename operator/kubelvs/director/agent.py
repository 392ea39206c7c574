"""`kubelvs director`: watch the Kubernetes API, program this node's IPVS, report status.

Every director is active (kopf in standalone mode, no peering). kopf watches the VirtualServers;
Services, EndpointSlices and Nodes, which are many more, come through lean informers
(``informer``) and are kept trimmed to what is read. Events only update an in-memory view of the
cluster and mark the VirtualServers they touch. One loop coalesces bursts, updates the desired
state for the marked VirtualServers (a full pass only when a conflict could move), and applies
the difference for them against a cached view of the kernel: an event costs O(touched), not
O(everything). A periodic full resync dumps the kernel and repairs drift. When the API server is
unreachable the view stays as it was: the kernel is left alone (fail static) and the director
catches up when the watches resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from kubelvs.apply import CachedReconciler, SyncReport
from kubelvs.core import status as st
from kubelvs.core.cluster import Cluster, trim_endpoint_slice, trim_node, trim_service, trim_virtual_server
from kubelvs.core.desired import DesiredState, Memo, desired_state, update_desired
from kubelvs.core.spec import GROUP, PLURAL, SERVICE_NAME_LABEL, VERSION, ObjectRef
from kubelvs.director.metrics import Metrics
from kubelvs.kernel.addresses import VipInterface
from kubelvs.kernel.ipvs import IPVSClient
from kubelvs.kube.informers import Informer, list_objects
from kubelvs.state.ownership import CachedStore

log = logging.getLogger("kubelvs.director")
STATUS_WRITES_IN_FLIGHT = 4


@dataclass
class DirectorConfig:
    node_name: str
    state_dir: Path
    interface: str = "kubelvs0"
    netns: str | None = None  # program IPVS in this network namespace (tests); default: our own
    resync_seconds: float = 30.0
    coalesce_seconds: float = 0.05
    metrics_port: int = 0  # 0: no metrics endpoint


@dataclass
class ClusterView:
    """What the director knows of the cluster, updated by watch events."""

    virtual_servers: dict[ObjectRef, dict[str, Any]] = field(default_factory=dict)
    cluster: Cluster = field(default_factory=Cluster)
    node_labels: dict[str, str] = field(default_factory=dict)
    refs_by_service: dict[tuple[str, str], set[ObjectRef]] = field(default_factory=lambda: defaultdict(set))


class Director:
    def __init__(self, config: DirectorConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.view = ClusterView()
        self.memo: Memo = {}
        self.dirty: set[ObjectRef] = set()
        self.everything_dirty = True
        self.wake: asyncio.Event | None = None
        self.metrics = metrics or Metrics()  # the process-wide registry /metrics serves
        self.reconciler: CachedReconciler | None = None
        self.desired: DesiredState | None = None
        self.errors_by_ref: dict[ObjectRef, list[str]] = {}
        self.written_entries: dict[ObjectRef, dict[str, Any]] = {}
        self.last_full = 0.0
        self.custom: k8s.CustomObjectsApi | None = None
        self.ready = asyncio.Event()
        self.status_pending: set[ObjectRef] = set()
        self.status_wake = asyncio.Event()

    # --- events -------------------------------------------------------------------------

    def _mark(self, refs: Iterable[ObjectRef] = (), everything: bool = False) -> None:
        self.dirty.update(refs)
        self.everything_dirty |= everything
        if self.wake is not None:
            self.wake.set()

    def on_virtual_server(self, kind: str | None, obj: dict[str, Any]) -> None:
        ref = ObjectRef.of(obj)
        before = self.view.virtual_servers.get(ref)
        if kind != "DELETED" and _unchanged(before, obj):
            return  # kopf's replay of its initial listing: already known from ours
        obj = trim_virtual_server(obj)
        if kind == "DELETED":
            self.view.virtual_servers.pop(ref, None)
            self.memo.pop(ref, None)
            self.written_entries.pop(ref, None)
            self._index_service(ref, before, None)
            self._mark([ref])
            return
        self.view.virtual_servers[ref] = obj
        self._index_service(ref, before, obj)
        spec_changed = before is None or (before.get("metadata") or {}).get("generation") != (
            obj.get("metadata") or {}
        ).get("generation")
        if spec_changed:
            self._mark([ref])

    def _index_service(self, ref: ObjectRef, before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> None:
        for obj, add in ((before, False), (after, True)):
            name = (((obj or {}).get("spec") or {}).get("backends") or {}).get("serviceRef", {}) or {}
            if isinstance(name, Mapping) and name.get("name"):
                key = (ref.namespace, str(name["name"]))
                (self.view.refs_by_service[key].add if add else self.view.refs_by_service[key].discard)(ref)

    def on_service(self, kind: str | None, obj: dict[str, Any]) -> None:
        ref = ObjectRef.of(obj)
        if kind != "DELETED" and _unchanged(self.view.cluster.services.get((ref.namespace, ref.name)), obj):
            return
        if kind == "DELETED":
            self.view.cluster.remove_service(ref.namespace, ref.name)
        else:
            self.view.cluster.put_service(obj)
        self._mark(self.view.refs_by_service.get((ref.namespace, ref.name), ()))

    def on_endpoint_slice(self, kind: str | None, obj: dict[str, Any]) -> None:
        ref = ObjectRef.of(obj)
        service = ((obj.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
        # Every slice is kept (trimmed), used or not: a VirtualServer created later for an
        # existing Service must find its endpoints without waiting for them to change.
        known = (self.view.cluster.slices.get((ref.namespace, service or "")) or {}).get(ref.name)
        if kind == "DELETED":
            self.view.cluster.remove_slice(obj)
        elif _unchanged(known, obj):
            return
        else:
            self.view.cluster.put_slice(obj)
        self._mark(self.view.refs_by_service.get((ref.namespace, service or ""), ()))

    def on_node(self, kind: str | None, obj: dict[str, Any]) -> None:
        name = (obj.get("metadata") or {}).get("name")
        version = self.view.cluster.nodes_version
        if kind == "DELETED":
            self.view.cluster.remove_node(str(name))
        else:
            self.view.cluster.put_node(obj)
        if name == self.config.node_name:
            labels = dict((obj.get("metadata") or {}).get("labels") or {})
            if labels != self.view.node_labels:
                self.view.node_labels = labels
                self._mark(everything=True)
                return
        if self.view.cluster.nodes_version != version:
            node_targets = [
                r
                for r, vs in self.view.virtual_servers.items()
                if ((vs.get("spec") or {}).get("backends") or {}).get("target") == "Node"
            ]
            self._mark(node_targets)

    def _relisted(self, known: Iterable[Mapping[str, Any]], listed: list[dict[str, Any]], on_event: Any) -> None:
        """A watch expired and its kind was listed again: what is gone was deleted meanwhile."""
        present = {ObjectRef.of(obj) for obj in listed}
        for obj in [o for o in known if ObjectRef.of(o) not in present]:
            on_event("DELETED", dict(obj))
        for obj in listed:
            on_event("MODIFIED", obj)

    def on_services_relisted(self, listed: list[dict[str, Any]]) -> None:
        self._relisted(list(self.view.cluster.services.values()), listed, self.on_service)

    def on_endpoint_slices_relisted(self, listed: list[dict[str, Any]]) -> None:
        known = [eps for by_name in self.view.cluster.slices.values() for eps in by_name.values()]
        self._relisted(known, listed, self.on_endpoint_slice)

    def on_nodes_relisted(self, listed: list[dict[str, Any]]) -> None:
        known = [{"metadata": {"name": name}} for name in self.view.cluster.node_addresses]
        self._relisted(known, listed, self.on_node)

    # --- the sync loop --------------------------------------------------------------------

    def compute_desired(self) -> DesiredState:
        return desired_state(self.view.virtual_servers.values(), self.view.cluster, self.view.node_labels, self.memo)

    def _scope(self, desired: DesiredState) -> set[ObjectRef] | None:
        """The VirtualServers to sync: those marked, and those whose outcome changed because of
        another (a conflict resolved when the older one went away)."""
        if self.everything_dirty or self.desired is None:
            return None
        scope = set(self.dirty)
        before = self.desired.resolutions
        for ref, now in desired.resolutions.items():
            old = before.get(ref)
            if (
                old is None
                or old.keys != now.keys
                or old.selected != now.selected
                or ((old.error and old.error.reason) != (now.error and now.error.reason))
            ):
                scope.add(ref)
        scope.update(ref for ref in before if ref not in desired.resolutions)
        return scope

    def plan_sync(self, full: bool) -> tuple[DesiredState, set[ObjectRef] | None]:
        """In the event loop's thread (the view is only touched there): what to sync."""
        if not (full or self.everything_dirty) and self.desired is not None:
            quick = update_desired(
                self.desired, self.view.virtual_servers, self.dirty, self.view.cluster, self.view.node_labels, self.memo
            )
            if quick is not None:  # nothing but the marked VirtualServers changed
                marked = set(self.dirty)
                self.dirty.clear()
                return quick, marked
        desired = self.compute_desired()
        scope = None if full else self._scope(desired)
        self.dirty.clear()
        self.everything_dirty = False
        return desired, scope

    def sync_once(self, desired: DesiredState, scope: set[ObjectRef] | None, full: bool) -> SyncReport:
        """In a worker thread: the kernel I/O."""
        assert self.reconciler is not None
        started = time.perf_counter()
        report = self.reconciler.sync_cached(desired, only=scope, full=full)
        self.metrics.observe_sync("full" if full else "incremental", time.perf_counter() - started, report)
        errors: dict[ObjectRef, list[str]] = defaultdict(list)
        for failure in report.result.failed:
            origin = desired.origins.get(failure.operation.key)
            if origin is not None:
                errors[origin].append(str(failure))
        for key in report.plan.conflicts:
            origin = desired.origins.get(key)
            if origin is not None:
                errors[origin].append(f"{key} exists in the kernel and is not owned by kubelvs")
        if self.desired is None or len(report.plan) or not report.ok:
            kind = "initial" if self.desired is None else "full" if full else "incremental"
            log.info(
                "%s sync: %d operations %s, %d failed, %d conflicts",
                kind,
                len(report.plan),
                report.plan.counts(),
                len(report.result.failed),
                len(report.plan.conflicts),
            )
        self.errors_by_ref = errors
        self.desired = desired
        return report

    async def run(self) -> None:
        """Coalesce events, sync, write status; a full resync every resync_seconds."""
        self.wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.reconciler = CachedReconciler(
            IPVSClient(netns=self.config.netns),
            CachedStore(self.config.state_dir),
            VipInterface(self.config.interface, netns=self.config.netns),
        )
        await self.ready.wait()  # the initial listing is in: never sync from a partial view
        while True:
            due = self.last_full + self.config.resync_seconds - time.monotonic()
            if not (self.dirty or self.everything_dirty) and due > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=due)
            self.wake.clear()
            await asyncio.sleep(self.config.coalesce_seconds)  # let a burst of events land
            full = time.monotonic() >= self.last_full + self.config.resync_seconds
            try:
                desired, scope = self.plan_sync(full)
                await loop.run_in_executor(None, self.sync_once, desired, scope, full)
            except Exception:
                log.exception("sync failed; retrying")
                self.everything_dirty = True
                await asyncio.sleep(1.0)
                continue
            if full:
                self.last_full = time.monotonic()
            # Status goes out on its own task: a thousand status writes never delay the kernel.
            self.status_pending.update(desired.resolutions if scope is None else scope)
            self.status_wake.set()

    # --- status ---------------------------------------------------------------------------

    async def status_loop(self) -> None:
        """Write the status of the VirtualServers the syncs touched, a few requests in flight
        (a few workers, not a task per VirtualServer: start-up touches all of them)."""

        async def worker(queue: list[ObjectRef]) -> None:
            while queue:
                ref = queue.pop()
                try:
                    await self.write_status(ref)
                except Exception:  # reported again after the next sync; the kernel work goes on
                    log.exception("status of %s not written", ref)
                    self.metrics.api_errors.inc()

        while True:
            await self.status_wake.wait()
            self.status_wake.clear()
            queue = sorted(self.status_pending, reverse=True)
            self.status_pending = set()
            await asyncio.gather(*(worker(queue) for _ in range(STATUS_WRITES_IN_FLIGHT)))

    async def write_status(self, ref: ObjectRef) -> None:
        desired = self.desired
        if self.custom is None or desired is None or ref not in desired.resolutions:
            return
        loop = asyncio.get_running_loop()
        node = self.config.node_name
        resolution = desired.resolutions[ref]
        vs = self.view.virtual_servers.get(ref)
        if vs is None:
            return
        entry = st.director_entry(node, resolution, self.errors_by_ref.get(ref, []))
        manager = f"kubelvs-director-{node}"
        if not resolution.selected:
            if node in st.entries(vs) and self.written_entries.get(ref) != {}:
                # No longer ours: applying an empty list drops the entry this manager owns.
                await loop.run_in_executor(None, self._apply_status, ref, {"directors": []}, manager)
                self.written_entries[ref] = {}
            return
        # This director's own entry first: the summary is derived from the entries.
        if not st.same_entry(vs, entry) and self.written_entries.get(ref) != entry:
            body = {"directors": [{**entry, "lastSyncTime": st.now_rfc3339()}]}
            await loop.run_in_executor(None, self._apply_status, ref, body, manager)
            self.written_entries[ref] = entry
        if st.summary_writer(vs, node):
            summary = st.summary(vs, resolution, entry, st.now_rfc3339())
            if not st.same_summary(vs, summary):
                await loop.run_in_executor(None, self._apply_status, ref, summary, "kubelvs-status")
                await loop.run_in_executor(None, self._event_on_transition, vs, summary)

    def _apply_status(self, ref: ObjectRef, status: dict[str, Any], manager: str) -> None:
        assert self.custom is not None
        patch = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "VirtualServer",
            "metadata": {"name": ref.name, "namespace": ref.namespace},
            "status": status,
        }
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                ref.namespace,
                PLURAL,
                ref.name,
                patch,
                field_manager=manager,
                force=True,
                _content_type="application/apply-patch+yaml",
            )
        except k8s.ApiException as error:
            if error.status != 404:  # deleted meanwhile: nothing to report on
                self.metrics.api_errors.inc()
                log.warning("status of %s not written: %s %s", ref, error.status, error.reason)

    def _event_on_transition(self, vs: Mapping[str, Any], summary: Mapping[str, Any]) -> None:
        """A Kubernetes Event for each condition that changed (Warning when it went bad)."""
        old = {c.get("type"): c for c in (vs.get("status") or {}).get("conditions") or []}
        meta = vs.get("metadata") or {}
        for condition in summary["conditions"]:
            before = old.get(condition["type"]) or {}
            if (before.get("status"), before.get("reason")) == (condition["status"], condition["reason"]):
                continue
            warning = condition["status"] == "False" and condition["reason"] != "NoDirectors"
            now = st.now_rfc3339()
            event = {
                "metadata": {"generateName": f"{meta.get('name')}.", "namespace": meta.get("namespace")},
                "involvedObject": {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "VirtualServer",
                    "name": meta.get("name"),
                    "namespace": meta.get("namespace"),
                    "uid": meta.get("uid"),
                },
                "type": "Warning" if warning else "Normal",
                "reason": condition["reason"],
                "message": f"{condition['type']}={condition['status']}: {condition['message']}"[:1000],
                "source": {"component": "kubelvs-director", "host": self.config.node_name},
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
            }
            try:
                assert self.custom is not None
                core = k8s.CoreV1Api(self.custom.api_client)
                core.create_namespaced_event(str(meta.get("namespace")), event)  # type: ignore[arg-type]
            except k8s.ApiException as error:  # events are best effort
                self.metrics.api_errors.inc()
                log.debug("event not posted: %s", error.reason)

    # --- start-up -------------------------------------------------------------------------

    def informers(self, api: k8s.ApiClient) -> list[Informer]:
        core, discovery = k8s.CoreV1Api(api), k8s.DiscoveryV1Api(api)
        restarted = self.metrics.watch_restarted
        return [
            Informer(
                "services",
                core.list_service_for_all_namespaces,
                trim_service,
                self.on_service,
                self.on_services_relisted,
                restarted,
            ),
            Informer(
                "endpointslices",
                discovery.list_endpoint_slice_for_all_namespaces,
                trim_endpoint_slice,
                self.on_endpoint_slice,
                self.on_endpoint_slices_relisted,
                restarted,
            ),
            Informer("nodes", core.list_node, trim_node, self.on_node, self.on_nodes_relisted, restarted),
        ]

    def initial_list(self) -> list[tuple[Informer, str]]:
        """List everything once before the first sync, so a restart adopts the kernel as is.

        VirtualServers first: the Services and EndpointSlices listed after them are kept only
        when a VirtualServer refers to them. Returns each informer with the version to watch from.
        """
        api = k8s.ApiClient()
        self.custom = k8s.CustomObjectsApi(api)
        custom = self.custom

        def list_virtual_servers(**kwargs: Any) -> Any:
            return custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kwargs)

        # Read in pages like the informers (kopf then watches them: that listing is only replayed).
        listed, _ = list_objects(list_virtual_servers, trim_virtual_server)
        for vs in listed:
            self.on_virtual_server("ADDED", vs)
        del listed
        started = []
        for informer in self.informers(api):
            items, version = informer.list()
            for obj in items:
                informer.on_event("ADDED", obj)
            started.append((informer, version))
        self._mark(everything=True)
        return started


def _unchanged(known: Mapping[str, Any] | None, obj: Mapping[str, Any]) -> bool:
    """The same resourceVersion: a replayed event (kopf replays its initial listing)."""
    if known is None:
        return False
    version = (obj.get("metadata") or {}).get("resourceVersion")
    return version is not None and (known.get("metadata") or {}).get("resourceVersion") == version


def build_registry(director: Director) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> Any:
        return kopf.login_via_client(**kwargs)

    def handler(callback: Any) -> Any:
        def on_event(event: Mapping[str, Any], body: kopf.Body, **_: Any) -> None:
            callback(event.get("type"), dict(body))

        return on_event

    kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)(handler(director.on_virtual_server))
    watches_stop = threading.Event()

    @kopf.on.startup(registry=registry)
    async def start(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.level = logging.WARNING
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # not one line per watch event
        settings.watching.server_timeout = 300
        # Memory: kopf lists in pages, and a per-object worker with nothing to do exits soon
        # (each keeps the last body it saw; the initial listing makes one per VirtualServer).
        settings.watching.chunk_size = 500
        settings.queueing.idle_timeout = 0.5
        settings.networking.request_timeout = 30
        loop = asyncio.get_running_loop()
        informers = await loop.run_in_executor(None, director.initial_list)

        def deliver(callback: Any, args: Any) -> None:  # from a watch thread to the event loop's
            loop.call_soon_threadsafe(callback, *args)

        for informer, version in informers:
            informer.start(version, deliver, watches_stop)
        director.ready.set()
        if director.config.metrics_port:
            director.metrics.serve(director.config.metrics_port, director)
        director.sync_task = asyncio.create_task(director.run())  # type: ignore[attr-defined]
        director.status_task = asyncio.create_task(director.status_loop())  # type: ignore[attr-defined]

    @kopf.on.cleanup(registry=registry)
    async def stop(**_: Any) -> None:
        watches_stop.set()
        for name in ("sync_task", "status_task"):
            task = getattr(director, name, None)
            if task is not None:
                task.cancel()

    return registry


def load_kube_config() -> None:
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()


def run(config: DirectorConfig) -> int:
    load_kube_config()
    director = Director(config)
    registry = build_registry(director)
    # kopf logs in with the same credentials (kubeconfig or the pod's service account).
    asyncio.run(kopf.operator(registry=registry, standalone=True, clusterwide=True))
    return 0
