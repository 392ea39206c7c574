"""End to end, in the VM: backend "pods" (network namespaces with a server inside) start
unprepared; `kubelvs realserver` prepares them (the test does no receive-side setup of its own)
and sets their readiness gate; `kubelvs director` programs DR and TUN to them; real traffic.

The control plane runs on the host (KUBELVS_E2E_KUBECONFIG). There is no kubelet: a small
stand-in marks a pod Ready as a kubelet would, once its containers run and every readiness
gate is True, so a gated pod enters the EndpointSlice (and IPVS) only once the agent says it
can receive. The tests of this module run in order and share one director and one agent.
"""

from __future__ import annotations

import contextlib
import json
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
from ha_topology import output_dir
from pod_login import pod_login_env
from topology import Topology, alternates

KUBECONFIG = os.environ.get("KUBELVS_E2E_KUBECONFIG", "")
KUBELVS = str(Path(sys.executable).with_name("kubelvs"))
DIRECTOR_NODE = "rs-director-1"
POD_NODE = "rs-worker-1"
DIRECTOR_METRICS = 19354
AGENT_METRICS = 19356
GATE = "kubelvs.io/receiver-ready"
UPLOAD_PORT = 8080
RESULTS_NAME = "realserver-results.json"  # next to the process logs (output_dir)

pytestmark = pytest.mark.vm_control_plane

UPLOAD_SERVER = r"""
import re, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
open(sys.argv[2], "w").close()
while True:
    conn, _ = s.accept()
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    reply = f"got {len(body)}".encode()
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: " + str(len(reply)).encode() + b"\r\n\r\n" + reply)
    conn.close()
"""

UPLOAD_CLIENT = r"""
import socket, sys
body = b"x" * int(sys.argv[3])
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
s.sendall(b"POST / HTTP/1.0\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.split(b"\r\n\r\n", 1)[-1].decode())
"""


MSS_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
mss = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
s.sendall(b"GET / HTTP/1.0\r\n\r\n"); s.recv(4096); s.close()
print(mss)
"""


def client_mss(topo: Topology, vip: str) -> int:
    """The MSS the client uses towards ``vip``: what the real server's SYN-ACK offered (the client's
    own MTU is 1500: 1460 unclamped), less the timestamp option."""
    return int(topo.exec("client", [sys.executable, "-c", MSS_CLIENT, vip, "80"], timeout=30).stdout)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0, interval: float = 0.5) -> Any:
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
        self.namespace = f"rs-{uuid.uuid4().hex[:6]}"
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

    def pod(self, name: str, ips: list[str], gated: bool) -> None:
        spec: dict[str, Any] = {
            "nodeName": POD_NODE,
            "containers": [{"name": "web", "image": "web", "ports": [{"containerPort": 80}]}],
        }
        if gated:
            spec["readinessGates"] = [{"conditionType": GATE}]
        self.core.create_namespaced_pod(
            self.namespace, {"metadata": {"name": name, "labels": {"app": "web"}}, "spec": spec}
        )
        self.core.patch_namespaced_pod_status(
            name,
            self.namespace,
            {"status": {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]}},
        )

    def conditions(self, name: str) -> dict[str, str]:
        pod = self.core.read_namespaced_pod(name, self.namespace)
        return {c.type: c.status for c in pod.status.conditions or []}

    def virtual_server(self, name: str, spec: dict[str, Any]) -> None:
        spec = {**spec, "directors": {"nodeSelector": {"kubelvs.io/director": "true"}}}
        self.custom.create_namespaced_custom_object(
            "kubelvs.io",
            "v1alpha1",
            self.namespace,
            "virtualservers",
            {"apiVersion": "kubelvs.io/v1alpha1", "kind": "VirtualServer", "metadata": {"name": name}, "spec": spec},
        )

    def delete_virtual_server(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object("kubelvs.io", "v1alpha1", self.namespace, "virtualservers", name)


class Kubelet(threading.Thread):
    """A kubelet's readiness rule for the pods of this node: Ready once the containers run (at
    once here) and every readiness gate's condition is True."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.pods: dict[str, bool] = {}  # name -> gated
        self.ready: dict[str, bool] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            for name, gated in list(self.pods.items()):
                try:
                    conditions = self.cluster.conditions(name)
                    ready = not gated or conditions.get(GATE) == "True"
                    if self.ready.get(name) != ready or conditions.get("Ready") != str(ready):
                        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                        flag = "True" if ready else "False"
                        self.cluster.core.patch_namespaced_pod_status(
                            name,
                            self.cluster.namespace,
                            {
                                "status": {
                                    "conditions": [
                                        {"type": "Ready", "status": flag, "lastTransitionTime": now},
                                        {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                                    ]
                                }
                            },
                        )
                        self.ready[name] = ready
                except Exception:  # a pod being deleted, the API briefly away: next round
                    continue


class Process:
    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv = argv
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **pod_login_env(KUBECONFIG), "PYTHONUNBUFFERED": "1"},  # as in a pod
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def metric(port: int, name: str) -> float | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    except OSError:
        return None
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


def namespace_state(topo: Topology, rs: str) -> str:
    """Everything the agent may touch in a namespace: devices and their state, addresses, the
    sysctls, fou ports, nftables tables."""
    script = (
        "ip -br link; ip -br addr; ip fou show 2>/dev/null; nft list tables 2>/dev/null; "
        "for f in /proc/sys/net/ipv4/conf/*/arp_ignore /proc/sys/net/ipv4/conf/*/arp_announce "
        "/proc/sys/net/ipv4/conf/*/rp_filter; do echo $f $(cat $f); done"
    )
    return topo.exec(rs, script).stdout


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if not KUBECONFIG:
        pytest.fail("KUBELVS_E2E_KUBECONFIG is not set: the host side of the kernel suite starts the control plane")
    for module in ("ipip", "fou"):  # as a node that uses them would have (the agent also loads them on demand)
        subprocess.run(["modprobe", module], check=False)
    workdir = tmp_path_factory.mktemp("realserver")
    # The processes' logs where the host keeps them after the VM is gone (the run's output).
    logs = output_dir(f"realserver-{time.strftime('%H%M%S')}")
    with Topology(real_servers=4, directors=1, ports=(80,)) as topo:
        # Set by hand before kubelvs: must survive everything the agent does.
        topo.exec("rs1", ["ip", "addr", "add", "10.99.0.1/32", "dev", "lo"])
        topo.sysctl("rs2", {"net.ipv4.conf.all.arp_announce": 2})
        upload = workdir / "upload.py"
        upload.write_text(UPLOAD_SERVER)
        uploaders = []
        for rs in topo.real_servers:
            ready = workdir / f"upload-{rs}.ready"
            uploaders.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", topo.ns(rs), sys.executable, str(upload), str(UPLOAD_PORT), str(ready)]
                )
            )
            wait_for(f"the upload server in {rs}", ready.exists, timeout=60)
        before = {rs: namespace_state(topo, rs) for rs in topo.real_servers}
        cluster = Cluster()
        cluster.node(DIRECTOR_NODE, topo.ip4("dir1"), {"kubelvs.io/director": "true"})
        cluster.node(POD_NODE, "10.0.2.251")
        director = Process(
            [
                KUBELVS,
                "director",
                "--node-name",
                DIRECTOR_NODE,
                "--netns",
                topo.ns("dir1"),
                "--state-dir",
                str(workdir / "director-state"),
                "--resync-seconds",
                "5",
                "--metrics-port",
                str(DIRECTOR_METRICS),
                "--metrics-address",
                "127.0.0.1",
                "--lease-namespace",
                cluster.namespace,
            ],
            logs / "director.log",
        )
        agent = Process(
            [
                KUBELVS,
                "realserver",
                "--node-name",
                POD_NODE,
                "--state-dir",
                str(workdir / "agent-state"),
                "--resync-seconds",
                "5",
                "--metrics-port",
                str(AGENT_METRICS),
                "--metrics-address",
                "127.0.0.1",
            ],
            logs / "agent.log",
        )
        kubelet = Kubelet(cluster)
        kubelet.start()
        director.start()
        agent.start()
        try:
            yield {
                "topo": topo,
                "cluster": cluster,
                "director": director,
                "agent": agent,
                "kubelet": kubelet,
                "before": before,
                "results": {},
                "logs": logs,
            }
        finally:
            kubelet.stop.set()
            agent.stop()
            director.stop()
            for proc in uploaders:
                proc.kill()
            print("--- agent ---\n" + agent.log()[-8000:])
            print("--- director ---\n" + director.log()[-4000:])


def real_servers(topo: Topology, vip: str, port: int = 80) -> set[str]:
    text = topo.ipvsadm("dir1", "-Sn").stdout
    target = f"[{vip}]" if ":" in vip else vip
    found = set()
    for line in text.splitlines():
        match = re.match(rf"-a -[tu] {re.escape(target)}:{port} -r (\S+):{port}", line)
        if match:
            found.add(match.group(1).strip("[]"))
    return found


def traffic_ok(topo: Topology, vip: str, names: list[str], n: int = 6) -> list[str] | None:
    got = topo.client_get(vip, 80, n, timeout=2)
    return got if alternates(got, names) else None


def test_dr_pods_are_prepared_by_the_agent_and_serve(env: dict[str, Any]) -> None:
    topo, cluster, kubelet = env["topo"], env["cluster"], env["kubelet"]
    cluster.core.create_namespaced_service(
        cluster.namespace,
        {
            "metadata": {"name": "web"},
            "spec": {
                "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80}, {"name": "up", "port": UPLOAD_PORT}],
            },
        },
    )
    for i, rs in enumerate(topo.real_servers[:3], start=1):
        cluster.pod(f"web-{i}", [topo.ip4(rs), topo.ip6(rs)], gated=True)
        kubelet.pods[f"web-{i}"] = True
    vip = topo.vip4(0)
    cluster.virtual_server(
        "dr", {"vip": vip, "ports": [{"port": 80}], "scheduler": "rr", "backends": {"serviceRef": {"name": "web"}}}
    )
    try:
        for i in (1, 2, 3):
            wait_for(
                f"web-{i} receiver-ready and Ready",
                lambda i=i: cluster.conditions(f"web-{i}").get("Ready") == "True",
                timeout=300,
            )
    except AssertionError as error:
        seen = {f"web-{i}": cluster.conditions(f"web-{i}") for i in (1, 2, 3)}
        raise AssertionError(f"{error}\nconditions: {seen}\n--- agent log ---\n{env['agent'].log()[-5000:]}") from None
    expected = {topo.ip4(rs) for rs in topo.real_servers[:3]}
    wait_for("three DR real servers", lambda: real_servers(topo, vip) == expected)
    assert f"{vip}/32" in topo.exec("rs1", ["ip", "-br", "addr", "show", "dev", "lo"]).stdout
    wait_for("DR traffic through every pod", lambda: traffic_ok(topo, vip, topo.real_servers[:3]), timeout=60)


def test_tun_ipip_with_a_1mb_request(env: dict[str, Any]) -> None:
    topo, cluster = env["topo"], env["cluster"]
    vip = topo.vip4(1)
    cluster.virtual_server(
        "tun",
        {
            "vip": vip,
            "ports": [{"port": 80}, {"port": UPLOAD_PORT}],
            "scheduler": "rr",
            "forwarding": {"method": "TUN"},
            "backends": {"serviceRef": {"name": "web"}},
        },
    )
    wait_for(
        "tunl0 up with the VIP in rs1",
        lambda: f"{vip}/32" in topo.exec("rs1", ["ip", "-br", "addr", "show", "dev", "tunl0"]).stdout,
    )
    wait_for("three TUN real servers", lambda: len(real_servers(topo, vip)) == 3)
    wait_for("TUN traffic through every pod", lambda: traffic_ok(topo, vip, topo.real_servers[:3]), timeout=60)
    started = time.monotonic()
    answer = topo.exec(
        "client", [sys.executable, "-c", UPLOAD_CLIENT, vip, str(UPLOAD_PORT), str(1 << 20)], timeout=180
    ).stdout.strip()
    env["results"]["tun_1mb_upload_seconds"] = round(time.monotonic() - started, 2)
    assert answer == f"got {1 << 20}", answer
    # The real servers offer an MSS that fits the path once encapsulated (1500 - 20 - 40).
    assert 1440 - 12 <= client_mss(topo, vip) <= 1440


def test_tun_gue(env: dict[str, Any]) -> None:
    topo, cluster = env["topo"], env["cluster"]
    vip = topo.vip4(2)
    cluster.virtual_server(
        "gue",
        {
            "vip": vip,
            "ports": [{"port": 80}],
            "scheduler": "rr",
            "forwarding": {"method": "TUN", "tunnel": {"type": "gue", "port": 6080}},
            "backends": {"serviceRef": {"name": "web"}},
        },
    )
    wait_for("a GUE port in rs1", lambda: "6080" in topo.exec("rs1", "ip fou show").stdout)
    wait_for("three GUE real servers", lambda: len(real_servers(topo, vip)) == 3)
    wait_for("GUE traffic through every pod", lambda: traffic_ok(topo, vip, topo.real_servers[:3]), timeout=60)
    assert 1428 - 12 <= client_mss(topo, vip) <= 1428  # 1500 - IP, UDP and GUE headers (32) - 40


def test_ipv6_dr(env: dict[str, Any]) -> None:
    topo, cluster = env["topo"], env["cluster"]
    vip = topo.vip6(0)
    backends = [{"ip": topo.ip6(rs)} for rs in topo.real_servers[:3]]
    cluster.virtual_server(
        "dr6", {"vip": vip, "ports": [{"port": 80}], "scheduler": "rr", "backends": {"addresses": backends}}
    )
    wait_for(
        "the VIP6 on lo in rs1",
        lambda: vip in topo.exec("rs1", ["ip", "-6", "-br", "addr", "show", "dev", "lo"]).stdout,
    )
    wait_for("three IPv6 DR real servers", lambda: len(real_servers(topo, vip)) == 3)
    wait_for("IPv6 DR traffic through every pod", lambda: traffic_ok(topo, vip, topo.real_servers[:3]), timeout=90)


def _scale_up(env: dict[str, Any], pod: str, gated: bool, pause_agent: bool) -> dict[str, Any]:
    """rs4 joins as ``pod`` under steady load on the DR VIP; the failed requests until it serves."""
    topo, cluster, kubelet, agent = env["topo"], env["cluster"], env["kubelet"], env["agent"]
    vip = topo.vip4(0)
    results: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            results.extend(topo.client_get(vip, 80, 12, timeout=1.5))

    thread = threading.Thread(target=load)
    thread.start()
    try:
        wait_for("load running", lambda: len(results) >= 12)
        if pause_agent:
            agent.signal(signal.SIGSTOP)  # a receive side that is slow to come (kube-router#512's ~30 s)
        kubelet.pods[pod] = gated
        cluster.pod(pod, [topo.ip4("rs4"), topo.ip6("rs4")], gated=gated)
        if not gated:  # Ready at once: in the EndpointSlice, then in IPVS, unprepared
            wait_for("rs4 in IPVS", lambda: topo.ip4("rs4") in real_servers(topo, vip), timeout=180)
        mark = len(results)
        if pause_agent:
            wait_for("a few rounds of requests with rs4 unprepared", lambda: len(results) >= mark + 24, timeout=180)
            agent.signal(signal.SIGCONT)
        wait_for("rs4 in IPVS", lambda: topo.ip4("rs4") in real_servers(topo, vip), timeout=180)
        wait_for("rs4 answering", lambda: "rs4" in results[mark:], timeout=180)
        mark = len(results)
        wait_for("one more round", lambda: len(results) >= mark + 12, timeout=120)
    finally:
        stop.set()
        thread.join(timeout=120)
        if pause_agent:
            agent.signal(signal.SIGCONT)
    errors = [r for r in results if r.startswith("ERR")]
    return {"requests": len(results), "errors": len(errors), "kinds": sorted(set(errors))}


def test_scale_up_under_load_with_and_without_the_gate(env: dict[str, Any]) -> None:
    topo, cluster, kubelet = env["topo"], env["cluster"], env["kubelet"]
    gated = _scale_up(env, "web-4", gated=True, pause_agent=True)
    env["results"]["scale_up_gated_agent_paused"] = gated
    # rs4 goes again: its pod is deleted, and the agent puts its namespace back as it was.
    kubelet.pods.pop("web-4")
    cluster.core.delete_namespaced_pod("web-4", cluster.namespace, grace_period_seconds=0)
    wait_for("rs4 out of IPVS", lambda: topo.ip4("rs4") not in real_servers(topo, topo.vip4(0)))
    with contextlib.suppress(AssertionError):  # the comparison below shows the difference
        wait_for("rs4's namespace restored", lambda: namespace_state(topo, "rs4") == env["before"]["rs4"], timeout=60)
    assert namespace_state(topo, "rs4") == env["before"]["rs4"]
    ungated = _scale_up(env, "web-5", gated=False, pause_agent=True)
    env["results"]["scale_up_ungated_agent_paused"] = ungated
    (env["logs"] / RESULTS_NAME).write_text(json.dumps(env["results"], indent=1))
    print("scale-up figures:", json.dumps(env["results"]))
    assert gated["errors"] == 0, gated
    assert ungated["errors"] > 0, ungated  # what the gate prevents


def test_agent_restart_makes_no_change(env: dict[str, Any]) -> None:
    agent = env["agent"]
    agent.stop()
    agent.start()
    wait_for(
        "the restarted agent's first sync",
        lambda: metric(AGENT_METRICS, 'kubelvs_realserver_targets{state="prepared"}') == 4,
    )
    assert metric(AGENT_METRICS, 'kubelvs_realserver_changes_total{op="add"}') == 0
    assert metric(AGENT_METRICS, 'kubelvs_realserver_changes_total{op="remove"}') == 0


def test_deleting_the_virtual_servers_leaves_every_namespace_as_before(env: dict[str, Any]) -> None:
    topo, cluster = env["topo"], env["cluster"]
    for name in ("dr", "tun", "gue", "dr6"):
        cluster.delete_virtual_server(name)
    for rs in topo.real_servers:
        with contextlib.suppress(AssertionError):  # the comparison below shows the difference
            wait_for(f"{rs} as before", lambda rs=rs: namespace_state(topo, rs) == env["before"][rs], timeout=60)
        assert namespace_state(topo, rs) == env["before"][rs]
    assert "10.99.0.1/32" in topo.exec("rs1", ["ip", "-br", "addr", "show", "dev", "lo"]).stdout
