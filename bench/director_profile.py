#!/usr/bin/env python3
"""Where the director's time and memory go, natively on the host (a profile, not the benchmark).

Three views, each against a real API server; only the kernel is an in-memory stand-in, because
this host has no IPVS (the benchmark, ``director_bench.py``, runs the real kernel in the VM):

- default: the whole director (the watches, the view, desired state, the planner, the election
  and the status writes) from start to every rule programmed; then settle time, convergence, RSS
  and, with ``--tracemalloc``, the top allocation sites, with ``--cprofile`` the hottest functions;
- ``--phases``: the cold start cut into its steps (each informer's listing, the first desired
  state, the first plan and apply, a second full pass), with the time, the RSS and the memory
  each one keeps (tracemalloc, by allocation site);
- ``--imports``: what each import the director makes costs in RSS and time, one fresh process each.

    python hack/cluster/controlplane.py up --dir DIR
    KUBECONFIG=DIR/kubeconfig python bench/director_profile.py --create 1000
    KUBECONFIG=DIR/kubeconfig python bench/director_profile.py --phases
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the in-memory kernel
import director_bench as bench
from fakes import FakeIPVS, FakeVips
from kubelvs.apply import CachedReconciler
from kubelvs.core.model import ServiceKey
from kubelvs.core.plan import Operation, apply_operations
from kubelvs.core.status import entries as status_entries
from kubelvs.director.allocator import release_free_memory
from kubelvs.director.app import Director
from kubelvs.director.options import DirectorConfig
from kubelvs.kernel.ipvs import ApplyResult
from kubelvs.kube.rest import KubeApi
from kubelvs.kube.status_writer import StatusWriter, Written
from kubelvs.state.ownership import CachedStore

# The imports a director makes, in the order it makes them (``--imports`` measures each alone).
DIRECTOR_IMPORTS = (
    "prometheus_client",
    "pyroute2",
    "urllib3",
    "yaml",
    "pydantic",
    "kubernetes.client",
    "kubernetes.config",
    "kubernetes",
    "kubelvs.core.desired",
    "kubelvs.kernel.ipvs",
    "kubelvs.director.app",
    "kubelvs.cli",
)


class LinearKernel(FakeIPVS):
    """The tests' in-memory IPVS without its fault injection, applying a batch in one pass: the
    fake checks every operation against the whole table (quadratic: minutes at 50,000 objects),
    which would hide the director's own costs."""

    def apply(self, operations: Any) -> ApplyResult:
        ops: list[Operation] = list(operations)
        self.services = apply_operations(self.services, ops)
        return ApplyResult(succeeded=ops)


def rss() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


class NoFilter:
    """The VIP port filter's seam without nftables: the reconciler still works out what to allow
    (its cost is the director's), nothing is applied."""

    def sync(self, allowed: Any) -> None:
        pass

    def begin(self, allowed: Any) -> None:
        pass


class NoNet:
    """The election's node side with no interface for any VIP: this host's interfaces are never
    touched (the election still runs its Leases; no VIP is claimed)."""

    def uplinks(self, vips: Any) -> dict[str, None]:
        return dict.fromkeys(vips)

    def hold(self, interface: str, vips: Any, lifetime: int, still_valid: Any) -> list[Any]:
        return []

    def release(self, interface: str, vips: Any) -> list[Any]:
        return []

    def held(self) -> dict[str, str]:
        return {}

    def probe(self, interface: str, vips: Any, timeout: float) -> dict[str, set[str]]:
        return {}

    def announce(self, interface: str, vips: Any) -> tuple[int, list[Any]]:
        return 0, []

    def monitor(self, interface: str) -> None:
        return None


def budget(args: argparse.Namespace) -> int:
    """The director's memory at ``--budget`` VirtualServers against ``--budget-mb``: a control
    plane of its own, the objects, then the director (in a child: this process's own imports
    and objects must not count). Fails loudly over the budget."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernel"))  # pod_login
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # before it: tests/conftest
    import conftest  # the control plane helpers of the test suite
    from kubernetes import client, config
    from pod_login import pod_login_env

    controlplane = conftest.controlplane
    controlplane.build()
    cp = controlplane.ControlPlane(Path(tempfile.mkdtemp(prefix="kubelvs-budget-")), die_with_parent=True)
    cp.start()
    try:
        conftest._install_crds(conftest.Kubectl(cp.kubectl, cp.kubeconfig))
        api = config.new_client_from_config(config_file=str(cp.kubeconfig))
        client.CoreV1Api(api).create_namespace({"metadata": {"name": bench.NAMESPACE}})
        client.CoreV1Api(api).create_node({"metadata": {"name": "director-1"}})
        bench.create_all(str(cp.kubeconfig), bench.objects(0, args.budget, True))
        out = Path(tempfile.mkdtemp()) / "figures.json"
        command = [sys.executable, __file__, "--count", str(args.budget), "--changes", "5", "--json-out", str(out)]
        # The child logs in as a director pod does (a ServiceAccount token): the kubeconfig loader's
        # imports (about 15 MB) are not part of a director's footprint.
        login = pod_login_env(str(cp.kubeconfig), Path(tempfile.mkdtemp(prefix="kubelvs-login-")))
        subprocess.run(command, env={**os.environ, **login}, check=True)
        figures = json.loads(out.read_text())
    finally:
        cp.stop()
    steady, peak = figures["rss_mb"]["VmRSS"], figures["rss_mb"]["VmHWM"]
    verdict = "within" if peak <= args.budget_mb else "OVER"
    print(f"director RSS at {args.budget:,} VirtualServers: {steady:.1f} MB, peak {peak:.1f} MB: {verdict} "
          f"the budget of {args.budget_mb:.0f} MB")  # fmt: skip
    if peak > args.budget_mb:
        print(f"*** MEMORY BUDGET EXCEEDED: {peak:.1f} MB > {args.budget_mb:.0f} MB (see --phases, --imports) ***")
        return 1
    return 0


def imports() -> int:
    """RSS and time of each import the director makes, alone in a fresh interpreter."""
    probe = (
        "import sys, time; t = time.perf_counter(); __import__(sys.argv[1]); t = time.perf_counter() - t; "
        "rss = [l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]; "
        "print(int(rss) / 1024, t, len(sys.modules))"
    )
    base = subprocess.run([sys.executable, "-c", probe, "sys"], capture_output=True, text=True, check=True)
    base_rss = float(base.stdout.split()[0])
    print(f"{'python alone':24s} {base_rss:6.1f} MB")
    for module in DIRECTOR_IMPORTS:
        out = subprocess.run([sys.executable, "-c", probe, module], capture_output=True, text=True)
        if out.returncode:
            print(f"{module:24s} not importable")
            continue
        rss_mb, seconds, modules = out.stdout.split()
        print(f"{module:24s} +{float(rss_mb) - base_rss:5.1f} MB {float(seconds) * 1000:6.0f} ms {modules:>5s} modules")
    return 0


def phases(args: argparse.Namespace) -> int:
    """The cold start step by step, in this process: time, RSS, and what each step keeps."""
    from kubelvs.director.view import ClusterView
    from kubelvs.kube import client as kube
    from kubelvs.kube.informers import cluster_informers

    kube.load_config()
    api = kube.new_api_client()
    view = ClusterView("director-1")
    informers = cluster_informers(api, view, lambda resource, reason: None)
    if args.tracemalloc:
        tracemalloc.start()
    rows: list[tuple[str, float, float, float]] = []
    snapshots: list[tuple[str, Any]] = []

    def step(name: str, action: Any) -> Any:
        before, started = rss()["VmRSS"], time.perf_counter()
        result = action()
        seconds = time.perf_counter() - started
        traced = tracemalloc.get_traced_memory()[0] / 2**20 if args.tracemalloc else 0.0
        rows.append((name, seconds, rss()["VmRSS"] - before, traced))
        if args.tracemalloc:
            snapshots.append((name, tracemalloc.take_snapshot()))
        return result

    for informer in informers:

        def listing(informer: Any = informer) -> None:
            items, _ = informer.list()
            for obj in items:
                informer.on_event("ADDED", obj)

        step(f"list {informer.resource}", listing)
    desired, _ = step("first desired state", lambda: view.plan_sync(True))
    view.desired = desired
    kernel = LinearKernel()
    reconciler = CachedReconciler(kernel, CachedStore(Path(tempfile.mkdtemp())), FakeVips())
    report = step("first plan+apply+record", lambda: reconciler.sync_cached(desired, None, True))
    operations = len(report.plan)
    del report
    desired, _ = step("second full desired state", lambda: view.plan_sync(True))
    view.desired = desired  # the first one is garbage now, as in the director
    report = step("second full sync", lambda: reconciler.sync_cached(desired, None, True))
    print(f"{len(view.virtual_servers)} VirtualServers, {operations} operations, then {len(report.plan)}")
    print(f"{'step':28s} {'seconds':>8s} {'RSS +MB':>8s} {'traced MB':>10s}")
    for name, seconds, grown, traced in rows:
        print(f"{name:28s} {seconds:8.3f} {grown:8.1f} {traced:10.1f}")
    print(f"RSS {rss()['VmRSS']:.1f} MB, peak {rss()['VmHWM']:.1f} MB")
    started = time.perf_counter()
    gc.collect()  # what one full collection (the GC's oldest generation) costs the director's loop
    seconds = time.perf_counter() - started
    print(f"objects tracked by the GC: {len(gc.get_objects())}; a full collection: {seconds:.3f} s")
    previous = None
    for name, snapshot in snapshots:
        stats = snapshot.compare_to(previous, "lineno") if previous is not None else snapshot.statistics("lineno")
        print(f"--- kept by {name}")
        for stat in stats[:6]:
            size = getattr(stat, "size_diff", stat.size)
            count = getattr(stat, "count_diff", stat.count)
            print(f"  {size / 2**20:7.2f} MB {count:8d}  {stat.traceback[0]}")
        previous = snapshot
    return 0


class NullStatusWriter:
    """A status writer that sends nothing and reports every write as landed."""

    def apply_status(self, ref: Any, status: dict[str, Any], manager: str) -> Written:
        return Written.OK

    def post_event(self, namespace: str, event: dict[str, Any]) -> bool:
        return True

    def remove_directors(self, ref: Any, directors: list[dict[str, Any]], gone: set[str]) -> Written:
        return Written.OK


def cpu_by_thread() -> dict[str, float]:
    """CPU seconds (user + system) each live thread of this process has used, by thread name
    (numbered names such as the executors' ``asyncio_3`` summed by prefix)."""
    ticks = os.sysconf("SC_CLK_TCK")
    spent: dict[str, float] = {}
    for thread in threading.enumerate():
        if thread.native_id is None:
            continue
        try:
            fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = thread.name.rstrip("0123456789").rstrip("_-") or thread.name
        spent[name] = spent.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return spent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--create", type=int, default=0, help="create VirtualServers 0..N first")
    parser.add_argument("--count", type=int, default=1000, help="VirtualServers with Services (changes go to them)")
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--trace-frames", type=int, default=12, help="--tracemalloc's frames (fewer: faster)")
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument(
        "--cprofile-changes", action="store_true", help="profile only the changes (and churn), not the start-up"
    )
    parser.add_argument("--status-qps", type=float, help="the director's --status-qps (0: no limit)")
    parser.add_argument("--fill-statuses", action="store_true", help="then wait until every status is written")
    parser.add_argument("--fill-timeout", type=float, default=900.0)
    parser.add_argument("--churn", type=int, default=0, help="then this many EndpointSlice changes per second")
    parser.add_argument("--churn-seconds", type=int, default=60)
    parser.add_argument(
        "--no-status-requests",
        action="store_true",
        help="status and Events worked out but not sent (what the requests cost, by difference)",
    )
    parser.add_argument("--phases", action="store_true", help="the cold start step by step (no director tasks)")
    parser.add_argument("--imports", action="store_true", help="RSS and time of each import, alone")
    parser.add_argument("--budget", type=int, help="check the director's RSS at this many VirtualServers")
    parser.add_argument("--budget-mb", type=float, default=80.0)
    parser.add_argument("--json-out", help="also write the figures here")
    args = parser.parse_args()
    if args.imports:
        return imports()
    if args.budget:
        return budget(args)
    if args.phases:
        return phases(args)

    from kubelvs.kube.client import load_config
    from kubernetes import client

    if args.create:
        from kubernetes import config

        kubeconfig = os.environ["KUBECONFIG"]
        admin = config.new_client_from_config(config_file=kubeconfig)
        with contextlib.suppress(client.ApiException):
            client.CoreV1Api(admin).create_namespace({"metadata": {"name": bench.NAMESPACE}})
        print(f"created in {bench.create_all(kubeconfig, bench.objects(0, args.create, True)):.1f}s")
    # As the director logs in: a ServiceAccount's token when KUBERNETES_SERVICE_HOST is set (--budget
    # does that), else the kubeconfig; this process's polling client shares that configuration.
    load_config()
    # This process's own requests go through kubelvs's raw client too: the typed client's models
    # would add their 45 MB to the figure, which is the director's.
    api = KubeApi()
    # The election's Leases go there (the chart creates it): without it the director runs as
    # one cut off from the API, renewing in vain.
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": bench.LEASE_NAMESPACE}}
    if api.call("GET", f"/api/v1/namespaces/{bench.LEASE_NAMESPACE}", missing_ok=True) is None:
        api.call("POST", "/api/v1/namespaces", body=namespace)

    kernel = LinearKernel()
    if args.tracemalloc:
        tracemalloc.start(args.trace_frames)
    profiling = args.cprofile or args.cprofile_changes
    loop_profile = cProfile.Profile() if profiling else None  # informers, handlers, desired state
    sync_profile = cProfile.Profile() if profiling else None  # the sync worker thread
    sync_profiled = threading.Event()  # set: sync_profile records (from the start with --cprofile)
    if args.cprofile:
        sync_profiled.set()
    baseline = rss()
    started = time.perf_counter()
    config_ = DirectorConfig(
        node_name="director-1",
        state_dir=Path(tempfile.mkdtemp()),
        resync_seconds=3600,
        status_qps=args.status_qps if args.status_qps is not None else DirectorConfig.status_qps,
    )
    # The kernel is injected through the director's seam (no IPVS on this host).
    director = Director(
        config_,
        make_reconciler=lambda: CachedReconciler(kernel, CachedStore(config_.state_dir), FakeVips(), NoFilter()),
        make_vipnet=NoNet,
    )
    if sync_profile:
        sync_once = director.sync.sync_once

        def profiled(*a: Any) -> Any:
            if not sync_profiled.is_set():
                return sync_once(*a)
            sync_profile.enable()
            try:
                return sync_once(*a)
            finally:
                sync_profile.disable()

        director.sync.sync_once = profiled  # type: ignore[method-assign]
    stopping: list[Any] = []

    def run() -> None:
        director_api = KubeApi()
        if loop_profile and args.cprofile:
            loop_profile.enable()

        async def main() -> None:
            stop_event = asyncio.Event()
            stopping.append((asyncio.get_running_loop(), stop_event))
            writer = NullStatusWriter() if args.no_status_requests else StatusWriter(director_api)
            await director.main(director_api, writer, stop_event)

        asyncio.run(main())

    director_thread = threading.Thread(target=run, daemon=True)
    director_thread.start()
    # How many there are, without listing them here (this process's memory is the director's figure).
    first = api.call("GET", "/apis/kubelvs.io/v1alpha1/virtualservers", query={"limit": 1})
    total = len(first["items"]) + int(first["metadata"].get("remainingItemCount") or 0)
    while kernel.count_services() < total:
        time.sleep(0.05)
    result: dict[str, Any] = {"virtual_servers": total, "startup_s": time.perf_counter() - started}
    discovery = bench.RawDiscovery(api)

    class Poll:  # what bench.converge polls, served from the in-memory kernel
        def destinations(self, key: ServiceKey) -> list[Any]:
            svc = kernel.services.get(key)
            return list(svc.destinations) if svc else []

    settle = time.perf_counter()
    bench.converge(discovery, Poll(), args.count, 0, timeout=600)
    result["settle_s"] = time.perf_counter() - settle
    result["rss_mb"] = rss()
    result["rss_baseline_mb"] = baseline
    if args.fill_statuses:
        # Every VirtualServer's status written and back through the watch: the steady state of
        # a director that has run for a while (the statuses are kept, packed, in the view).
        filled = time.perf_counter()
        before_fill = tracemalloc.take_snapshot() if args.tracemalloc else None
        while True:
            have = sum("director-1" in status_entries(vs) for vs in list(director.view.virtual_servers.values()))
            if have >= total and not director.status.pending:
                break
            if time.perf_counter() - filled > args.fill_timeout:
                raise SystemExit(f"{have} of {total} statuses after {args.fill_timeout} s")
            time.sleep(1.0)
        result["statuses_filled_s"] = time.perf_counter() - filled
        time.sleep(10)  # the summaries' own echoes
        result["rss_after_statuses_mb"] = rss()
        release_free_memory()  # what the director does after a full resync
        result["rss_after_statuses_trimmed_mb"] = rss()
        if before_fill is not None:
            print("--- kept by the status fill (traced, by allocation site)")
            for stat in tracemalloc.take_snapshot().compare_to(before_fill, "traceback")[:12]:
                print(f"  {stat.size_diff / 2**20:7.2f} MB {stat.count_diff:8d}")
                print("\n".join(f"      {line}" for line in stat.traceback.format(limit=args.trace_frames)))
    if args.cprofile_changes and loop_profile:
        stopping[0][0].call_soon_threadsafe(loop_profile.enable)  # on the event loop's thread
        sync_profiled.set()
    latencies = sorted(bench.converge(discovery, Poll(), args.count, n, timeout=60) for n in range(1, args.changes + 1))
    result["convergence_p50_s"] = statistics.median(latencies)
    result["convergence_p99_s"] = latencies[int(0.99 * (len(latencies) - 1))]
    result["convergence_max_s"] = latencies[-1]
    if args.churn:
        before = cpu_by_thread()
        result.update(bench.churn(discovery, Poll(), args.count, args.churn, args.churn_seconds))
        result["rss_after_churn_mb"] = rss()
        after = cpu_by_thread()
        spent = {name: round(after[name] - before.get(name, 0.0), 2) for name in after}
        result["churn_cpu_s_by_thread"] = dict(sorted(spent.items(), key=lambda item: -item[1]))
    print(json.dumps(result, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    if args.tracemalloc:
        snapshot = tracemalloc.take_snapshot()
        print(f"traced: {sum(s.size for s in snapshot.statistics('filename')) / 2**20:.1f} MB")
        for stat in snapshot.statistics("lineno")[:25]:
            print(f"{stat.size / 2**20:8.2f} MB {stat.count:8d}  {stat.traceback[0]}")
        for stat in snapshot.statistics("traceback")[:4]:
            print(f"{stat.size / 2**20:8.2f} MB from", *stat.traceback.format(), sep="\n  ")
    if stopping:
        running_loop, stop_event = stopping[0]
        running_loop.call_soon_threadsafe(stop_event.set)
        director_thread.join(timeout=30)  # its tasks end before the interpreter's executors do
    for name, profile in (("event loop", loop_profile), ("sync thread", sync_profile)):
        if profile:
            time.sleep(1)
            out = io.StringIO()
            pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)
            what = "changes" if args.cprofile_changes else "start-up and changes"
            print(f"--- {name} ({what}) ---\n{out.getvalue()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
