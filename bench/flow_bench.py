#!/usr/bin/env python3
"""Established connections across VIP moves (`make bench-flows`): repeated failovers and failbacks.

Runs tests/kernel/test_ha_flows.py (three directors with their IPVS sync daemons, a real API
server on the host, 24 TCP and 6 UDP flows that send a line every 200 ms and check the echo) with
``KUBELVS_HA_FLOW_CYCLES`` cycles. Each cycle SIGKILLs the owner of a VIP (failover), opens 9 more
TCP flows while that director is away (its backup sync daemon stopped, as after a reboot), then
starts it again until a VIP is handed back to it (failback). The test stops at the first flow
lost; the figures of every cycle run so far are kept:

- flows lost at each failover and each failback (those opened while the director was away too);
- failover: SIGKILL to the new owner's first ARP answer; failback: restart to the handover;
- the longest time any flow went without an echo.

Then tests/kernel/test_ha.py's rolling restart under load (``--rolling-rounds`` times every
director: the requests that failed), and keepalived with ``lvs_sync_daemon`` in the same
topology (bench/keepalived_flows.py, a VM of its own), the reference. Writes ``{"ha_flows":
..., "rolling_restart": ..., "keepalived_flows": ...}`` to ``--out``
(then ``merge_results.py`` into bench/results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from vmout import ensure_vmout

REPO = Path(__file__).resolve().parents[1]


def distribution(values: list[float]) -> dict[str, float] | None:
    """p50, p99 and max of ``values`` (None for none); bench/keepalived_flows.py uses it too."""
    if not values:
        return None
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 2),
        "p99": round(ordered[int(0.99 * (len(ordered) - 1))], 2),
        "max": round(ordered[-1], 2),
    }


def summary(raw: dict[str, Any], passed: bool) -> dict[str, Any]:
    cycles = raw.get("cycles") or []
    failovers = [c for c in cycles if "failover_lost" in c]
    failbacks = [c for c in cycles if "failback_lost" in c]
    return {
        "environment": "VM: qemu TCG, 2 vCPUs; 3 directors in network namespaces, API server on the host",
        "scheduler": "rr with the kernel's sync daemons (master and backup on every director), sloppy_tcp",
        "flows": raw.get("flows"),
        "flows_opened_while_away_per_cycle": raw.get("flows_opened_while_away_per_cycle"),
        "completed": passed,
        "failovers": len(failovers),
        "failbacks": len(failbacks),
        "failover_flows_lost": sum(c["failover_lost"] for c in failovers),
        "failback_flows_lost": sum(c["failback_lost"] for c in failbacks),
        "failback_flows_lost_opened_while_away": sum(c.get("failback_lost_opened_while_away", 0) for c in failbacks),
        "failover_young_flows": sum(c.get("failover_young", 0) for c in failovers),
        "failover_young_flows_lost": sum(c.get("failover_young_lost", 0) for c in failovers),
        "failover_young_age_at_takeover_s": distribution(
            [c["failover_young_age_at_takeover_s"] for c in failovers if "failover_young_age_at_takeover_s" in c]
        ),
        "failback_flows_lost_slow_opened_while_away": sum(
            c.get("failback_lost_slow_opened_while_away", 0) for c in failbacks
        ),
        "failover_takeover_s": distribution([c["failover_takeover_s"] for c in cycles if "failover_takeover_s" in c]),
        "failback_after_restart_s": distribution(
            [c["failback_after_restart_s"] for c in cycles if "failback_after_restart_s" in c]
        ),
        "max_gap_s": max((c.get("max_gap_s", c.get("failover_max_gap_s", 0.0)) for c in cycles), default=None),
        "overlaps": sum(c.get("overlaps", 0) for c in cycles),
        "cycles": cycles,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=20, help="failovers and failbacks (>= 20)")
    parser.add_argument(
        "--keepalived-cycles", type=int, default=None, help="keepalived's, kernel defaults (default: --cycles; 0: none)"
    )
    parser.add_argument(
        "--keepalived-kubelvs-kernel-cycles", type=int, default=5, help="keepalived's, with kubelvs's sync settings"
    )
    parser.add_argument("--rolling-rounds", type=int, default=3, help="rolling restarts of the 3 directors (0: none)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    figures = ensure_vmout() / "flow_bench.raw.json"
    figures.unlink(missing_ok=True)
    env = {
        **os.environ,
        "KUBELVS_HA_FLOW_CYCLES": str(args.cycles),
        "KUBELVS_HA_FLOW_FIGURES": str(figures),
        "KUBELVS_VM_TIMEOUT": str(600 + 300 * args.cycles),
    }
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "tests/kernel/test_ha_flows.py"]
    passed = subprocess.call(command, cwd=REPO, env=env) == 0
    raw = json.loads(figures.read_text()) if figures.exists() else {}
    if not raw.get("cycles"):
        print("flow_bench: no cycle ran (see the test's output above); nothing recorded", file=sys.stderr)
        return 1
    report: dict[str, Any] = {"ha_flows": summary(raw, passed)}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report["ha_flows"].items() if k != "cycles"}, indent=2))
    if args.rolling_rounds:
        report.update(rolling(args.rolling_rounds))
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    ka_cycles = args.cycles if args.keepalived_cycles is None else args.keepalived_cycles
    if ka_cycles or args.keepalived_kubelvs_kernel_cycles:
        report.update(keepalived(ka_cycles, args.keepalived_kubelvs_kernel_cycles))
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0  # a failed cycle is recorded as such ("completed": false)


def rolling(rounds: int) -> dict[str, Any]:
    """tests/kernel/test_ha.py's rolling restart under load, ``rounds`` times: requests failed."""
    figures = ensure_vmout() / "rolling.raw.json"
    figures.unlink(missing_ok=True)
    env = {
        **os.environ,
        "KUBELVS_HA_ROLLING_ROUNDS": str(rounds),
        "KUBELVS_HA_ROLLING_FIGURES": str(figures),
        "KUBELVS_VM_TIMEOUT": str(900 + 600 * rounds),
    }
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "tests/kernel/test_ha.py"]
    passed = subprocess.call([*command, "-k", "rolling_restart"], cwd=REPO, env=env) == 0
    if not figures.exists():
        print("flow_bench: the rolling restart recorded nothing (see above)", file=sys.stderr)
        return {}
    raw = json.loads(figures.read_text())
    return {
        "rolling_restart": {
            "scheduler": "mh (mh-port), 3 VIPs, a request every 200 ms to each",
            "completed": passed,
            **{k: raw.get(k) for k in ("rounds", "restarts", "requests", "failed", "overlaps")},
            "exit_after_sigterm_s": distribution(raw.get("exits_s") or []),
        }
    }


def keepalived(cycles: int, kubelvs_kernel_cycles: int) -> dict[str, Any]:
    """bench/keepalived_flows.py in a VM of its own (no control plane): its figures, or none."""
    out = ensure_vmout()
    figures = out / "keepalived_flows.json"
    figures.unlink(missing_ok=True)
    command = [sys.executable, str(REPO / "hack" / "vm.py"), "--rwdir", str(out)]
    command += ["--timeout", str(900 + 150 * (cycles + kubelvs_kernel_cycles)), "--"]
    command += [sys.executable, str(REPO / "bench" / "keepalived_flows.py"), "--out", str(figures)]
    command += ["--cycles", str(cycles), "--kubelvs-kernel-cycles", str(kubelvs_kernel_cycles)]
    if subprocess.call(command, cwd=REPO) != 0 or not figures.exists():
        print("flow_bench: keepalived's reference did not complete (see above)", file=sys.stderr)
    return json.loads(figures.read_text()) if figures.exists() else {}


if __name__ == "__main__":
    sys.exit(main())
