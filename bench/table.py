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


def ipvs_rows(data: dict[str, Any]) -> list[str]:
    rows = []
    for s in data.get("scenarios", []):
        n = f"{s['services']:,} x {s['real_servers_per_service']}"
        rows += [
            f"| full programming, {n} | `kubelvs apply` {s['kubelvs_apply_s']:.2f} s (applier alone "
            f"{s['applier_full_s']:.2f} s) | `ipvsadm -R` {s['ipvsadm_restore_s']:.2f} s | "
            f"**{s['ratio_apply_vs_ipvsadm_restore']:.2f}x** ({s['ratio_applier_vs_ipvsadm_restore']:.2f}x) | ≤ 1.0x |",
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


def director_rows(d: dict[str, Any]) -> list[str]:
    rows = []
    if "convergence_p99_s" in d:
        rows.append(
            f"| convergence, EndpointSlice change to kernel rule, 1,000 VirtualServers "
            f"({d['convergence_changes']} changes) | p50 {d['convergence_p50_s']:.2f} s, "
            f"**p99 {d['convergence_p99_s']:.2f} s** | kube-proxy nftables p99 6.8 s (its 100-node job) | | p99 < 1 s |"
        )
    if "startup_1000_s" in d:
        rows.append(
            f"| director start-up to all rules programmed, 1,000 VirtualServers | {d['startup_1000_s']:.1f} s "
            f"(first change after start-up converged in {d.get('settle_after_startup_s', 0):.1f} s) | | | |"
        )
    if "startup_10000_s" in d:
        rows.append(f"| director start-up, 10,000 VirtualServers | {d['startup_10000_s']:.1f} s | | | |")
    for n, label, target in (("1000", "1,000", ""), ("10000", "10,000", "< 150 MB")):
        if f"rss_mb_{n}" in d:
            peak = f" (peak {d[f'peak_rss_mb_{n}']:.0f} MB)" if f"peak_rss_mb_{n}" in d else ""
            rss = d[f"rss_mb_{n}"]
            rows.append(f"| director memory (RSS), {label} VirtualServers | **{rss:.0f} MB**{peak} | | | {target} |")
    return rows


def render(results: dict[str, Any]) -> str:
    lines = ["| scenario | kubelvs | reference (same VM run) | ratio | target |", "| --- | --- | --- | --- | --- |"]
    lines += ipvs_rows(results.get("ipvs_programming", {}))
    lines += director_rows(results.get("director", {}))
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
    readme.write_text(text)
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
