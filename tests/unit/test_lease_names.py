"""Lease names and records of the election (kubelvs.kube.leases), without an API server."""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import urllib3
from hypothesis import given
from hypothesis import strategies as st
from kubelvs.kube.leases import (
    ClaimRecord,
    HeartbeatRecord,
    LeaseClient,
    UnfitRecord,
    _ipv6_hex,
    claim_name,
    decode_vips,
    encode_vips,
    heartbeat_name,
    trim_lease,
    unfit_name,
)

# What the API server checks of a Lease name (IsDNS1123Subdomain), and the stricter label.
SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def valid_subdomain(name: str) -> bool:
    return len(name) <= 253 and SUBDOMAIN.fullmatch(name) is not None


@pytest.mark.parametrize(
    ("vip", "name"),
    [
        ("10.0.0.1", "kubelvs-vip-10-0-0-1"),
        (" 192.168.1.254 ", "kubelvs-vip-192-168-1-254"),
        ("fd00::1", "kubelvs-vip-fd00--1"),
        ("FD00:0:0:0:0:0:0:1", "kubelvs-vip-fd00--1"),
        ("::1", "kubelvs-vip---1"),
        ("::", "kubelvs-vip---0"),
        ("2001:db8::", "kubelvs-vip-2001-db8--0"),
        ("2001:db8:0:1:0:0:0:1", "kubelvs-vip-2001-db8-0-1--1"),
        ("1:0:0:2:0:0:0:3", "kubelvs-vip-1-0-0-2--3"),  # the longer run of zeros is cut
        ("1:0:0:2:0:0:3:4", "kubelvs-vip-1--2-0-0-3-4"),  # of equal runs the first
        ("1:0:2:3:4:5:6:7", "kubelvs-vip-1-0-2-3-4-5-6-7"),  # a single zero group stays
        ("::ffff:10.0.0.1", "kubelvs-vip---ffff-a00-1"),  # hex, whatever Python writes
    ],
)
def test_claim_names(vip: str, name: str) -> None:
    assert claim_name(vip) == name
    assert LABEL.fullmatch(name) and len(name) <= 63


@pytest.mark.parametrize("text", ["", "10.0.0.256", "10.0.0", "fe80::1%eth0", "example.com", "10.0.0.1/32"])
def test_claim_name_refuses_what_is_not_an_address(text: str) -> None:
    with pytest.raises(ValueError):
        claim_name(text)


@given(st.ip_addresses())
def test_every_claim_name_is_a_valid_label(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    name = claim_name(str(address))
    assert LABEL.fullmatch(name) and len(name) <= 63 and valid_subdomain(name)


@given(st.ip_addresses(), st.ip_addresses())
def test_distinct_vips_get_distinct_claim_names(
    a: ipaddress.IPv4Address | ipaddress.IPv6Address, b: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> None:
    assert (claim_name(str(a)) == claim_name(str(b))) == (a == b)


def test_distinct_claim_names_over_neighbouring_addresses() -> None:
    vips = [f"10.0.{i}.{j}" for i in range(4) for j in range(256)]
    vips += [str(ipaddress.IPv6Address(n)) for n in range(1024)]
    vips += [str(ipaddress.IPv6Address((0xFD00 << 112) + (n << k))) for n in range(1, 64) for k in (0, 16, 48, 96)]
    vips += [str(ipaddress.IPv6Address((0xFFFF << 32) + n)) for n in range(1024)]  # IPv4-mapped
    vips = list(dict.fromkeys(vips))
    assert len({claim_name(v) for v in vips}) == len(vips)


@given(st.ip_addresses(v=6))
def test_ipv6_hex_is_the_rfc5952_text(address: ipaddress.IPv6Address) -> None:
    if address.ipv4_mapped is None:  # Python >= 3.13 writes those with a dotted quad
        assert _ipv6_hex(address) == address.compressed
    assert ipaddress.IPv6Address(_ipv6_hex(address)) == address


@pytest.mark.parametrize(
    ("node", "name"),
    [
        ("node-a", "kubelvs-director-node-a"),
        ("worker-1.example.com", "kubelvs-director-worker-1.example.com"),
        ("10.0.0.5", "kubelvs-director-10.0.0.5"),
    ],
)
def test_heartbeat_names_of_valid_node_names_are_kept(node: str, name: str) -> None:
    assert heartbeat_name(node) == name


@pytest.mark.parametrize("node", ["Node-A", "node_a", "-node-", "a..b", "node.", "ünïcode", "", "x" * 300, "a." * 150])
def test_heartbeat_names_of_odd_node_names_are_valid_and_hashed(node: str) -> None:
    name = heartbeat_name(node)
    assert valid_subdomain(name), name
    assert name.startswith("kubelvs-director-") and re.search(r"-[0-9a-f]{10}$", name)


def test_heartbeat_names_stay_distinct() -> None:
    nodes = ["node-a", "Node-A", "node_a", "NODE_A", "node-a.", "x" * 300, "x" * 301, "x" * 236, "x" * 237]
    assert len({heartbeat_name(n) for n in nodes}) == len(nodes)
    assert all(valid_subdomain(heartbeat_name(n)) for n in nodes)


@given(st.text(max_size=300))
def test_every_heartbeat_name_is_valid(node: str) -> None:
    assert valid_subdomain(heartbeat_name(node))
    assert valid_subdomain(unfit_name(node))


def test_a_nodes_own_leases_have_distinct_names() -> None:
    assert heartbeat_name("node-a") == "kubelvs-director-node-a" and unfit_name("node-a") == "kubelvs-unfit-node-a"
    assert unfit_name("Node_A") != unfit_name("node-a")


ADDRESSES = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)


@given(st.frozensets(ADDRESSES, max_size=50))
def test_unfit_vips_round_trip(vips: frozenset[str]) -> None:
    assert decode_vips(encode_vips(vips)) == vips


def test_a_long_unfit_report_is_compressed_to_fit_an_annotation() -> None:
    many = frozenset(str(ipaddress.IPv6Address(0xFD00 << 112) + i * 7919) for i in range(10_000))
    encoded = encode_vips(many)
    assert encoded.startswith("zlib+base64:") and len(encoded) < 128 * 1024  # annotations: 256 KiB in all
    assert decode_vips(encoded) == many
    assert encode_vips({"10.0.0.2", "10.0.0.1"}) == "10.0.0.1,10.0.0.2"  # short: readable
    with pytest.raises(ValueError, match="corrupt"):
        decode_vips("zlib+base64:bm90IHpsaWI=")


# ---------------------------------------------------------------------------------------------
# Records


def _heartbeat(**overrides: Any) -> dict[str, Any]:
    lease: dict[str, Any] = {
        "metadata": {
            "name": "kubelvs-director-node-a",
            "namespace": "kubelvs-system",
            "uid": "u1",
            "resourceVersion": "42",
            "labels": {"app.kubernetes.io/name": "kubelvs", "kubelvs.io/lease": "heartbeat"},
            "annotations": {"kubelvs.io/shutting-down": "true", "kubelvs.io/peer-address": "192.0.2.1"},
            "managedFields": [{"manager": "kubelvs"}],
        },
        "spec": {"holderIdentity": "node-a", "leaseDurationSeconds": 15, "renewTime": "2025-01-01T00:00:00.000000Z"},
    }
    for path, value in overrides.items():
        section, key = path.split("__")
        lease[section][key] = value
    return lease


def _claim(**overrides: Any) -> dict[str, Any]:
    lease: dict[str, Any] = {
        "metadata": {
            "name": "kubelvs-vip-fd00--1",
            "uid": "u2",
            "resourceVersion": "7",
            "labels": {"app.kubernetes.io/name": "kubelvs", "kubelvs.io/lease": "vip"},
            "annotations": {"kubelvs.io/vip": "fd00::1"},
        },
        "spec": {"holderIdentity": "node-b", "leaseTransitions": 3, "acquireTime": "2025-01-01T00:00:00.000000Z"},
    }
    for path, value in overrides.items():
        section, key = path.split("__")
        lease[section][key] = value
    return lease


def test_heartbeat_record() -> None:
    record = HeartbeatRecord.from_lease(_heartbeat())
    assert record == HeartbeatRecord("node-a", "42", 15, True, "192.0.2.1")
    assert HeartbeatRecord.from_lease(trim_lease(_heartbeat())) == record
    no_annotations = HeartbeatRecord.from_lease(_heartbeat(metadata__annotations=None))
    assert no_annotations == HeartbeatRecord("node-a", "42", 15, False, "")


def _report(**overrides: Any) -> dict[str, Any]:
    lease: dict[str, Any] = {
        "metadata": {
            "name": "kubelvs-unfit-node-a",
            "resourceVersion": "43",
            "labels": {"app.kubernetes.io/name": "kubelvs", "kubelvs.io/lease": "unfit"},
            "annotations": {"kubelvs.io/unfit": "10.0.0.1, fd00::1,"},
        },
        "spec": {"holderIdentity": "node-a"},
    }
    for path, value in overrides.items():
        section, key = path.split("__")
        lease[section][key] = value
    return lease


def test_unfit_record() -> None:
    assert UnfitRecord.from_lease(_report()) == UnfitRecord("node-a", "43", frozenset({"10.0.0.1", "fd00::1"}))
    assert UnfitRecord.from_lease(_report(metadata__annotations=None)) == UnfitRecord("node-a", "43", frozenset())
    many = [f"10.0.{i // 256}.{i % 256}" for i in range(5000)]
    compressed = _report(metadata__annotations={"kubelvs.io/unfit": encode_vips(many)})
    record = UnfitRecord.from_lease(compressed)
    assert record is not None and len(record.vips) == 5000


@pytest.mark.parametrize(
    "lease",
    [
        {},
        _report(metadata__name="kubelvs-unfit-node-b"),  # not the name of its holder
        _report(spec__holderIdentity=None),
        _report(metadata__annotations={"kubelvs.io/unfit": "zlib+base64:!!"}),  # corrupt: ignored
        _heartbeat(),
        _claim(),
    ],
)
def test_unfit_record_of_a_lease_not_ours(lease: dict[str, Any]) -> None:
    assert UnfitRecord.from_lease(lease) is None


@pytest.mark.parametrize(
    "lease",
    [
        {},
        {"metadata": None, "spec": None},
        _heartbeat(metadata__labels={"app.kubernetes.io/name": "kubelvs", "kubelvs.io/lease": "vip"}),
        _heartbeat(metadata__labels={"kubelvs.io/lease": "heartbeat"}),
        _heartbeat(metadata__resourceVersion=None),
        _heartbeat(metadata__name="kubelvs-director-node-b"),  # not the name of its holder
        _heartbeat(spec__holderIdentity=None),
        _heartbeat(spec__holderIdentity=""),
        _heartbeat(spec__leaseDurationSeconds=None),
        _heartbeat(spec__leaseDurationSeconds="15"),
        _heartbeat(spec__leaseDurationSeconds=True),
        _heartbeat(spec__leaseDurationSeconds=0),
        _claim(),
    ],
)
def test_heartbeat_record_of_a_lease_not_ours(lease: dict[str, Any]) -> None:
    assert HeartbeatRecord.from_lease(lease) is None


def test_claim_record() -> None:
    record = ClaimRecord.from_lease(_claim())
    assert record == ClaimRecord("fd00::1", "node-b", "7", 3)
    assert record is not None and (record.uid, record.acquired) == ("u2", "2025-01-01T00:00:00.000000Z")
    assert ClaimRecord.from_lease(trim_lease(_claim())) == record
    released = ClaimRecord.from_lease(_claim(spec__holderIdentity=None, spec__leaseTransitions=None))
    assert released == ClaimRecord("fd00::1", "", "7", 0)
    spelled = ClaimRecord.from_lease(_claim(metadata__annotations={"kubelvs.io/vip": "FD00:0::1"}))
    assert spelled is not None and spelled.vip == "fd00::1"


@pytest.mark.parametrize(
    "lease",
    [
        {},
        _claim(metadata__labels={"app.kubernetes.io/name": "kubelvs", "kubelvs.io/lease": "heartbeat"}),
        _claim(metadata__annotations=None),
        _claim(metadata__annotations={"kubelvs.io/vip": "not-an-address"}),
        _claim(metadata__annotations={"kubelvs.io/vip": "fd00::2"}),  # not the VIP its name is for
        _claim(metadata__resourceVersion=""),
        _heartbeat(),
    ],
)
def test_claim_record_of_a_lease_not_ours(lease: dict[str, Any]) -> None:
    assert ClaimRecord.from_lease(lease) is None


def test_trim_keeps_metadata_that_matters_and_the_spec() -> None:
    trimmed = trim_lease(_heartbeat())
    assert set(trimmed["metadata"]) == {"name", "namespace", "uid", "resourceVersion", "labels", "annotations"}
    assert trimmed["spec"] == _heartbeat()["spec"]


# ---------------------------------------------------------------------------------------------
# Requests: bounded by the timeout, never sent twice


@pytest.fixture
def silent_server() -> Iterator[tuple[int, list[bytes]]]:
    """A server that reads requests and never answers: (port, the requests it got)."""
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        held = []
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(conn)
            conn.settimeout(1)
            received.append(conn.recv(65536))
        for conn in held:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], received
    stop.set()
    thread.join(5)
    listener.close()


def test_a_write_that_gets_no_answer_fails_within_its_timeout_and_is_not_resent(silent_server) -> None:
    from kubelvs.kube.rest import KubeApi
    from kubernetes import client

    port, received = silent_server
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{port}"
    writes: list[str] = []
    with KubeApi(cfg) as api:
        leases = LeaseClient(api, "kubelvs-system", timeout_seconds=0.5, on_write=writes.append)
        started = time.monotonic()
        with pytest.raises(urllib3.exceptions.ReadTimeoutError):
            leases.claim("10.0.0.1", "node-a", ClaimRecord("10.0.0.1", "", "5", 0, uid="u"))
        assert time.monotonic() - started < 2  # urllib3's default would retry a PUT three times
    time.sleep(0.2)
    assert len(received) == 1 and received[0].startswith(b"PUT /apis/coordination.k8s.io/v1/namespaces/kubelvs-system/")
    assert writes == ["claim"]
