"""What the director knows of the cluster, fed by watch events, and what the next sync covers.

Events only update this view and mark the VirtualServers they touch; nothing here does I/O.
The event handlers run on the event loop's thread only (the watches hand their events over to
it), so the view needs no lock. ``plan_sync`` turns the marks into the desired state and the
scope of the next sync: O(touched) when only marked VirtualServers changed, a full pass when a
conflict could move.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from kubelvs.core import election as el
from kubelvs.core.cluster import Cluster, refresh_status, service_name_of, spec_of, trim_virtual_server
from kubelvs.core.desired import DesiredState, Memo, age_key, desired_state, spec_version, update_desired
from kubelvs.core.model import normalize_address
from kubelvs.core.spec import ObjectRef, SpecError, meta

Obj = dict[str, Any]
_NO_SELECTOR: Mapping[str, str] = {}


class SpecFacts(NamedTuple):
    vip: str  # canonical; "" when not valid
    selector: Mapping[str, str]  # directors.nodeSelector
    node_target: bool  # backends.target is Node: a Node's change can change its real servers


class ClusterView:
    """VirtualServers, Services, EndpointSlices and Nodes as last seen, plus the dirty marks."""

    def __init__(self, node_name: str, wake: Callable[[], None] = lambda: None) -> None:
        self.node_name = node_name
        self.wake = wake  # called on every mark: the sync loop's wake-up
        self.virtual_servers: dict[ObjectRef, Obj] = {}
        self.cluster = Cluster()
        self.node_labels: dict[str, str] = {}
        # Every Node's labels: which other directors a VirtualServer's nodeSelector selects (the election)
        self.labels_by_node: dict[str, dict[str, str]] = {}
        self.on_nodes_changed: Callable[[], None] = lambda: None
        # The director nodes (those with a heartbeat Lease: the election keeps it); empty
        # without the election. VirtualServers sharing a VIP must select a director in common.
        self.director_nodes: frozenset[str] = frozenset()
        self.refused: dict[ObjectRef, SpecError] = {}
        self.node_seen = False  # our own Node object was listed (else every nodeSelector excludes us)
        self.node_address = ""  # our own InternalIP (the metrics listener binds to it)
        self.refs_by_service: dict[tuple[str, str], set[ObjectRef]] = defaultdict(set)
        self.memo: Memo = {}
        self._spec_facts: dict[ObjectRef, tuple[str, SpecFacts]] = {}  # by spec_version()
        self.dirty: set[ObjectRef] = set()
        self.everything_dirty = True
        self.desired: DesiredState | None = None  # the desired state of the last successful sync

    # --- events -------------------------------------------------------------------------

    def mark(self, refs: Iterable[ObjectRef] = (), everything: bool = False) -> None:
        self.dirty.update(refs)
        self.everything_dirty |= everything
        self.wake()

    def on_virtual_server(self, event_type: str, obj: Obj) -> None:
        ref = ObjectRef.of(obj)
        before = self.virtual_servers.get(ref)
        if event_type != "DELETED" and _unchanged(before, obj):
            return  # a replay of what the listing already gave
        if event_type == "DELETED":
            self.virtual_servers.pop(ref, None)
            self.memo.pop(ref, None)
            self._spec_facts.pop(ref, None)
            self._index_service(ref, before, None)
            self.mark([ref])
            return
        # The same object (uid) at the same generation has the same spec: a status write.
        version = spec_version(obj)
        same_spec = before is not None and version is not None and spec_version(before) == version
        if same_spec and before is not None and refresh_status(before, obj):
            return  # a status write: nothing to mark
        obj = trim_virtual_server(obj, before if same_spec else None)
        self.virtual_servers[ref] = obj
        if not same_spec:
            self._index_service(ref, before, obj)
            self.mark([ref])  # a new spec, or a new object under the same name (deleted and created again)

    def _index_service(self, ref: ObjectRef, before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> None:
        old, new = _service_ref(before), _service_ref(after)
        if old == new:
            return
        if old is not None:
            users = self.refs_by_service.get((ref.namespace, old))
            if users is not None:
                users.discard(ref)
                if not users:
                    del self.refs_by_service[(ref.namespace, old)]
        if new is not None:
            self.refs_by_service[(ref.namespace, new)].add(ref)

    def on_service(self, event_type: str, obj: Obj) -> None:
        ref = ObjectRef.of(obj)
        if event_type != "DELETED" and _unchanged(self.cluster.services.get((ref.namespace, ref.name)), obj):
            return
        if event_type == "DELETED":
            self.cluster.remove_service(ref.namespace, ref.name)
        else:
            self.cluster.put_service(obj)
        self.mark(self.refs_by_service.get((ref.namespace, ref.name), ()))

    def on_endpoint_slice(self, event_type: str, obj: Obj) -> None:
        ref = ObjectRef.of(obj)
        service = service_name_of(obj) or ""
        # Every slice is kept (trimmed), used or not: a VirtualServer created later for an
        # existing Service must find its endpoints without waiting for them to change.
        known = (self.cluster.slices.get((ref.namespace, service)) or {}).get(ref.name)
        if event_type == "DELETED":
            self.cluster.remove_slice(obj)
        elif _unchanged(known, obj):
            return
        else:
            self.cluster.put_slice(obj)
        self.mark(self.refs_by_service.get((ref.namespace, service), ()))

    def on_node(self, event_type: str, obj: Obj) -> None:
        name = str(meta(obj).get("name") or "")
        version = self.cluster.nodes_version
        if event_type == "DELETED":
            self.cluster.remove_node(name)
            if self.labels_by_node.pop(name, None) is not None:
                self.on_nodes_changed()
        else:
            self.cluster.put_node(obj)
            labels = dict(meta(obj).get("labels") or {})
            if self.labels_by_node.get(name) != labels:
                self.labels_by_node[name] = labels
                self.on_nodes_changed()
        if name == self.node_name:
            self.node_seen = event_type != "DELETED"
            addresses = self.cluster.node_addresses.get(name)
            self.node_address = addresses.usable[0][1] if addresses is not None and addresses.usable else ""
            labels = dict(meta(obj).get("labels") or {}) if self.node_seen else {}
            if labels != self.node_labels:
                self.node_labels = labels
                self.mark(everything=True)
                return
        if self.cluster.nodes_version != version:
            node_targets = [ref for ref, vs in self.virtual_servers.items() if self._facts(ref, vs).node_target]
            self.mark(node_targets)

    def _relisted(
        self, known: Iterable[Mapping[str, Any]], listed: list[Obj], on_event: Callable[[str, Obj], None]
    ) -> None:
        """A watch expired and its kind was listed again: what is gone was deleted meanwhile."""
        present = {ObjectRef.of(obj) for obj in listed}
        for obj in [o for o in known if ObjectRef.of(o) not in present]:
            on_event("DELETED", dict(obj))
        for obj in listed:
            on_event("MODIFIED", obj)

    def on_virtual_servers_relisted(self, listed: list[Obj]) -> None:
        self._relisted(list(self.virtual_servers.values()), listed, self.on_virtual_server)

    def on_services_relisted(self, listed: list[Obj]) -> None:
        self._relisted(list(self.cluster.services.values()), listed, self.on_service)

    def on_endpoint_slices_relisted(self, listed: list[Obj]) -> None:
        known = [eps for by_name in self.cluster.slices.values() for eps in by_name.values()]
        self._relisted(known, listed, self.on_endpoint_slice)

    def on_nodes_relisted(self, listed: list[Obj]) -> None:
        known = [{"metadata": {"name": name}} for name in self.cluster.node_addresses]
        self._relisted(known, listed, self.on_node)

    # --- what the next sync covers ------------------------------------------------------

    def set_director_nodes(self, nodes: Iterable[str]) -> None:
        nodes = frozenset(nodes)
        if nodes != self.director_nodes:
            self.director_nodes = nodes
            self.mark(everything=True)

    def _selection_conflicts(self) -> dict[ObjectRef, SpecError]:
        """DirectorSelectionConflict: read from the raw objects (not the resolutions, which the
        verdict itself changes), so that a refused VirtualServer still counts as a sharer."""
        if not self.director_nodes:
            return {}
        sharers: dict[str, list[el.Sharer]] = {}
        for ref, obj in self.virtual_servers.items():
            facts = self._facts(ref, obj)
            if facts.vip:
                sharers.setdefault(facts.vip, []).append(el.Sharer(ref, age_key(obj), facts.selector))
        labels = {node: self.labels_by_node.get(node, {}) for node in self.director_nodes}
        return {
            ref: SpecError(ref, "spec.directors.nodeSelector", message, reason="DirectorSelectionConflict")
            for ref, message in el.selection_conflicts(sharers, labels).items()
        }

    def _facts(self, ref: ObjectRef, obj: Obj) -> SpecFacts:
        """What full passes read of a VirtualServer's spec, kept per generation: reading it from
        every packed spec made each pass unpack 10,000 specs."""
        key = spec_version(obj)
        cached = self._spec_facts.get(ref)
        if cached is not None and cached[0] == key:
            return cached[1]
        spec = spec_of(obj)
        selector = _dict(_dict(spec.get("directors")).get("nodeSelector"))
        try:
            vip = normalize_address(str(spec.get("vip")))[1]
        except ValueError:
            vip = ""  # refused by its own validation
        facts = SpecFacts(
            vip,
            {str(k): str(v) for k, v in selector.items()} if selector else _NO_SELECTOR,
            _dict(spec.get("backends")).get("target") == "Node",
        )
        if key is not None:  # else nothing tells a changed spec
            self._spec_facts[ref] = (key, facts)
        return facts

    def compute_desired(self) -> DesiredState:
        self.refused = self._selection_conflicts()
        return desired_state(self.virtual_servers.values(), self.cluster, self.node_labels, self.memo, self.refused)

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
        """The desired state and the scope of the next sync (None: everything)."""
        if not (full or self.everything_dirty) and self.desired is not None:
            quick = update_desired(
                self.desired, self.virtual_servers, self.dirty, self.cluster, self.node_labels, self.memo, self.refused
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

    def sync_failed(self) -> None:
        """A sync did not happen: the next one covers everything (what it did is unknown)."""
        self.mark(everything=True)

    @property
    def pending(self) -> bool:
        return bool(self.dirty or self.everything_dirty)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _unchanged(known: Mapping[str, Any] | None, obj: Mapping[str, Any]) -> bool:
    """The same resourceVersion: a replayed event."""
    if known is None:
        return False
    version = meta(obj).get("resourceVersion")
    return version is not None and meta(known).get("resourceVersion") == version


def _service_ref(obj: Mapping[str, Any] | None) -> str | None:
    ref = _dict(spec_of(obj or {}).get("backends")).get("serviceRef")
    if isinstance(ref, Mapping) and ref.get("name"):
        return str(ref["name"])
    return None
