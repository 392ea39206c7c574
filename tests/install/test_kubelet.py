"""The chart installed for real: containerd (Debian) + kubelet + kube-scheduler built from Go modules
as a node of the local control plane, the director image built daemonlessly and imported, then
``helm install``, ``upgrade`` and ``uninstall``. This host's kernel has no IPVS: the test proves the
install mechanics (security context, RBAC, probes, metrics, rolling update, clean removal) and that
the director says the kernel lacks IPVS; the data path is proven in the VM (tests/kernel).

Needs root and the Debian packages containerd, runc, buildah, mmdebstrap (hack/bootstrap.sh
installs them); everything built is cached under ~/.cache/kubelvs.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "api"))
from helm_tools import CHART, Helm, ensure_tools  # noqa: E402

NAMESPACE = "kubelvs-system"
# The director's capabilities as the kernel sees them: CAP_NET_ADMIN (12) and CAP_NET_RAW (13).
NET_ADMIN_AND_RAW = (1 << 12) | (1 << 13)

pytestmark = pytest.mark.api


def _load_node_module() -> Any:
    spec = importlib.util.spec_from_file_location("kubelvs_node", REPO / "hack" / "install" / "node" / "node.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


node_module = _load_node_module()


def poll(what: str, probe: Callable[[], Any], timeout: float = 300) -> Any:
    return node_module.poll(what, probe, timeout)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return 0, str(error)


@pytest.fixture(scope="module")
def node(control_plane, kubectl, tmp_path_factory) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("containerd", "ctr", "runc", "buildah", "mmdebstrap")):
        pytest.skip("needs root and containerd, runc, buildah, mmdebstrap (hack/bootstrap.sh --node)")
    subprocess.run(["bash", str(REPO / "hack" / "install" / "node" / "build.sh")], check=True)
    image = subprocess.run(
        ["bash", str(REPO / "hack" / "install" / "image.sh"), "test"], check=True, capture_output=True, text=True
    ).stdout.strip()
    pause = subprocess.run(
        ["bash", str(REPO / "hack" / "install" / "image.sh"), "--pause"], check=True, capture_output=True, text=True
    ).stdout.strip()
    node = node_module.Node(
        tmp_path_factory.mktemp("node"),
        Path(control_plane.kubectl).parent,
        Path(control_plane.kubeconfig),
        {"kubelvs.io/director": "true"},
    )
    try:
        node.start_containerd()
        node.import_image(Path(pause))
        node.import_image(Path(image))
        node.start_kubelet()
        poll("the node to register", lambda: kubectl("get", "node", node_module.NODE_NAME, check=False).returncode == 0)
        # No node-lifecycle controller here: nobody would lift the taint the kubelet registers with.
        kubectl("taint", "node", node_module.NODE_NAME, "node.kubernetes.io/not-ready:NoSchedule-", check=False)
        yield node
    finally:
        node.stop()
        kubectl("delete", "node", node_module.NODE_NAME, "--wait=false", check=False)
        for name in ("containerd", "kubelet", "kube-scheduler"):
            if node.log(name).exists():
                print(
                    f"--- {name} (last lines)\n"
                    + "\n".join(node.log(name).read_text(errors="replace").splitlines()[-15:])
                )


@pytest.fixture(scope="module")
def helm(control_plane, kubeconfig: str, tmp_path_factory) -> Helm:  # type: ignore[no-untyped-def]
    tools = ensure_tools(Path(control_plane.kubectl).parent)
    return Helm(tools["helm"], kubeconfig, tmp_path_factory.mktemp("helm-home"))


def director_pod(kubectl) -> dict[str, Any] | None:  # type: ignore[no-untyped-def]
    pods = kubectl.json("get", "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=director")["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    return live[0] if len(live) == 1 else None


def running(kubectl, not_uid: str = "") -> dict[str, Any] | None:  # type: ignore[no-untyped-def]
    pod = director_pod(kubectl)
    if pod is None or pod["metadata"]["uid"] == not_uid or pod["status"].get("phase") != "Running":
        return None
    statuses = pod["status"].get("containerStatuses") or []
    return pod if statuses and statuses[0].get("state", {}).get("running") else None


def container_status(node, pod: dict[str, Any]) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """/proc/<pid>/status of the director's process, as the kernel applies the security context."""
    container_id = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    tasks = node.ctr("tasks", "list").stdout.splitlines()[1:]  # TASK PID STATUS
    pids = {line.split()[0]: line.split()[1] for line in tasks if line.split()}
    status = Path(f"/proc/{pids[container_id]}/status").read_text()
    return dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)


def dashboard_and_alert_metrics() -> set[str]:
    """Series the dashboard and the alerts query, but for the kernel's counters (exported only for
    programmed services, which this node without IPVS has none of)."""
    from kubelvs.director.metrics import KERNEL_FAMILIES

    files = REPO / "charts" / "kubelvs" / "files"
    text = (files / "dashboard.json").read_text() + (files / "alerts.yaml").read_text()
    kernel = {name for name, _kind, _doc, _value in KERNEL_FAMILIES}
    return {name for name in re.findall(r"kubelvs_[a-z0-9_]+", text) if name not in kernel}


def exported_families(metrics: str) -> set[str]:
    names = set()
    for line in metrics.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {name, *(f"{name}{s}" for s in ("_bucket", "_count", "_sum") if kind == "histogram")}
    return names


def pod_log(node, pod: dict[str, Any]) -> str:  # type: ignore[no-untyped-def]
    # `kubectl logs` needs the node's name to resolve: read the kubelet's pod log directory.
    meta = pod["metadata"]
    directory = node.workdir / "kubelet" / "pod-logs" / f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
    return "\n".join(p.read_text(errors="replace") for p in sorted(directory.rglob("*.log")))


def test_install_upgrade_uninstall_under_a_real_kubelet(node, kubectl, helm, control_plane) -> None:  # type: ignore[no-untyped-def]
    api_port = str(control_plane.server).rsplit(":", 1)[1]
    started = time.monotonic()
    # As the README says: the namespace first (Helm keeps its record there), then the chart adopts it.
    kubectl("apply", "-f", str(REPO / "deploy" / "namespace.yaml"))
    helm(
        "install", "kubelvs", str(CHART), "-n", NAMESPACE,
        "--set", f"director.stateDir={node.workdir / 'state'}",  # not the host's /run/kubelvs
        "--set", "image.repository=localhost/kubelvs", "--set-string", "image.tag=test",
        "--set", "image.pullPolicy=Never", "--set", "realserver.enabled=false",
        # no kube-proxy on this node: the in-cluster Service address does not answer
        "--set", "director.apiServer.host=127.0.0.1", "--set", f"director.apiServer.port={api_port}",
    )  # fmt: skip
    pod = poll("the director pod Running", lambda: running(kubectl))
    print(f"director Running {time.monotonic() - started:.1f} s after helm install")

    # The chart's security context, as the kernel applies it to the process.
    status = container_status(node, pod)
    assert int(status["CapEff"], 16) == NET_ADMIN_AND_RAW, status["CapEff"]
    assert int(status["CapBnd"], 16) == NET_ADMIN_AND_RAW, status["CapBnd"]
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2", status
    assert status["Uid"].split()[0] == "0"
    spec = pod["spec"]["containers"][0]["securityContext"]
    assert spec["readOnlyRootFilesystem"] is True and pod["spec"]["hostNetwork"] is True

    # The ARP sysctls the election sets are writable where the chart mounts them, and only there
    # (the value written is the one read: nothing changes on this host).
    container_id = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    rewrite = 'v=$(cat {0}/ipv4/conf/lo/arp_ignore) && echo "$v" > {0}/ipv4/conf/lo/arp_ignore && echo written'
    for directory, writable in (("/host/proc/sys/net", True), ("/proc/sys/net", False)):
        result = node.ctr("tasks", "exec", "--exec-id", f"sysctl-{writable}", container_id, "sh", "-c",
                          rewrite.format(directory), check=False)  # fmt: skip
        assert ("written" in result.stdout) is writable, (directory, result.stdout, result.stderr)

    # Metrics and health on the node's address; no IPVS here: alive, not ready, and it says why.
    base = f"http://{node.address}:9344"
    code, metrics = poll("/metrics", lambda: (r := get(f"{base}/metrics"))[0] == 200 and r)
    assert "kubelvs_build_info" in metrics and "# TYPE kubelvs_vip_owner gauge" in metrics
    missing = dashboard_and_alert_metrics() - exported_families(metrics)
    assert not missing, f"the dashboard or the alerts query what the live director does not export: {missing}"
    assert get(f"{base}/healthz")[0] == 200
    # "listing the cluster" first (the informers' initial lists), then "first sync pending" until
    # the first attempt, then the reason that stays.
    transient = ("listing the cluster", "first sync pending")
    code, why = poll(
        "/readyz to answer", lambda: (r := get(f"{base}/readyz"))[0] and not any(t in r[1] for t in transient) and r
    )
    assert code == 503 and "KernelUnavailable" in why, (code, why)
    log = poll(
        "the director's log to name the missing IPVS", lambda: "KernelUnavailable" in (t := pod_log(node, pod)) and t
    )
    assert "forbidden" not in log.lower(), log[-3000:]
    pod = kubectl.json("get", "pod", pod["metadata"]["name"], "-n", NAMESPACE)
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0  # the liveness probe passes
    assert pod["status"]["containerStatuses"][0]["ready"] is False

    # The chart's own test: a pod on each director node gets 200 from /healthz.
    tested = helm("test", "kubelvs", "-n", NAMESPACE, "--timeout", "280s")
    assert "Phase:          Succeeded" in tested.stdout, tested.stdout

    # A rolling update: the pod is replaced with the new arguments.
    helm("upgrade", "kubelvs", str(CHART), "-n", NAMESPACE, "--reuse-values", "--set", "director.logLevel=DEBUG")
    new = poll("the updated pod Running", lambda: running(kubectl, not_uid=pod["metadata"]["uid"]))
    assert "--log-level=DEBUG" in new["spec"]["containers"][0]["args"]

    # Uninstall: the pods and every object of the release go; the CRD and the namespace stay.
    helm("uninstall", "kubelvs", "-n", NAMESPACE, "--wait", "--timeout", "280s")
    poll("the director pods to go", lambda: not kubectl.json("get", "pods", "-n", NAMESPACE)["items"])
    left = kubectl("get", "all,serviceaccounts,roles,rolebindings", "-n", NAMESPACE, "-o", "name").stdout.split()
    assert [name for name in left if "kubelvs" in name] == [], left
    assert not kubectl("get", "clusterroles,clusterrolebindings", "-o", "name").stdout.count("kubelvs-director")
    assert kubectl("get", "crd", "virtualservers.kubelvs.io", check=False).returncode == 0
    kubectl("delete", "namespace", NAMESPACE, "--wait=false")
    print(f"install, upgrade and uninstall took {time.monotonic() - started:.1f} s")
