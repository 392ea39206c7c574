#!/usr/bin/env python3
"""The director at scale (`make bench`): convergence, start-up time, memory.

Two halves. On the host (`host`): start the local control plane and create the objects natively
(fast), then boot the VM running the other half. In the VM (`vm`): run `kubelvs director`
against the host's API server (qemu user network), programming IPVS in a network namespace, and
measure:

- convergence: an EndpointSlice change in the API server to the kernel rule, polled with a
  per-service dump, p50 and p99 over the changes, with 1,000 VirtualServers present;
- start-up: director start to all 10,000 VirtualServers programmed;
- resident memory of the director at 1,000 and 10,000 VirtualServers (10 s after start-up, when
  its status writes are out) and its peak.

Every VirtualServer is over its own Service and EndpointSlice (4 endpoints).

Services are selector-less, with EndpointSlices written by this script (as a controller
would), so the API server holds exactly what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "bench"
NETNS = "kubelvs-dbench"
KUBELVS = str(Path(sys.executable).with_name("kubelvs"))
CHANGES = 100


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


def _vmout() -> Path:
    """This checkout's VM output directory (created; see ``ensure_vmout`` in hack/vm.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kubelvs_hack_vm", REPO / "hack" / "vm.py")
    assert spec is not None and spec.loader is not None
    vm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vm)
    return Path(vm.ensure_vmout(REPO))


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
        client.CoreV1Api(api).create_node(
            {
                "metadata": {"name": "director-1"},
                "status": {"addresses": [{"type": "InternalIP", "address": "10.0.2.15"}]},
            }
        )
        out = _vmout()  # shared read-write with the VM: outside the checkout, which may be under /tmp

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
        report = {
            "director": {"environment": "VM: qemu TCG, 2 vCPUs; director in the VM, API server on the host", **figures}
        }
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        return 0
    finally:
        cp.stop()


# --- VM half --------------------------------------------------------------------------------


class DirectorRun:
    def __init__(self, kubeconfig: str, log: Path) -> None:
        subprocess.run(["ip", "netns", "add", NETNS], check=False, capture_output=True)
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
                tempfile.mkdtemp(prefix="dstate-"),
                "--metrics-port",
                "0",
                "--resync-seconds",
                "600",
            ],
            env={**os.environ, "KUBECONFIG": kubeconfig},
            stdout=open(log, "wb"),  # noqa: SIM115 - the director outlives this call
            stderr=subprocess.STDOUT,
        )

    def rss_mb(self, field: str = "VmRSS") -> float:
        """Resident memory now (VmRSS), or its peak so far (VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


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


def vm(args: argparse.Namespace) -> int:
    from kubelvs.kernel.ipvs import IPVSClient
    from kubernetes import client, config

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
            api = config.new_client_from_config(config_file=args.kubeconfig)
            discovery = client.DiscoveryV1Api(api)
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
            time.sleep(10)
            result["rss_mb_10000"] = director.rss_mb()
            result["peak_rss_mb_10000"] = director.rss_mb("VmHWM")
    finally:
        director.stop()
        print(log.read_text()[-3000:])
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
    parser.add_argument("--timeout", type=int, default=3000)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    return host(args) if args.half == "host" else vm(args)


if __name__ == "__main__":
    sys.exit(main())
