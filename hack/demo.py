#!/usr/bin/env python3
"""`make demo`: kubelvs on a real IPVS kernel, first as a standalone CLI, then as the operator.

On the host, this starts the local Kubernetes control plane (etcd, kube-apiserver,
kube-controller-manager, built from Go modules on the first run) and boots the IPVS VM, where it
runs again (KUBELVS_IN_VM=1):

1. standalone: a client, a director and three web servers in network namespaces on one bridge;
   `kubelvs apply` programs the director from examples/ with DR, then TUN;
2. the operator: three `kubelvs director`s (one per network namespace, as on three nodes) elect an
   owner per VIP through the API server; `kubectl apply` of a Service, its pods and two
   VirtualServers; `kubectl get lvs -o wide` shows the owner; then the owner is killed while
   long-lived connections run, and they go on through the new owner (the kernel's connection
   sync), with the Events saying why the VIP moved.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "kernel"))

KUBELVS = str(Path(sys.executable).with_name("kubelvs"))
NAMESPACE = "demo"


def banner(text: str) -> None:
    print(f"\n\033[1m=== {text}\033[0m", flush=True)


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- on the host


def on_host() -> int:
    controlplane = _load("kubelvs_controlplane", REPO / "hack" / "cluster" / "controlplane.py")
    vm = _load("kubelvs_hack_vm", REPO / "hack" / "vm.py")
    banner("the local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager)")
    if not all((controlplane.default_bin_dir() / b).exists() for b in ("etcd", "kube-apiserver", "kubectl")):
        print("first run: building them from Go modules (about 6 minutes on 2 cores; cached afterwards)", flush=True)
    cp = controlplane.start_with_crds(sorted((REPO / "crds").glob("*.yaml")), Path(tempfile.mkdtemp(prefix="demo-cp-")))
    try:
        print(f"API server {cp.server}; the VM reaches it at 10.0.2.2", flush=True)
        banner("booting the IPVS VM (Debian's kernel under emulation: slow, but a real kernel)")
        env = {"KUBELVS_E2E_KUBECONFIG": str(cp.kubeconfig_vm), "KUBELVS_DEMO_KUBECTL": str(cp.kubectl)}
        # The VM output directory read-write: the directors' logs are kept there (and shown on failure).
        vmout = vm.ensure_vmout(REPO)
        return int(vm.run_in_vm([sys.executable, str(Path(__file__))], [str(vmout)], 1500.0, True, env=env))
    finally:
        cp.stop()


# --------------------------------------------------------------------------- in the VM: standalone


def kubelvs(topo: Any, state_dir: str, *args: str) -> None:
    command = [KUBELVS, *args]
    if args[0] != "plan":
        command += ["--state-dir", state_dir]
    print(f"$ kubelvs {' '.join(args)}", flush=True)
    result = topo.exec("dir1", command, check=False)
    sys.stdout.write(result.stdout + result.stderr)
    if result.returncode:
        raise SystemExit(f"kubelvs {args[0]} failed with status {result.returncode}")


def requests(topo: Any, vip: str, n: int, port: int = 80) -> None:
    names = topo.client_get(vip, port, n)
    print(f"client -> http://{vip}:{port}/ x{n}: {' '.join(names)}")
    print(f"  share: {dict(sorted(Counter(names).items()))}", flush=True)
    if any(name.startswith("ERR") for name in names):
        raise SystemExit("some requests failed")


def standalone() -> None:
    from topology import Topology

    state_dir = tempfile.mkdtemp(prefix="kubelvs-demo-")
    with Topology(real_servers=3, directors=1, index=1, ports=(80,)) as topo:
        dr_vip, tun_vip = "10.77.1.200", "10.77.1.201"
        for rs in topo.real_servers:
            topo.real_server_dr(rs, dr_vip)  # VIP on lo, ARP hidden
            topo.real_server_tun(rs, tun_vip)  # VIP on tunl0, rp_filter off
        banner(
            f"standalone: client {topo.ip4('client')}, director {topo.ip4('dir1')}, "
            f"web servers {', '.join(topo.ip4(r) for r in topo.real_servers)}"
        )

        banner("Direct Routing: a VirtualServer over a Service's EndpointSlice (examples/web-dr.yaml)")
        kubelvs(topo, state_dir, "plan", "-f", "examples/web-dr.yaml")
        kubelvs(topo, state_dir, "apply", "-f", "examples/web-dr.yaml")
        requests(topo, dr_vip, 6)

        banner("IP tunnelling, weighted round robin (examples/web-tun.yaml), next to the DR one")
        kubelvs(topo, state_dir, "apply", "-f", "examples/web-dr.yaml", "-f", "examples/web-tun.yaml")
        requests(topo, tun_vip, 8)
        kubelvs(topo, state_dir, "show")

        banner("the kernel's own view (ipvsadm -Ln) in the director")
        print(topo.exec("dir1", ["ipvsadm", "-Ln"]).stdout)

        banner("kubelvs delete removes exactly what it added")
        kubelvs(topo, state_dir, "delete", "-f", "examples/web-dr.yaml", "-f", "examples/web-tun.yaml")
        left = topo.exec("dir1", ["ipvsadm", "-Sn"]).stdout
        print(f"rules left in the director: {left.strip() or 'none'}")
    subprocess.run(["rm", "-rf", state_dir], check=False)


# --------------------------------------------------------------------------- in the VM: the operator


def manifest(vip: str, pods: dict[str, str]) -> str:
    """What a user applies: a Service, its pods (on a worker node) and two VirtualServers on one
    VIP (web on 80, a line echo on 7), DR to the pods."""
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": NAMESPACE},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}, {"name": "echo", "port": 7}]},
        }
    ]
    for name in pods:
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": "web"}},
                "spec": {
                    "nodeName": "demo-worker",
                    "containers": [
                        {"name": "web", "image": "web", "ports": [{"containerPort": 80}, {"containerPort": 7}]}
                    ],
                },
            }
        )
    for name, port in (("web", 80), ("echo", 7)):
        docs.append(
            {
                "apiVersion": "kubelvs.io/v1alpha1",
                "kind": "VirtualServer",
                "metadata": {"name": name, "namespace": NAMESPACE},
                "spec": {
                    "vip": vip,
                    "ports": [{"name": name, "port": port}],
                    "scheduler": "rr",
                    "forwarding": {"method": "DR"},
                    "backends": {"serviceRef": {"name": "web", "port": "http" if port == 80 else "echo"}},
                },
            }
        )
    return "---\n".join(json.dumps(doc) + "\n" for doc in docs)


class Kubectl:
    def __init__(self, binary: str, kubeconfig: str) -> None:
        self.base = [binary, f"--kubeconfig={kubeconfig}"]

    def __call__(self, *args: str, stdin: str | None = None, show: bool = True, check: bool = True) -> str:
        if show:
            print(f"$ kubectl {' '.join(args)}", flush=True)
        done = subprocess.run([*self.base, *args], input=stdin, capture_output=True, text=True, timeout=60)
        if show:
            sys.stdout.write(done.stdout + done.stderr)
            sys.stdout.flush()
        if check and done.returncode:
            raise SystemExit(f"kubectl {args[0]} failed: {done.stderr.strip()}")
        return done.stdout


def wait_until(what: str, check: Any, timeout: float = 120.0) -> Any:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.3)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def operator() -> None:
    from flows import EchoServers, Flows
    from ha_topology import HATopology

    kubeconfig = os.environ["KUBELVS_E2E_KUBECONFIG"]
    kubectl = Kubectl(os.environ.get("KUBELVS_DEMO_KUBECTL", "kubectl"), kubeconfig)
    with HATopology(directors=3, real_servers=2, index=2, kubeconfig=kubeconfig) as topo:
        vip = topo.vip4(0)  # in the directors' subnet: the owner claims it on that interface
        banner(
            f"the operator: directors {', '.join(f'{d} {topo.ip4(d)}' for d in topo.directors)}; "
            f"pods (web servers) {', '.join(topo.ip4(r) for r in topo.real_servers)}; client {topo.ip4('client')}"
        )
        kubectl("create", "namespace", NAMESPACE, show=False)
        nodes = [("demo-worker", "10.0.2.250")] + [(topo.node_name(d), topo.ip4(d)) for d in topo.directors]
        for name, ip in nodes:  # the Node objects a kubelet would register
            labels = {} if name == "demo-worker" else {"kubelvs.io/director": "true"}
            node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}
            kubectl("apply", "-f", "-", stdin=json.dumps(node), show=False)
            status = {"status": {"addresses": [{"type": "InternalIP", "address": ip}]}}
            kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p", json.dumps(status), show=False)
        for rs in topo.real_servers:
            topo.real_server_dr(rs, vip)  # the pods' receive side for DR (issue: automated by the agent)
        echo = EchoServers(topo, 7)
        for d in topo.directors:
            topo.start_director(d, "--lease-namespace", NAMESPACE)
        print(f"started `kubelvs director` in {', '.join(topo.directors)} (leases in namespace {NAMESPACE})")

        pods = {f"web-{i}": topo.ip4(rs) for i, rs in enumerate(topo.real_servers, start=1)}
        banner("kubectl apply: a Service, its pods and two VirtualServers (web on :80, echo on :7)")
        kubectl("apply", "-f", "-", stdin=manifest(vip, pods))
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for name, ip in pods.items():  # no kubelet in this demo: write what it would report
            ready = [{"type": t, "status": "True", "lastTransitionTime": now} for t in ("Ready", "ContainersReady")]
            status = {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "conditions": ready}}
            kubectl("patch", "pod", name, "-n", NAMESPACE, "--subresource=status", "--type=merge",
                    "-p", json.dumps(status), show=False)  # fmt: skip
        print("(no kubelet here: the pods' Running/Ready status is written as a kubelet would)")

        def owner() -> str:
            return kubectl("get", "lvs", "web", "-n", NAMESPACE, "-o", "jsonpath={.status.owner}", show=False)

        first = wait_until("an owner for the VIP", owner)
        wait_until("both VirtualServers Ready", lambda: "False" not in _ready(kubectl))
        kubectl("get", "lvs", "-n", NAMESPACE, "-o", "wide")
        requests(topo, vip, 6)

        banner(f"long-lived connections through {first}: 5 TCP flows to {vip}:7, a line every 200 ms")
        with Flows(topo.ns("client"), vip, 7, count=5, interval=0.2) as flows:
            time.sleep(4)  # the kernel syncs a new connection after its first packets (1-3 s)
            print(flows.describe())
            victim = next(d for d in topo.directors if topo.node_name(d) == first)
            banner(f"SIGKILL the owner ({victim}, node {first})")
            killed = time.monotonic()
            topo.kill(victim)
            second = wait_until("a new owner", lambda: (o := owner()) != first and o, timeout=60)
            print(f"new owner {second} after {time.monotonic() - killed:.1f}s (as seen in status)")
            wait_until("the flows echoing through the new owner", lambda: flows.all_echoed_since(time.monotonic() - 1))
            time.sleep(2)
            print(flows.describe())
            failed = flows.failed()
        kubectl("get", "lvs", "-n", NAMESPACE, "-o", "wide")
        kubectl("get", "events", "-n", NAMESPACE, "--field-selector", "reason=VIPOwnerChanged")
        if failed:
            raise SystemExit(f"{len(failed)} connections did not survive the failover")
        print(f"every connection survived the failover from {first} to {second}")
        for d in list(topo.running):
            topo.kill(d, signal.SIGTERM)
        echo.close()


def _ready(kubectl: Kubectl) -> str:
    return kubectl(
        "get", "lvs", "-n", NAMESPACE, "-o", "jsonpath={.items[*].status.conditions[?(@.type=='Ready')].status}",
        show=False,
    ) or "False"  # fmt: skip


def in_vm() -> int:
    standalone()
    if os.environ.get("KUBELVS_E2E_KUBECONFIG"):
        operator()
    banner("demo done")
    return 0


if __name__ == "__main__":
    sys.exit(in_vm() if os.environ.get("KUBELVS_IN_VM") == "1" else on_host())
