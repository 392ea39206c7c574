"""The real-server agent against the real API server and this host's kernel (network namespaces
with a process inside stand in for pods; the pods themselves are API objects without a kubelet,
their IPs set through the status subresource).

The agent runs with the token of the chart's realserver ServiceAccount and ClusterRole only
(least privilege, as installed). DR needs no tunnel module, so it runs here: the agent finds
each pod's namespace by its IP, puts the VIP on lo and the ARP sysctls, sets the
readiness-gate condition, leaves a pod whose namespace does not exist waiting, restores the
namespace exactly when the VirtualServer goes, and a restart with everything in place makes no
change. Needs root and network namespaces.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
GATE = "kubelvs.io/receiver-ready"


def _poll(what: str, probe: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last seen: {last!r}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"
    return done.stdout


def _sysctls(netns: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, "sysctl", "net.ipv4.conf.all.arp_ignore", "net.ipv4.conf.all.arp_announce"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def _state(netns: str) -> tuple[str, str]:
    return _ip("-n", netns, "addr", "show", "dev", "lo"), _sysctls(netns)


@pytest.fixture
def pod_netns() -> Iterator[tuple[str, str]]:
    """A network namespace with a process inside, holding the 'pod IP' on lo: (name, IP)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    name = f"kubelvs-rsapi-{uuid.uuid4().hex[:8]}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("no network namespace support")
    octet = 2 + uuid.uuid4().int % 250
    pod_ip = f"10.213.{octet}.7"
    _ip("-n", name, "link", "set", "lo", "up")
    _ip("-n", name, "addr", "add", f"{pod_ip}/32", "dev", "lo")
    sleeper = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "600"])
    try:
        yield name, pod_ip
    finally:
        sleeper.kill()
        sleeper.wait()
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


class Agent:
    def __init__(self, kubeconfig: str, node: str, state: Path, log: Path) -> None:
        self.port = _free_port()
        self.args = [sys.executable, "-m", "kubelvs.cli", "realserver", "--node-name", node,
                     "--state-dir", str(state), "--metrics-port", str(self.port),
                     "--metrics-address", "127.0.0.1", "--resync-seconds", "2"]  # fmt: skip
        self.env = {**os.environ, "KUBECONFIG": kubeconfig, "PYTHONUNBUFFERED": "1"}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None

    def metrics(self) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
                return str(response.read().decode())
        except OSError:
            return ""

    def value(self, name: str) -> float | None:
        found = re.search(rf"^{re.escape(name)} (\S+)$", self.metrics(), re.M)
        return float(found.group(1)) if found else None


@pytest.fixture
def least_privilege(
    control_plane: Any, kubeconfig: str, kubectl: Any, api_client: Any, tmp_path: Path
) -> Iterator[str]:
    """A kubeconfig with the token of the chart's realserver ServiceAccount, bound to the chart's
    ClusterRole (rendered from charts/kubelvs/templates/realserver.yaml) and nothing else."""
    from helm_tools import CHART, ensure_tools
    from kubernetes import client

    helm = ensure_tools(Path(control_plane.kubectl).parent)["helm"]
    release, namespace = f"rs{uuid.uuid4().hex[:6]}", f"rs-sa-{uuid.uuid4().hex[:6]}"
    rendered = subprocess.run(
        [helm, "template", release, str(CHART), "--namespace", namespace, "--kube-version", "1.34.0",
         "--show-only", "templates/realserver.yaml"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    docs = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] != "DaemonSet"]
    assert sorted(d["kind"] for d in docs) == ["ClusterRole", "ClusterRoleBinding", "ServiceAccount"]
    client.CoreV1Api(api_client).create_namespace({"metadata": {"name": namespace}})
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    account = next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount")
    token = client.CoreV1Api(api_client).create_namespaced_service_account_token(
        account, namespace, {"spec": {"expirationSeconds": 3600}}
    )
    config = yaml.safe_load(Path(kubeconfig).read_text())
    for user in config["users"]:
        user["user"] = {"token": token.status.token}
    path = tmp_path / "realserver.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    yield str(path)
    kubectl("delete", "-f", "-", "--ignore-not-found", input=yaml.safe_dump_all(docs), check=False)
    client.CoreV1Api(api_client).delete_namespace(namespace)


@pytest.fixture
def agent(least_privilege: str, api_client: Any, tmp_path: Path) -> Iterator[tuple[Agent, str]]:
    from kubernetes import client

    node = f"rs-node-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(api_client)
    # A Node, so that the pod garbage collector keeps the pods bound to it.
    core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})
    running = Agent(least_privilege, node, tmp_path / "state", tmp_path / "agent.log")
    running.start()
    try:
        yield running, node
    finally:
        running.stop()
        core.delete_node(node)
        print(running.log.read_text(errors="replace")[-6000:])


def _pod(api_client: Any, namespace: str, name: str, node: str, ip: str) -> None:
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    core.create_namespaced_pod(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": "web"}},
            "spec": {
                "nodeName": node,
                "readinessGates": [{"conditionType": GATE}],
                "containers": [{"name": "web", "image": "example.invalid/web:1"}],
            },
        },
    )
    core.patch_namespaced_pod_status(
        name, namespace, {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}
    )


def _condition(api_client: Any, namespace: str, name: str) -> dict[str, Any] | None:
    from kubernetes import client

    pod = client.CoreV1Api(api_client).read_namespaced_pod(name, namespace)
    for condition in pod.status.conditions or []:
        if condition.type == GATE:
            return {"status": condition.status, "message": condition.message}
    return None


def test_the_agent_prepares_gates_restores_and_restarts_without_changes(
    agent: tuple[Agent, str], pod_netns: tuple[str, str], api_client: Any, namespace: str
) -> None:
    from kubernetes import client

    running, node = agent
    netns, pod_ip = pod_netns
    before = _state(netns)
    core, custom = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
    core.create_namespaced_service(
        namespace,
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
         "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}},
    )  # fmt: skip
    vs = {
        "apiVersion": "kubelvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": "web"},
        "spec": {"vip": "192.0.2.61", "ports": [{"port": 80}], "backends": {"serviceRef": {"name": "web"}}},
    }
    custom.create_namespaced_custom_object("kubelvs.io", "v1alpha1", namespace, "virtualservers", vs)
    _pod(api_client, namespace, "web-1", node, pod_ip)
    _pod(api_client, namespace, "web-2", node, "10.213.255.9")  # no namespace holds this IP

    ready = _poll("web-1's receiver-ready condition True", lambda: (c := _condition(api_client, namespace, "web-1"))
                  and c["status"] == "True" and c)  # fmt: skip
    assert "192.0.2.61/32" in _ip("-n", netns, "addr", "show", "dev", "lo")
    assert _sysctls(netns).split()[2::3] == ["1", "2"]  # arp_ignore, arp_announce
    assert f"{namespace}/web" in ready["message"]
    waiting = _poll("web-2's condition False", lambda: _condition(api_client, namespace, "web-2"))
    assert waiting["status"] == "False" and "10.213.255.9" in waiting["message"], waiting

    # A restart with everything in place: no change at all.
    _poll("a sync reported in the metrics", lambda: running.value('kubelvs_realserver_targets{state="prepared"}') == 1)
    running.stop()
    running.start()
    _poll("the restarted agent to sync", lambda: running.value('kubelvs_realserver_targets{state="prepared"}') == 1)
    assert running.value('kubelvs_realserver_changes_total{op="add"}') == 0
    assert running.value('kubelvs_realserver_changes_total{op="remove"}') == 0

    # The VirtualServer goes: the namespace is exactly as before, and the gate opens (nothing needed).
    custom.delete_namespaced_custom_object("kubelvs.io", "v1alpha1", namespace, "virtualservers", "web")
    _poll("the namespace restored", lambda: _state(netns) == before or None)
    _poll("web-2's condition True (no VirtualServer needs it any more)",
          lambda: (_condition(api_client, namespace, "web-2") or {}).get("status") == "True")  # fmt: skip


@pytest.mark.parametrize(
    ("verb", "resource"),
    [("patch", "pods"), ("update", "pods/status"), ("create", "pods"), ("delete", "pods"),
     ("patch", "virtualservers.kubelvs.io/status"), ("list", "secrets"), ("list", "endpointslices.discovery.k8s.io"),
     ("list", "nodes")],
)  # fmt: skip
def test_the_agent_may_do_nothing_else(least_privilege: str, kubectl: Any, verb: str, resource: str) -> None:
    resource, _, subresource = resource.partition("/")
    extra = ["--subresource", subresource] if subresource else []
    done = kubectl("--kubeconfig", least_privilege, "auth", "can-i", verb, resource, *extra, "--all-namespaces",
                   check=False)  # fmt: skip
    assert done.stdout.strip() == "no", (verb, resource, done.stdout, done.stderr)
