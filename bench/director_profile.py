#!/usr/bin/env python3
"""Where the director's time and memory go, natively on the host (a profile, not the benchmark).

The director's Kubernetes side (kopf, the watches, the view, desired state, the planner and the
status writes) runs for real against a real API server; only the kernel is an in-memory stand-in,
because this host has no IPVS (the benchmark, ``director_bench.py``, runs the real kernel in the
VM). It reports start-up, settle time, convergence, RSS and the top allocation sites
(tracemalloc) and, with ``--cprofile``, the hottest functions of the sync loop.

    python hack/cluster/controlplane.py up --dir DIR
    KUBECONFIG=DIR/kubeconfig python bench/director_profile.py --create 1000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import os
import pstats
import statistics
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
from kubelvs.director.app import Director
from kubelvs.director.options import DirectorConfig
from kubelvs.kube.status_writer import StatusWriter
from kubelvs.state.ownership import CachedStore


def rss() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--create", type=int, default=0, help="create VirtualServers 0..N first")
    parser.add_argument("--count", type=int, default=1000, help="VirtualServers with Services (changes go to them)")
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--cprofile", action="store_true")
    args = parser.parse_args()

    from kubernetes import client, config

    kubeconfig = os.environ["KUBECONFIG"]  # read when kubernetes is imported: set it in the environment
    api = config.new_client_from_config(config_file=kubeconfig)
    if args.create:
        with contextlib.suppress(client.ApiException):
            client.CoreV1Api(api).create_namespace({"metadata": {"name": bench.NAMESPACE}})
        print(f"created in {bench.create_all(kubeconfig, bench.objects(0, args.create, True)):.1f}s")

    kernel = FakeIPVS()
    if args.tracemalloc:
        tracemalloc.start(12)
    loop_profile = cProfile.Profile() if args.cprofile else None  # informers, handlers, desired state
    sync_profile = cProfile.Profile() if args.cprofile else None  # the sync worker thread
    baseline = rss()
    started = time.perf_counter()
    config_ = DirectorConfig(node_name="director-1", state_dir=Path(tempfile.mkdtemp()), resync_seconds=3600)
    # The kernel is injected through the director's seam (no IPVS on this host).
    director = Director(
        config_, make_reconciler=lambda: CachedReconciler(kernel, CachedStore(config_.state_dir), FakeVips())
    )
    if sync_profile:
        sync_once = director.sync.sync_once

        def profiled(*a: Any) -> Any:
            sync_profile.enable()
            try:
                return sync_once(*a)
            finally:
                sync_profile.disable()

        director.sync.sync_once = profiled  # type: ignore[method-assign]
    stopping: list[Any] = []

    def run() -> None:
        config.load_kube_config(config_file=kubeconfig)
        director_api = client.ApiClient()
        if loop_profile:
            loop_profile.enable()

        async def main() -> None:
            stop_event = asyncio.Event()
            stopping.append((asyncio.get_running_loop(), stop_event))
            await director.main(director_api, StatusWriter(director_api), stop_event)

        asyncio.run(main())

    threading.Thread(target=run, daemon=True).start()
    listed = client.CustomObjectsApi(api).list_cluster_custom_object("kubelvs.io", "v1alpha1", "virtualservers")
    total = len(listed["items"])
    del listed
    while kernel.count_services() < total:
        time.sleep(0.05)
    result: dict[str, Any] = {"virtual_servers": total, "startup_s": time.perf_counter() - started}
    discovery = client.DiscoveryV1Api(api)

    class Poll:  # what bench.converge polls, served from the in-memory kernel
        def destinations(self, key: ServiceKey) -> list[Any]:
            svc = kernel.services.get(key)
            return list(svc.destinations) if svc else []

    settle = time.perf_counter()
    bench.converge(discovery, Poll(), args.count, 0, timeout=600)
    result["settle_s"] = time.perf_counter() - settle
    result["rss_mb"] = rss()
    result["rss_baseline_mb"] = baseline
    latencies = sorted(bench.converge(discovery, Poll(), args.count, n, timeout=60) for n in range(1, args.changes + 1))
    result["convergence_p50_s"] = statistics.median(latencies)
    result["convergence_p99_s"] = latencies[int(0.99 * (len(latencies) - 1))]
    print(json.dumps(result, indent=2))
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
    for name, profile in (("event loop", loop_profile), ("sync thread", sync_profile)):
        if profile:
            time.sleep(1)
            out = io.StringIO()
            pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)
            print(f"--- {name} (start-up and changes) ---\n{out.getvalue()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
