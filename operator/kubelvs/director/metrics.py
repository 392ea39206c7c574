"""The director's Prometheus metrics (``/metrics``) and health endpoints (``/healthz``, ``/readyz``).

Kernel counters are read when scraped (one dump of the kernel, reported for the services the
desired state has), labelled by the VirtualServer and the real server: bounded by the
configuration, never per connection.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.utils import floatToGoString

from kubelvs import __version__
from kubelvs.apply import SyncReport
from kubelvs.core.desired import DesiredState
from kubelvs.core.model import Counters, DestCounters, Observed, Protocol

Check = Callable[[], tuple[bool, str]]

log = logging.getLogger("kubelvs.director.metrics")


class Metrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.sync_duration = Histogram(
            "kubelvs_sync_duration_seconds",
            "Time to compute and apply one sync (incremental after events, or a full resync).",
            ["kind"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        self.operations = Counter(
            "kubelvs_operations_total",
            "IPVS operations applied, by verb and result.",
            ["verb", "result"],
            registry=registry,
        )
        self.api_errors = Counter(
            "kubelvs_api_errors_total", "Kubernetes API requests of the director that failed.", registry=registry
        )
        self.watch_restarts = Counter(
            "kubelvs_watch_restarts_total",
            "Watches of the API server that were started again, by resource and reason: timeout (the "
            "server closed it, routine), expired (resourceVersion too old: listed again), error.",
            ["resource", "reason"],
            registry=registry,
        )
        self.sync_outcomes = Counter(
            "kubelvs_sync_outcomes_total",
            "Sync attempts by verdict (ok, retry, give_up) and reason (e.g. KernelUnavailable).",
            ["verdict", "reason"],
            registry=registry,
        )
        self.last_successful_sync = Gauge(
            "kubelvs_last_successful_sync_timestamp_seconds",
            "When the kernel was last brought to the desired state (Unix time); /readyz checks its age.",
            registry=registry,
        )
        # The election (one owner per VIP): what a user reads to tell who owns a VIP and why it moved.
        self.vip_owner = Gauge(
            "kubelvs_vip_owner",
            "1 on the director that owns and announces the VIP, else 0.",
            ["vip"],
            registry=registry,
        )
        self.vip_transitions = Counter(
            "kubelvs_vip_transitions_total",
            "Ownership changes this director wrote, by VIP and reason (OwnerSilent, Unclaimed, Released, Rebalance, "
            "NotSelected, InterfaceDown, NoReadyBackends, ProgrammingFailed, ...).",
            ["vip", "reason"],
            registry=registry,
        )
        self.vip_failover = Histogram(
            "kubelvs_vip_failover_seconds",
            "From the previous owner's last heartbeat renewal (as this director saw it) to this director's first "
            "announcement of the VIP.",
            buckets=(0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5, 7.5, 10, 15, 30),
            registry=registry,
        )
        self.announcements = Counter(
            "kubelvs_announcements_total", "Gratuitous ARP and unsolicited NA frames sent.", registry=registry
        )
        self.vip_conflicts = Counter(
            "kubelvs_vip_conflicts_total",
            "Another MAC answered or announced a VIP this director owns or was about to claim.",
            ["vip"],
            registry=registry,
        )
        self.election_writes = Counter(
            "kubelvs_election_api_writes_total",
            "API writes the election made: heartbeat renewals, unfit reports and claim changes.",
            ["kind"],
            registry=registry,
        )
        self.heartbeat_renewal = Histogram(
            "kubelvs_heartbeat_renewal_seconds",
            "From sending a heartbeat renewal to its answer being seen by the election. An owner keeps its VIPs "
            "only while two of these, one after the other, fit within the renew deadline.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2.5, 5),
            registry=registry,
        )
        self.lease_watch_lag = Histogram(
            "kubelvs_lease_watch_lag_seconds",
            "From another director's heartbeat renewal (its spec.renewTime, its clock) to this director seeing "
            "it. A director is judged silent a lease duration after its last renewal seen: a watch this far "
            "behind delays takeovers as long (and includes the skew between the two nodes' clocks).",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=registry,
        )
        self.event_loop_lag = Histogram(
            "kubelvs_event_loop_lag_seconds",
            "How late a 100 ms timer on the event loop fires. Heartbeat answers, the fence and claims wait as "
            "long; stalls over --stall-report-seconds are logged with where the loop was.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        # Connection sync: 0 for a direction means connections are lost when VIPs move that way.
        self.sync_daemons = Gauge(
            "kubelvs_sync_daemons",
            "1 while the kernel's IPVS sync daemon of that direction (master: sends, backup: receives) runs as "
            "configured, else 0.",
            ["state"],
            registry=registry,
        )
        Info("kubelvs_build", "The kubelvs version.", registry=registry).info({"version": __version__})

    def watch_restarted(self, resource: str, reason: str) -> None:
        self.watch_restarts.labels(resource, reason).inc()

    def observe_sync(self, kind: str, seconds: float, report: SyncReport) -> None:
        self.sync_duration.labels(kind).observe(seconds)
        for op in report.result.succeeded:
            self.operations.labels(op.verb.value, "success").inc()
        for failure in report.result.failed:
            self.operations.labels(failure.operation.verb.value, "error").inc()

    def serve(
        self,
        address: str,
        port: int,
        alive: Check,
        ready: Check,
        desired: Callable[[], DesiredState | None],
        dump: Callable[[], Observed],
        backends: bool = True,
    ) -> ThreadingHTTPServer:
        """Serve /metrics, /healthz (liveness) and /readyz (readiness) on ``address:port``."""
        kernel = KernelCounters(desired, dump, backends)
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):  # HTTP/1.0: the end of a response is the connection's
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":  # no Content-Length: the kernel's part is written as it is made
                    self.send_response(200)
                    self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                    self.end_headers()
                    self.wfile.write(generate_latest(registry))
                    kernel.write(self.wfile.write)
                    return
                if path in ("/healthz", "/readyz"):
                    ok, why = (alive if path == "/healthz" else ready)()
                    body, status, kind = f"{why}\n".encode(), 200 if ok else 503, "text/plain; charset=utf-8"
                else:
                    body, status, kind = b"not found\n", 404, "text/plain; charset=utf-8"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: no log line each
                pass

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in address else socket.AF_INET  # an IPv6 node's hostIP

        server = Server((address, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        return server


def _escape(value: str) -> str:
    """A label value as the text format quotes it (what prometheus_client does)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


Row = Callable[[Any], int]
# The kernel's families, in the order written: (name as exposed, type, help, value read from a
# service's Counters or a real server's (DestCounters, weight)).
SERVICE_FAMILIES: tuple[tuple[str, str, str, Row], ...] = (
    ("kubelvs_service_connections_total", "counter", "Connections scheduled by the virtual service.",
     lambda c: c.connections),
    ("kubelvs_service_packets_in_total", "counter", "Packets in, client to real server.", lambda c: c.packets_in),
    ("kubelvs_service_packets_out_total", "counter", "Packets out, real server to client (NAT only).",
     lambda c: c.packets_out),
    ("kubelvs_service_bytes_in_total", "counter", "Bytes in, client to real server.", lambda c: c.bytes_in),
    ("kubelvs_service_bytes_out_total", "counter", "Bytes out, real server to client (NAT only).",
     lambda c: c.bytes_out),
)  # fmt: skip
BACKEND_FAMILIES: tuple[tuple[str, str, str, Row], ...] = (
    ("kubelvs_backend_connections_total", "counter", "Connections scheduled to the real server.",
     lambda r: r[0].counters.connections),
    ("kubelvs_backend_packets_in_total", "counter", "Packets in to the real server.",
     lambda r: r[0].counters.packets_in),
    ("kubelvs_backend_packets_out_total", "counter", "Packets out from the real server.",
     lambda r: r[0].counters.packets_out),
    ("kubelvs_backend_bytes_in_total", "counter", "Bytes in to the real server.", lambda r: r[0].counters.bytes_in),
    ("kubelvs_backend_bytes_out_total", "counter", "Bytes out from the real server.",
     lambda r: r[0].counters.bytes_out),
    ("kubelvs_backend_active_connections", "gauge", "Established connections now.",
     lambda r: r[0].active_connections),
    ("kubelvs_backend_inactive_connections", "gauge", "Other connections now (e.g. TIME_WAIT).",
     lambda r: r[0].inactive_connections),
    ("kubelvs_backend_weight", "gauge", "The real server's weight (0: draining).", lambda r: r[1]),
)  # fmt: skip
KERNEL_FAMILIES = SERVICE_FAMILIES + BACKEND_FAMILIES
CHUNK_LINES = 2000


class KernelCounters:
    """Per virtual service and real server counters, read from the kernel at scrape time and
    written out in the text format as they are formatted.

    Not a prometheus_client collector: that holds a sample object (with a dict of its labels) for
    every series until the whole page is built. At 1,000 VirtualServers with 4 real servers each
    (37,000 series) a scrape took 0.7 s and 32 MB more RSS natively; at 10,000, more memory
    than the chart's limit. The text is the same, byte for byte: a unit test renders both.
    ``backends=False`` writes the services' families only (5 series per virtual service instead
    of 5 + 8 per real server), for clusters where that many series is too many.
    """

    def __init__(
        self, desired: Callable[[], DesiredState | None], dump: Callable[[], Observed], backends: bool = True
    ) -> None:
        self.desired = desired
        self.dump = dump
        self.backends = backends

    def write(self, out: Callable[[bytes], object]) -> None:
        desired = self.desired()
        if desired is None:
            return
        try:
            observed = self.dump()
        except OSError:
            log.warning("kernel counters not read", exc_info=True)
            return
        services: list[tuple[str, Counters]] = []
        real_servers: list[tuple[str, tuple[DestCounters, int]]] = []
        for key, origin in desired.origins.items():
            service = observed.services.get(key)
            counters = observed.service_counters.get(key)
            if service is None or counters is None or key not in desired.services:
                continue
            protocol = Protocol(key.protocol).name if key.protocol in Protocol._value2member_map_ else str(key.protocol)
            labels = (
                f'name="{_escape(origin.name)}",namespace="{_escape(origin.namespace)}",'
                f'port="{key.port}",protocol="{_escape(protocol)}",vip="{_escape(key.address)}"'
            )
            services.append((labels, counters))
            if not self.backends:
                continue
            for dest in service.destinations:
                d = observed.dest_counters.get((key, dest.key))
                if d is not None:
                    real_servers.append((f'backend="{_escape(str(dest.key))}",{labels}', (d, dest.weight)))
        lines: list[str] = []
        for families, rows in ((SERVICE_FAMILIES, services), (BACKEND_FAMILIES, real_servers)):
            if not rows:
                continue  # no family without a series
            for name, kind, doc, value in families:
                lines.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
                for labels, row in rows:
                    lines.append(f"{name}{{{labels}}} {floatToGoString(value(row))}\n")
                    if len(lines) >= CHUNK_LINES:
                        out("".join(lines).encode())
                        lines.clear()
        if lines:
            out("".join(lines).encode())
