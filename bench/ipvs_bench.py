#!/usr/bin/env python3
"""IPVS programming speed: kubelvs against ipvsadm, side by side in one VM run (`make bench`).

Under software emulation absolute times are 10-50x native and noisy, so every figure is paired
with its reference measured in the same run and the ratio is what counts. Each measurement runs
in a fresh network namespace (its own, empty, IPVS table).

First, `kubelvs apply` of a single service, twice (cli_start): the CLI's cold start in a fresh VM
and its fixed cost; the scenarios then run with warm caches, as ipvsadm's do.

Scenarios, for N in 1,000 and 10,000 TCP services x 10 DR real servers:
- full programming: `ipvsadm -R` of the rules vs `kubelvs apply` of VirtualServers yielding the
  same rules (and the applier alone, in process, for where the time goes); best of
  PROGRAM_REPEATS runs each, ipvsadm's and kubelvs's alternating;
- dump: `ipvsadm -Sn` vs kubelvs's dump of the same state (with counters, as `kubelvs show`
  and the metrics read it, and without, as a sync reads it); best of DUMP_REPEATS runs each;
- one real server's weight changed with N services present: `kubelvs apply` (dump, plan, one
  operation) and the applier alone, vs `ipvsadm -e` for the same edit.

With --dump-decoders, only the dumps instead: the table programmed by the applier, then the
fast (shape-learning) dump decoder against the plain decode_service/decode_dest path, each with
and without counters, the fast one also with the garbage collector left running, and
`ipvsadm -Sn`; best of DUMP_REPEATS each, all alternating in one run (the "dump_decoder" key).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from kubelvs.core.model import AF_INET, Destination, ServiceKey, VirtualService
from kubelvs.core.plan import plan
from kubelvs.core.rules import format_rules
from kubelvs.kernel import ipvs
from kubelvs.kernel.ipvs import IPVSClient

KUBELVS = str(Path(sys.executable).with_name("kubelvs"))
PORTS_PER_VIP = 50  # one VirtualServer per VIP, 50 ports each
REAL_SERVERS = 10
NETNS = "kubelvs-bench"
PROGRAM_REPEATS = 2  # full programming: best of two, each side
DUMP_REPEATS = 2


def vip(i: int) -> str:
    return f"10.200.{i // 250}.{i % 250 + 1}"


def real_server(j: int) -> str:
    return f"10.201.0.{j + 1}"


def port(k: int) -> int:
    return 1000 + k


def desired(n: int) -> dict[ServiceKey, VirtualService]:
    state = {}
    for s in range(n):
        key = ServiceKey(AF_INET, 6, vip(s // PORTS_PER_VIP), port(s % PORTS_PER_VIP))
        dests = tuple(Destination(real_server(j), key.port) for j in range(REAL_SERVERS))
        state[key] = VirtualService(key, "wrr", destinations=dests)
    return state


def manifests(n: int, weight_of_first: int = 1) -> list[dict[str, Any]]:
    objects = []
    for v in range(n // PORTS_PER_VIP):
        addresses: list[dict[str, Any]] = [{"ip": real_server(j)} for j in range(REAL_SERVERS)]
        if v == 0:
            addresses[0]["weight"] = weight_of_first
        objects.append(
            {
                "apiVersion": "kubelvs.io/v1alpha1",
                "kind": "VirtualServer",
                "metadata": {"name": f"vs-{v}", "namespace": "bench"},
                "spec": {
                    "vip": vip(v),
                    "ports": [{"port": port(k)} for k in range(PORTS_PER_VIP)],
                    "scheduler": "wrr",
                    "backends": {"addresses": addresses},
                },
            }
        )
    return objects


def run(*command: str, stdin: str | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed: {result.stderr[-2000:]}")
    return elapsed, result.stdout


def in_netns(*command: str, stdin: str | None = None) -> tuple[float, str]:
    return run("ip", "netns", "exec", NETNS, *command, stdin=stdin)


def fresh_netns() -> None:
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    subprocess.run(["ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up"], check=True)


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def cli_start(workdir: Path) -> dict[str, float]:
    """`kubelvs apply` of one VirtualServer (one service, one real server), twice: the first run
    of the CLI in a fresh VM reads Python, the venv and kubelvs from cold caches; the second
    shows the CLI's fixed cost. The scenarios below run warm, as ipvsadm does (it is tiny)."""
    manifest = workdir / "vs-one.yaml"
    one = manifests(PORTS_PER_VIP)[0]
    one["spec"]["ports"] = one["spec"]["ports"][:1]
    one["spec"]["backends"]["addresses"] = one["spec"]["backends"]["addresses"][:1]
    manifest.write_text(yaml.safe_dump(one, sort_keys=False))
    result = {}
    for name in ("cli_first_apply_one_s", "cli_second_apply_one_s"):
        fresh_netns()
        result[name], _ = in_netns(
            KUBELVS, "apply", "-f", str(manifest), "--state-dir", str(workdir / f"state-one-{name}")
        )
    subprocess.run(["ip", "netns", "del", NETNS], check=False)
    print(
        f"kubelvs apply of one service: first {result['cli_first_apply_one_s']:.2f}s, "
        f"then {result['cli_second_apply_one_s']:.2f}s",
        flush=True,
    )
    return result


def scenario(n: int, workdir: Path) -> dict[str, Any]:
    print(f"--- {n} services x {REAL_SERVERS} real servers", flush=True)
    state = desired(n)
    rules = format_rules(state)
    expected = sorted(rules.splitlines())
    manifest = workdir / f"vs-{n}.yaml"
    manifest.write_text(yaml.safe_dump_all(manifests(n), sort_keys=False))
    changed_manifest = workdir / f"vs-{n}-changed.yaml"
    changed_manifest.write_text(yaml.safe_dump_all(manifests(n, weight_of_first=5), sort_keys=False))
    result: dict[str, Any] = {"services": n, "real_servers_per_service": REAL_SERVERS, "objects": n * 11}

    # ipvsadm -R and kubelvs apply (manifests -> spec -> plan -> pipelined netlink, VIPs made
    # local) alternate, PROGRAM_REPEATS times each, each on an empty table: the best of each
    # counts. After the first -R: -Sn and one edit. The last run leaves kubelvs's state.
    first = next(iter(state.values()))
    restores, applies = [], []
    for repeat in range(PROGRAM_REPEATS):
        fresh_netns()
        elapsed, _ = in_netns("ipvsadm", "-R", stdin=rules)
        restores.append(elapsed)
        if repeat == 0:
            result["ipvsadm_save_s"], saved = in_netns("ipvsadm", "-Sn")
            assert sorted(saved.splitlines()) == expected, "ipvsadm -R did not program the rules"
            result["ipvsadm_edit_one_s"], _ = in_netns(
                "ipvsadm",
                "-e",
                "-t",
                f"{first.key.address}:{first.key.port}",
                "-r",
                f"{real_server(0)}:{first.key.port}",
                "-g",
                "-w",
                "5",
            )
        fresh_netns()
        state_dir = workdir / f"state-{n}-{repeat}"
        elapsed, out = in_netns(KUBELVS, "apply", "-f", str(manifest), "--state-dir", str(state_dir))
        applies.append(elapsed)
        _, saved = in_netns("ipvsadm", "-Sn")
        assert sorted(saved.splitlines()) == expected, "kubelvs apply did not program the same rules"
        print(f"ipvsadm -R {restores[-1]:.2f}s, kubelvs apply {applies[-1]:.2f}s: {out.splitlines()[0]}", flush=True)
    result["ipvsadm_restore_runs_s"], result["kubelvs_apply_runs_s"] = restores, applies
    result["ipvsadm_restore_s"], result["kubelvs_apply_s"] = min(restores), min(applies)

    with IPVSClient(netns=NETNS) as client:
        # Dumps are short, so noise weighs more: ipvsadm -Sn and both kinds of dump alternate,
        # DUMP_REPEATS times each, and the best of each counts (ipvsadm's first -Sn above too).
        saves, dumps, plain = [result["ipvsadm_save_s"]], [], []
        for _ in range(DUMP_REPEATS):
            elapsed, saved = in_netns("ipvsadm", "-Sn")
            assert sorted(saved.splitlines()) == expected
            saves.append(elapsed)
            elapsed, observed = timed(lambda: client.dump(with_counters=True))
            assert observed.services == state and len(observed.dest_counters) == n * REAL_SERVERS
            dumps.append(elapsed)
            elapsed, observed = timed(lambda: client.dump(with_counters=False))
            assert observed.services == state
            plain.append(elapsed)
        result["ipvsadm_save_runs_s"], result["kubelvs_dump_runs_s"] = saves, dumps
        result["kubelvs_dump_without_counters_runs_s"] = plain
        result["ipvsadm_save_s"], result["kubelvs_dump_s"] = min(saves), min(dumps)
        result["kubelvs_dump_without_counters_s"] = min(plain)
        print(
            f"kubelvs apply {result['kubelvs_apply_s']:.2f}s, dump {result['kubelvs_dump_s']:.2f}s "
            f"(without counters {result['kubelvs_dump_without_counters_s']:.2f}s), "
            f"ipvsadm -Sn {result['ipvsadm_save_s']:.2f}s",
            flush=True,
        )

        # One weight changed: the CLI re-reads everything; the applier alone does one operation.
        result["kubelvs_apply_one_change_s"], out = in_netns(
            KUBELVS, "apply", "-f", str(changed_manifest), "--state-dir", str(state_dir)
        )
        result["kubelvs_apply_one_change_operations"] = int(out.split()[0])
        key = first.key
        dests = list(state[key].destinations)
        dests[0] = Destination(dests[0].address, dests[0].port, weight=9)
        changed = dict(state)
        changed[key] = VirtualService(key, "wrr", destinations=tuple(dests))
        current = dict(state)
        current[key] = VirtualService(
            key, "wrr", destinations=(Destination(dests[0].address, dests[0].port, weight=5), *dests[1:])
        )
        result["plan_one_change_s"], one = timed(lambda: plan(changed, current, set(current), only=[key]))
        result["applier_one_change_s"], applied = timed(lambda: client.apply(one))
        result["applier_one_change_operations"] = len(one)
        assert applied.ok and len(one) == 1

    # The applier alone, in process, on an empty table: where programming time goes.
    result["plan_full_s"], full = timed(lambda: plan(state, {}, set()))
    appliers = []
    for _ in range(PROGRAM_REPEATS):
        fresh_netns()
        with IPVSClient(netns=NETNS) as client:
            elapsed, applied = timed(lambda: client.apply(full))
            assert applied.ok, applied.failed[:3]
            appliers.append(elapsed)
    result["applier_full_runs_s"], result["applier_full_s"] = appliers, min(appliers)
    subprocess.run(["ip", "netns", "del", NETNS], check=False)

    result["ratio_apply_vs_ipvsadm_restore"] = result["kubelvs_apply_s"] / result["ipvsadm_restore_s"]
    result["ratio_applier_vs_ipvsadm_restore"] = result["applier_full_s"] / result["ipvsadm_restore_s"]
    result["ratio_dump_vs_ipvsadm_save"] = result["kubelvs_dump_s"] / result["ipvsadm_save_s"]
    result["ratio_dump_without_counters_vs_ipvsadm_save"] = (
        result["kubelvs_dump_without_counters_s"] / result["ipvsadm_save_s"]
    )
    result["ratio_applier_one_change_vs_ipvsadm_edit"] = result["applier_one_change_s"] / result["ipvsadm_edit_one_s"]
    for name, value in result.items():
        if name.startswith("ratio"):
            print(f"  {name}: {value:.2f}", flush=True)
    return result


def dump_decoders(n: int, repeats: int = DUMP_REPEATS, gc_cases: bool = True) -> dict[str, Any]:
    """The fast dump decoder against the plain one (and the garbage collector's share)."""
    print(f"--- dump decoders: {n} services x {REAL_SERVERS} real servers", flush=True)
    state = desired(n)
    expected = sorted(format_rules(state).splitlines())
    fresh_netns()
    runs: dict[str, list[float]] = {}
    with IPVSClient(netns=NETNS) as client:
        assert client.apply(plan(state, {}, set())).ok

        def gc_running(fn: Any) -> Any:
            def call() -> Any:
                paused = ipvs._paused_gc
                ipvs._paused_gc = contextlib.nullcontext  # type: ignore[assignment]
                try:
                    return fn()
                finally:
                    ipvs._paused_gc = paused

            return call

        cases: dict[str, Any] = {
            "fast_with_counters": lambda: client.dump(with_counters=True),
            "plain_with_counters": lambda: client.dump(with_counters=True, fast=False),
            "fast_without_counters": lambda: client.dump(with_counters=False),
            "plain_without_counters": lambda: client.dump(with_counters=False, fast=False),
        }
        if gc_cases:
            cases["fast_without_counters_gc_running"] = gc_running(lambda: client.dump(with_counters=False))
            cases["plain_without_counters_gc_running"] = gc_running(
                lambda: client.dump(with_counters=False, fast=False)
            )
        for repeat in range(repeats):
            elapsed, saved = in_netns("ipvsadm", "-Sn")
            assert sorted(saved.splitlines()) == expected
            runs.setdefault("ipvsadm_save", []).append(elapsed)
            observed = []
            for name, fn in cases.items():
                elapsed, got = timed(fn)
                runs.setdefault(name, []).append(elapsed)
                observed.append(got)
                print(f"  run {repeat + 1}: {name} {elapsed:.2f}s", flush=True)
            assert all(o.services == state for o in observed)
            assert observed[0].dest_counters == observed[1].dest_counters
            assert observed[0].service_counters == observed[1].service_counters
    subprocess.run(["ip", "netns", "del", NETNS], check=False)
    result: dict[str, Any] = {"services": n, "real_servers_per_service": REAL_SERVERS}
    for name, values in runs.items():
        result[f"{name}_runs_s"] = values
        result[f"{name}_s"] = min(values)
    for kind in ("with_counters", "without_counters"):
        result[f"speedup_fast_vs_plain_{kind}"] = result[f"plain_{kind}_s"] / result[f"fast_{kind}_s"]
    if gc_cases:
        result["slowdown_gc_running_fast"] = (
            result["fast_without_counters_gc_running_s"] / result["fast_without_counters_s"]
        )
        result["slowdown_gc_running_plain"] = (
            result["plain_without_counters_gc_running_s"] / result["plain_without_counters_s"]
        )
    for name, value in result.items():
        if not name.endswith("runs_s"):
            print(f"  {name}: {value if isinstance(value, int) else round(value, 3)}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--dump-decoders", action="store_true", help="only compare the dump decoders")
    parser.add_argument("--repeats", type=int, default=DUMP_REPEATS, help="--dump-decoders: runs of each")
    parser.add_argument("--no-gc-cases", action="store_true", help="--dump-decoders: skip the collector's cases")
    args = parser.parse_args()
    if args.dump_decoders:
        report: dict[str, Any] = {
            "dump_decoder": {
                "environment": f"VM: {platform.release()}, qemu TCG (software emulation), 2 vCPUs",
                "scenarios": [],
            }
        }
        for n in args.sizes.split(","):
            report["dump_decoder"]["scenarios"].append(dump_decoders(int(n), args.repeats, not args.no_gc_cases))
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")  # after each size
        print(f"wrote {args.out}")
        return 0
    with tempfile.TemporaryDirectory(prefix="kubelvs-bench-") as tmp:
        start = cli_start(Path(tmp))
        scenarios = [scenario(int(n), Path(tmp)) for n in args.sizes.split(",")]
    report = {
        "ipvs_programming": {
            "environment": f"VM: {platform.release()}, qemu TCG (software emulation), 2 vCPUs",
            "cli_start": start,
            "scenarios": scenarios,
        }
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
