"""The director on a node whose kernel has no IPVS (this host's: built without CONFIG_IP_VS),
against the real API server: it must say so, not run silently.

It once ran `1/1 Running` under a real kubelet, logged nothing, wrote no status and did nothing:
the exception was raised inside a background task and never seen.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _poll(what: str, probe: Callable[[], Any], timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last seen: {last!r}")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return 0, str(error)


@pytest.fixture
def director(kubeconfig: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    if Path("/proc/net/ip_vs").exists():
        pytest.skip("this kernel has IPVS: the test needs one without")
    port = _free_port()
    log = tmp_path / "director.log"
    env = {**os.environ, "KUBECONFIG": kubeconfig, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubelvs.cli", "director", "--node-name", "no-ipvs-node",
             "--state-dir", str(tmp_path / "state"), "--metrics-port", str(port), "--metrics-address", "127.0.0.1"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        print(log.read_text(errors="replace")[-4000:])


def test_a_node_without_ipvs_is_reported_on_status_health_and_log(director, api_client, namespace) -> None:  # type: ignore[no-untyped-def]
    from kubernetes import client

    url, log = director
    custom = client.CustomObjectsApi(api_client)
    custom.create_namespaced_custom_object(
        "kubelvs.io", "v1alpha1", namespace, "virtualservers",
        {
            "apiVersion": "kubelvs.io/v1alpha1", "kind": "VirtualServer", "metadata": {"name": "web"},
            "spec": {"vip": "192.0.2.50", "ports": [{"port": 80}], "backends": {"addresses": [{"ip": "10.9.0.1"}]}},
        },
    )  # fmt: skip

    def entry() -> dict[str, Any] | None:
        vs = custom.get_namespaced_custom_object("kubelvs.io", "v1alpha1", namespace, "virtualservers", "web")
        status = vs.get("status") or {}
        found = [e for e in status.get("directors") or [] if e.get("node") == "no-ipvs-node"]
        programmed = [c for c in status.get("conditions") or [] if c.get("type") == "Programmed"]
        return {"entry": found[0], "programmed": programmed[0]} if found and programmed else None

    seen = _poll("a status entry from the director", entry)
    assert seen["entry"]["programmed"] is False and seen["entry"]["reason"] == "KernelUnavailable", seen
    assert (seen["programmed"]["status"], seen["programmed"]["reason"]) == ("False", "KernelUnavailable"), seen
    status, body = _poll("/readyz to answer", lambda: (r := _get(url + "/readyz"))[0] and r)
    assert status == 503 and "KernelUnavailable" in body, (status, body)
    assert _get(url + "/healthz")[0] == 200  # alive: restarting would not load ip_vs
    metrics = _get(url + "/metrics")[1]
    assert 'kubelvs_sync_outcomes_total{reason="KernelUnavailable",verdict="give_up"}' in metrics
    assert "KernelUnavailable" in log.read_text(errors="replace")
