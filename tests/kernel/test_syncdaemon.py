"""The kernel's IPVS connection sync, managed by kubelvs through netlink
(kubelvs.kernel.syncdaemon), in the VM: daemons started, listed, adopted, replaced and stopped;
the sync sysctls set and put back; connections made through one director appear on the others,
and long-lived TCP and UDP flows survive the VIP moving to another director, and on to a
director started afresh (which learns them from the periodic refresh, not from a bulk resync).

``ipvsadm`` serves as the reference here (listing daemons and connections, programming the
services by hand), never kubelvs itself.
"""

from __future__ import annotations

import errno
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from flows import EchoServers, Flows
from ha_topology import output_dir, wait_for
from kubelvs.core.syncd import DaemonState, SyncConfig, SyncDaemon
from kubelvs.kernel.syncdaemon import SyncDaemonClient, SyncDaemonError, SyncDaemons

SYNC_ID = 9
PORT = 7
MOVE_BOUND = 5.0  # the longest echo gap allowed across a move (the move itself is a few ip commands)
VS = "/proc/sys/net/ipv4/vs"


def _vs_sysctls(topo: Any, node: str) -> dict[str, str]:
    out = topo.exec(
        node,
        f'cd {VS} && for f in sync_version sync_threshold sync_refresh_period sloppy_tcp; do echo "$f $(cat $f)"; done',
    ).stdout
    return {line.split(" ", 1)[0]: " ".join(line.split()[1:]) for line in out.splitlines()}


def test_daemons_start_adopt_replace_and_stop(topology: Any, tmp_path: Path) -> None:
    topo = topology
    ns = topo.ns("dir1")
    defaults = _vs_sysctls(topo, "dir1")
    daemons = SyncDaemons(tmp_path / "dir1", ns)
    report = daemons.ensure(SyncConfig(interface="eth0", sync_id=SYNC_ID))
    assert [d.state for d in report.plan.start] == [DaemonState.MASTER, DaemonState.BACKUP]
    running = {d.state: d for d in report.running}
    for state in DaemonState:
        daemon = running[state]
        assert (daemon.interface, daemon.sync_id, daemon.group, daemon.port, daemon.ttl) == (
            "eth0",
            SYNC_ID,
            "224.0.0.81",
            8848,
            1,
        ), daemon
        assert daemon.max_len > 0
    listed = topo.ipvsadm("dir1", "-L", "--daemon").stdout  # the reference
    assert re.search(rf"master sync daemon \(mcast=eth0, syncid={SYNC_ID}", listed), listed
    assert re.search(rf"backup sync daemon \(mcast=eth0, syncid={SYNC_ID}", listed), listed
    assert _vs_sysctls(topo, "dir1") == {
        "sync_version": "1",
        "sync_threshold": "3 0",
        "sync_refresh_period": "1",
        "sloppy_tcp": "1",
    }
    recorded = json.loads((tmp_path / "dir1" / "sysctls.json").read_text())["sysctls"]
    assert set(recorded) == {"net/ipv4/vs/sync_threshold", "net/ipv4/vs/sync_refresh_period", "net/ipv4/vs/sloppy_tcp"}

    # A restart adopts: nothing changes, nothing is written.
    again = SyncDaemons(tmp_path / "dir1", ns).ensure(SyncConfig(interface="eth0", sync_id=SYNC_ID))
    assert not again.plan.changes and len(again.plan.kept) == 2 and again.sysctls_changed == {}

    with SyncDaemonClient(ns) as client:
        with pytest.raises(SyncDaemonError) as raised:
            client.start(SyncDaemon(DaemonState.MASTER, "eth0", SYNC_ID))
        assert raised.value.errno == errno.EEXIST
        assert "starting the sync daemon (master on eth0 syncid 9)" in str(raised.value)

    # Another sync id: kubelvs's daemons are replaced.
    changed = daemons.ensure(SyncConfig(interface="eth0", sync_id=SYNC_ID + 1))
    assert changed.plan.stop == (DaemonState.MASTER, DaemonState.BACKUP)
    assert {d.sync_id for d in changed.running} == {SYNC_ID + 1}

    # A daemon kubelvs did not start is left alone, by ensure and by release.
    ns2 = topo.ns("dir2")
    topo.ipvsadm("dir2", "--start-daemon", "backup", "--mcast-interface", "eth0", "--syncid", "3")
    theirs = SyncDaemons(tmp_path / "dir2", ns2).ensure(SyncConfig(interface="eth0", sync_id=SYNC_ID))
    assert [d.state for d in theirs.plan.start] == [DaemonState.MASTER]
    assert [(d.state, d.sync_id) for d in theirs.plan.foreign] == [(DaemonState.BACKUP, 3)]
    stopped, _restored = SyncDaemons(tmp_path / "dir2", ns2).release()
    assert stopped == [DaemonState.MASTER]
    with SyncDaemonClient(ns2) as client:
        assert [(d.state, d.sync_id) for d in client.running()] == [(DaemonState.BACKUP, 3)]
        assert client.stop(DaemonState.BACKUP) and not client.stop(DaemonState.BACKUP)  # ESRCH: False

    # Uninstall: kubelvs's daemons stopped, the sysctls put back.
    stopped, restored = daemons.release()
    assert sorted(stopped) == [DaemonState.MASTER, DaemonState.BACKUP]
    assert set(restored) == set(recorded)
    with SyncDaemonClient(ns) as client:
        assert client.running() == []
    assert _vs_sysctls(topo, "dir1") == defaults
    assert not (tmp_path / "dir1" / "syncd.json").exists()


def _connections(topo: Any, node: str) -> dict[tuple[str, int], tuple[str, str]]:
    """(protocol, client port) -> (state, real server) from ``ipvsadm -Lnc`` in ``node``."""
    found: dict[tuple[str, int], tuple[str, str]] = {}
    for line in topo.ipvsadm(node, "-Lnc").stdout.splitlines():
        words = line.split()
        if len(words) == 6 and words[0] in ("TCP", "UDP"):
            found[(words[0], int(words[3].rsplit(":", 1)[1]))] = (words[2], words[5].rsplit(":", 1)[0])
    return found


def _synced(topo: Any, node: str, expected: dict[tuple[str, int], tuple[str, str]]) -> bool:
    """Every expected connection is in ``node``'s table, to the same real server."""
    table = _connections(topo, node)
    return all(table.get(key) == want for key, want in expected.items())


def _expected(topo: Any, flows: list[Flows]) -> dict[tuple[str, int], tuple[str, str]]:
    out = {}
    for group in flows:
        proto, state = ("UDP", "UDP") if group.udp else ("TCP", "ESTABLISHED")
        servers = group.servers()
        for index, port in group.client_ports().items():
            out[(proto, port)] = (state, topo.ip4(servers[index]))
    return out


def _move_vip(topo: Any, vip: str, old: str, new: str) -> float:
    """The VIP from ``old``'s eth0 to ``new``'s, and the client's neighbour entry to ``new``'s MAC
    (what a gratuitous ARP does); the time of the switch."""
    topo.exec(old, ["ip", "addr", "del", f"{vip}/32", "dev", "eth0"])
    topo.exec(new, ["ip", "addr", "add", f"{vip}/32", "dev", "eth0"])
    mac = topo.exec(new, ["cat", "/sys/class/net/eth0/address"]).stdout.strip()
    topo.exec("client", ["ip", "neigh", "replace", vip, "lladdr", mac, "dev", "eth0", "nud", "reachable"])
    return time.monotonic()


def _program(topo: Any, node: str, vip: str) -> None:
    for proto in ("-t", "-u"):
        topo.ipvsadm(node, "-A", proto, f"{vip}:{PORT}", "-s", "rr")
        for rs in topo.real_servers:
            topo.ipvsadm(node, "-a", proto, f"{vip}:{PORT}", "-r", f"{topo.ip4(rs)}:{PORT}", "-g")


@pytest.mark.topology(real_servers=2, directors=3, ports=())
def test_flows_survive_a_move_and_a_move_to_a_fresh_director(topology: Any, tmp_path: Path) -> None:
    topo = topology
    vip = topo.vip4()
    figures: dict[str, Any] = {}
    for rs in topo.real_servers:
        topo.real_server_dr(rs, vip)
    for node in ("dir1", "dir2"):
        _program(topo, node, vip)
        SyncDaemons(tmp_path / node, topo.ns(node)).ensure(SyncConfig(interface="eth0", sync_id=SYNC_ID))
    topo.director_vip("dir1", vip)
    with (
        EchoServers(topo, PORT, udp_vips=[vip]),
        Flows(topo.ns("client"), vip, PORT, 8) as tcp,
        Flows(topo.ns("client"), vip, PORT, 4, udp=True) as udp,
    ):
        groups = [tcp, udp]

        def context() -> str:
            return "\n".join(
                [
                    tcp.describe(),
                    udp.describe(),
                    *(f"--- {n}\n{topo.ipvsadm(n, '-Lnc').stdout}" for n in topo.directors),
                ]
            )

        expected = _expected(topo, groups)
        assert len(expected) == 12, context()
        opened = min(f.opened for g in groups for f in g.snapshot())
        wait_for("dir2 to hold every flow", lambda: _synced(topo, "dir2", expected), 30, 0.2, context)
        figures["first_sync_seconds"] = round(time.monotonic() - opened, 2)

        moved = _move_vip(topo, vip, "dir1", "dir2")
        wait_for(
            "every flow to echo through dir2",
            lambda: tcp.all_echoed_since(moved) and udp.all_echoed_since(moved),
            20,
            0.2,
            context,
        )
        assert not tcp.failed() and not udp.failed(), context()

        # dir3 starts afresh (an empty table, no bulk resync): the refresh brings it every live flow.
        _program(topo, "dir3", vip)
        started = time.monotonic()
        SyncDaemons(tmp_path / "dir3", topo.ns("dir3")).ensure(SyncConfig(interface="eth0", sync_id=SYNC_ID))
        wait_for("dir3 to learn every flow", lambda: _synced(topo, "dir3", expected), 30, 0.2, context)
        figures["fresh_director_learns_seconds"] = round(time.monotonic() - started, 2)
        moved = _move_vip(topo, vip, "dir2", "dir3")
        wait_for(
            "every flow to echo through dir3",
            lambda: tcp.all_echoed_since(moved) and udp.all_echoed_since(moved),
            20,
            0.2,
            context,
        )
        failed = tcp.failed() + udp.failed()
        assert not failed, context()
        gaps = [f.max_gap for g in groups for f in g.snapshot()]
        figures["max_echo_gap_seconds"] = round(max(gaps), 2)
        figures["flows"] = len(gaps)
        assert max(gaps) < MOVE_BOUND, context()
    (output_dir("syncdaemon") / "figures.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(f"sync figures: {figures}")


@pytest.mark.topology(real_servers=2, directors=2, ports=())
def test_mh_with_sloppy_tcp_keeps_flows_without_sync(topology: Any) -> None:
    """The alternative to sync, measured for comparison: ``mh`` (source port hashed too) with
    the real servers added in the same order on both directors, ``sloppy_tcp=1``, no sync
    daemon. The new director creates each entry from a mid-flow packet and hashes it to the same
    real server."""
    topo = topology
    vip = topo.vip4()
    for rs in topo.real_servers:
        topo.real_server_dr(rs, vip)
    for node in ("dir1", "dir2"):
        topo.sysctl(node, {"net.ipv4.vs.sloppy_tcp": 1})
        for proto in ("-t", "-u"):
            topo.ipvsadm(node, "-A", proto, f"{vip}:{PORT}", "-s", "mh", "-b", "mh-port")
            for rs in topo.real_servers:
                topo.ipvsadm(node, "-a", proto, f"{vip}:{PORT}", "-r", f"{topo.ip4(rs)}:{PORT}", "-g")
    topo.director_vip("dir1", vip)
    with (
        EchoServers(topo, PORT, udp_vips=[vip]),
        Flows(topo.ns("client"), vip, PORT, 8) as tcp,
        Flows(topo.ns("client"), vip, PORT, 4, udp=True) as udp,
    ):

        def context() -> str:
            tables = (f"--- {n}\n{topo.ipvsadm(n, '-Lnc').stdout}" for n in topo.directors)
            return "\n".join([tcp.describe(), udp.describe(), *tables])

        assert _connections(topo, "dir2") == {}, context()  # no sync: dir2 knows nothing
        moved = _move_vip(topo, vip, "dir1", "dir2")
        wait_for(
            "every flow to echo through dir2",
            lambda: tcp.all_echoed_since(moved) and udp.all_echoed_since(moved),
            20,
            0.2,
            context,
        )
        assert not tcp.failed() and not udp.failed(), context()
        assert max(f.max_gap for g in (tcp, udp) for f in g.snapshot()) < MOVE_BOUND, context()
