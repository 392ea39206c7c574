"""The kernel's counters on /metrics: written as they are formatted, byte for byte what
prometheus_client renders for the same families, and served over HTTP with the registry's."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st
from kubelvs.core.desired import DesiredState
from kubelvs.core.model import Counters, DestCounters, Destination, Observed, ServiceKey, VirtualService
from kubelvs.core.spec import ObjectRef
from kubelvs.director.metrics import BACKEND_FAMILIES, SERVICE_FAMILIES, KernelCounters, Metrics
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

COUNTS = st.integers(min_value=0, max_value=2**64 - 1)  # the kernel's counters are u64
NAMES = st.text(alphabet='ab-."\\\n', min_size=1, max_size=6)  # what needs escaping, too


@st.composite
def tables(draw: st.DrawFn) -> tuple[DesiredState, Observed]:
    desired, observed = DesiredState(), Observed()
    for i in range(draw(st.integers(0, 4))):
        key = ServiceKey(2, draw(st.sampled_from([6, 17, 132, 99])), f"10.0.0.{i}", draw(st.integers(1, 65535)))
        dests = tuple(
            Destination(f"10.1.0.{n}", 8080, weight=draw(st.integers(0, 65535))) for n in range(draw(st.integers(0, 3)))
        )
        service = VirtualService(key, destinations=dests)
        if draw(st.booleans()):  # else desired but not (yet) in the kernel: no series
            observed.services[key] = service
            observed.service_counters[key] = Counters(*(draw(COUNTS) for _ in range(5)))
            for dest in dests[: draw(st.integers(0, len(dests)))]:
                observed.dest_counters[(key, dest.key)] = DestCounters(
                    Counters(*(draw(COUNTS) for _ in range(5))), draw(COUNTS), draw(COUNTS)
                )
        desired.services[key] = service
        desired.origins[key] = ObjectRef(draw(NAMES), draw(NAMES))
    return desired, observed


class Reference(Collector):
    """The same families built with prometheus_client's own classes (its rendering is the reference)."""

    def __init__(self, desired: DesiredState, observed: Observed, backends: bool) -> None:
        self.desired, self.observed, self.backends = desired, observed, backends

    def collect(self):  # type: ignore[no-untyped-def]
        def family(name: str, kind: str, doc: str, labels: list[str]) -> CounterMetricFamily | GaugeMetricFamily:
            if kind == "counter":
                return CounterMetricFamily(name.removesuffix("_total"), doc, labels=labels)
            return GaugeMetricFamily(name, doc, labels=labels)

        service_labels = ["namespace", "name", "vip", "port", "protocol"]
        services = [family(n, k, d, service_labels) for n, k, d, _ in SERVICE_FAMILIES]
        backends = [family(n, k, d, [*service_labels, "backend"]) for n, k, d, _ in BACKEND_FAMILIES]
        for key, origin in self.desired.origins.items():
            service = self.observed.services.get(key)
            counters = self.observed.service_counters.get(key)
            if service is None or counters is None:
                continue
            protocol = {6: "TCP", 17: "UDP", 132: "SCTP"}.get(key.protocol, str(key.protocol))
            labels = [origin.namespace, origin.name, key.address, str(key.port), protocol]
            for metric, (_, _, _, value) in zip(services, SERVICE_FAMILIES, strict=True):
                metric.add_metric(labels, value(counters))
            for dest in service.destinations if self.backends else ():
                d = self.observed.dest_counters.get((key, dest.key))
                if d is not None:
                    for metric, (_, _, _, value) in zip(backends, BACKEND_FAMILIES, strict=True):
                        metric.add_metric([*labels, str(dest.key)], value((d, dest.weight)))
        yield from (metric for metric in [*services, *backends] if metric.samples)


def rendered(write: Callable[[Callable[[bytes], object]], None]) -> bytes:
    chunks: list[bytes] = []
    write(chunks.append)
    return b"".join(chunks)


@given(tables(), st.booleans())
def test_the_kernel_counters_are_what_prometheus_client_renders(
    table: tuple[DesiredState, Observed], backends: bool
) -> None:
    desired, observed = table
    registry = CollectorRegistry()
    registry.register(Reference(desired, observed, backends))
    ours = rendered(KernelCounters(lambda: desired, lambda: observed, backends).write)
    assert ours == generate_latest(registry)


def test_a_large_table_is_written_in_chunks() -> None:
    desired, observed = DesiredState(), Observed()
    for i in range(300):
        key = ServiceKey(2, 6, f"10.0.{i // 256}.{i % 256}", 80)
        dests = tuple(Destination(f"10.1.0.{n}", 8080) for n in range(4))
        desired.services[key] = observed.services[key] = VirtualService(key, destinations=dests)
        desired.origins[key] = ObjectRef("web", f"vs-{i}")
        observed.service_counters[key] = Counters(1)
        for dest in dests:
            observed.dest_counters[(key, dest.key)] = DestCounters(Counters(1))
    chunks: list[bytes] = []
    KernelCounters(lambda: desired, lambda: observed).write(chunks.append)
    assert len(chunks) > 1 and b"".join(chunks).count(b"\nkubelvs_backend_weight{") == 1200


def test_metrics_over_http_hold_the_registry_and_the_kernel_counters() -> None:
    key = ServiceKey(2, 6, "10.0.0.1", 80)
    dest = Destination("10.1.0.1", 8080, weight=3)
    desired, observed = DesiredState(), Observed()
    desired.services[key] = observed.services[key] = VirtualService(key, destinations=(dest,))
    desired.origins[key] = ObjectRef("web", "front")
    observed.service_counters[key] = Counters(7)
    observed.dest_counters[(key, dest.key)] = DestCounters(Counters(7), active_connections=2)
    for backends in (True, False):
        server = Metrics(CollectorRegistry()).serve(
            "127.0.0.1", 0, lambda: (True, "ok"), lambda: (True, "ok"), lambda: desired, lambda: observed, backends
        )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/metrics", timeout=5) as r:
                body = r.read().decode()
        finally:
            server.shutdown()
            server.server_close()
        assert "kubelvs_last_successful_sync_timestamp_seconds" in body
        service = 'name="front",namespace="web",port="80",protocol="TCP",vip="10.0.0.1"'
        assert f"kubelvs_service_connections_total{{{service}}} 7.0" in body
        assert ('kubelvs_backend_weight{backend="10.1.0.1:8080",' in body) is backends
