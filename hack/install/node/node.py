"""A real node of the local control plane on this host: containerd (Debian) + kubelet +
kube-scheduler, for the install test (tests/install/test_kubelet.py). Settings that work in this
sandbox (../shared/TESTBED.md §7):

- containerd 1.6 with its own root, state and socket; ``restrict_oom_score_adj`` (lowering
  oom_score_adj is refused here); the sandbox image is ``localhost/kubelvs-pause:1`` (no registry);
- kubelet: cgroupfs without per-QoS cgroups or node allocatable enforcement, cgroup v1 allowed,
  swap allowed, webhook authentication/authorization off, the admin kubeconfig, ``--node-ip`` a
  non-loopback address of the host; no CNI (the pods under test use the host network);
- kube-scheduler without leader election; the ``not-ready`` taint the kubelet registers with is
  removed (the control plane runs no node-lifecycle controller).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

NODE_NAME = "kubelvs-node"
NAMESPACE = "k8s.io"  # containerd's namespace for Kubernetes
PAUSE_IMAGE = "localhost/kubelvs-pause:1"


def host_address() -> str:
    """A non-loopback IPv4 address of this host (the kubelet's --node-ip): the default route's source."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: UDP connect only picks the route
        return str(probe.getsockname()[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(what: str, probe: Callable[[], Any], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}; last seen: {last!r}")


class Node:
    def __init__(self, workdir: Path, bin_dir: Path, kubeconfig: Path, labels: dict[str, str]) -> None:
        self.workdir = workdir
        self.bin_dir = bin_dir
        self.kubeconfig = kubeconfig
        self.labels = labels
        self.address = host_address()
        self.socket = workdir / "containerd" / "containerd.sock"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def log(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def _start(self, name: str, command: list[str]) -> None:
        self.log(name).parent.mkdir(parents=True, exist_ok=True)
        with self.log(name).open("ab") as out:
            self.processes[name] = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", "--address", str(self.socket), "--namespace", NAMESPACE, *args],
            capture_output=True, text=True, check=check, timeout=300,
        )  # fmt: skip

    def start_containerd(self) -> None:
        root = self.workdir / "containerd"
        root.mkdir(parents=True, exist_ok=True)
        config = root / "config.toml"
        config.write_text(
            f"""version = 2
root = "{root / "root"}"
state = "{root / "state"}"
[grpc]
  address = "{self.socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = "{root / "cni"}"
"""
        )
        self._start("containerd", ["containerd", "--config", str(config)])
        poll("containerd's socket", lambda: self.ctr("version", check=False).returncode == 0, timeout=120)

    def import_image(self, archive: Path) -> None:
        self.ctr("images", "import", "--all-platforms", str(archive))

    def start_kubelet(self) -> None:
        root = self.workdir / "kubelet"
        root.mkdir(parents=True, exist_ok=True)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "failCgroupV1": False,
            "failSwapOn": False,
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "address": self.address,
            "port": free_port(),
            "readOnlyPort": 0,
            "healthzPort": 0,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "resolvConf": "/etc/resolv.conf",
            "podLogsDir": str(root / "pod-logs"),
            "evictionHard": {},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "syncFrequency": "5s",
            "fileCheckFrequency": "5s",
            "nodeStatusUpdateFrequency": "5s",
        }
        (root / "config.yaml").write_text(json.dumps(config))
        labels = ",".join(f"{k}={v}" for k, v in self.labels.items())
        self._start(
            "kubelet",
            [str(self.bin_dir / "kubelet"), f"--config={root / 'config.yaml'}", f"--kubeconfig={self.kubeconfig}",
             f"--root-dir={root / 'root'}", f"--cert-dir={root / 'pki'}", f"--node-ip={self.address}",
             f"--hostname-override={NODE_NAME}", f"--node-labels={labels}", "--v=1"],
        )  # fmt: skip
        self._start(
            "kube-scheduler",
            [str(self.bin_dir / "kube-scheduler"), f"--kubeconfig={self.kubeconfig}",
             f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
             "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={free_port()}"],
        )  # fmt: skip

    def running(self) -> dict[str, int | None]:
        return {name: process.poll() for name, process in self.processes.items()}

    def stop(self) -> None:
        """Stops the kubelet and the scheduler, kills what containerd still runs, then containerd."""
        for name in ("kube-scheduler", "kubelet"):
            self._terminate(name)
        if "containerd" in self.processes:
            listed = self.ctr("tasks", "list", "--quiet", check=False).stdout.split()
            for task in listed:
                self.ctr("tasks", "kill", "--signal", "SIGKILL", task, check=False)
            for task in listed:
                with contextlib.suppress(TimeoutError):
                    poll(
                        f"task {task} to stop",
                        lambda t=task: self.ctr("tasks", "delete", t, check=False).returncode == 0,
                        20,
                    )
            for container in self.ctr("containers", "list", "--quiet", check=False).stdout.split():
                self.ctr("containers", "delete", container, check=False)
            self._terminate("containerd")
        # What the runtime mounted under the work directory (rootfs, shm) must go before it can be removed.
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(str(self.workdir))), reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)

    def _terminate(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
