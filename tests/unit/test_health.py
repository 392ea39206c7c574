"""/metrics, /healthz and /readyz served by the director (a real HTTP server on loopback)."""

from __future__ import annotations

import urllib.error
import urllib.request

from kubelvs.core.desired import DesiredState
from kubelvs.core.model import Observed
from kubelvs.director.metrics import Metrics
from prometheus_client import CollectorRegistry


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_health_endpoints_report_the_checks_and_metrics_include_the_sync_gauge() -> None:
    state = {"ready": (False, "KernelUnavailable: no ip_vs")}
    metrics = Metrics(CollectorRegistry())
    server = metrics.serve(
        "127.0.0.1",
        0,
        alive=lambda: (True, "ok"),
        ready=lambda: state["ready"],
        desired=lambda: DesiredState(),
        dump=lambda: Observed(),
    )
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert get(base + "/healthz") == (200, "ok\n")
        assert get(base + "/readyz") == (503, "KernelUnavailable: no ip_vs\n")
        state["ready"] = (True, "ok")
        assert get(base + "/readyz")[0] == 200
        status, body = get(base + "/metrics")
        assert status == 200 and "kubelvs_last_successful_sync_timestamp_seconds" in body
        assert "kubelvs_sync_outcomes_total" in body
        assert get(base + "/other")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


def test_an_ipv6_address_is_served_too() -> None:
    # An IPv6 node's status.hostIP: a plain ThreadingHTTPServer is IPv4 only and would crash.
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        import pytest

        pytest.skip("no IPv6 loopback here")
    metrics = Metrics(CollectorRegistry())
    server = metrics.serve("::1", 0, lambda: (True, "ok"), lambda: (True, "ok"), lambda: None, lambda: Observed())
    try:
        assert get(f"http://[::1]:{server.server_address[1]}/healthz") == (200, "ok\n")
    finally:
        server.shutdown()
        server.server_close()
