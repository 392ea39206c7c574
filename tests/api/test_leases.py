"""The election Leases against a real kube-apiserver: one write per heartbeat renewal, claims that
only one director can win, the informer's view of them, and the RBAC they need."""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubelvs.kube.leases import (
    ClaimRecord,
    Conflict,
    HeartbeatRecord,
    HeartbeatTaken,
    LeaseClient,
    UnfitRecord,
    claim_name,
    heartbeat_name,
    lease_informer,
    renew_time,
    unfit_name,
)
from kubelvs.kube.rest import KubeApi
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException


@pytest.fixture
def directors(kubeconfig: str) -> Iterator[tuple[client.ApiClient, client.ApiClient]]:
    """Two API clients with their own connection pools, as two directors have."""
    a = config.new_client_from_config(config_file=kubeconfig)
    b = config.new_client_from_config(config_file=kubeconfig)
    yield a, b
    for api in (a, b):
        with contextlib.suppress(Exception):
            api.close()


def raw(api_client: client.ApiClient) -> KubeApi:
    """kubelvs's raw JSON client on the same configuration (its own connection pool)."""
    return KubeApi(api_client.configuration)


def _lease(api_client: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    response = client.CoordinationV1Api(api_client).read_namespaced_lease(name, namespace, _preload_content=False)
    return json.loads(response.data)


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# Heartbeats

HEARTBEAT_LABELS = {"app.kubernetes.io/name": "kubelvs", "kubelvs.io/lease": "heartbeat"}


def test_heartbeat_is_created_once_then_renewed_with_one_request_each(api_client, namespace, monkeypatch) -> None:
    kinds: list[str] = []
    api = raw(api_client)
    leases = LeaseClient(api, namespace, timeout_seconds=5.0, on_write=kinds.append)
    sent: list[tuple[str, str]] = []
    pool = api.rest_client.pool_manager
    real = pool.request

    def spy(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        sent.append((method, url))
        return real(method, url, *args, **kwargs)

    monkeypatch.setattr(pool, "request", spy)

    first = leases.renew_heartbeat("node-a", 7.5, False, "192.0.2.10")
    assert first == HeartbeatRecord("node-a", first.version, 8, False, "192.0.2.10")
    assert [m for m, _ in sent] == ["POST"]
    versions = [first.version]
    for i in range(5):
        draining = i % 2 == 0  # the last one: shutting down
        record = leases.renew_heartbeat("node-a", 7.5, draining, "192.0.2.10")
        assert record.draining == draining and record.peer_address == "192.0.2.10"
        versions.append(record.version)
    # One PUT per renewal, no GET before it; every renewal moves the resourceVersion.
    assert [m for m, _ in sent] == ["POST"] + ["PUT"] * 5
    assert len(set(versions)) == 6
    assert kinds == ["heartbeat"] * 6 and leases.writes == {"heartbeat": 6}

    lease = _lease(api_client, namespace, heartbeat_name("node-a"))
    assert lease["metadata"]["labels"] == HEARTBEAT_LABELS
    # What the others read of it: renewTime orders this director's renewals (and measures the
    # watch's lag), read back from what the API server kept.
    renewed = renew_time(lease)
    assert renewed is not None and abs(time.time() - renewed) < 60, lease["spec"]
    seen = HeartbeatRecord.from_lease(lease)
    assert seen is not None and seen.renewed == renewed
    assert lease["metadata"]["annotations"] == {
        "kubelvs.io/shutting-down": "true",
        "kubelvs.io/peer-address": "192.0.2.10",
    }
    assert lease["spec"]["holderIdentity"] == "node-a" and lease["spec"]["leaseDurationSeconds"] == 8
    assert lease["spec"]["renewTime"] and lease["spec"]["acquireTime"]
    assert HeartbeatRecord.from_lease(lease) == HeartbeatRecord("node-a", versions[-1], 8, True, "192.0.2.10")
    assert leases.get_heartbeat("node-a") == HeartbeatRecord.from_lease(lease)
    # Renewed without the flag: the annotation goes (a PUT replaces the whole object).
    leases.renew_heartbeat("node-a", 7.5, False, "192.0.2.10")
    annotations = _lease(api_client, namespace, heartbeat_name("node-a"))["metadata"]["annotations"]
    assert "kubelvs.io/shutting-down" not in annotations


def test_unfit_report_is_its_own_lease_and_holds_10000_ipv6_vips(api_client, namespace) -> None:
    """The VIPs a director cannot serve go in a Lease of their own, written when they change:
    the heartbeat stays small. 10,000 IPv6 VIPs are more than an annotation may hold as text;
    compressed they fit, and they read back the same."""
    kinds: list[str] = []
    leases = LeaseClient(raw(api_client), namespace, on_write=kinds.append)
    small = leases.report_unfit("node-a", {"10.0.0.2", "fd00::1"})
    assert small == UnfitRecord("node-a", small.version, frozenset({"10.0.0.2", "fd00::1"}))
    lease = _lease(api_client, namespace, unfit_name("node-a"))
    assert lease["metadata"]["labels"] == {"app.kubernetes.io/name": "kubelvs", "kubelvs.io/lease": "unfit"}
    assert lease["metadata"]["annotations"] == {"kubelvs.io/unfit": "10.0.0.2,fd00::1"}
    assert UnfitRecord.from_lease(lease) == small

    many = frozenset(f"fd00:1234:5678:9abc::{i:x}:{i * 7 % 65536:x}" for i in range(10_000))
    assert len(",".join(many)) > 256 * 1024  # too long for an annotation as text
    big = leases.report_unfit("node-a", many)
    lease = _lease(api_client, namespace, unfit_name("node-a"))
    assert UnfitRecord.from_lease(lease) == big and big.vips == many
    assert leases.report_unfit("node-a", ()).vips == frozenset()
    assert kinds == ["unfit"] * 3
    # A restarted director (no version known) overwrites the report of its earlier run.
    again = LeaseClient(raw(api_client), namespace).report_unfit("node-a", {"10.0.0.3"})
    assert UnfitRecord.from_lease(_lease(api_client, namespace, unfit_name("node-a"))) == again


def test_heartbeat_after_a_restart_a_foreign_write_and_a_delete(api_client, namespace) -> None:
    before = LeaseClient(raw(api_client), namespace)
    created = before.renew_heartbeat("node-b", 10, False, "")
    acquired = _lease(api_client, namespace, heartbeat_name("node-b"))["spec"]["acquireTime"]

    # A restarted director knows no version: its create is refused, it reads and renews.
    after = LeaseClient(raw(api_client), namespace)
    renewed = after.renew_heartbeat("node-b", 10, False, "198.51.100.1")
    assert renewed.version != created.version and after.writes == {"heartbeat": 2}
    assert _lease(api_client, namespace, heartbeat_name("node-b"))["spec"]["acquireTime"] == acquired

    # Its earlier incarnation still has the old version: 409, a fresh read, one more PUT.
    again = before.renew_heartbeat("node-b", 10, False, "")
    assert again.version != renewed.version and before.writes == {"heartbeat": 3}

    # Deleted under it: the PUT creates it again (Leases allow create-on-update), one write.
    client.CoordinationV1Api(api_client).delete_namespaced_lease(heartbeat_name("node-b"), namespace)
    assert after.get_heartbeat("node-b") is None
    assert before.renew_heartbeat("node-b", 10, False, "").node == "node-b" and before.writes == {"heartbeat": 4}

    # Clean shutdown; a second delete finds nothing and is fine.
    before.delete_heartbeat("node-b")
    before.delete_heartbeat("node-b")
    assert before.get_heartbeat("node-b") is None


def test_a_heartbeat_held_by_another_node_is_not_overwritten(api_client, namespace) -> None:
    coordination = client.CoordinationV1Api(api_client)
    name = heartbeat_name("node-c")
    coordination.create_namespaced_lease(
        namespace,
        {
            "metadata": {"name": name, "labels": HEARTBEAT_LABELS},
            "spec": {"holderIdentity": "somebody-else", "leaseDurationSeconds": 10},
        },
    )
    leases = LeaseClient(raw(api_client), namespace)
    with pytest.raises(HeartbeatTaken, match="somebody-else"):
        leases.renew_heartbeat("node-c", 10)
    assert _lease(api_client, namespace, name)["spec"]["holderIdentity"] == "somebody-else"
    # Not a heartbeat of node-c: its name is node-c's, its holder not.
    assert leases.get_heartbeat("node-c") is None


def test_list_heartbeats_skips_leases_that_are_not_ours(api_client, namespace) -> None:
    leases = LeaseClient(raw(api_client), namespace)
    for node in ("n1", "n2.example.com", "N3_odd"):
        leases.renew_heartbeat(node, 4.2, False, "")
    coordination = client.CoordinationV1Api(api_client)
    coordination.create_namespaced_lease(namespace, {"metadata": {"name": "unrelated"}, "spec": {}})
    coordination.create_namespaced_lease(
        namespace,
        {"metadata": {"name": "kubelvs-director-x", "labels": {"app.kubernetes.io/name": "kubelvs"}}, "spec": {}},
    )
    records, version = leases.list_heartbeats()
    assert sorted(r.node for r in records) == ["N3_odd", "n1", "n2.example.com"]
    assert {r.duration_seconds for r in records} == {5} and version
    assert leases.list_claims()[0] == []


# ---------------------------------------------------------------------------------------------
# Claims


def _race(
    barrier: threading.Barrier,
    results: dict[str, ClaimRecord | Exception],
    leases: LeaseClient,
    vip: str,
    me: str,
    expected: ClaimRecord | None,
) -> None:
    barrier.wait()  # both requests leave together
    try:
        results[me] = leases.claim(vip, me, expected)
    except Exception as error:
        results[me] = error


def test_two_directors_racing_for_a_vip_never_both_win(directors, namespace) -> None:
    a, b = LeaseClient(raw(directors[0]), namespace), LeaseClient(raw(directors[1]), namespace)
    vip = "10.20.30.40"
    expected: ClaimRecord | None = None  # the first round races two creates
    holders: list[str] = []
    for _ in range(20):
        barrier = threading.Barrier(2)
        results: dict[str, ClaimRecord | Exception] = {}
        threads = [
            threading.Thread(target=_race, args=(barrier, results, leases, vip, node, expected))
            for leases, node in ((a, "node-a"), (b, "node-b"))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        won = {n: r for n, r in results.items() if isinstance(r, ClaimRecord)}
        lost = {n: r for n, r in results.items() if not isinstance(r, ClaimRecord)}
        assert len(won) == 1 and len(lost) == 1, results
        assert all(isinstance(e, Conflict) for e in lost.values()), lost
        ((winner, record),) = won.items()
        assert record.holder == winner and record.vip == vip
        previous = "" if expected is None else expected.holder
        transitions = 0 if expected is None else expected.transitions + (winner != previous)
        assert record.transitions == transitions
        holders.append(winner)
        expected = record
    assert expected is not None
    server = ClaimRecord.from_lease(_lease(directors[0], namespace, claim_name(vip)))
    assert server == expected
    assert a.writes["claim"] == b.writes["claim"] == 20


def test_stale_versions_are_refused_release_then_claim(api_client, namespace) -> None:
    kinds: list[str] = []
    a, b = LeaseClient(raw(api_client), namespace, on_write=kinds.append), LeaseClient(raw(api_client), namespace)
    vip = "fd00:0:0::1"
    first = a.claim(vip, "node-a", None)
    assert (first.vip, first.holder, first.transitions) == ("fd00::1", "node-a", 0)
    lease = _lease(api_client, namespace, "kubelvs-vip-fd00--1")
    assert lease["metadata"]["labels"] == {"app.kubernetes.io/name": "kubelvs", "kubelvs.io/lease": "vip"}
    assert lease["metadata"]["annotations"] == {"kubelvs.io/vip": "fd00::1"}
    assert lease["spec"]["holderIdentity"] == "node-a" and lease["spec"]["acquireTime"]

    with pytest.raises(Conflict):  # it exists
        b.claim(vip, "node-b", None)

    released = a.claim(vip, "", first)
    assert (released.holder, released.transitions) == ("", 1)
    assert "holderIdentity" not in _lease(api_client, namespace, claim_name(vip))["spec"]
    with pytest.raises(Conflict):  # the version before the release
        b.claim(vip, "node-b", first)
    taken = b.claim(vip, "node-b", released)
    assert (taken.holder, taken.transitions) == ("node-b", 2)
    with pytest.raises(Conflict):
        a.claim(vip, "node-a", released)

    # The same holder again changes no transition count and keeps the acquire time.
    same = b.claim(vip, "node-b", taken)
    assert same.transitions == 2 and same.version != taken.version and same.acquired == taken.acquired

    # A claim no VirtualServer needs is deleted only at the version last seen.
    with pytest.raises(Conflict):
        b.delete_claim(vip, taken)
    b.delete_claim(vip, same)
    b.delete_claim(vip, same)  # gone already: fine
    # An update from a view older than the deletion: Leases allow create-on-update, the uid
    # sent along refuses it instead of bringing the claim back.
    with pytest.raises(Conflict):
        a.claim(vip, "node-a", same)
    assert a.list_claims()[0] == []
    assert a.claim(vip, "node-a", None).transitions == 0
    assert kinds == ["claim"] * 5  # a's: two writes that landed, two refused, one create


def test_list_claims(api_client, namespace) -> None:
    leases = LeaseClient(raw(api_client), namespace)
    for i, vip in enumerate(("10.0.0.1", "10.0.0.2", "2001:db8::", "::ffff:10.0.0.1")):
        leases.claim(vip, f"node-{i}", None)
    client.CoordinationV1Api(api_client).create_namespaced_lease(
        namespace,  # ours by its labels, but not a name a director writes for that VIP
        {
            "metadata": {
                "name": "kubelvs-vip-10-0-0-9",
                "labels": {"app.kubernetes.io/name": "kubelvs", "kubelvs.io/lease": "vip"},
                "annotations": {"kubelvs.io/vip": "10.0.0.8"},
            },
            "spec": {"holderIdentity": "mallory"},
        },
    )
    records, version = leases.list_claims()
    assert sorted((r.vip, r.holder) for r in records) == [
        ("10.0.0.1", "node-0"),
        ("10.0.0.2", "node-1"),
        ("2001:db8::", "node-2"),
        ("::ffff:a00:1", "node-3"),
    ]
    assert version and leases.list_heartbeats()[0] == []


# ---------------------------------------------------------------------------------------------
# The informer


def test_the_informer_sees_claims_come_change_and_go(api_client, namespace) -> None:
    leases = LeaseClient(raw(api_client), namespace)
    leases.renew_heartbeat("node-a", 5, False, "")
    events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
    relisted: list[list[dict[str, Any]]] = []
    restarts: list[tuple[str, str]] = []
    informer = lease_informer(
        raw(api_client),
        namespace,
        lambda kind, obj: events.put((kind, obj)),
        relisted.append,
        on_restart=lambda resource, reason: restarts.append((resource, reason)),
    )
    items, version = informer.list()
    assert [HeartbeatRecord.from_lease(o).node for o in items] == ["node-a"]  # type: ignore[union-attr]
    assert set(items[0]) == {"metadata", "spec"} and "managedFields" not in items[0]["metadata"]

    stop = threading.Event()
    informer.start(version, lambda callback, args: callback(*args), stop)
    try:
        created = leases.claim("10.1.2.3", "node-a", None)
        moved = leases.claim("10.1.2.3", "node-b", created)
        leases.delete_claim("10.1.2.3", moved)
        seen = [events.get(timeout=30) for _ in range(3)]
        assert [kind for kind, _ in seen] == ["ADDED", "MODIFIED", "DELETED"]
        records = [ClaimRecord.from_lease(obj) for _, obj in seen]
        assert records[:2] == [created, moved]
        # A deletion is the last state, at the deletion's own resourceVersion.
        assert records[2] is not None and (records[2].holder, records[2].transitions) == ("node-b", 1)
        assert all(set(obj["metadata"]) <= {"name", "namespace", "uid", "resourceVersion", "labels", "annotations"}
                   for _, obj in seen)  # fmt: skip
        # A heartbeat renewal and an unfit report come through as well.
        renewed = leases.renew_heartbeat("node-a", 5, True, "")
        kind, obj = events.get(timeout=30)
        assert kind == "MODIFIED" and HeartbeatRecord.from_lease(obj) == renewed
        report = leases.report_unfit("node-a", {"10.1.2.3"})
        kind, obj = events.get(timeout=30)
        assert kind == "ADDED" and UnfitRecord.from_lease(obj) == report
    finally:
        stop.set()
    assert not relisted and not restarts


# ---------------------------------------------------------------------------------------------
# RBAC: a namespaced Role is all a director needs


LEASE_VERBS = ["get", "list", "watch", "create", "update", "delete"]


def test_a_namespaced_role_without_patch_is_enough(api_client, kubectl, namespace) -> None:
    core, rbac = client.CoreV1Api(api_client), client.RbacAuthorizationV1Api(api_client)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "director"}})
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "kubelvs-election"},
            "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": LEASE_VERBS}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "kubelvs-election"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kubelvs-election"},
            "subjects": [{"kind": "ServiceAccount", "name": "director", "namespace": namespace}],
        },
    )
    user = f"system:serviceaccount:{namespace}:director"

    def can(verb: str, ns: str = namespace) -> bool:
        res = kubectl("auth", "can-i", verb, "leases.coordination.k8s.io", "-n", ns, "--as", user, check=False)
        return res.stdout.strip() == "yes"

    _wait(lambda: can("delete"), timeout=30, what="the RoleBinding to take effect")
    assert all(can(verb) for verb in LEASE_VERBS)
    assert not can("patch") and not can("deletecollection") and not can("list", "default")

    token = core.create_namespaced_service_account_token(
        "director", namespace, {"spec": {"audiences": []}}
    ).status.token
    cfg = client.Configuration()
    cfg.host = api_client.configuration.host
    cfg.ssl_ca_cert = api_client.configuration.ssl_ca_cert
    cfg.api_key = {"authorization": token}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    with client.ApiClient(cfg) as sa_client:
        leases = LeaseClient(raw(sa_client), namespace)
        # Every path: create, renew, the 409 re-read, read, list, claim, release, delete.
        leases.renew_heartbeat("node-a", 5, False, "192.0.2.1")
        leases.renew_heartbeat("node-a", 5, True, "192.0.2.1")
        leases.report_unfit("node-a", {"10.0.0.1"})
        leases.report_unfit("node-a", ())
        # POST 409, GET, PUT:
        assert LeaseClient(raw(sa_client), namespace).renew_heartbeat("node-a", 5).node == "node-a"
        assert leases.get_heartbeat("node-a") is not None
        assert [r.node for r in leases.list_heartbeats()[0]] == ["node-a"]
        claim = leases.claim("10.0.0.1", "node-a", None)
        released = leases.claim("10.0.0.1", "", claim)
        assert [r.holder for r in leases.list_claims()[0]] == [""]
        leases.delete_claim("10.0.0.1", released)
        leases.delete_heartbeat("node-a")

        events: queue.Queue[str] = queue.Queue()
        informer = lease_informer(raw(sa_client), namespace, lambda kind, obj: events.put(kind), lambda items: None)
        _, version = informer.list()
        stop = threading.Event()
        informer.start(version, lambda callback, args: callback(*args), stop)
        try:
            leases.claim("10.0.0.2", "node-a", None)
            assert events.get(timeout=30) == "ADDED"
        finally:
            stop.set()

        # Nothing outside its namespace.
        with pytest.raises(ApiException) as refused:
            LeaseClient(raw(sa_client), "default").list_claims()
        assert refused.value.status == 403
