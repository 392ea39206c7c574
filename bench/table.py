#!/usr/bin/env python3
"""Render bench/results.json as the README's benchmark table (between the BENCH markers)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- BENCH:START -->", "<!-- BENCH:END -->"
HA_START, HA_END = "<!-- BENCH-HA:START -->", "<!-- BENCH-HA:END -->"


# `kubelvs apply` end to end against `ipvsadm -R` (issue 13): at 10,000 x 10 the CLI must do far better.
APPLY_TARGETS = {1000: "≤ 1.0x", 10000: "≤ 0.3x"}


def ipvs_rows(data: dict[str, Any]) -> list[str]:
    rows = []
    previous = data.get("previous_runs") or [{}]
    before = {s["services"]: s for s in previous[0].get("scenarios", [])}  # the run before the last
    for s in data.get("scenarios", []):
        n = f"{s['services']:,} x {s['real_servers_per_service']}"
        was = before.get(s["services"], {}).get("ratio_apply_vs_ipvsadm_restore")
        was_text = f" (before: {was:.2f}x)" if was is not None else ""
        rows += [
            f"| full programming, {n} | `kubelvs apply` {s['kubelvs_apply_s']:.2f} s (applier alone "
            f"{s['applier_full_s']:.2f} s) | `ipvsadm -R` {s['ipvsadm_restore_s']:.2f} s | "
            f"**{s['ratio_apply_vs_ipvsadm_restore']:.2f}x** ({s['ratio_applier_vs_ipvsadm_restore']:.2f}x)"
            f"{was_text} | {APPLY_TARGETS.get(s['services'], '≤ 1.0x')} |",
            f"| dump, {n} | {s['kubelvs_dump_s']:.2f} s | `ipvsadm -Sn` {s['ipvsadm_save_s']:.2f} s | "
            f"**{s['ratio_dump_vs_ipvsadm_save']:.2f}x** | ≤ 2x |",
            f"| one weight change among {s['services']:,} services | "
            f"applier {s['applier_one_change_s'] * 1000:.1f} ms, "
            f"{s['applier_one_change_operations']} operation(s) (`kubelvs apply` end to end, one weight in "
            f"{s['kubelvs_apply_one_change_s']:.2f} s, a 50-port VirtualServer: "
            f"{s['kubelvs_apply_one_change_operations']} operations) | "
            f"`ipvsadm -e` {s['ipvsadm_edit_one_s'] * 1000:.0f} ms | "
            f"**{s['ratio_applier_one_change_vs_ipvsadm_edit']:.2f}x** | a handful of operations |",
        ]
    return rows


def director_rows(d: dict[str, Any], before: dict[str, Any] | None = None) -> list[str]:
    before = before or {}

    def was(key: str, unit: str = "s", digits: int = 1) -> str:
        """The figure before the scale work (issue 13), if recorded."""
        return f" (before: {before[key]:.{digits}f} {unit})" if key in before and key in d else ""

    rows = []
    if "convergence_p99_s" in d:
        rows.append(
            f"| convergence, EndpointSlice change to kernel rule, 1,000 VirtualServers "
            f"({d['convergence_changes']} changes) | p50 {d['convergence_p50_s']:.2f} s, "
            f"**p99 {d['convergence_p99_s']:.2f} s**{was('convergence_p99_s', digits=2)} | "
            f"kube-proxy nftables p99 6.8 s (its 100-node job) | | p99 < 1 s |"
        )
    if "convergence_10000_p99_s" in d:
        rows.append(
            f"| convergence, one change at a time, 10,000 VirtualServers ({d['convergence_10000_changes']} "
            f"changes) | p50 {d['convergence_10000_p50_s']:.2f} s, **p99 {d['convergence_10000_p99_s']:.2f} s**, "
            f"max {d['convergence_10000_max_s']:.2f} s | | | p99 < 1 s |"
        )
    if "churn_p99_s" in d:
        kept = "kept up" if d.get("churn_kept_up") else "**fell behind**"
        rows.append(
            f"| convergence under churn, {d['churn_rate_per_s']} EndpointSlice changes/s for "
            f"{d['churn_seconds']} s, 10,000 VirtualServers | p50 {d['churn_p50_s']:.2f} s, "
            f"**p99 {d['churn_p99_s']:.2f} s**, max {d['churn_max_s']:.2f} s ({kept}) | | | p99 < 1 s |"
        )
    if "startup_1000_s" in d:
        rows.append(
            f"| director start-up to all rules programmed, 1,000 VirtualServers | {d['startup_1000_s']:.1f} s"
            f"{was('startup_1000_s')} (first change after start-up converged in "
            f"{d.get('settle_after_startup_s', 0):.1f} s) | | | |"
        )
    if "startup_10000_s" in d:
        reference, ratio = "", ""
        if "ipvsadm_restore_10000_s" in d:
            reference = f"`ipvsadm -R` of its rules {d['ipvsadm_restore_10000_s']:.1f} s"
            ratio = f"**{d['ratio_startup_vs_ipvsadm_restore_10000']:.2f}x**"
        rows.append(
            f"| director cold start to all rules programmed, 10,000 VirtualServers (50,000 IPVS objects) | "
            f"{d['startup_10000_s']:.1f} s{was('startup_10000_s')} | {reference} | {ratio} | ≤ 1.0x |"
        )
    if "restart_10000_adopted_s" in d:
        rows.append(
            f"| director restart with 10,000 programmed: to adopted | {d['restart_10000_adopted_s']:.1f} s, "
            f"**{d['restart_10000_operations']} kernel operations** | | | 0 operations |"
        )
    for n, label, target in (("1000", "1,000", "< 80 MB"), ("10000", "10,000", "< 150 MB")):
        if f"rss_mb_{n}" in d:
            peak = f" (peak {d[f'peak_rss_mb_{n}']:.0f} MB)" if f"peak_rss_mb_{n}" in d else ""
            rss = d[f"rss_mb_{n}"]
            rows.append(
                f"| director memory (RSS), {label} VirtualServers | **{rss:.0f} MB**{peak}"
                f"{was(f'rss_mb_{n}', 'MB', 0)} | | | {target} |"
            )
    if "restart_rss_mb_10000" in d:
        rows.append(
            "| director memory (RSS), 10,000 VirtualServers, after a restart (listing the statuses written so far) "
            f"| **{d['restart_rss_mb_10000']:.0f} MB** (peak {d['restart_peak_rss_mb_10000']:.0f} MB) | | | < 150 MB |"
        )
    return rows


def _dist(d: dict[str, Any] | None, key: str = "failover_s") -> str:
    s = (d or {}).get(key) or {}
    if not s.get("n"):
        return "-"
    missing = f", {s['missing']} without" if s.get("missing") else ""
    return f"p50 {s['p50']:.2f} s, p99 {s['p99']:.2f} s ({s['n']} runs{missing})"


def ha_rows(ha: dict[str, Any]) -> list[str]:
    """VIP failover: kubelvs's election against keepalived, same VM run."""
    ka, kl, ratios = ha.get("keepalived") or {}, ha.get("kubelvs") or {}, ha.get("ratios") or {}
    rows = []
    labels = {"default": "defaults", "tuned": "tuned"}
    faults = {
        "link_down": "owner link down: fault to first successful connect",
        "sigkill": "owner SIGKILL: fault to the other director's first ARP answer",
    }
    for profile, label in labels.items():
        for fault, what in faults.items():
            k, r = (kl.get(profile) or {}).get(fault), (ka.get(profile) or {}).get(fault)
            if not k and not r:
                continue
            ref = f"keepalived ({_ka_profile(ka, profile)}): {_dist(r)}" if r else "-"
            ratio = ratios.get(f"{profile}_{fault}_p50")
            rows.append(
                f"| VIP failover, {what}, {label} | {_dist(k)} | {ref} | "
                f"{f'**{ratio:.2f}x** (p50)' if ratio is not None else '-'} |"
            )
    for profile, label in labels.items():
        for fault, what in (
            ("sigstop", "owner frozen (SIGSTOP)"),
            ("api_partition", "owner cut from the API"),
            ("api_down", "API down for every director"),
        ):
            k = (kl.get(profile) or {}).get(fault)
            if k:
                rows.append(f"| longest HTTP gap, {what}, {label} | {_dist(k, 'outage_s')} | | |")
    for profile, label in labels.items():
        steps = [
            f"{name}: {_dist((kl.get(profile) or {}).get(fault), 'decision_to_announcement_s')}"
            for fault, name in (("link_down", "link down"), ("sigkill", "SIGKILL"))
            if ((kl.get(profile) or {}).get(fault) or {}).get("decision_to_announcement_s", {}).get("n")
        ]
        logged = (kl.get(profile) or {}).get("takeovers_logged") or {}
        if not steps and logged.get("decision_to_announcement_s", {}).get("n"):
            every = _dist(logged, "decision_to_announcement_s").replace(" runs", " takeovers")
            steps = [f"every takeover of the run: {every}"]
        if steps:
            rows.append(
                f"| election + announcement: the new owner's decision to its announcement (read and probe, claim "
                f"write, address), {label} | {'; '.join(steps)} | | |"
            )
    for profile, label in labels.items():
        idle = (kl.get(profile) or {}).get("idle")
        if idle:
            rows.append(
                f"| owners that lapsed with no fault (could not renew nor hear every peer in time), {label} | "
                f"{idle['lapses']} in {idle['seconds']:.0f} s of {idle['directors']} directors | | |"
            )
    sb = kl.get("split_brain") or {}
    sb_label = f" ({labels.get(sb['profile'], sb['profile'])})" if sb.get("profile") else ""
    parts = [
        f"{sb[f]['split_brain_runs']} of {sb[f]['runs']} {name}{sb_label}"
        for f, name in (("api_partition", "API partitions"), ("sigstop", "freezes"))
        if f in sb
    ]
    ka_sb = [
        f"{ka[p]['sigkill']['split_brain_runs']} of {len(ka[p]['sigkill']['runs'])} SIGKILLs ({p})"
        for p in labels
        if (ka.get(p) or {}).get("sigkill")
    ]
    if parts or ka_sb:
        rows.append(
            f"| split brain: runs in which two MACs answered for the VIP (capture on the switch) | "
            f"{', '.join(parts) or '-'} | keepalived: {', '.join(ka_sb) or '-'} | |"
        )
    writes = kl.get("api_writes") or {}
    if "steady_per_s" in writes:
        rows.append(
            f"| API writes per second, {writes['vips']:,} VIPs over {writes['directors']} directors | steady "
            f"{writes['steady_per_s']:.1f}/s, during a failover {writes['failover_per_s']:.1f}/s | (VRRP: none) | |"
        )
    victim = writes.get("failover_victim")
    if victim and ("all_taken_over_s" in writes or "not_taken_over" in writes):
        held = (writes.get("placement") or {}).get(victim, "?")
        done = (
            f"{writes['all_taken_over_s']:.0f} s"
            if "all_taken_over_s" in writes
            else f"not done: {writes['not_taken_over']} still claimed after {writes.get('takeover_timeout_s', '?')} s"
        )
        rows.append(f"| every VIP of a killed director taken over ({held} of {writes['vips']:,}) | {done} | | |")
    return rows


def _ka_profile(ka: dict[str, Any], profile: str) -> str:
    p = ka.get(profile) or {}
    return f"VRRPv{p.get('vrrp_version', '?')}, advert_int {p.get('advert_int', '?')} s"


def _ka_flows(ka: dict[str, Any], move: str) -> str:
    """keepalived's figure for ``move`` ("failover" | "failback"), per kernel setting."""
    parts = []
    for kernel, label in (("defaults", "kernel defaults"), ("kubelvs", "kubelvs's sync settings")):
        r = ka.get(kernel) or {}
        runs = r.get(f"{move}s")
        if not runs:
            continue
        text = f"{r[f'{move}_flows_lost']} of {r[f'{move}_flows']} lost in {runs} {move}s"
        if move == "failback":
            text += (
                f" ({r['failback_flows_lost_opened_while_away']} opened while away, "
                f"{r['failback_flows_lost_slow_opened_while_away']} of them slow)"
            )
        parts.append(f"{label}: {text}")
    return "keepalived + `lvs_sync_daemon`, " + "; ".join(parts) if parts else "not measured side by side"


def flow_rows(f: dict[str, Any], ka: dict[str, Any] | None = None) -> list[str]:
    """Established flows across VIP moves (bench/flow_bench.py), keepalived's beside them
    (bench/keepalived_flows.py)."""
    if not f:
        return []
    ka = ka or {}
    flows = f.get("flows") or {}
    total = f"{flows.get('tcp', '?')} TCP + {flows.get('udp', '?')} UDP flows"
    away = f.get("flows_opened_while_away_per_cycle") or {}
    late = f"{away.get('tcp', 0)} busy" + (f" + {away['tcp_slow']} slow" if away.get("tcp_slow") else "")
    slow_lost = f.get("failback_flows_lost_slow_opened_while_away")
    slow = "" if slow_lost is None else f", {slow_lost} of them slow"
    stopped = "" if f.get("completed") else " (the run stopped at a failure: see `cycles` in results.json)"
    takeover, back = f.get("failover_takeover_s") or {}, f.get("failback_after_restart_s") or {}
    young = ""
    if f.get("failover_young_flows"):
        age = (f.get("failover_young_age_at_takeover_s") or {}).get("p50", 0)
        young = (
            f"; TCP flows opened just before the SIGKILL (p50 {age:.1f} s old when the VIP moved), counted "
            f"apart: {f['failover_young_flows_lost']} of {f['failover_young_flows']} lost"
        )
    per_move = int(flows.get("tcp", 0)) + int(flows.get("udp", 0))
    per_back = per_move + int(away.get("tcp", 0)) + int(away.get("tcp_slow", 0))
    rows = [
        f"| established flows across owner SIGKILLs (failover), {total} | **{f['failover_flows_lost']} of "
        f"{per_move * f['failovers']} lost** in {f['failovers']} failovers{stopped}; new owner answering p50 "
        f"{takeover.get('p50', 0):.2f} s, p99 {takeover.get('p99', 0):.2f} s{young} | {_ka_flows(ka, 'failover')} | |",
        f"| established flows across failbacks (the killed director restarts, a VIP is handed back), "
        f"{total} + {late} TCP opened while it was away | **{f['failback_flows_lost']} of "
        f"{per_back * f['failbacks']} lost** in {f['failbacks']} failbacks "
        f"({f['failback_flows_lost_opened_while_away']} of those opened while away{slow}); restart to handover "
        f"p50 {back.get('p50', 0):.1f} s | {_ka_flows(ka, 'failback')} | |",
        f"| longest time a flow went without an echo, over all moves | {f.get('max_gap_s') or 0:.2f} s | | |",
    ]
    return rows


def rolling_rows(r: dict[str, Any] | None) -> list[str]:
    """Requests failed during rolling restarts of every director (bench/flow_bench.py)."""
    if not r:
        return []
    exits = r.get("exit_after_sigterm_s") or {}
    stopped = "" if r.get("completed") else " (stopped early: see results.json)"
    return [
        f"| requests failed during rolling restarts of the 3 directors under load ({r.get('scheduler')}) | "
        f"**{r.get('failed')} of {r.get('requests')}** in {r.get('rounds')} rounds ({r.get('restarts')} restarts)"
        f"{stopped}; SIGTERM to exit p50 {exits.get('p50', 0):.1f} s | | |",
    ]


def render_ha(results: dict[str, Any]) -> str:
    lines = ["| scenario | kubelvs | reference (same VM run) | ratio |", "| --- | --- | --- | --- |"]
    flows = flow_rows(results.get("ha_flows", {}), results.get("keepalived_flows"))
    flows += rolling_rows(results.get("rolling_restart"))
    return "\n".join(lines + ha_rows(results.get("ha", {})) + flows)


def render(results: dict[str, Any]) -> str:
    lines = ["| scenario | kubelvs | reference (same VM run) | ratio | target |", "| --- | --- | --- | --- | --- |"]
    lines += ipvs_rows(results.get("ipvs_programming", {}))
    lines += director_rows(results.get("director", {}), results.get("director_baseline"))
    return "\n".join(lines)


def main() -> int:
    results = json.loads((REPO / "bench" / "results.json").read_text())
    readme = REPO / "README.md"
    text = readme.read_text()
    block = f"{START}\n{render(results)}\n{END}"
    if START in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.replace("BENCH_TABLE", block)
    if results.get("ha") or results.get("ha_flows"):
        ha_block = f"{HA_START}\n{render_ha(results)}\n{HA_END}"
        if HA_START in text:
            text = re.sub(re.escape(HA_START) + r".*?" + re.escape(HA_END), lambda _: ha_block, text, flags=re.S)
        else:  # first time: right after the main table
            text = text.replace(END, f"{END}\n\nVIP failover (`make bench-ha`):\n\n{ha_block}", 1)
    readme.write_text(text)
    print(render(results))
    if results.get("ha") or results.get("ha_flows"):
        print(render_ha(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
