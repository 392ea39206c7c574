#!/usr/bin/env python3
"""Where `kubelvs apply` spends its time: each phase timed in process, without a profiler.

cProfile doubles the Python-heavy phases under emulation, so the breakdown of the CLI's time at
10,000 x 10 (the README's "Where the time went") was measured this way: the CLI's own functions
are wrapped with timers and `kubelvs.cli.main(["apply", ...])` runs in this process. Run it in
the VM (it needs IPVS), in a fresh network namespace of its own:

    out=$(.venv/bin/python hack/vm.py --vmout)
    .venv/bin/python hack/vm.py --rwdir "$out" -- .venv/bin/python bench/apply_phases.py --services 10000

With ``--ports-per-vip 1 --real-servers 4`` the rules have the director benchmark's shape (10,000
VIPs, each with one port and 4 real servers). A second in-process apply over the programmed rules
(nothing to change) shows the fixed costs a restarted director pays.

It prints `ipvsadm -R` and `kubelvs apply` (a process each, as bench/ipvs_bench.py times them)
and then the phases of an in-process apply as JSON (seconds; "imports" is the import of the
modules the CLI loads, "main" the command itself).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_START = time.perf_counter()

import kubelvs.cli as cli  # noqa: E402  (the imports are the first phase timed)
from kubelvs import apply as reconcile  # noqa: E402
from kubelvs.core import plan as planning  # noqa: E402
from kubelvs.kernel.addresses import VipInterface  # noqa: E402
from kubelvs.kernel.ipvs import IPVSClient  # noqa: E402
from kubelvs.kernel.vipfilter import VipPortFilter  # noqa: E402
from kubelvs.state.ownership import OwnershipStore  # noqa: E402

_IMPORTS = time.perf_counter() - _START

# (owner, attribute, phase): what each phase of `kubelvs apply` is, by the function doing it.
PHASES = [
    (cli, "load", "manifests"),
    (cli, "desired_state", "desired state"),
    (reconcile, "plan", "plan"),
    (reconcile, "plan_addresses", "address plan"),
    (IPVSClient, "dump", "dump"),
    (IPVSClient, "apply", "IPVS apply"),
    (VipInterface, "add", "VIP adds"),
    (OwnershipStore, "save", "record save"),
    (reconcile.Reconciler, "_record", "record update"),
    (reconcile.Reconciler, "_filter_ports", "port filter, total"),
    (VipPortFilter, "sync", "port filter, nft wait"),
    (planning.Plan, "counts", "report"),
    (OwnershipStore, "load", "record load"),
    (VipInterface, "addresses", "VIP interface read"),
    (reconcile, "allowed_ports", "port filter, allowed ports"),
    (reconcile.Reconciler, "_begin_filter", "port filter, begin"),
    (reconcile, "with_kept", "kept services"),
]


def timed_phases() -> dict[str, float]:
    """Wrap every phase's function with a timer adding to the returned mapping."""
    spent: dict[str, float] = {"imports": _IMPORTS}
    for owner, name, phase in PHASES:
        original = getattr(owner, name)
        static = isinstance(owner, type) and isinstance(vars(owner).get(name), staticmethod)

        def timer(*args: Any, _original: Any = original, _phase: str = phase, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[_phase] = spent.get(_phase, 0.0) + time.perf_counter() - start

        functools.update_wrapper(timer, original)
        setattr(owner, name, staticmethod(timer) if static else timer)
    return spent


def in_process(manifest: Path, state: str) -> None:
    spent = timed_phases()
    start = time.perf_counter()
    code = cli.main(["apply", "-f", str(manifest), "--state-dir", state])
    spent["main"] = time.perf_counter() - start
    print(json.dumps({phase: round(seconds, 3) for phase, seconds in spent.items()}))
    sys.exit(code)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10000, help="IPVS services (x 10 real servers)")
    parser.add_argument(
        "--ports-per-vip", type=int, help="ports per VIP (1, with --real-servers 4: the director bench)"
    )
    parser.add_argument("--real-servers", type=int, help="real servers per service (default: the IPVS benchmark's)")
    parser.add_argument("--in-process", type=Path, help=argparse.SUPPRESS)  # the timed run itself
    parser.add_argument("--state-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        in_process(args.in_process, args.state_dir)
    sys.path.insert(0, str(Path(__file__).parent))
    import ipvs_bench as bench
    import yaml

    # The shape, as the benchmark's module reads it when it builds the manifests and the rules.
    if args.ports_per_vip:
        bench.PORTS_PER_VIP = args.ports_per_vip
    if args.real_servers:
        bench.REAL_SERVERS = args.real_servers

    with tempfile.TemporaryDirectory() as work:
        manifest = Path(work) / "vs.yaml"
        manifest.write_text(yaml.safe_dump_all(bench.manifests(args.services), sort_keys=False))
        bench.fresh_netns()
        elapsed, _ = bench.in_netns("ipvsadm", "-R", stdin=bench.format_rules(bench.desired(args.services)))
        print(f"ipvsadm -R {elapsed:.2f} s", flush=True)
        bench.fresh_netns()
        elapsed, out = bench.in_netns(bench.KUBELVS, "apply", "-f", str(manifest), "--state-dir", f"{work}/state")
        print(f"kubelvs apply {elapsed:.2f} s: {out.splitlines()[0]}", flush=True)
        bench.fresh_netns()
        state = f"{work}/timed-state"
        for run in ("in process", "in process again (nothing to change: a restart's fixed costs)"):
            elapsed, out = bench.in_netns(sys.executable, __file__, "--in-process", str(manifest), "--state-dir", state)
            print(f"{run} {elapsed:.2f} s, phases: {out.strip().splitlines()[-1]}", flush=True)
        bench.subprocess.run(["ip", "netns", "del", bench.NETNS], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
