"""The real-server agent's view and sync: from the VirtualServers, Services and this node's pods
to prepared namespaces and the pods' ``kubelvs.io/receiver-ready`` condition.

One thread owns the view and syncs (the informers hand their events over a queue); the kernel
and the API are reached through the callables given, so that the logic runs in tests against a
fake kernel or a real one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubelvs.core import receive as rc
from kubelvs.core.spec import SpecError, meta, parse_virtual_server
from kubelvs.realserver.records import NamespaceRecord, RecordStore

log = logging.getLogger("kubelvs.realserver")

Obj = dict[str, Any]
Converge = Callable[
    [str | None, frozenset[rc.Item], dict[rc.Item, int | None], Callable[[dict[rc.Item, int | None]], None]],
    tuple[list[rc.Action], bool],
]


class Finder(Protocol):
    def find(self, ips: Iterable[str]) -> tuple[str, int] | None: ...
    def path_of(self, inode: int) -> str | None: ...


@dataclass
class SyncReport:
    prepared: int = 0
    waiting: int = 0
    adds: int = 0
    removals: int = 0
    errors: int = 0
    condition_writes: dict[str, bool] = field(default_factory=dict)  # pod "ns/name" -> status written


class Agent:
    def __init__(
        self,
        store: RecordStore,
        finder: Finder,
        converge: Converge,
        write_condition: Callable[[Mapping[str, str], bool, str], None],
        node_addresses: Callable[[], list[str]] = list,
        path_mtu: int = rc.PATH_MTU,
    ) -> None:
        self.store = store
        self.finder = finder
        self.converge = converge
        self.write_condition = write_condition
        self.node_addresses = node_addresses
        self.path_mtu = path_mtu
        self.objects: dict[str, dict[str, Obj]] = {"virtualservers": {}, "services": {}, "pods": {}}
        self.listed: set[str] = set()
        self.invalid: dict[str, str] = {}  # VirtualServer -> its last spec error (logged once)
        self.last_report = SyncReport()
        self.last_sync = 0.0

    # --- the view --------------------------------------------------------------------------

    @staticmethod
    def _key(obj: Obj) -> str:
        found = meta(obj)
        return str(found.get("uid") or f"{found.get('namespace')}/{found.get('name')}")

    def on_event(self, kind: str, event_type: str, obj: Obj) -> None:
        if event_type == "DELETED":
            self.objects[kind].pop(self._key(obj), None)
        else:
            self.objects[kind][self._key(obj)] = obj

    def on_relisted(self, kind: str, listed: list[Obj]) -> None:
        self.objects[kind] = {self._key(obj): obj for obj in listed}
        self.listed.add(kind)

    def synced_once(self) -> bool:
        return self.listed >= set(self.objects)

    # --- the sync --------------------------------------------------------------------------

    def _specs(self) -> list[Any]:
        specs = []
        for obj in self.objects["virtualservers"].values():
            try:
                specs.append(parse_virtual_server(obj))
            except SpecError as error:  # the director reports it in the VirtualServer's status
                if self.invalid.get(str(error.ref)) != str(error):
                    log.warning("%s", error)
                self.invalid[str(error.ref)] = str(error)
        return specs

    def sync(self) -> SyncReport:
        report = SyncReport()
        specs = self._specs()
        selectors = dict(rc.service_selector(obj) for obj in self.objects["services"].values())
        pods = [pod for pod in (rc.pod_info(obj) for obj in self.objects["pods"].values()) if pod is not None]
        try:
            node_addresses = self.node_addresses()
        except Exception as error:
            log.warning("cannot read this node's addresses: %s", error)
            node_addresses = []
        wanted = rc.targets(specs, selectors, pods, node_addresses, self.path_mtu)
        records = self.store.load()
        ready: dict[str, bool] = {}
        messages: dict[str, str] = {}

        for key, target in sorted(wanted.items()):
            if not target.items:
                continue
            where: tuple[str | None, int | None]
            if key == rc.NODE:
                where = (None, None)
            else:
                assert target.pod is not None
                found = self.finder.find(target.pod.ips)
                if found is None:
                    ready[key] = False
                    ips = ", ".join(target.pod.ips) or "none yet"
                    messages[key] = f"no network namespace with the pod's IPs ({ips})"
                    continue
                where = found
            record = records.get(key)
            if record is None or record.inode != where[1]:
                # A new namespace (or the first time): what was recorded went away with the old one.
                record = NamespaceRecord(where[1], str(target.pod.ref) if target.pod else "")
                records[key] = record
            ready[key] = self._converge(key, where[0], target.items, record, records, report)
            if not ready[key]:
                unsupported = sorted(item.reason for item in target.items if isinstance(item, rc.Unsupported))
                messages[key] = "; ".join(unsupported) or "the receive side is not in place yet"

        for key in sorted(set(records) - {k for k, t in wanted.items() if t.items}):
            record = records[key]
            path = None if key == rc.NODE else (self.finder.path_of(record.inode) if record.inode else None)
            if key != rc.NODE and path is None:
                records.pop(key)  # the namespace is gone, and what kubelvs set in it
                self.store.save(records)
                continue
            self._converge(key, path, frozenset(), record, records, report)
            if not record.items:
                records.pop(key, None)
                self.store.save(records)

        report.prepared = sum(ready.values())
        report.waiting = len(ready) - report.prepared
        by_uid = {pod.uid: pod for pod in pods}
        for uid, status in rc.condition_changes(pods, wanted, ready).items():
            pod = by_uid[uid]
            targeted = wanted.get(uid)
            refs = ", ".join(sorted(str(ref) for ref in targeted.virtual_servers)) if targeted else ""
            if status:
                message = f"prepared for {refs}" if refs else "no DR or TUN VirtualServer targets this pod"
            else:
                message = f"waiting for {refs}: {messages.get(uid) or messages.get(rc.NODE) or 'not prepared'}"
            try:
                self.write_condition({"namespace": pod.namespace, "name": pod.name}, status, message)
            except Exception as error:
                report.errors += 1
                log.warning("pod %s: cannot set %s: %s", pod.ref, rc.READY_CONDITION, error)
                continue
            report.condition_writes[str(pod.ref)] = status
            self._remember_condition(uid, status)
        self.last_report = report
        self.last_sync = time.monotonic()
        return report

    def _converge(
        self,
        key: str,
        netns: str | None,
        items: frozenset[rc.Item],
        record: NamespaceRecord,
        records: dict[str, NamespaceRecord],
        report: SyncReport,
    ) -> bool:
        def save(current: dict[rc.Item, int | None]) -> None:
            record.items = current
            self.store.save(records)

        try:
            actions, ok = self.converge(netns, items, record.items, save)
        except OSError as error:
            report.errors += 1
            log.warning("%s (%s): %s", record.pod or key, netns or "node", error)
            return False
        for action in actions:
            if action.op == "add":
                report.adds += 1
            else:
                report.removals += 1
            log.info("%s: %s %s", record.pod or key, action.op, action.item)
        return ok

    def _remember_condition(self, uid: str, status: bool) -> None:
        """The condition as written, until the watch brings it back (no second write meanwhile)."""
        pod = self.objects["pods"].get(uid)
        if pod is None:
            return
        conditions = [c for c in pod.get("status", {}).get("conditions", []) if c.get("type") != rc.READY_CONDITION]
        conditions.append({"type": rc.READY_CONDITION, "status": "True" if status else "False"})
        pod.setdefault("status", {})["conditions"] = conditions
