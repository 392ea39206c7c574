"""End to end: the real kube-apiserver and kube-controller-manager (on the host), `kubelvs director`
and real IPVS (in the VM), pods whose IPs live in network namespaces, real HTTP through the VIP.

The host side of the kernel suite starts the control plane and passes its kubeconfig
(KUBELVS_E2E_KUBECONFIG, server https://10.0.2.2:PORT through qemu's user network). Pods have
no kubelet here: the test makes them Running and Ready by writing their status, as a kubelet
would; the EndpointSlices are the real controller's. The director runs in the VM's root network
namespace (where the API is reachable) and programs IPVS in the director namespace ``dir1``.

The tests of this module run in order and share one director.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pod_login import pod_login_env
from topology import Topology, alternates

KUBECONFIG = os.environ.get("KUBELVS_E2E_KUBECONFIG", "")
KUBELVS = str(Path(sys.executable).with_name("kubelvs"))
DIRECTOR_NODE = "director-1"
POD_NODE = "worker-1"
METRICS_PORT = 19344
RESYNC_SECONDS = 5

# The host side of the kernel suite starts the control plane and gives the VM user networking.
pytestmark = pytest.mark.vm_control_plane


def wait_for(what: str, check: Callable[[], Any], timeout: float = 90.0, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as error:  # the API may be briefly unavailable
            last = error
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


class Cluster:
    def __init__(self) -> None:
        from kubernetes import client, config

        config.load_kube_config(KUBECONFIG)
        self.core = client.CoreV1Api()
        self.custom = client.CustomObjectsApi()
        self.discovery = client.DiscoveryV1Api()
        self.namespace = f"e2e-{uuid.uuid4().hex[:6]}"
        self.core.create_namespace({"metadata": {"name": self.namespace}})

    def node(self, name: str, ip: str, labels: dict[str, str] | None = None) -> None:
        body = {
            "metadata": {"name": name, "labels": labels or {}},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
        }
        try:
            self.core.create_node(body)
        except Exception as error:
            if getattr(error, "status", None) != 409:
                raise

    def pod(self, name: str, ip: str) -> None:
        self.core.create_namespaced_pod(
            self.namespace,
            {
                "metadata": {"name": name, "labels": {"app": "web"}},
                "spec": {
                    "nodeName": POD_NODE,
                    "containers": [{"name": "web", "image": "web", "ports": [{"containerPort": 80}]}],
                },
            },
        )
        self.pod_ready(name, ip, True)

    def pod_ready(self, name: str, ip: str, ready: bool) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        flag = "True" if ready else "False"
        self.core.patch_namespaced_pod_status(
            name,
            self.namespace,
            {
                "status": {
                    "phase": "Running",
                    "podIP": ip,
                    "podIPs": [{"ip": ip}],
                    "conditions": [
                        {"type": "Ready", "status": flag, "lastTransitionTime": now},
                        {"type": "ContainersReady", "status": flag, "lastTransitionTime": now},
                    ],
                }
            },
        )

    def virtual_server(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(
            "kubelvs.io",
            "v1alpha1",
            self.namespace,
            "virtualservers",
            {"apiVersion": "kubelvs.io/v1alpha1", "kind": "VirtualServer", "metadata": {"name": name}, "spec": spec},
        )

    def get_vs(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(  # type: ignore[no-any-return]
            "kubelvs.io", "v1alpha1", self.namespace, "virtualservers", name
        )

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        conditions = (self.get_vs(name).get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == kind), {})

    def events(self, name: str) -> list[Any]:
        return [e for e in self.core.list_namespaced_event(self.namespace).items if e.involved_object.name == name]


class DirectorProcess:
    def __init__(self, topo: Topology, workdir: Path) -> None:
        self.topo = topo
        self.state_dir = workdir / "director-state"
        self.log_path = workdir / "director.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.lease_namespace = "default"

    def start(self) -> None:
        env = {**os.environ, **pod_login_env(KUBECONFIG)}  # as in a pod: a ServiceAccount token
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                KUBELVS,
                "director",
                "--node-name",
                DIRECTOR_NODE,
                "--netns",
                self.topo.ns("dir1"),
                "--state-dir",
                str(self.state_dir),
                "--resync-seconds",
                str(RESYNC_SECONDS),
                "--metrics-port",
                str(METRICS_PORT),
                "--metrics-address",
                "127.0.0.1",  # the Node's address (the default) lives in the dir1 namespace
                "--lease-namespace",
                self.lease_namespace,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if not KUBECONFIG:
        pytest.fail("KUBELVS_E2E_KUBECONFIG is not set: the host side of the kernel suite starts the control plane")
    workdir = tmp_path_factory.mktemp("e2e")
    with Topology(real_servers=3, directors=1, ports=(80,)) as topo:
        cluster = Cluster()
        cluster.node(DIRECTOR_NODE, topo.ip4("dir1"), {"kubelvs.io/director": "true"})
        cluster.node(POD_NODE, "10.0.2.250")
        director = DirectorProcess(topo, workdir)
        director.lease_namespace = cluster.namespace  # the election's Leases
        director.start()
        try:
            yield {"topo": topo, "cluster": cluster, "director": director, "vip": topo.vip4(0)}
        finally:
            director.kill()
            print(director.log()[-6000:])


def rules(topo: Topology) -> list[str]:
    return sorted(topo.ipvsadm("dir1", "-Sn").stdout.splitlines())


def real_servers(topo: Topology) -> dict[str, str]:
    """Real server address -> its rule, as ipvsadm shows them."""
    found = {}
    for line in rules(topo):
        match = re.search(r"-r (\S+):80 .*", line)
        if line.startswith("-a") and match:
            found[match.group(1)] = line
    return found


def test_service_endpoints_become_real_servers_and_serve_traffic(env: dict[str, Any]) -> None:
    topo, cluster, vip = env["topo"], env["cluster"], env["vip"]
    for rs in topo.real_servers:
        topo.real_server_dr(rs, vip)
    cluster.core.create_namespaced_service(
        cluster.namespace,
        {
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 80}]},
        },
    )
    for i, rs in enumerate(topo.real_servers, start=1):
        cluster.pod(f"web-{i}", topo.ip4(rs))
    cluster.virtual_server(
        "web",
        {
            "vip": vip,
            "ports": [{"name": "http", "port": 80}],
            "scheduler": "rr",
            "backends": {"serviceRef": {"name": "web", "port": "http"}},
            "directors": {"nodeSelector": {"kubelvs.io/director": "true"}},
        },
    )
    expected = {topo.ip4(rs) for rs in topo.real_servers}
    wait_for("three real servers", lambda: set(real_servers(topo)) == expected, timeout=120)
    wait_for("Ready=True", lambda: cluster.condition("web", "Ready").get("status") == "True")
    status = cluster.get_vs("web")["status"]
    assert status["readyBackends"] == 3 and status["programmedDirectors"] == 1
    assert status["directors"][0]["node"] == DIRECTOR_NODE and status["directors"][0]["programmed"]
    assert cluster.condition("web", "Accepted")["reason"] == "Valid"
    # The only director owns the VIP: it holds the claim address on its uplink and says so.
    wait_for("Announced=True", lambda: cluster.condition("web", "Announced").get("status") == "True")
    assert cluster.get_vs("web")["status"]["owner"] == DIRECTOR_NODE
    uplink = topo.exec("dir1", ["ip", "-br", "addr", "show", "dev", "eth0"]).stdout
    assert f"{vip}/32" in uplink, uplink
    names = topo.client_get(vip, 80, 6)
    assert alternates(names, topo.real_servers), names


def test_scale_down_drains_then_removes(env: dict[str, Any]) -> None:
    topo, cluster = env["topo"], env["cluster"]
    rs3 = topo.ip4("rs3")
    # A graceful delete: the pod is terminating but still serving, so its connections drain.
    cluster.core.delete_namespaced_pod("web-3", cluster.namespace, grace_period_seconds=30)
    wait_for("rs3 at weight 0", lambda: "-w 0" in real_servers(topo).get(rs3, ""))
    wait_for("draining counted", lambda: (cluster.get_vs("web").get("status") or {}).get("drainingBackends") == 1)
    cluster.core.delete_namespaced_pod("web-3", cluster.namespace, grace_period_seconds=0)
    wait_for("rs3 removed", lambda: rs3 not in real_servers(topo))
    assert alternates(topo.client_get(env["vip"], 80, 4), ["rs1", "rs2"])


def test_scale_up_and_not_ready(env: dict[str, Any]) -> None:
    topo, cluster = env["topo"], env["cluster"]
    cluster.pod("web-4", topo.ip4("rs3"))
    wait_for("rs3 back", lambda: topo.ip4("rs3") in real_servers(topo))
    cluster.pod_ready("web-2", topo.ip4("rs2"), False)
    wait_for("rs2 out while not ready", lambda: topo.ip4("rs2") not in real_servers(topo))
    wait_for("rs2 counted as waiting", lambda: (cluster.get_vs("web").get("status") or {}).get("waitingBackends") == 1)
    assert alternates(topo.client_get(env["vip"], 80, 4), ["rs1", "rs3"])
    cluster.pod_ready("web-2", topo.ip4("rs2"), True)
    wait_for("rs2 back", lambda: topo.ip4("rs2") in real_servers(topo))


def test_drift_is_repaired_and_foreign_rules_are_left_alone(env: dict[str, Any]) -> None:
    topo, vip = env["topo"], env["vip"]
    foreign = topo.vip4(9)
    topo.ipvsadm("dir1", "-A", "-t", f"{foreign}:8080", "-s", "wlc")
    topo.ipvsadm("dir1", "-d", "-t", f"{vip}:80", "-r", f"{topo.ip4('rs1')}:80")
    wait_for("rs1 restored by the resync", lambda: topo.ip4("rs1") in real_servers(topo), timeout=RESYNC_SECONDS * 6)
    assert any(line.startswith(f"-A -t {foreign}:8080") for line in rules(topo))


def test_edit_scheduler_in_place(env: dict[str, Any]) -> None:
    topo, cluster = env["topo"], env["cluster"]
    cluster.custom.patch_namespaced_custom_object(
        "kubelvs.io", "v1alpha1", cluster.namespace, "virtualservers", "web", {"spec": {"scheduler": "wrr"}}
    )
    wait_for("wrr", lambda: any(f"-A -t {env['vip']}:80 -s wrr" in line for line in rules(topo)))
    generation = cluster.get_vs("web")["metadata"]["generation"]
    wait_for(
        "status for the new generation", lambda: cluster.get_vs("web")["status"].get("observedGeneration") == generation
    )


def test_vip_conflict_refuses_the_newer(env: dict[str, Any]) -> None:
    cluster = env["cluster"]
    cluster.virtual_server(
        "web-copy", {"vip": env["vip"], "ports": [{"port": 80}], "backends": {"addresses": [{"ip": "10.77.0.1"}]}}
    )
    condition = wait_for(
        "Accepted=False",
        lambda: (
            cluster.condition("web-copy", "Accepted").get("status") == "False"
            and cluster.condition("web-copy", "Accepted")
        ),
    )
    assert condition["reason"] == "VIPConflict" and "web" in condition["message"]
    wait_for(
        "a Warning event",
        lambda: any(e.type == "Warning" and e.reason == "VIPConflict" for e in cluster.events("web-copy")),
    )
    assert cluster.condition("web", "Ready")["status"] == "True"  # the older one keeps working
    cluster.custom.delete_namespaced_custom_object(
        "kubelvs.io", "v1alpha1", cluster.namespace, "virtualservers", "web-copy"
    )


def test_metrics(env: dict[str, Any]) -> None:
    env["topo"].client_get(env["vip"], 80, 2)
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=30).read().decode()
    assert 'kubelvs_build_info{version="' in text
    assert re.search(r'kubelvs_service_connections_total\{[^}]*name="web"[^}]*\} [1-9]', text), text[-3000:]
    assert "kubelvs_backend_active_connections{" in text
    assert "kubelvs_sync_duration_seconds_bucket" in text
    assert 'kubelvs_operations_total{result="success",verb="add-dest"}' in text
    assert "# TYPE kubelvs_watch_restarts_total counter" in text


def test_sigkill_and_restart_adopts_without_disturbing_traffic(env: dict[str, Any]) -> None:
    topo, director = env["topo"], env["director"]
    before = rules(topo)
    results: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            results.extend(topo.client_get(env["vip"], 80, 5, timeout=5))

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        time.sleep(2)
        director.kill()
        offset = len(director.log())
        time.sleep(2)
        director.start()
        wait_for("the first sync after restart", lambda: "initial sync:" in director.log()[offset:], timeout=120)
        time.sleep(2)
    finally:
        stop.set()
        thread.join(timeout=120)
    restart_log = director.log()[offset:]
    assert "initial sync: 0 operations" in restart_log, restart_log[-3000:]
    assert rules(topo) == before
    assert results and not [r for r in results if r.startswith("ERR")], results


def test_delete_service_then_virtual_server(env: dict[str, Any]) -> None:
    topo, cluster, vip = env["topo"], env["cluster"], env["vip"]
    cluster.core.delete_namespaced_service("web", cluster.namespace)
    condition = wait_for(
        "Ready=False",
        lambda: cluster.condition("web", "Ready").get("status") == "False" and cluster.condition("web", "Ready"),
    )
    assert condition["reason"] == "ServiceNotFound", condition
    cluster.custom.delete_namespaced_custom_object("kubelvs.io", "v1alpha1", cluster.namespace, "virtualservers", "web")
    wait_for("its rules gone", lambda: not any(vip in line for line in rules(topo)))
    assert any(line.startswith(f"-A -t {topo.vip4(9)}:8080") for line in rules(topo))  # foreign one stays
    addresses = topo.exec("dir1", ["ip", "-br", "addr", "show", "dev", "kubelvs0"], check=False).stdout
    assert vip not in addresses
