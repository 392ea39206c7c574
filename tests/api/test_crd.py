"""The VirtualServer CRD against the real API server, and against kubelvs.spec.

The CRD (crds/virtualservers.kubelvs.io.yaml) and ``kubelvs.spec.parse_virtual_server`` must
agree: what one refuses the other refuses, naming the same field, and what the API server
stores (with its defaults applied) means to kubelvs what the manifest meant. The few places
where they cannot agree are listed in DISAGREEMENTS and marked as strict xfails, so that a fix
on either side shows up.
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubelvs.core.desired import desired_state
from kubelvs.core.model import SCHEDULERS
from kubelvs.core.spec import GROUP, KIND, PLURAL, VERSION, SpecError, parse_virtual_server
from kubernetes import client
from kubernetes.client.rest import ApiException

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "virtualservers.kubelvs.io.yaml"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
API_VERSION = f"{GROUP}/{VERSION}"

# --- helpers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def custom(api_client) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client)


@pytest.fixture(scope="module")
def vs_namespace(api_client) -> Iterator[str]:
    """One namespace for the many refused/accepted objects of this module (faster than one each)."""
    core = client.CoreV1Api(api_client)
    name = f"t-crd-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"kubelvs-test": "1"})))
    yield name
    with contextlib.suppress(ApiException):
        core.delete_namespace(name)


def virtual_server(spec: dict[str, Any] | None, name: str = "vs", namespace: str = "default") -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": namespace}}
    if spec is not None:
        obj["spec"] = spec
    return obj


def create(
    custom: client.CustomObjectsApi, namespace: str, obj: dict[str, Any], dry_run: bool = False
) -> dict[str, Any]:
    """POST with fieldValidation=Strict (unknown and duplicate fields are errors)."""
    extra = {"dry_run": "All"} if dry_run else {}
    return custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, obj, field_validation="Strict", **extra
    )


def refusal(custom: client.CustomObjectsApi, namespace: str, obj: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    try:
        created = create(custom, namespace, obj)
    except ApiException as error:
        return error.status, json.loads(error.body)
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj["metadata"]["name"])
    raise AssertionError(f"the API server accepted {json.dumps(obj['spec'])} as {json.dumps(created['spec'])}")


def unique_name(prefix: str = "vs") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# --- the bad manifests -------------------------------------------------------------------------

V4: dict[str, Any] = {
    "vip": "192.0.2.10",
    "ports": [{"name": "http", "port": 80}],
    "backends": {"addresses": [{"ip": "192.0.2.21"}, {"ip": "192.0.2.22"}]},
}
V6: dict[str, Any] = {
    "vip": "2001:db8::10",
    "ports": [{"name": "http", "port": 80}],
    "backends": {"addresses": [{"ip": "2001:db8::21"}, {"ip": "2001:db8::22"}]},
}
DROP = object()


def spec(base: dict[str, Any] = V4, **fields: Any) -> dict[str, Any]:
    """A copy of base with top-level spec fields replaced (DROP removes one)."""
    result = copy.deepcopy(base)
    for key, value in fields.items():
        if value is DROP:
            result.pop(key, None)
        else:
            result[key] = value
    return result


SVC = {"serviceRef": {"name": "web"}}
TWO_PORTS = [{"name": "http", "port": 80}, {"name": "https", "port": 443}]


@dataclass(frozen=True)
class Bad:
    id: str
    spec: dict[str, Any] | None
    path: str  # the field path the API server's message must name
    py_path: str | None = None  # the SpecError.path prefix kubelvs.spec reports (default: path)
    status: int = 422
    python_accepts: str | None = None  # a known disagreement: why kubelvs.spec accepts it


BAD = [
    # vip
    Bad("vip-octet-300", spec(vip="192.0.2.300"), "spec.vip"),
    Bad("vip-hostname", spec(vip="lb.example.com"), "spec.vip"),
    Bad("vip-cidr", spec(vip="192.0.2.10/32"), "spec.vip"),
    Bad("vip-leading-zero", spec(vip="192.0.2.010"), "spec.vip"),
    Bad("vip-number", spec(vip=3221225994), "spec.vip"),
    Bad("vip-missing", spec(vip=DROP), "spec.vip"),
    Bad("spec-missing", None, "spec"),
    # ports
    Bad("ports-missing", spec(ports=DROP), "spec.ports"),
    Bad("ports-empty", spec(ports=[]), "spec.ports"),
    Bad("port-0", spec(ports=[{"port": 0}]), "spec.ports[0].port"),
    Bad("port-65536", spec(ports=[{"port": 65536}]), "spec.ports[0].port"),
    Bad("port-string", spec(ports=[{"port": "80"}]), "spec.ports[0].port"),
    Bad("port-missing", spec(ports=[{"name": "http"}]), "spec.ports[0].port"),
    Bad("port-name-empty", spec(ports=[{"name": "", "port": 80}]), "spec.ports[0].name"),
    Bad("port-protocol-duplicate", spec(ports=[{"port": 80}, {"port": 80, "protocol": "TCP"}]), "spec.ports[1]"),
    Bad("protocol-icmp", spec(ports=[{"port": 80, "protocol": "ICMP"}]), "spec.ports[0].protocol"),
    Bad("protocol-lowercase", spec(ports=[{"port": 80, "protocol": "tcp"}]), "spec.ports[0].protocol"),
    Bad("targetPort-differs-dr", spec(ports=[{"port": 80}, {"port": 443, "targetPort": 8443}]), "spec.ports[1]"),
    Bad(
        "targetPort-named-tun",
        spec(ports=[{"port": 80, "targetPort": "http"}], forwarding={"method": "TUN"}),
        "spec.ports[0]",
    ),
    Bad(
        "targetPort-70000-nat",
        spec(ports=[{"port": 80, "targetPort": 70000}], forwarding={"method": "NAT"}),
        "spec.ports[0].targetPort",
    ),
    # scheduler
    Bad("scheduler-unknown", spec(scheduler="random"), "spec.scheduler"),
    Bad("scheduler-flag-unknown", spec(scheduler="sh", schedulerFlags=["sh-bogus"]), "spec.schedulerFlags[0]"),
    Bad("sh-port-with-rr", spec(scheduler="rr", schedulerFlags=["sh-port"]), "spec.schedulerFlags[0]"),
    Bad(
        "mh-fallback-with-sh",
        spec(scheduler="sh", schedulerFlags=["sh-port", "mh-fallback"]),
        "spec.schedulerFlags[1]",
    ),
    Bad("sh-flag-with-default-wlc", spec(schedulerFlags=["sh-fallback"]), "spec.schedulerFlags[0]"),
    # forwarding
    Bad("method-unknown", spec(forwarding={"method": "LOCAL"}), "spec.forwarding.method"),
    Bad("tunnel-with-dr", spec(forwarding={"method": "DR", "tunnel": {"type": "ipip"}}), "spec.forwarding.tunnel"),
    Bad(
        "tunnel-with-default-method",
        spec(forwarding={"tunnel": {"type": "gre"}}),
        "spec.forwarding.tunnel",
    ),
    Bad("tunnel-with-nat", spec(forwarding={"method": "NAT", "tunnel": {"type": "gre"}}), "spec.forwarding.tunnel"),
    Bad(
        "tunnel-type-vxlan",
        spec(forwarding={"method": "TUN", "tunnel": {"type": "vxlan"}}),
        "spec.forwarding.tunnel.type",
    ),
    Bad(
        "gue-without-port", spec(forwarding={"method": "TUN", "tunnel": {"type": "gue"}}), "spec.forwarding.tunnel.port"
    ),
    Bad(
        "gue-port-0",
        spec(forwarding={"method": "TUN", "tunnel": {"type": "gue", "port": 0}}),
        "spec.forwarding.tunnel.port",
    ),
    Bad(
        "port-with-ipip",
        spec(forwarding={"method": "TUN", "tunnel": {"type": "ipip", "port": 6080}}),
        "spec.forwarding.tunnel.port",
    ),
    Bad(
        "port-with-gre",
        spec(forwarding={"method": "TUN", "tunnel": {"type": "gre", "port": 6080}}),
        "spec.forwarding.tunnel.port",
    ),
    Bad(
        "checksum-with-ipip",
        spec(forwarding={"method": "TUN", "tunnel": {"checksum": "csum"}}),
        "spec.forwarding.tunnel.checksum",
    ),
    Bad(
        "remcsum-with-gre",
        spec(forwarding={"method": "TUN", "tunnel": {"type": "gre", "checksum": "remcsum"}}),
        "spec.forwarding.tunnel.checksum",
    ),
    Bad(
        "checksum-unknown",
        spec(forwarding={"method": "TUN", "tunnel": {"type": "gue", "port": 6080, "checksum": "crc"}}),
        "spec.forwarding.tunnel.checksum",
    ),
    # persistence
    Bad("timeout-0", spec(persistence={"timeoutSeconds": 0}), "spec.persistence.timeoutSeconds"),
    Bad("timeout-32-days", spec(persistence={"timeoutSeconds": 2678401}), "spec.persistence.timeoutSeconds"),
    Bad("ipv4-netmask-255.0.255.0", spec(persistence={"netmask": "255.0.255.0"}), "spec.persistence.netmask"),
    Bad("ipv4-netmask-0.0.0.0", spec(persistence={"netmask": "0.0.0.0"}), "spec.persistence.netmask"),
    Bad("ipv4-netmask-octet-256", spec(persistence={"netmask": "255.255.255.256"}), "spec.persistence.netmask"),
    Bad("ipv4-netmask-ipv6-style", spec(persistence={"netmask": "ffff:ff00::"}), "spec.persistence.netmask"),
    Bad("ipv6-netmask-129", spec(V6, persistence={"netmask": 129}), "spec.persistence.netmask"),
    Bad("ipv6-netmask-0", spec(V6, persistence={"netmask": 0}), "spec.persistence.netmask"),
    Bad("ipv6-netmask-string-129", spec(V6, persistence={"netmask": "129"}), "spec.persistence.netmask"),
    Bad("ipv6-netmask-dotted", spec(V6, persistence={"netmask": "255.255.255.0"}), "spec.persistence.netmask"),
    Bad("ipv6-netmask-negative", spec(V6, persistence={"netmask": "-64"}), "spec.persistence.netmask"),
    # backends
    Bad("backends-missing", spec(backends=DROP), "spec.backends"),
    Bad("backends-empty", spec(backends={}), "spec.backends"),
    Bad("addresses-empty", spec(backends={"addresses": []}), "spec.backends"),
    Bad(
        "serviceRef-and-addresses",
        spec(backends={"serviceRef": {"name": "web"}, "addresses": [{"ip": "192.0.2.21"}]}),
        "spec.backends",
    ),
    Bad("serviceRef-without-name", spec(backends={"serviceRef": {"port": 80}}), "spec.backends.serviceRef.name"),
    Bad("serviceRef-name-empty", spec(backends={"serviceRef": {"name": ""}}), "spec.backends.serviceRef.name"),
    Bad(
        "serviceRef-port-0", spec(backends={"serviceRef": {"name": "web", "port": 0}}), "spec.backends.serviceRef.port"
    ),
    Bad("target-node-with-addresses", spec(backends={**V4["backends"], "target": "Node"}), "spec.backends.target"),
    Bad("target-host", spec(backends={**SVC, "target": "Host"}), "spec.backends.target"),
    Bad("weight-70000", spec(backends={**SVC, "weight": 70000}), "spec.backends.weight"),
    Bad("weight-negative", spec(backends={**SVC, "weight": -1}), "spec.backends.weight"),
    Bad("upperThreshold-negative", spec(backends={**SVC, "upperThreshold": -1}), "spec.backends.upperThreshold"),
    Bad("lowerThreshold-negative", spec(backends={**SVC, "lowerThreshold": -5}), "spec.backends.lowerThreshold"),
    Bad(
        "address-weight-70000",
        spec(backends={"addresses": [{"ip": "192.0.2.21", "weight": 70000}]}),
        "spec.backends.addresses[0].weight",
    ),
    Bad(
        "address-not-ip",
        spec(backends={"addresses": [{"ip": "192.0.2.21"}, {"ip": "192.0.2.256"}]}),
        "spec.backends.addresses[1].ip",
    ),
    Bad("address-without-ip", spec(backends={"addresses": [{"weight": 2}]}), "spec.backends.addresses[0].ip"),
    Bad(
        "dr-same-ip-with-and-without-port",
        spec(backends={"addresses": [{"ip": "192.0.2.21"}, {"ip": "192.0.2.21", "port": 80}]}),
        "spec.backends.addresses[1].ip",
    ),
    Bad(
        "ipv4-vip-ipv6-backend-dr",
        spec(backends={"addresses": [{"ip": "192.0.2.21"}, {"ip": "2001:db8::21"}]}),
        "spec.backends.addresses[1]",
    ),
    Bad(
        "ipv6-vip-ipv4-backend-nat",
        spec(V6, forwarding={"method": "NAT"}, backends={"addresses": [{"ip": "192.0.2.21"}]}),
        "spec.backends.addresses[0]",
    ),
    Bad(
        "address-port-with-dr",
        spec(backends={"addresses": [{"ip": "192.0.2.21", "port": 8080}]}),
        "spec.backends.addresses[0]",
    ),
    Bad(
        "address-port-not-every-vip-port-tun",
        spec(
            ports=TWO_PORTS,
            forwarding={"method": "TUN"},
            backends={"addresses": [{"ip": "192.0.2.21"}, {"ip": "192.0.2.22", "port": 443}]},
        ),
        "spec.backends.addresses[1]",
    ),
    Bad(
        "address-listed-twice",
        spec(backends={"addresses": [{"ip": "192.0.2.21"}, {"ip": "192.0.2.22"}, {"ip": "192.0.2.21", "weight": 3}]}),
        "spec.backends.addresses[2]",
    ),
    Bad(
        "address-listed-twice-ipv6-spelling",
        spec(V6, backends={"addresses": [{"ip": "2001:db8::21"}, {"ip": "2001:DB8:0:0::21"}]}),
        "spec.backends.addresses[1]",
    ),
    Bad(
        "nat-real-server-twice-default-port",
        spec(
            forwarding={"method": "NAT"},
            backends={"addresses": [{"ip": "192.0.2.21"}, {"ip": "192.0.2.21", "port": 80}]},
        ),
        "spec.backends.addresses[1]",
    ),
    Bad(
        "nat-real-server-twice-numeric-target-port",
        spec(
            forwarding={"method": "NAT"},
            ports=[{"name": "http", "port": 80, "targetPort": 8080}],
            backends={
                "addresses": [{"ip": "192.0.2.21", "port": 81}, {"ip": "192.0.2.22"}, {"ip": "192.0.2.21", "port": 82}]
            },
        ),
        "spec.backends.addresses[2]",
    ),
    Bad("directors-nodeSelector-list", spec(directors={"nodeSelector": ["a=b"]}), "spec.directors.nodeSelector"),
    # unknown fields: refused by the decoder with fieldValidation=Strict (400 BadRequest, not 422)
    Bad(
        "misspelled-serviceref",
        spec(backends={"serviceref": {"name": "web"}}),
        "spec.backends.serviceref",
        py_path="spec.backends",
        status=400,
    ),
    # --- once disagreements: the CRD refused, kubelvs.spec accepted (now both refuse) --------
    Bad(
        "unknown-field-spec",
        spec(sessionAffinity="ClientIP"),
        "spec.sessionAffinity",
        status=400,
    ),
    Bad(
        "unknown-field-port",
        spec(ports=[{"port": 80, "nodePort": 30080}]),
        "spec.ports[0].nodePort",
        status=400,
    ),
    Bad(
        "unknown-field-tunnel",
        spec(forwarding={"method": "TUN", "tunnel": {"ttl": 4}}),
        "spec.forwarding.tunnel.ttl",
        status=400,
    ),
    Bad(
        "tunnel-empty-with-dr",
        spec(forwarding={"method": "DR", "tunnel": {}}),
        "spec.forwarding.tunnel",
    ),
    Bad(
        "scheduler-flag-twice",
        spec(scheduler="sh", schedulerFlags=["sh-port", "sh-port"]),
        "spec.schedulerFlags[1]",
    ),
    Bad(
        "ipv4-netmask-prefix-length",
        spec(persistence={"netmask": 24}),
        "spec.persistence.netmask",
    ),
    Bad(
        "ipv4-netmask-hostmask",
        spec(persistence={"netmask": "0.0.0.255"}),
        "spec.persistence.netmask",
    ),
    Bad(
        "vip-surrounding-space",
        spec(vip=" 192.0.2.10"),
        "spec.vip",
    ),
    Bad(
        "vip-ipv6-zone",
        spec(V6, vip="fe80::10%eth0"),
        "spec.vip",
    ),
    Bad(
        "vip-ipv4-mapped-ipv6",
        spec(V6, vip="::ffff:192.0.2.10"),
        "spec.vip",
    ),
    Bad(
        "nodeSelector-value-number",
        spec(directors={"nodeSelector": {"rack": 7}}),
        "spec.directors.nodeSelector.rack",
    ),
    Bad(
        "ipv6-netmask-fullwidth-digits",
        spec(V6, persistence={"netmask": "\uff16\uff14"}),
        "spec.persistence.netmask",
    ),
    Bad(
        "ipv6-netmask-superscript-digit",
        spec(V6, persistence={"netmask": "\u00b2"}),
        "spec.persistence.netmask",
    ),
]
assert len({b.id for b in BAD}) == len(BAD)
DISAGREEMENTS = [b for b in BAD if b.python_accepts]


def bad_params(for_python: bool) -> list[Any]:
    return [
        pytest.param(
            b,
            id=b.id,
            marks=[pytest.mark.xfail(strict=True, reason=f"known disagreement: {b.python_accepts}")]
            if for_python and b.python_accepts
            else [],
        )
        for b in BAD
    ]


@pytest.mark.parametrize("bad", bad_params(for_python=False))
def test_api_server_refuses_bad_manifest(custom, vs_namespace, bad: Bad) -> None:
    obj = virtual_server(bad.spec, unique_name(), vs_namespace)
    status, body = refusal(custom, vs_namespace, obj)
    message = body.get("message", "")
    assert status == bad.status, message
    assert body.get("reason") == ("Invalid" if bad.status == 422 else "BadRequest"), body
    if bad.status == 400:
        assert f'unknown field "{bad.path}"' in message, message
    else:
        assert bad.path in message, message
        causes = (body.get("details") or {}).get("causes") or []
        fields = [c.get("field", "") for c in causes]
        assert any(bad.path.startswith(f) or f.startswith(bad.path) for f in fields if f), (fields, message)


@pytest.mark.parametrize("bad", bad_params(for_python=True))
def test_kubelvs_spec_refuses_bad_manifest(bad: Bad) -> None:
    with pytest.raises(SpecError) as error:
        parse_virtual_server(virtual_server(bad.spec))
    assert error.value.path.startswith(bad.py_path or bad.path), str(error.value)


def test_there_are_enough_bad_manifests() -> None:
    agreed = [b for b in BAD if not b.python_accepts]
    assert len(agreed) >= 25
    assert {b.status for b in BAD} == {400, 422}


# --- manifests both accept ---------------------------------------------------------------------

GOOD = {
    "minimal-v4": spec(),
    "minimal-v6": spec(V6),
    "serviceRef": spec(backends={"serviceRef": {"name": "web", "port": "http"}, "target": "Node"}),
    "serviceRef-and-empty-addresses": spec(backends={"serviceRef": {"name": "web"}, "addresses": []}),
    "same-port-tcp-udp-sctp": spec(
        ports=[{"port": 53}, {"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "SCTP"}]
    ),
    "targetPort-equal-with-dr": spec(ports=[{"port": 80, "targetPort": 80}]),
    "targetPort-named-with-nat": spec(ports=[{"port": 80, "targetPort": "http"}], forwarding={"method": "NAT"}),
    "address-port-with-nat": spec(
        forwarding={"method": "NAT"}, backends={"addresses": [{"ip": "192.0.2.21", "port": 8080, "weight": 0}]}
    ),
    "address-port-equal-every-vip-port-dr": spec(backends={"addresses": [{"ip": "192.0.2.21", "port": 80}]}),
    "same-ip-two-ports-nat": spec(
        forwarding={"method": "NAT"},
        backends={"addresses": [{"ip": "192.0.2.21", "port": 8080}, {"ip": "192.0.2.21", "port": 8081}]},
    ),
    "tun-mixes-families": spec(
        forwarding={"method": "TUN", "tunnel": {"type": "gre", "checksum": "csum"}},
        backends={"addresses": [{"ip": "192.0.2.21"}, {"ip": "2001:db8::21"}]},
    ),
    "gue-remcsum": spec(forwarding={"method": "TUN", "tunnel": {"type": "gue", "port": 6080, "checksum": "remcsum"}}),
    "tun-empty-tunnel": spec(forwarding={"method": "TUN", "tunnel": {}}),
    "gre-checksum-none": spec(forwarding={"method": "TUN", "tunnel": {"type": "gre", "checksum": "none"}}),
    "mh-both-flags": spec(V6, scheduler="mh", schedulerFlags=["mh-port", "mh-fallback"]),
    "ipv4-netmask-32": spec(persistence={"netmask": "255.255.255.255", "timeoutSeconds": 2678400}),
    "ipv4-netmask-128.0.0.0": spec(persistence={"netmask": "128.0.0.0"}),
    "ipv6-netmask-128": spec(V6, persistence={"netmask": 128}),
    "ipv6-netmask-string": spec(V6, persistence={"netmask": "064", "timeoutSeconds": 1}),
    "thresholds-and-weights": spec(
        backends={
            "serviceRef": {"name": "web", "port": 8080},
            "weight": 0,
            "upperThreshold": 2147483647,
            "lowerThreshold": 0,
        }
    ),
    "nodeSelector": spec(directors={"nodeSelector": {"kubelvs.io/director": "true", "zone": "a"}}),
    "empty-nodeSelector": spec(directors={}),
    "uppercase-ipv6": spec(V6, vip="2001:DB8::10"),
    "persistence-empty": spec(persistence={}),
}


# The API server drops explicit nulls (then defaults the field) and reads an integral float as an
# integer; kubelvs.spec refuses both in a manifest (though not in what the server stores).
GOOD.update(
    {
        "null-weight": spec(backends={**SVC, "weight": None}),
        "null-method": spec(forwarding={"method": None}),
        "null-protocol": spec(ports=[{"port": 80, "protocol": None}]),
        "null-scheduler": spec(scheduler=None),
        "null-ipip-port": spec(forwarding={"method": "TUN", "tunnel": {"type": "ipip", "port": None}}),
        "float-port": spec(ports=[{"port": 80.0}]),
        "float-threshold": spec(backends={**SVC, "upperThreshold": 100.0}),
    }
)
GOOD_DISAGREEMENTS: dict[str, str] = {}  # none left: kubelvs reads every manifest as the server stores it


@pytest.mark.parametrize("name", sorted(GOOD))
def test_server_accepts_and_kubelvs_reads_stored(custom, vs_namespace, name: str) -> None:
    obj = virtual_server(copy.deepcopy(GOOD[name]), unique_name(), vs_namespace)
    stored = create(custom, vs_namespace, obj)
    assert desired_state([stored]).errors == []


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=[pytest.mark.xfail(strict=True, reason=f"known disagreement: {GOOD_DISAGREEMENTS[n]}")])
        if n in GOOD_DISAGREEMENTS
        else n
        for n in sorted(GOOD)
    ],
)
def test_kubelvs_reads_manifest_as_stored(custom, vs_namespace, name: str) -> None:
    """kubelvs accepts the manifest and reads it as it reads the stored object (defaults applied)."""
    obj = virtual_server(copy.deepcopy(GOOD[name]), "dry-run", vs_namespace)
    stored = create(custom, vs_namespace, copy.deepcopy(obj), dry_run=True)
    assert parse_virtual_server(obj) == parse_virtual_server(stored)


def test_server_defaults(custom, vs_namespace) -> None:
    obj = virtual_server(
        spec(
            persistence={"netmask": "255.255.255.0"},
            forwarding={"method": "TUN", "tunnel": {}},
            backends={"serviceRef": {"name": "web"}},
        ),
        "defaults",
        vs_namespace,
    )
    stored = create(custom, vs_namespace, obj, dry_run=True)["spec"]
    assert stored["scheduler"] == "wlc"
    assert stored["ports"] == [{"name": "http", "port": 80, "protocol": "TCP"}]
    assert stored["forwarding"] == {"method": "TUN", "tunnel": {"type": "ipip"}}
    assert stored["backends"] == {"serviceRef": {"name": "web"}, "target": "Pod", "weight": 1}
    assert stored["persistence"] == {"netmask": "255.255.255.0", "timeoutSeconds": 300}
    bare = create(custom, vs_namespace, virtual_server(spec(), "bare", vs_namespace), dry_run=True)["spec"]
    assert bare["forwarding"] == {"method": "DR"}
    assert "persistence" not in bare


# --- the examples ------------------------------------------------------------------------------


def example_documents() -> list[tuple[Path, list[dict[str, Any]]]]:
    return [(path, [d for d in yaml.safe_load_all(path.read_text()) if d]) for path in EXAMPLES]


def kubelvs_plan(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubelvs.cli", "plan", "-f", str(path)], capture_output=True, text=True, timeout=60
    )


def test_examples_exist() -> None:
    assert EXAMPLES
    assert any(d.get("kind") == KIND for _, docs in example_documents() for d in docs)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_accepted_and_planned_alike(custom, namespace, tmp_path, path: Path) -> None:
    """Every example's VirtualServers are created; `kubelvs plan` of what the server stores is
    the plan of the file."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    stored_docs: list[dict[str, Any]] = []
    for doc in docs:
        if doc.get("kind") != KIND:
            stored_docs.append(doc)
            continue
        original_ns = (doc.get("metadata") or {}).get("namespace") or "default"
        obj = copy.deepcopy(doc)
        obj["metadata"]["namespace"] = namespace
        stored = create(custom, namespace, obj)
        assert stored["spec"]["vip"] == doc["spec"]["vip"]
        assert desired_state([stored]).errors == []
        stored["metadata"] = {"name": stored["metadata"]["name"], "namespace": original_ns}
        stored_docs.append(stored)
    (tmp_path / "stored.yaml").write_text(yaml.safe_dump_all(stored_docs))
    from_file = kubelvs_plan(path)
    from_server = kubelvs_plan(tmp_path / "stored.yaml")
    assert from_file.returncode == 0, from_file.stderr
    assert (from_server.returncode, from_server.stdout) == (0, from_file.stdout), from_server.stderr


# --- kubectl -----------------------------------------------------------------------------------

PRINTED = virtual_server(
    {
        "vip": "198.51.100.7",
        "ports": [{"name": "https", "port": 443}],
        "scheduler": "sh",
        "schedulerFlags": ["sh-port"],
        "forwarding": {"method": "TUN", "tunnel": {"type": "gue", "port": 6080}},
        "backends": {"addresses": [{"ip": "198.51.100.21"}, {"ip": "198.51.100.22"}]},
    },
    "printed",
)


COLUMNS = ["NAME", "VIP", "PORTS", "METHOD", "SCHEDULER", "OWNER", "READY"]
WIDE_COLUMNS = ["BACKENDS", "DRAINING", "WAITING", "DIRECTORS"]
ROW = ["printed", "198.51.100.7", "443", "TUN", "sh", "director-a", "True"]


def test_kubectl_get_shows_printer_columns(kubectl, namespace) -> None:
    obj = copy.deepcopy(PRINTED)
    obj["metadata"]["namespace"] = namespace
    kubectl("apply", "--validate=strict", "--server-side", "-f", "-", input=json.dumps(obj))
    now = "2026-01-01T00:00:00Z"
    status = {
        "observedGeneration": 1,
        "owner": "director-a",
        "readyBackends": 2,
        "drainingBackends": 1,
        "waitingBackends": 4,
        "programmedDirectors": 3,
        "conditions": [
            {"type": "Accepted", "status": "True", "reason": "Valid", "message": "", "lastTransitionTime": now},
            {"type": "Ready", "status": "True", "reason": "Programmed", "message": "ok", "lastTransitionTime": now},
        ],
    }
    kubectl(
        "patch",
        "virtualserver",
        "printed",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )

    lines = kubectl("get", "lvs", "-n", namespace).stdout.splitlines()
    assert lines[0].split() == [*COLUMNS, "AGE"]
    assert lines[1].split()[:7] == ROW

    wide = kubectl("get", "virtualservers", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert wide[0].split() == [*COLUMNS, *WIDE_COLUMNS, "AGE"]
    assert wide[1].split()[:11] == [*ROW, "2", "1", "4", "3"]

    # The category and the singular name work too.
    assert "printed" in kubectl("get", "kubelvs", "-n", namespace, "-o", "name").stdout
    assert kubectl.json("get", "virtualserver", "printed", "-n", namespace)["status"]["owner"] == "director-a"


def test_status_is_a_subresource(kubectl, custom, namespace) -> None:
    obj = copy.deepcopy(PRINTED)
    obj["metadata"]["namespace"] = namespace
    obj["status"] = {"owner": "ignored"}
    stored = create(custom, namespace, obj)
    assert "status" not in stored
    res = kubectl(
        "patch",
        "virtualserver",
        "printed",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"readyBackends": -1}}),
        check=False,
    )
    assert res.returncode != 0 and "status.readyBackends" in res.stderr, res.stderr


def _schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_FILE.read_text())
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def _walk(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{name}")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_every_field_has_a_description() -> None:
    missing = [p for p, node in _walk(_schema(), "") if p != ".metadata" and not node.get("description")]
    assert not missing


def _squash(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("field", ["spec.forwarding", "spec.ports", "spec.backends", "status"])
def test_kubectl_explain_prints_descriptions(kubectl, field: str) -> None:
    out = _squash(kubectl("explain", f"virtualserver.{field}").stdout)
    node = _schema()
    for part in field.split("."):
        node = node["properties"][part]
        node = node.get("items", node)
    assert _squash(node["description"]) in out, out
    for name, child in node["properties"].items():
        assert name in out
        assert _squash(child["description"]) in out, (name, out)


# --- the planner and the API server agree on generated specs -----------------------------------

IPV4_NETMASKS = [str(ipaddress.IPv4Network(f"0.0.0.0/{n}").netmask) for n in range(1, 33)]


@st.composite
def ip_addresses(draw: st.DrawFn, version: int) -> str:
    if version == 4:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(draw(st.integers(0, 2**32 - 1)))
        return str(address)
    address = ipaddress.IPv6Address(
        draw(st.one_of(st.integers(0, 2**128 - 1), st.integers(0x20010DB8 << 96, (0x20010DB8 << 96) + 2**16)))
    )
    if address.ipv4_mapped is not None:  # a known disagreement (see vip-ipv4-mapped-ipv6)
        address = ipaddress.IPv6Address(int(address) ^ (1 << 127))
    text = str(address)
    return draw(st.sampled_from([text, text.upper(), address.exploded]))


LABEL = st.from_regex(r"[a-z]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
PORT = st.integers(1, 65535)


@st.composite
def valid_specs(draw: st.DrawFn) -> dict[str, Any]:
    version = draw(st.sampled_from([4, 6]))
    result: dict[str, Any] = {"vip": draw(ip_addresses(version))}

    method = draw(st.sampled_from([None, "DR", "TUN", "NAT"]))
    effective = method or "DR"
    forwarding: dict[str, Any] | None = draw(st.sampled_from([None, {}])) if method is None else {"method": method}
    if method == "TUN":
        kind = draw(st.sampled_from([None, "absent", "ipip", "gue", "gre"]))
        if kind == "absent":
            forwarding["tunnel"] = {}
        elif kind is not None:
            tunnel: dict[str, Any] = {"type": kind}
            if kind == "gue":
                tunnel["port"] = draw(PORT)
            if kind != "ipip" and draw(st.booleans()):
                tunnel["checksum"] = draw(st.sampled_from(["none", "csum"] + (["remcsum"] if kind == "gue" else [])))
            forwarding["tunnel"] = tunnel
    if forwarding is not None:
        result["forwarding"] = forwarding

    raw_ports = draw(
        st.lists(
            st.tuples(PORT, st.sampled_from([None, "TCP", "UDP", "SCTP"]), st.none() | LABEL),
            min_size=1,
            max_size=4,
            unique_by=lambda t: (t[0], t[1] or "TCP"),
        )
    )
    ports = []
    for number, protocol, name in raw_ports:
        entry: dict[str, Any] = {"port": number}
        if protocol:
            entry["protocol"] = protocol
        if name:
            entry["name"] = name
        target = draw(st.none() | PORT | LABEL) if effective == "NAT" else draw(st.sampled_from([None, number]))
        if target is not None:
            entry["targetPort"] = target
        ports.append(entry)
    result["ports"] = ports

    scheduler = draw(st.sampled_from((None, *SCHEDULERS)))
    if scheduler:
        result["scheduler"] = scheduler
        if scheduler in ("sh", "mh"):
            flags = draw(st.lists(st.sampled_from([f"{scheduler}-fallback", f"{scheduler}-port"]), unique=True))
            if flags or draw(st.booleans()):
                result["schedulerFlags"] = flags

    if draw(st.booleans()):
        persistence: dict[str, Any] = {}
        if draw(st.booleans()):
            persistence["timeoutSeconds"] = draw(st.integers(1, 2678400))
        if not persistence or draw(st.booleans()):  # never {} (see persistence-empty)
            if version == 4:
                persistence["netmask"] = draw(st.sampled_from(IPV4_NETMASKS))
            else:
                prefix = draw(st.integers(1, 128))
                persistence["netmask"] = draw(st.sampled_from([prefix, str(prefix)]))
        result["persistence"] = persistence

    backends: dict[str, Any] = {}
    if draw(st.booleans()):
        ref: dict[str, Any] = {"name": draw(LABEL)}
        port = draw(st.none() | PORT | LABEL)
        if port is not None:
            ref["port"] = port
        backends["serviceRef"] = ref
        target = draw(st.sampled_from([None, "Pod", "Node"]))
        if target:
            backends["target"] = target
    else:
        same_ports = len({p["port"] for p in ports}) == 1
        entries = []
        seen = set()
        for _ in range(draw(st.integers(1, 5))):
            family = draw(st.sampled_from([4, 6])) if effective == "TUN" else version
            address = draw(ip_addresses(family))
            entry = {"ip": address}
            if effective == "NAT":
                port = draw(st.none() | PORT)
            else:
                port = draw(st.sampled_from([None, ports[0]["port"]])) if same_ports else None
            if port is not None:
                entry["port"] = port
            if draw(st.booleans()):
                entry["weight"] = draw(st.integers(0, 65535))
            # DR and TUN always use the virtual port, so there an ip is one real server; under NAT
            # an entry is a real server per virtual port (its own port, else the numeric
            # targetPort or the virtual port), none of which another entry may name again.
            ip = ipaddress.ip_address(address)
            if effective == "NAT":
                keys = {
                    (k, ip, p["targetPort"] if isinstance(p.get("targetPort"), int) else port or p["port"])
                    for k, p in enumerate(ports)
                }
            else:
                keys = {(ip, None)}
            if not keys & seen:
                seen |= keys
                entries.append(entry)
        backends["addresses"] = entries
        if draw(st.booleans()):
            backends["target"] = "Pod"
    for name, high in (("weight", 65535), ("upperThreshold", 2**31 - 1), ("lowerThreshold", 2**31 - 1)):
        if draw(st.booleans()):
            backends[name] = draw(st.integers(0, high))
    result["backends"] = backends

    if draw(st.booleans()):
        result["directors"] = {"nodeSelector": draw(st.dictionaries(LABEL, LABEL, max_size=3))}
    return result


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(generated=valid_specs())
def test_generated_specs_accepted_and_planned(custom, vs_namespace, generated: dict[str, Any]) -> None:
    obj = virtual_server(generated, "generated", vs_namespace)
    expected = parse_virtual_server(obj)  # kubelvs accepts the manifest...
    try:
        stored = create(custom, vs_namespace, copy.deepcopy(obj), dry_run=True)  # ...and so does the server
    except ApiException as error:
        raise AssertionError(f"refused: {json.dumps(generated)}: {error.body}") from None
    state = desired_state([stored])
    assert state.errors == []
    assert len(state.resolutions) == 1
    assert parse_virtual_server(stored) == expected  # the server's defaults mean what kubelvs assumes
    if "addresses" in generated["backends"]:
        assert len(state.services) == len(generated["ports"])
