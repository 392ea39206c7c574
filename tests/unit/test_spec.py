"""From VirtualServers, Services and EndpointSlices to desired IPVS state."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kubelvs.core.cluster import Cluster
from kubelvs.core.desired import desired_state
from kubelvs.core.model import AF_INET, AF_INET6, Method, ServiceKey
from kubelvs.core.spec import ObjectRef, parse_virtual_server


def vs(name: str = "web", created: str = "2026-01-01T00:00:00Z", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "vip": "192.0.2.10",
        "ports": [{"name": "http", "port": 80}],
        "scheduler": "rr",
        "backends": {"serviceRef": {"name": "web"}},
    }
    base.update(spec)
    return {
        "apiVersion": "kubelvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": name, "namespace": "ns", "creationTimestamp": created, "generation": 3},
        "spec": base,
    }


def service(name: str = "web", ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {"ports": ports or [{"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP"}]},
    }


def endpoint(
    ip: str,
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    node: str | None = None,
) -> dict[str, Any]:
    conditions = {
        k: v for k, v in {"ready": ready, "serving": serving, "terminating": terminating}.items() if v is not None
    }
    result: dict[str, Any] = {"addresses": [ip], "conditions": conditions}
    if node:
        result["nodeName"] = node
    return result


def eps(
    name: str, *endpoints: dict[str, Any], port: int = 80, service_name: str = "web", family: str = "IPv4"
) -> dict[str, Any]:
    return {
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "ns", "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": family,
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": list(endpoints),
    }


KEY = ServiceKey(AF_INET, 6, "192.0.2.10", 80)


def test_ready_endpoints_become_real_servers() -> None:
    cluster = Cluster.build([service()], [eps("a", endpoint("10.0.0.1"), endpoint("10.0.0.2", ready=None))])
    state = desired_state([vs()], cluster)
    svc = state.services[KEY]
    assert svc.scheduler == "rr"
    assert [(d.address, d.port, d.weight, d.method) for d in svc.destinations] == [
        ("10.0.0.1", 80, 1, Method.DR),
        ("10.0.0.2", 80, 1, Method.DR),
    ]
    resolution = state.resolutions[ObjectRef("ns", "web")]
    assert (resolution.ready_backends, resolution.draining_backends, resolution.generation) == (2, 0, 3)
    assert state.vips == {"192.0.2.10": AF_INET}


def test_not_ready_left_out_and_terminating_serving_drains() -> None:
    cluster = Cluster.build(
        [service()],
        [
            eps(
                "a",
                endpoint("10.0.0.1"),
                endpoint("10.0.0.2", ready=False),
                endpoint("10.0.0.3", ready=False, serving=True, terminating=True),
                endpoint("10.0.0.4", ready=False, serving=False, terminating=True),
            ),
            eps("b", endpoint("10.0.0.3", ready=False, serving=True, terminating=True)),  # duplicate in 2 slices
        ],
    )
    state = desired_state([vs()], cluster)
    assert [(d.address, d.weight) for d in state.services[KEY].destinations] == [("10.0.0.1", 1), ("10.0.0.3", 0)]
    resolution = state.resolutions[ObjectRef("ns", "web")]
    assert (resolution.ready_backends, resolution.draining_backends) == (1, 1)


def test_missing_service_is_a_backend_problem_not_an_error() -> None:
    state = desired_state([vs()], Cluster())
    resolution = state.resolutions[ObjectRef("ns", "web")]
    assert resolution.accepted
    assert resolution.problem is not None and resolution.problem.reason == "ServiceNotFound"
    assert state.services[KEY].destinations == ()


def test_one_bad_virtual_server_does_not_stop_the_others() -> None:
    bad = vs("bad", vip="not-an-ip")
    good = vs("good", vip="192.0.2.11", backends={"addresses": [{"ip": "10.0.0.9"}]})
    state = desired_state([bad, good])
    [error] = state.errors
    assert error.ref == ObjectRef("ns", "bad") and error.path == "spec.vip"
    assert "VirtualServer ns/bad: spec.vip" in str(error)
    assert ServiceKey(AF_INET, 6, "192.0.2.11", 80) in state.services


def test_vip_conflict_older_wins() -> None:
    older = vs("older", created="2026-01-01T00:00:00Z", backends={"addresses": [{"ip": "10.0.0.1"}]})
    newer = vs("newer", created="2026-02-01T00:00:00Z", backends={"addresses": [{"ip": "10.0.0.2"}]})
    state = desired_state([newer, older])
    assert state.origins[KEY] == ObjectRef("ns", "older")
    assert state.resolutions[ObjectRef("ns", "newer")].error.reason == "VIPConflict"  # type: ignore[union-attr]
    assert [d.address for d in state.services[KEY].destinations] == ["10.0.0.1"]


def test_nat_remaps_target_port_and_dr_refuses_it() -> None:
    nat = vs(
        forwarding={"method": "NAT"},
        ports=[{"port": 53, "protocol": "UDP", "targetPort": 5353}],
        backends={"addresses": [{"ip": "10.0.0.1"}]},
    )
    [svc] = desired_state([nat]).services.values()
    assert (svc.key.protocol, svc.destinations[0].port, svc.destinations[0].method) == (17, 5353, Method.NAT)

    dr = vs(ports=[{"port": 80, "targetPort": 8080}])
    with pytest.raises(ValueError, match=r"spec.ports\[0\].targetPort"):
        parse_virtual_server(dr)


def test_dr_with_service_on_another_port_is_refused_with_the_field() -> None:
    cluster = Cluster.build(
        [service(ports=[{"name": "http", "port": 80, "targetPort": 8080}])], [eps("a", endpoint("10.0.0.1"), port=8080)]
    )
    state = desired_state([vs()], cluster)
    [error] = state.errors
    assert error.reason == "PortMismatch" and error.path == "spec.backends.serviceRef.port"


def test_node_target_uses_node_ips_weighted_by_pods() -> None:
    nodes = [
        {"metadata": {"name": f"n{i}"}, "status": {"addresses": [{"type": "InternalIP", "address": f"172.16.0.{i}"}]}}
        for i in (1, 2)
    ]
    cluster = Cluster.build(
        [service()],
        [eps("a", endpoint("10.0.0.1", node="n1"), endpoint("10.0.0.2", node="n1"), endpoint("10.0.0.3", node="n2"))],
        nodes,
    )
    state = desired_state([vs(backends={"serviceRef": {"name": "web"}, "target": "Node"})], cluster)
    assert [(d.address, d.weight) for d in state.services[KEY].destinations] == [("172.16.0.1", 2), ("172.16.0.2", 1)]


def test_tun_persistence_flags_and_ipv6() -> None:
    spec = vs(
        vip="2001:db8::10",
        scheduler="mh",
        schedulerFlags=["mh-port", "mh-fallback"],
        persistence={"timeoutSeconds": 120, "netmask": 64},
        forwarding={"method": "TUN", "tunnel": {"type": "gue", "port": 6080, "checksum": "remcsum"}},
        backends={"addresses": [{"ip": "2001:db8::7", "weight": 4}]},
    )
    [svc] = desired_state([spec]).services.values()
    assert svc.key.family == AF_INET6
    assert (svc.scheduler, svc.sched_flags, svc.persistence_timeout, svc.netmask) == ("mh", 0x18, 120, 64)
    [dest] = svc.destinations
    assert (dest.method, dest.tunnel_port, dest.weight) == (Method.TUN, 6080, 4)


def test_node_selector() -> None:
    spec = vs(directors={"nodeSelector": {"lvs": "yes"}}, backends={"addresses": [{"ip": "10.0.0.1"}]})
    assert desired_state([spec], node_labels={"lvs": "yes"}).services
    excluded = desired_state([spec], node_labels={"lvs": "no"})
    assert not excluded.services and not excluded.vips
    assert excluded.origins[KEY] == ObjectRef("ns", "web")  # still claims the VIP cluster-wide


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"vip": "300.1.1.1"}, "spec.vip"),
        ({"ports": []}, "spec.ports"),
        ({"ports": [{"port": 80}, {"port": 80, "protocol": "TCP"}]}, "spec.ports[1].port"),
        ({"ports": [{"port": 0}]}, "spec.ports[0].port"),
        ({"ports": [{"port": 80, "protocol": "ICMP"}]}, "spec.ports[0].protocol"),
        ({"scheduler": "random"}, "spec.scheduler"),
        ({"schedulerFlags": ["sh-port"]}, "spec.schedulerFlags[0]"),
        ({"persistence": {"timeoutSeconds": 0}}, "spec.persistence.timeoutSeconds"),
        ({"persistence": {"netmask": "255.0.255.0"}}, "spec.persistence.netmask"),
        ({"forwarding": {"method": "FULLNAT"}}, "spec.forwarding.method"),
        ({"forwarding": {"method": "DR", "tunnel": {"type": "ipip"}}}, "spec.forwarding.tunnel"),
        ({"forwarding": {"method": "TUN", "tunnel": {"type": "gue"}}}, "spec.forwarding.tunnel.port"),
        ({"backends": {}}, "spec.backends"),
        ({"backends": {"serviceRef": {"name": "web"}, "addresses": [{"ip": "10.0.0.1"}]}}, "spec.backends"),
        ({"backends": {"addresses": [{"ip": "10.0.0.1", "weight": 70000}]}}, "spec.backends.addresses[0].weight"),
        ({"backends": {"addresses": [{"ip": "2001:db8::1"}]}}, "spec.backends.addresses[0].ip"),
        ({"backends": {"addresses": [{"ip": "10.0.0.1", "port": 8080}]}}, "spec.backends.addresses[0].port"),
        # NAT: one real server of port 80 twice (port 80 taken by default, then given)...
        (
            {
                "forwarding": {"method": "NAT"},
                "backends": {"addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.1", "port": 80}]},
            },
            "spec.backends.addresses[1]",
        ),
        # ... and two ports of one address, both sent to the numeric targetPort
        (
            {
                "forwarding": {"method": "NAT"},
                "ports": [{"port": 80, "targetPort": 8080}],
                "backends": {"addresses": [{"ip": "10.0.0.1", "port": 81}, {"ip": "10.0.0.1", "port": 82}]},
            },
            "spec.backends.addresses[1]",
        ),
    ],
)
def test_invalid_specs_name_the_field(change: dict[str, Any], path: str) -> None:
    obj = vs()
    obj["spec"].update(copy.deepcopy(change))
    with pytest.raises(ValueError) as info:
        parse_virtual_server(obj)
    assert info.value.path == path  # type: ignore[attr-defined]
