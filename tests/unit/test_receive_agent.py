"""The real-server agent's sync, with a model kernel: which namespaces it converges, what it
records, which pod conditions it writes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from kubelvs.core import receive as rc
from kubelvs.realserver.agent import Agent
from kubelvs.realserver.records import RecordStore


class Kernel:
    """Namespaces by path: their items in place; converge as kernel/receive.py does."""

    def __init__(self) -> None:
        self.spaces: dict[str | None, set[rc.Item]] = {None: set()}
        self.calls: list[tuple[str | None, frozenset[rc.Item]]] = []

    def converge(
        self,
        netns: str | None,
        desired: frozenset[rc.Item],
        record: dict[rc.Item, int | None],
        save: Callable[[dict[rc.Item, int | None]], None],
    ) -> tuple[list[rc.Action], bool]:
        self.calls.append((netns, desired))
        space = self.spaces[netns]
        observed = rc.Observed(
            links={i.device: True for i in space if isinstance(i, rc.Link)},
            addresses=frozenset((i.device, i.address) for i in space if isinstance(i, rc.Address)),
            sysctls={i.path: i.value for i in space if isinstance(i, rc.Sysctl)},
        )
        actions = rc.plan(desired, record, observed)
        for action in actions:
            if action.op == "add":
                record[action.item] = None
                save(record)
                space.add(action.item)
            else:
                space.discard(action.item)
                record.pop(action.item, None)
                save(record)
        return actions, all(item in space for item in desired)


class Finder:
    def __init__(self) -> None:
        self.by_ip: dict[str, tuple[str, int]] = {}

    def find(self, ips: Iterable[str]) -> tuple[str, int] | None:
        return next((self.by_ip[ip] for ip in ips if ip in self.by_ip), None)

    def path_of(self, inode: int) -> str | None:
        return next((path for path, found in self.by_ip.values() if found == inode), None)


def _pod(name: str, ip: str, gated: bool = True) -> dict[str, Any]:
    spec: dict[str, Any] = {"nodeName": "n1"}
    if gated:
        spec["readinessGates"] = [{"conditionType": rc.READY_CONDITION}]
    return {
        "metadata": {"name": name, "namespace": "shop", "uid": f"uid-{name}", "labels": {"app": "web"}},
        "spec": spec,
        "status": {"podIP": ip},
    }


VS = {
    "metadata": {"name": "web", "namespace": "shop", "uid": "vs-1"},
    "spec": {"vip": "192.0.2.10", "ports": [{"port": 80}], "backends": {"serviceRef": {"name": "web"}}},
}
SERVICE = {"metadata": {"name": "web", "namespace": "shop"}, "spec": {"selector": {"app": "web"}}}


def _agent(tmp_path: Path) -> tuple[Agent, Kernel, Finder, list[tuple[str, bool]]]:
    kernel, finder, written = Kernel(), Finder(), []

    def write(pod: Mapping[str, str], ready: bool, message: str) -> None:
        written.append((pod["name"], ready))

    agent = Agent(RecordStore(tmp_path), finder, kernel.converge, write)
    agent.on_relisted("virtualservers", [VS])
    agent.on_relisted("services", [SERVICE])
    agent.on_relisted("pods", [_pod("web-1", "10.1.0.5"), _pod("web-2", "10.1.0.6")])
    return agent, kernel, finder, written


def test_prepares_found_namespaces_and_gates_the_others(tmp_path: Path) -> None:
    agent, kernel, finder, written = _agent(tmp_path)
    kernel.spaces["/proc/10/ns/net"] = set()
    finder.by_ip["10.1.0.5"] = ("/proc/10/ns/net", 1001)
    report = agent.sync()
    assert (report.prepared, report.waiting, report.adds) == (1, 1, 3)
    assert sorted(written) == [("web-1", True), ("web-2", False)]
    written.clear()
    report = agent.sync()  # nothing changed: no kernel change, no condition write
    assert report.adds == 0 and written == []


def test_a_restart_adopts_the_record_and_a_vanished_virtual_server_is_undone(tmp_path: Path) -> None:
    agent, kernel, finder, _ = _agent(tmp_path)
    kernel.spaces["/proc/10/ns/net"] = set()
    finder.by_ip["10.1.0.5"] = ("/proc/10/ns/net", 1001)
    agent.sync()
    restarted = Agent(RecordStore(tmp_path), finder, kernel.converge, lambda *args: None)
    restarted.objects = agent.objects
    assert restarted.sync().adds == 0
    restarted.on_event("virtualservers", "DELETED", VS)
    report = restarted.sync()
    assert report.removals == 3 and kernel.spaces["/proc/10/ns/net"] == set()
    assert not (tmp_path / "receive.json").exists()


def test_a_new_namespace_for_the_pod_starts_a_new_record(tmp_path: Path) -> None:
    agent, kernel, finder, _ = _agent(tmp_path)
    kernel.spaces["/proc/10/ns/net"] = set()
    finder.by_ip["10.1.0.5"] = ("/proc/10/ns/net", 1001)
    agent.sync()
    # The sandbox was replaced: same IP, another namespace; the old one is gone with its state.
    kernel.spaces["/proc/20/ns/net"] = set()
    finder.by_ip["10.1.0.5"] = ("/proc/20/ns/net", 2002)
    report = agent.sync()
    assert report.adds == 3 and len(kernel.spaces["/proc/20/ns/net"]) == 3
    assert RecordStore(tmp_path).load()["uid-web-1"].inode == 2002


def test_a_deleted_pod_whose_namespace_is_gone_drops_its_record(tmp_path: Path) -> None:
    agent, kernel, finder, _ = _agent(tmp_path)
    kernel.spaces["/proc/10/ns/net"] = set()
    finder.by_ip["10.1.0.5"] = ("/proc/10/ns/net", 1001)
    agent.sync()
    agent.on_event("pods", "DELETED", _pod("web-1", "10.1.0.5"))
    del finder.by_ip["10.1.0.5"]
    calls = len(kernel.calls)
    agent.sync()
    assert len(kernel.calls) == calls  # nothing to undo in a namespace that no longer exists
    assert "uid-web-1" not in RecordStore(tmp_path).load()


def test_every_kind_of_item_survives_the_record_file(tmp_path: Path) -> None:
    """A TUN pod's record holds a Link, whose own ``kind`` once overwrote the item's type in the
    file: the agent crashed at its next load (seen in the VM after the first TUN VirtualServer)."""
    from kubelvs.realserver.records import NamespaceRecord

    items: dict[rc.Item, int | None] = {
        rc.Link("tunl0", "ipip"): None,
        rc.Link("gre0", "gre"): 1,
        rc.Address("tunl0", "10.0.0.1", 2): None,
        rc.Sysctl("net/ipv4/conf/all/rp_filter", 0): 2,
        rc.FouPort(6080, 2): None,
    }
    store = RecordStore(tmp_path)
    store.save({"uid-1": NamespaceRecord(4242, "ns/web-1", dict(items))})
    assert store.load()["uid-1"].items == items


def test_a_version_1_record_with_a_link_is_read(tmp_path: Path) -> None:
    """Version 1 wrote a Link's kind over the item's type ("kind": "ipip")."""
    (tmp_path / "receive.json").write_text(
        '{"version": 1, "namespaces": {"uid-1": {"inode": 7, "pod": "ns/web-1", "items": ['
        '{"kind": "ipip", "device": "tunl0", "previous": null}, '
        '{"kind": "Address", "device": "tunl0", "address": "10.0.0.1", "family": 2, "previous": null}]}}}'
    )
    assert RecordStore(tmp_path).load()["uid-1"].items == {
        rc.Link("tunl0", "ipip"): None,
        rc.Address("tunl0", "10.0.0.1", 2): None,
    }
