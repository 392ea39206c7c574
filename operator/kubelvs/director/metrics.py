"""The director's Prometheus metrics (``/metrics``).

Kernel counters are read when scraped (one dump of the owned services), labelled by the
VirtualServer and the real server: bounded by the configuration, never per connection.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kubelvs import __version__
from kubelvs.apply import SyncReport
from kubelvs.core.model import Protocol

if TYPE_CHECKING:
    from kubelvs.director.agent import Director

log = logging.getLogger("kubelvs.director.metrics")

SERVICE_LABELS = ["namespace", "name", "vip", "port", "protocol"]
BACKEND_LABELS = [*SERVICE_LABELS, "backend"]


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
        Info("kubelvs_build", "The kubelvs version.", registry=registry).info({"version": __version__})

    def watch_restarted(self, resource: str, reason: str) -> None:
        self.watch_restarts.labels(resource, reason).inc()

    def observe_sync(self, kind: str, seconds: float, report: SyncReport) -> None:
        self.sync_duration.labels(kind).observe(seconds)
        for op in report.result.succeeded:
            self.operations.labels(op.verb.value, "success").inc()
        for failure in report.result.failed:
            self.operations.labels(failure.operation.verb.value, "error").inc()

    def serve(self, port: int, director: Director) -> None:
        self.registry.register(KernelCollector(director))
        start_http_server(port, registry=self.registry)


class KernelCollector(Collector):
    """Per virtual service and real server counters, read from the kernel at scrape time."""

    def __init__(self, director: Director) -> None:
        self.director = director
        self.client: Any = None

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        from kubelvs.kernel.ipvs import IPVSClient

        families: dict[str, Any] = {}

        def family(name: str, doc: str, labels: list[str], gauge: bool = False) -> Any:
            if name not in families:
                cls = GaugeMetricFamily if gauge else CounterMetricFamily
                families[name] = cls(name, doc, labels=labels)
            return families[name]

        desired = self.director.desired
        if desired is None:
            return
        try:
            if self.client is None:
                self.client = IPVSClient(netns=self.director.config.netns)
            observed = self.client.dump(with_counters=True)
        except OSError:
            log.warning("kernel counters not read", exc_info=True)
            self.client = None
            return
        for key, origin in desired.origins.items():
            service = observed.services.get(key)
            counters = observed.service_counters.get(key)
            if service is None or counters is None or key not in desired.services:
                continue
            labels = [origin.namespace, origin.name, key.address, str(key.port), Protocol(key.protocol).name]
            for name, doc, value in (
                ("kubelvs_service_connections", "Connections scheduled by the virtual service.", counters.connections),
                ("kubelvs_service_packets_in", "Packets in, client to real server.", counters.packets_in),
                ("kubelvs_service_packets_out", "Packets out, real server to client (NAT only).", counters.packets_out),
                ("kubelvs_service_bytes_in", "Bytes in, client to real server.", counters.bytes_in),
                ("kubelvs_service_bytes_out", "Bytes out, real server to client (NAT only).", counters.bytes_out),
            ):
                family(name, doc, SERVICE_LABELS).add_metric(labels, value)
            for dest in service.destinations:
                d = observed.dest_counters.get((key, dest.key))
                if d is None:
                    continue
                backend = [*labels, str(dest.key)]
                for name, doc, value in (
                    (
                        "kubelvs_backend_connections",
                        "Connections scheduled to the real server.",
                        d.counters.connections,
                    ),
                    ("kubelvs_backend_packets_in", "Packets in to the real server.", d.counters.packets_in),
                    ("kubelvs_backend_packets_out", "Packets out from the real server.", d.counters.packets_out),
                    ("kubelvs_backend_bytes_in", "Bytes in to the real server.", d.counters.bytes_in),
                    ("kubelvs_backend_bytes_out", "Bytes out from the real server.", d.counters.bytes_out),
                ):
                    family(name, doc, BACKEND_LABELS).add_metric(backend, value)
                family(
                    "kubelvs_backend_active_connections", "Established connections now.", BACKEND_LABELS, gauge=True
                ).add_metric(backend, d.active_connections)
                family(
                    "kubelvs_backend_inactive_connections",
                    "Other connections now (e.g. TIME_WAIT).",
                    BACKEND_LABELS,
                    gauge=True,
                ).add_metric(backend, d.inactive_connections)
                family(
                    "kubelvs_backend_weight", "The real server's weight (0: draining).", BACKEND_LABELS, gauge=True
                ).add_metric(backend, dest.weight)
        yield from families.values()
