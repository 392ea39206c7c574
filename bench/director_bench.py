#!/usr/bin/env python3
"""The director at scale (`make bench`): convergence, start-up time, memory.

Two halves. On the host (`host`): start the local control plane and create the objects natively
(fast), then boot the VM running the other half. In the VM (`vm`): run `kubelvs director`
against the host's API server (qemu user network), programming IPVS in a network namespace, and
measure:

- convergence: an EndpointSlice change in the API server to the kernel rule, polled with a
  per-service dump, p50 and p99 over the changes, with 1,000 VirtualServers present;
- start-up: director start to all 10,000 VirtualServers programmed;
- resident memory of the director at 1,000 and 10,000 VirtualServers 10 s after start-up (its
  status writes go on at ``--status-qps``, 20 a second: at 10,000, for many minutes, which the
  emulated VM cannot wait for; ``director_profile.py --fill-statuses`` measures that natively),
  its peak over the changes and the churn, and after a restart that lists what was written;
- with 10,000 present: convergence of single changes, and under churn (50 EndpointSlice changes
  per second for 60 s: p50, p99, max, and whether the director kept up);
- a restart with everything programmed: kernel operations (0 expected) and time to "adopted";
- the reference for the cold start: the director's final rules dumped with ``ipvsadm -Sn``,
  flushed, and restored with ``ipvsadm -R`` (timed), in the same VM run.

Every VirtualServer is over its own Service and EndpointSlice (4 endpoints).

Services are selector-less, with EndpointSlices written by this script (as a controller
would), so the API server holds exactly what is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "kernel"))
from pod_login import pod_login_env  # noqa: E402
from vmout import ensure_vmout  # noqa: E402

NAMESPACE = "bench"
LEASE_NAMESPACE = "kubelvs-system"  # the director's default --lease-namespace
NETNS = "kubelvs-dbench"
KUBELVS = str(Path(sys.executable).with_name("kubelvs"))
CHANGES = 100
CHANGES_AT_LARGE = 30  # single changes with 10,000 present
CHURN_RATE = 50  # EndpointSlice changes per second
CHURN_SECONDS = 60
POLLED_PER_ROUND = 20  # churn: pending changes checked in the kernel per 10 ms round, oldest first


def vip(i: int) -> str:
    return f"10.210.{i // 250}.{i % 250 + 1}"


def backend(i: int, j: int) -> str:
    return f"10.220.{(i * 4 + j) // 250 % 250}.{(i * 4 + j) % 250 + 1}"


def objects(start: int, stop: int, with_services: bool) -> list[tuple[str, dict[str, Any]]]:
    """VirtualServers start..stop; with_services: over a Service + EndpointSlice each, else static."""
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(start, stop):
        name = f"vs-{i}"
        if with_services:
            backends: dict[str, Any] = {"serviceRef": {"name": name, "port": "http"}}
            out.append(
                (
                    "service",
                    {"metadata": {"name": name}, "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}},
                )
            )
            out.append(("slice", slice_body(name, [backend(i, j) for j in range(4)])))
        else:
            backends = {"addresses": [{"ip": backend(i, j)} for j in range(4)]}
        out.append(
            (
                "vs",
                {
                    "apiVersion": "kubelvs.io/v1alpha1",
                    "kind": "VirtualServer",
                    "metadata": {"name": name},
                    "spec": {
                        "vip": vip(i),
                        "ports": [{"name": "http", "port": 80}],
                        "scheduler": "rr",
                        "backends": backends,
                    },
                },
            )
        )
    return out


def slice_body(service: str, addresses: list[str], ready: list[bool] | None = None) -> dict[str, Any]:
    ready = ready or [True] * len(addresses)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-1",
            "labels": {"kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": "bench"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": r}} for a, r in zip(addresses, ready, strict=True)],
    }


def create_all(kubeconfig: str, items: list[tuple[str, dict[str, Any]]]) -> float:
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=kubeconfig)
    core, discovery, custom = client.CoreV1Api(api), client.DiscoveryV1Api(api), client.CustomObjectsApi(api)

    def create(item: tuple[str, dict[str, Any]]) -> None:
        kind, body = item
        if kind == "service":
            core.create_namespaced_service(NAMESPACE, body)
        elif kind == "slice":
            discovery.create_namespaced_endpoint_slice(NAMESPACE, body)
        else:
            custom.create_namespaced_custom_object("kubelvs.io", "v1alpha1", NAMESPACE, "virtualservers", body)

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, items))
    return time.perf_counter() - started


# --- host half ------------------------------------------------------------------------------


def host(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO / "tests"))
    import conftest  # the control plane helpers of the test suite
    from kubernetes import client, config

    controlplane = conftest.controlplane
    controlplane.build()
    workdir = Path(tempfile.mkdtemp(prefix="kubelvs-dbench-"))
    cp = controlplane.ControlPlane(workdir, die_with_parent=True)
    cp.start()
    try:
        conftest._install_crds(conftest.Kubectl(cp.kubectl, cp.kubeconfig))
        api = config.new_client_from_config(config_file=str(cp.kubeconfig))
        client.CoreV1Api(api).create_namespace({"metadata": {"name": NAMESPACE}})
        # The election's Leases live there, as installed by the chart: without it every renewal
        # fails and the director never holds anything (figures of a director cut off from the API).
        client.CoreV1Api(api).create_namespace({"metadata": {"name": LEASE_NAMESPACE}})
        client.CoreV1Api(api).create_node(
            {
                "metadata": {"name": "director-1"},
                "status": {"addresses": [{"type": "InternalIP", "address": "10.0.2.15"}]},
            }
        )
        out = ensure_vmout()

        def vm_phase(phase: str, *options: str) -> dict[str, Any] | None:
            """Run the VM half of one phase; its figures, or None if the VM run failed."""
            result = out / f"dbench-{phase}.json"
            command = [sys.executable, str(REPO / "hack" / "vm.py"), "--rwdir", str(out), "--network", "user"]
            command += ["--timeout", str(args.timeout), "--", sys.executable, __file__, "vm", "--phase", phase]
            command += [*options, "--kubeconfig", str(cp.kubeconfig_vm), "--out", str(result)]
            if subprocess.call(command):
                return None
            return dict(json.loads(result.read_text()))

        small = args.small
        seconds = create_all(str(cp.kubeconfig), objects(0, small, with_services=True))
        print(f"created {small} VirtualServers over Services in {seconds:.1f}s", flush=True)
        figures = vm_phase("small", "--small", str(small))
        if figures is None:
            return 1
        if args.large > small:
            seconds = create_all(str(cp.kubeconfig), objects(small, args.large, with_services=True))
            print(f"created {args.large - small} more VirtualServers over Services in {seconds:.1f}s", flush=True)
            large = vm_phase("large", "--small", str(small), "--large", str(args.large))
            if large is None:
                return 1
            figures.update(large)
        report: dict[str, Any] = {
            "director": {"environment": "VM: qemu TCG, 2 vCPUs; director in the VM, API server on the host", **figures}
        }
        recorded = REPO / "bench" / "results.json"
        previous = json.loads(recorded.read_text()) if recorded.exists() else {}
        if "director_baseline" not in previous and "director" in previous:
            # The figures before the scale work (issue 13), kept once, shown beside the new ones.
            report["director_baseline"] = previous["director"]
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        return 0
    finally:
        cp.stop()


# --- VM half --------------------------------------------------------------------------------


class DirectorRun:
    def __init__(self, kubeconfig: str, log: Path, state_dir: str | None = None) -> None:
        subprocess.run(["ip", "netns", "add", NETNS], check=False, capture_output=True)
        self.log = log
        self.state_dir = state_dir or tempfile.mkdtemp(prefix="dstate-")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [
                KUBELVS,
                "director",
                "--node-name",
                "director-1",
                "--netns",
                NETNS,
                "--state-dir",
                self.state_dir,
                "--metrics-port",
                "0",
                "--resync-seconds",
                "600",
            ],
            env={**os.environ, **pod_login_env(kubeconfig)},  # as a director pod logs in
            stdout=open(log, "wb"),  # noqa: SIM115 - the director outlives this call
            stderr=subprocess.STDOUT,
        )
        # Where the peak comes from: the highest RSS sampled in each phase the bench names.
        self.phase = "start-up"
        self.peak_by_phase: dict[str, float] = {}
        threading.Thread(target=self._sample_rss, daemon=True).start()

    def _sample_rss(self) -> None:
        while self.proc.poll() is None:
            with contextlib.suppress(OSError):
                rss = self.rss_mb()
                self.peak_by_phase[self.phase] = max(rss, self.peak_by_phase.get(self.phase, 0.0))
            time.sleep(0.5)

    def rss_mb(self, field: str = "VmRSS") -> float:
        """Resident memory now (VmRSS), or its peak so far (VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def initial_sync(self, timeout: float) -> tuple[float, int]:
        """Seconds from start to the log's "initial sync: N operations" line, and N."""
        while time.perf_counter() - self.started < timeout:
            found = re.search(r"initial sync: (\d+) operations", self.log.read_text(errors="replace"))
            if found:
                return time.perf_counter() - self.started, int(found.group(1))
            time.sleep(0.2)
        raise SystemExit(f"no initial sync after {timeout} s")


def wait_services(client: Any, n: int, timeout: float) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if client.count_services() >= n:
            return time.perf_counter() - started
        time.sleep(0.5)
    raise SystemExit(f"not {n} services after {timeout}s (have {client.count_services()})")


def dests_of(client: Any, index: int) -> dict[str, int]:
    from kubelvs.core.model import AF_INET, ServiceKey

    return {d.address: d.weight for d in client.destinations(ServiceKey(AF_INET, 6, vip(index), 80))}


def converge(discovery: Any, ipvs: Any, count: int, n: int, timeout: float) -> float:
    """Make one endpoint of one Service not ready; return the time until its real server is gone
    from the kernel (then put it back, so every change starts from the full set)."""
    index = (n * 7919) % count
    name = f"vs-{index}"
    addresses = [backend(index, j) for j in range(4)]
    ready = [j != n % 4 for j in range(4)]
    expected = {a for a, r in zip(addresses, ready, strict=True) if r}
    started = time.perf_counter()
    discovery.replace_namespaced_endpoint_slice(f"{name}-1", NAMESPACE, slice_body(name, addresses, ready))
    while set(dests_of(ipvs, index)) != expected:
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"change {n} not converged after {timeout} s")
        time.sleep(0.002)
    elapsed = time.perf_counter() - started
    discovery.replace_namespaced_endpoint_slice(f"{name}-1", NAMESPACE, slice_body(name, addresses))
    while len(dests_of(ipvs, index)) != 4:
        if time.perf_counter() - started > 2 * timeout:
            raise SystemExit(f"change {n} not reverted after {timeout} s")
        time.sleep(0.005)
    return elapsed


def percentiles(latencies: list[float], prefix: str) -> dict[str, Any]:
    latencies = sorted(latencies)
    return {
        f"{prefix}_changes": len(latencies),
        f"{prefix}_p50_s": statistics.median(latencies),
        f"{prefix}_p99_s": latencies[int(0.99 * (len(latencies) - 1))],
        f"{prefix}_max_s": latencies[-1],
    }


def churn(discovery: Any, ipvs: Any, count: int, rate: int, seconds: int) -> dict[str, Any]:
    """``rate`` EndpointSlice changes per second for ``seconds``, each to another Service (one
    endpoint made not ready), sent on schedule by a few writers; one poller watches the kernel
    for each change and records when its rule is right. Kept up: every change converged, and
    the last within 10 s of the end of the churn."""
    total = rate * seconds
    started: dict[int, float] = {}
    done: dict[int, float] = {}
    lock = threading.Lock()
    begin = time.perf_counter()

    def change(k: int) -> None:
        index = (k * 7919 + 13) % count  # a different Service each time (7919 is prime to count)
        name = f"vs-{index}"
        addresses = [backend(index, j) for j in range(4)]
        ready = [j != k % 4 for j in range(4)]
        delay = begin + k / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        with lock:
            started[k] = time.perf_counter()
        discovery.replace_namespaced_endpoint_slice(f"{name}-1", NAMESPACE, slice_body(name, addresses, ready))

    def expected(k: int) -> tuple[int, set[str]]:
        index = (k * 7919 + 13) % count
        return index, {backend(index, j) for j in range(4) if j != k % 4}

    with ThreadPoolExecutor(16) as writers:
        futures = [writers.submit(change, k) for k in range(total)]
        deadline = begin + seconds + 120
        poller_cpu = time.thread_time()
        while len(done) < total and time.perf_counter() < deadline:
            with lock:
                pending = [k for k in started if k not in done]
            # The oldest few only: a kernel query per pending change every 10 ms grows with the
            # backlog, so a director that fell behind had the poller take more and more of the
            # two vCPUs they share (its CPU time is reported). A change is timed when a round
            # first finds it done: with a backlog the figure is an upper bound, never less.
            for k in pending[:POLLED_PER_ROUND]:
                index, want = expected(k)
                if set(dests_of(ipvs, index)) == want:
                    done[k] = time.perf_counter()
            time.sleep(0.01)
        poller_cpu = time.thread_time() - poller_cpu
        for future in futures:
            future.result()
    sent = max(started.values()) - begin if started else 0.0
    latencies = [done[k] - started[k] for k in done]
    result = percentiles(latencies, "churn") if latencies else {}
    last = max(done.values()) - begin if done else float("inf")
    result.update(
        churn_rate_per_s=rate,
        churn_seconds=seconds,
        churn_sent_in_s=sent,
        churn_converged=len(done),
        churn_poller_cpu_s=poller_cpu,
        churn_kept_up=len(done) == total and last <= seconds + 10,
    )
    return result


def ipvsadm_reference(netns: str) -> dict[str, Any]:
    """The director's rules as ipvsadm restores them: save, flush, time the restore (the
    director is stopped first, so that nothing puts the rules back meanwhile)."""
    in_netns = ["ip", "netns", "exec", netns]
    rules = subprocess.run([*in_netns, "ipvsadm", "-Sn"], check=True, capture_output=True).stdout
    subprocess.run([*in_netns, "ipvsadm", "-C"], check=True)
    started = time.perf_counter()
    subprocess.run([*in_netns, "ipvsadm", "-R"], input=rules, check=True)
    seconds = time.perf_counter() - started
    lines = rules.count(b"\n")
    return {"ipvsadm_restore_10000_s": seconds, "ipvsadm_restore_10000_lines": lines}


class RawDiscovery:
    """The one call ``converge`` and ``churn`` make, on kubelvs's raw client: the typed
    client's models cost the sender, under emulation in the director's VM, more CPU than the
    director spends on the change (the churn's sender once needed 142 s for 60 s of changes)."""

    def __init__(self, api: Any) -> None:
        self.api = api  # a kubelvs.kube.rest.KubeApi

    def replace_namespaced_endpoint_slice(self, name: str, namespace: str, body: dict[str, Any]) -> None:
        self.api.call("PUT", f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices/{name}", body=body)


def raw_discovery(kubeconfig: str) -> RawDiscovery:
    from kubelvs.kube.rest import KubeApi
    from kubernetes import config
    from kubernetes.client.configuration import Configuration

    configuration = Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return RawDiscovery(KubeApi(configuration))


def vm(args: argparse.Namespace) -> int:
    from kubelvs.kernel.ipvs import IPVSClient

    log = Path(args.out).with_suffix(".log")
    director = DirectorRun(args.kubeconfig, log)
    result: dict[str, Any] = {}
    try:
        subprocess.run(["ip", "netns", "add", NETNS], check=False, capture_output=True)
        ipvs = IPVSClient(netns=NETNS)
        if args.phase == "small":
            result["startup_1000_s"] = wait_services(ipvs, args.small, 900)
            time.sleep(10)  # the status writes of start-up go out
            result["rss_mb_1000"] = director.rss_mb()
            result["peak_rss_mb_1000"] = director.rss_mb("VmHWM")
            discovery = raw_discovery(args.kubeconfig)
            # Start-up is over when the director has taken in the watches' initial events (kopf
            # replays every object once): one change, not counted, with a generous timeout.
            settle = time.perf_counter()
            converge(discovery, ipvs, args.small, 0, timeout=900)
            result["settle_after_startup_s"] = time.perf_counter() - settle
            latencies = []
            for n in range(1, CHANGES + 1):
                latencies.append(converge(discovery, ipvs, args.small, n, timeout=120))
            latencies.sort()
            result["convergence_changes"] = len(latencies)
            result["convergence_p50_s"] = statistics.median(latencies)
            result["convergence_p99_s"] = latencies[int(0.99 * (len(latencies) - 1))]
            result["convergence_max_s"] = latencies[-1]
        else:
            result["startup_10000_s"] = wait_services(ipvs, args.large, 3000)
            director.phase = "after start-up (status writes)"
            time.sleep(10)
            result["rss_mb_10000"] = director.rss_mb()
            result["peak_rss_mb_10000"] = director.rss_mb("VmHWM")
            discovery = raw_discovery(args.kubeconfig)
            settle = time.perf_counter()
            converge(discovery, ipvs, args.large, 0, timeout=900)
            result["settle_after_startup_10000_s"] = time.perf_counter() - settle
            director.phase = "single changes"
            latencies = [converge(discovery, ipvs, args.large, n, timeout=120) for n in range(1, CHANGES_AT_LARGE + 1)]
            result.update(percentiles(latencies, "convergence_10000"))
            director.phase = "churn"
            result.update(churn(discovery, ipvs, args.large, CHURN_RATE, CHURN_SECONDS))
            result["peak_rss_mb_10000"] = director.rss_mb("VmHWM")  # the churn included
            result["peak_rss_mb_by_phase_10000"] = dict(director.peak_by_phase)  # sampled every 0.5 s
            # A restart with everything programmed: it must adopt the kernel as it is.
            director.stop()
            director = DirectorRun(args.kubeconfig, log.with_suffix(".restart.log"), director.state_dir)
            result["restart_10000_adopted_s"], result["restart_10000_operations"] = director.initial_sync(3000)
            time.sleep(10)
            result["restart_rss_mb_10000"] = director.rss_mb()
            result["restart_peak_rss_mb_10000"] = director.rss_mb("VmHWM")
            director.stop()
            result.update(ipvsadm_reference(NETNS))
            result["ratio_startup_vs_ipvsadm_restore_10000"] = (
                result["startup_10000_s"] / result["ipvsadm_restore_10000_s"]
            )
    finally:
        director.stop()
        print(director.log.read_text()[-3000:])
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("half", choices=["host", "vm"])
    parser.add_argument("--phase", choices=["small", "large"])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=10000)
    parser.add_argument("--kubeconfig")
    parser.add_argument("--timeout", type=int, default=6000)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    return host(args) if args.half == "host" else vm(args)


if __name__ == "__main__":
    sys.exit(main())
