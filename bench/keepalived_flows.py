#!/usr/bin/env python3
"""keepalived with the kernel's connection sync, as the reference for `make bench-flows`.

Runs in the IPVS VM (``hack/vm.py``; bench/flow_bench.py starts it). The topology of
tests/kernel/test_ha_flows.py: three directors, two DR real servers with the same echo servers,
the client, a capture of who answers ARP for the VIPs. What keepalived's users deploy for
"connections survive a failover": one VRRP instance holding the three VIPs (dirA priority 150,
dirB 100, dirC 50, preemption on, ``advert_int 1``), ``lvs_sync_daemon eth0 VI_1`` (keepalived
runs the master daemon on the MASTER, the backup daemon on the BACKUPs), and the same IPVS
rules on every director (``rr``, DR; programmed with ipvsadm, as keepalived's
``virtual_server`` blocks would).

Each cycle, with fresh flows (24 TCP, 6 UDP; a line every 200 ms, echo checked), all in every
backup's table before the fault:

1. failover: dirA's keepalived is SIGKILLed and its VIPs and sync daemons go, as when the node
   dies (a crashed keepalived leaves both behind); dirB takes over;
2. more TCP flows open through dirB while dirA is away: 9 busy ones, and 6 slow ones (a line
   every 3 s: the kernel's default re-sends a connection every 50 packets);
3. failback: dirA's keepalived starts again and preempts (its priority is the highest).

It counts the flows lost at each move, as the kubelvs test does. Kernel settings, ``--kernel``:
``defaults`` (what a keepalived install leaves: ``sync_threshold 3 50``, no refresh, no
``sloppy_tcp``) and ``kubelvs`` (the sync settings kubelvs sets: kubelvs.core.syncd), so that
what differs from kubelvs's figure is the failover and failback policy, not the kernel's.

Writes ``{"keepalived_flows": {<kernel>: ...}}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "kernel"))
sys.path.insert(0, str(REPO / "bench"))

from flow_bench import distribution  # noqa: E402
from flows import EchoServers, Flows  # noqa: E402
from ha_topology import HATopology, output_dir, wait_for  # noqa: E402
from keepalived import Keepalived  # noqa: E402
from kubelvs.core.syncd import DaemonState, SyncConfig, desired_sysctls  # noqa: E402
from kubelvs.kernel.syncdaemon import SyncDaemonClient  # noqa: E402

PORT = 7000
TCP_PER_VIP, UDP_PER_VIP, LATE_PER_VIP, LATE_SLOW_PER_VIP = 8, 2, 3, 2  # as tests/kernel/test_ha_flows.py
SLOW_INTERVAL = 3.0
PRIORITIES = {"dirA": 150, "dirB": 100, "dirC": 50}
SYNC_ID = 5
VIP_INDEX = 40  # VIPs of their own (the kubelvs beds use 0..)
BOUND = 12.0  # a flow with no echo for this long after a move is lost, as test_ha_flows's bound
KERNEL_DEFAULTS = {
    "net/ipv4/vs/sync_threshold": "3 50",
    "net/ipv4/vs/sync_refresh_period": 0,
    "net/ipv4/vs/sloppy_tcp": 0,
}


class Bed:
    def __init__(self, kernel: str, logdir: Path) -> None:
        self.topo = HATopology(directors=3, ports=(), api=False, logdir=logdir)
        self.vips = [self.topo.vip4(VIP_INDEX + i) for i in range(3)]
        self.echo: EchoServers | None = None
        self.capture: Any = None
        self.prober: Any = None
        self.keepalived: dict[str, Keepalived] = {}
        try:
            topo = self.topo
            servers = [topo.ip4(rs) for rs in topo.real_servers]
            for rs in topo.real_servers:
                for vip in self.vips:
                    topo.real_server_dr(rs, vip)
            self.echo = EchoServers(topo, PORT, udp_vips=self.vips)
            settings = desired_sysctls(SyncConfig(interface="eth0", sync_id=SYNC_ID))
            if kernel == "defaults":
                settings = {path: KERNEL_DEFAULTS.get(path, value) for path, value in settings.items()}
            rules = []
            for vip in self.vips:
                for proto in ("-t", "-u"):
                    rules.append(f"-A {proto} {vip}:{PORT} -s rr")
                    rules += [f"-a {proto} {vip}:{PORT} -r {rs}:{PORT} -g -w 1" for rs in servers]
            for d in topo.directors:
                topo.sysctl(d, settings)
                topo.exec(d, ["ipvsadm", "-R"], input="\n".join(rules) + "\n")
            self.capture = topo.capture(self.vips).start()
            self.prober = topo.prober(self.vips).start()
            for d in topo.directors:
                self.keepalived[d] = Keepalived(
                    topo,
                    d,
                    self.vips[0],
                    PRIORITIES[d],
                    logdir / f"keepalived-{kernel}",
                    vrid=53,
                    more_vips=tuple(self.vips[1:]),
                    sync_interface="eth0",
                    sync_id=SYNC_ID,
                )
                self.keepalived[d].start()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for ka in self.keepalived.values():
            ka.stop()
        for watcher in (self.prober, self.capture):
            if watcher is not None:
                watcher.stop()
        if self.echo is not None:
            self.echo.close()
        self.topo.close()

    def owner(self, vip: str, since: float) -> str | None:
        """The one director that answered for ``vip`` since ``since`` (None: none or several)."""
        seen = self.capture.responders(since, vip=vip)
        return self.capture.name(next(iter(seen))) if len(seen) == 1 else None

    def owned_by(self, director: str, window: float = 1.0) -> bool:
        since = time.monotonic() - window
        return all(self.owner(vip, since) == director for vip in self.vips)

    def context(self, groups: list[Flows], since: float = float("-inf")) -> str:
        parts = [g.describe() for g in groups]
        parts.append(self.capture.describe(since))
        parts += [f"--- keepalived {d}:\n{ka.log_tail()}" for d, ka in self.keepalived.items()]
        return "\n".join(parts)


def _open(bed: Bed, per_vip: int, udp: bool = False, interval: float = 0.2) -> list[Flows]:
    client = bed.topo.ns("client")
    return [Flows(client, vip, PORT, per_vip, udp=udp, interval=interval).start() for vip in bed.vips]


def _lost_after(groups: list[Flows], since: float) -> dict[tuple[int, int], str]:
    """The flows lost by a move at ``since``: failed (reset, closed, another real server) or
    without an echo since (stalled), once each one echoed or failed (at most BOUND later).
    Keyed by (the group's id, the flow's index): groups to one VIP number their flows alike."""
    deadline = time.monotonic() + BOUND
    while True:
        flows = [(g, f) for g in groups for f in g.snapshot()]
        lost = [(g, f) for g, f in flows if not f.ok or f.last_echo < since]
        if not [f for _, f in lost if f.ok] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return {
        (id(g), f.index): f"{g.host} {'UDP' if g.udp else 'TCP'} every {g.interval:g} s #{f.index}: "
        f"{f.failure or 'stalled'}"
        for g, f in lost
    }


def cycle(bed: Bed, figures: dict[str, Any], log: Callable[[str], None]) -> None:
    topo, a = bed.topo, bed.keepalived["dirA"]
    wait_for("dirA answering for every VIP", lambda: bed.owned_by("dirA"), 90, 0.3, lambda: bed.context([]))
    groups = _open(bed, TCP_PER_VIP) + _open(bed, UDP_PER_VIP, udp=True)
    late: list[Flows] = []
    try:
        keys = {("UDP" if g.udp else "TCP", port) for g in groups for port in g.client_ports().values()}
        client = topo.ip4("client")
        for d in ("dirB", "dirC"):
            wait_for(
                f"{d} to hold every flow",
                lambda d=d: keys <= topo.ipvs_connections(d, client),
                60,
                0.5,
                lambda: bed.context(groups),
            )
        # 1. Failover: the node of the MASTER dies (keepalived, its VIPs, its sync daemons).
        t_fault = bed.capture.mark("crash dirA")
        a.crash()
        a.drop_vip()
        with SyncDaemonClient(topo.ns("dirA")) as daemons:
            for state in DaemonState:
                daemons.stop(state)
        new = wait_for(
            "another director answering for the VIPs",
            lambda: next(
                (e for e in bed.capture.events(t_fault) if e.is_answer and e.mac != topo.mac("dirA")),
                None,
            ),
            60,
            0.1,
            lambda: bed.context(groups, t_fault),
        )
        figures["failover_takeover_s"] = round(new.t - t_fault, 2)
        lost = _lost_after(groups, new.t)
        figures["failover_lost"] = len(lost)

        # 2. New flows while dirA is away: busy ones, and slow ones (a line every 3 s).
        late = _open(bed, LATE_PER_VIP) + _open(bed, LATE_SLOW_PER_VIP, interval=SLOW_INTERVAL)
        away_since = time.monotonic()

        # 3. Failback: dirA's keepalived starts again and preempts.
        t_back = bed.capture.mark("restart dirA")
        a.start()
        back = wait_for(
            "dirA answering again",
            lambda: bed.capture.first_answer_after(t_back, mac=topo.mac("dirA")),
            90,
            0.1,
            lambda: bed.context(groups + late, t_back),
        )
        figures["failback_after_restart_s"] = round(back.t - t_back, 2)
        figures["late_flows_age_at_failback_s"] = round(back.t - away_since, 2)
        # Which of the flows opened while it was away dirA had learned when it took the VIPs.
        late_keys = {("UDP" if g.udp else "TCP", port) for g in late for port in g.client_ports().values()}
        figures["late_flows_known_at_failback"] = len(late_keys & topo.ipvs_connections("dirA", client))
        lost_back = {k: v for k, v in _lost_after(groups + late, back.t).items() if k not in lost}
        late_ids = {id(g): g.interval == SLOW_INTERVAL for g in late}  # -> slow
        figures["failback_lost"] = len(lost_back)
        figures["failback_lost_opened_while_away"] = sum(1 for group, _ in lost_back if group in late_ids)
        figures["failback_lost_slow_opened_while_away"] = sum(1 for group, _ in lost_back if late_ids.get(group))
        figures["lost_flows"] = [*lost.values(), *lost_back.values()][:20]
        log(
            f"failover lost {figures['failover_lost']}, failback lost {figures['failback_lost']} "
            f"(+{figures['failback_lost_opened_while_away']} of {3 * (LATE_PER_VIP + LATE_SLOW_PER_VIP)} opened "
            f"while away, {figures['failback_lost_slow_opened_while_away']} of them slow); "
            f"takeover {figures['failover_takeover_s']} s, "
            f"restart to preemption {figures['failback_after_restart_s']} s"
        )
    finally:
        for g in groups + late:
            g.stop()


def summary(cycles: list[dict[str, Any]], kernel: str, completed: bool) -> dict[str, Any]:
    done = [c for c in cycles if "failback_lost" in c]
    flows = (TCP_PER_VIP + UDP_PER_VIP) * 3
    return {
        "kernel": kernel,
        "keepalived": "one VRRP instance with the 3 VIPs, priorities 150/100/50, preempt, advert_int 1, "
        "lvs_sync_daemon eth0 (master on MASTER, backup on BACKUP)",
        "scheduler": "rr",
        "flows": {"tcp": TCP_PER_VIP * 3, "udp": UDP_PER_VIP * 3},
        "flows_opened_while_away_per_cycle": {"tcp": LATE_PER_VIP * 3, "tcp_slow": LATE_SLOW_PER_VIP * 3},
        "completed": completed,
        "failovers": sum(1 for c in cycles if "failover_lost" in c),
        "failbacks": len(done),
        "failover_flows_lost": sum(c["failover_lost"] for c in cycles if "failover_lost" in c),
        "failover_flows": flows * sum(1 for c in cycles if "failover_lost" in c),
        "failback_flows_lost": sum(c["failback_lost"] for c in done),
        "failback_flows_lost_opened_while_away": sum(c["failback_lost_opened_while_away"] for c in done),
        "failback_flows_lost_slow_opened_while_away": sum(c["failback_lost_slow_opened_while_away"] for c in done),
        "failback_flows": (flows + (LATE_PER_VIP + LATE_SLOW_PER_VIP) * 3) * len(done),
        "failover_takeover_s": distribution([c["failover_takeover_s"] for c in cycles if "failover_takeover_s" in c]),
        "failback_after_restart_s": distribution([c["failback_after_restart_s"] for c in done]),
        "cycles": cycles,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=20, help="cycles with the kernel's defaults")
    parser.add_argument("--kubelvs-kernel-cycles", type=int, default=5, help="cycles with kubelvs's sync settings")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    report: dict[str, Any] = {}
    for kernel, count in (("defaults", args.cycles), ("kubelvs", args.kubelvs_kernel_cycles)):
        if not count:
            continue
        logdir = output_dir(f"keepalived-flows-{kernel}-{time.strftime('%H%M%S')}")
        cycles: list[dict[str, Any]] = []
        completed = False
        bed = Bed(kernel, logdir)
        try:
            for i in range(count):
                cycles.append({})
                name = f"keepalived ({kernel} kernel) cycle {i}"
                cycle(bed, cycles[-1], lambda text, name=name: print(f"{name}: {text}", flush=True))
            completed = True
        except Exception as error:  # keep the cycles measured so far; say why it stopped
            print(f"keepalived ({kernel} kernel) stopped: {error}", file=sys.stderr, flush=True)
            cycles[-1]["error"] = str(error)[:4000]
        finally:
            bed.close()
            report[kernel] = summary(cycles, kernel, completed)
            Path(args.out).write_text(json.dumps({"keepalived_flows": report}, indent=2) + "\n")
    for kernel, figures in report.items():
        print(kernel, json.dumps({k: v for k, v in figures.items() if k != "cycles"}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
