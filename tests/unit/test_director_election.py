"""The election wired (kubelvs.director.election) with several directors in one event loop.

The API server and the segment are stand-ins here (an in-memory Lease store with the real
compare-and-set rules, and a segment that knows which director holds which claim address and
when its lifetime ends); the same scenarios run against the real API server and kernel in
tests/kernel/test_ha.py. Time is real and short; every check polls with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubelvs.core import election as el
from kubelvs.core.model import AF_INET
from kubelvs.core.resolve import Resolution
from kubelvs.core.spec import ObjectRef
from kubelvs.director import election as election_module
from kubelvs.director.election import FULL_DECISION_PERIODS, ClaimLost, Election, ElectionConfig
from kubelvs.director.metrics import Metrics
from kubelvs.kube.leases import (
    ClaimRecord,
    Conflict,
    HeartbeatRecord,
    UnfitRecord,
    claim_name,
    encode_vips,
    heartbeat_name,
    unfit_name,
)
from prometheus_client import CollectorRegistry

TIMINGS = el.Timings(lease_duration=0.8, renew_deadline=0.5, retry_period=0.1, handover_delay=0.8)


class LeaseStore:
    """Leases with resourceVersions and compare-and-set, delivering events to every director."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.leases: dict[str, dict[str, Any]] = {}
        self.version = itertools.count(1)
        self.watchers: list[tuple[asyncio.AbstractEventLoop, Callable[[str, dict[str, Any]], None]]] = []
        self.writes: dict[str, int] = {"heartbeat": 0, "unfit": 0, "claim": 0}
        self.claim_log: list[tuple[str, str, str]] = []  # (writer, vip, new holder)
        self.down: set[str] = set()  # nodes cut off from the API
        self.slow: dict[str, float] = {}  # node -> seconds each of its heartbeat renewals takes

    def _put(self, obj: dict[str, Any], event: str) -> dict[str, Any]:
        obj["metadata"]["resourceVersion"] = str(next(self.version))
        self.leases[obj["metadata"]["name"]] = obj
        for loop, callback in self.watchers:
            loop.call_soon_threadsafe(callback, event, _copy(obj))
        return _copy(obj)

    def client(self, node: str) -> FakeLeases:
        return FakeLeases(self, node)


def _copy(obj: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": dict(obj["metadata"]), "spec": dict(obj["spec"])}


@dataclass
class FakeLeases:
    store: LeaseStore
    node: str

    def _check(self) -> None:
        if self.node in self.store.down:
            raise ConnectionError(f"{self.node} cannot reach the API server")

    def renew_heartbeat(
        self, node: str, duration_seconds: float, draining: bool = False, peer_address: str = ""
    ) -> HeartbeatRecord:
        self._check()
        time.sleep(self.store.slow.get(self.node, 0.0))
        with self.store.lock:
            self.store.writes["heartbeat"] += 1
            annotations = {"kubelvs.io/peer-address": ""} | ({"kubelvs.io/shutting-down": "true"} if draining else {})
            obj = {
                "metadata": {
                    "name": heartbeat_name(node),
                    "labels": {"app.kubernetes.io/name": "kubelvs", "kubelvs.io/lease": "heartbeat"},
                    "annotations": annotations,
                },
                "spec": {"holderIdentity": node, "leaseDurationSeconds": 1},
            }
            record = HeartbeatRecord.from_lease(self.store._put(obj, "MODIFIED"))
        assert record is not None
        return record

    def report_unfit(self, node: str, vips: Iterable[str]) -> UnfitRecord:
        self._check()
        with self.store.lock:
            self.store.writes["unfit"] += 1
            obj = {
                "metadata": {
                    "name": unfit_name(node),
                    "labels": {"app.kubernetes.io/name": "kubelvs", "kubelvs.io/lease": "unfit"},
                    "annotations": {"kubelvs.io/unfit": encode_vips(vips)},
                },
                "spec": {"holderIdentity": node},
            }
            record = UnfitRecord.from_lease(self.store._put(obj, "MODIFIED"))
        assert record is not None
        return record

    def get_heartbeat(self, node: str) -> HeartbeatRecord | None:
        self._check()
        with self.store.lock:
            obj = self.store.leases.get(heartbeat_name(node))
            return HeartbeatRecord.from_lease(_copy(obj)) if obj else None

    def claim(self, vip: str, holder: str, expected: ClaimRecord | None) -> ClaimRecord:
        self._check()
        with self.store.lock:
            name = claim_name(vip)
            current = self.store.leases.get(name)
            if expected is None and current is not None:
                raise Conflict("exists")
            if expected is not None and (current is None or current["metadata"]["resourceVersion"] != expected.version):
                raise Conflict("changed")
            self.store.writes["claim"] += 1
            self.store.claim_log.append((self.node, vip, holder))
            transitions = (expected.transitions + (holder != expected.holder)) if expected else 0
            obj = {
                "metadata": {
                    "name": name,
                    "labels": {"app.kubernetes.io/name": "kubelvs", "kubelvs.io/lease": "vip"},
                    "annotations": {"kubelvs.io/vip": vip},
                },
                "spec": {"holderIdentity": holder, "leaseTransitions": transitions},
            }
            record = ClaimRecord.from_lease(self.store._put(obj, "MODIFIED"))
        assert record is not None
        return record

    def list_claims(self) -> tuple[list[ClaimRecord], str]:
        self._check()
        with self.store.lock:
            records = [ClaimRecord.from_lease(_copy(o)) for o in self.store.leases.values()]
        return [r for r in records if r is not None], "0"


class Segment:
    """Who holds which claim address, until when; fails the test on two live holders at once."""

    def __init__(self) -> None:
        # VIP -> node -> expiry (monotonic); written by each director's kernel thread
        self.addresses: dict[str, dict[str, float]] = {}
        self.overlaps: list[str] = []
        self.down: set[str] = set()  # links down

    def holders(self, vip: str, now: float | None = None) -> set[str]:
        now = time.monotonic() if now is None else now
        held = self.addresses.get(vip, {}).copy()
        return {node for node, end in held.items() if end > now and node not in self.down}

    def check(self, vip: str) -> None:
        holders = self.holders(vip)
        if len(holders) > 1:
            self.overlaps.append(f"{vip}: {sorted(holders)}")


@dataclass
class FakeNet:
    segment: Segment
    node: str
    announced: list[str] = field(default_factory=list)

    def uplinks(self, vips: Iterable[str]) -> dict[str, tuple[str, bool] | None]:
        return {vip: ("eth0", self.node not in self.segment.down) for vip in vips}

    def hold(
        self,
        interface: str,
        vips: list[tuple[str, int]],
        lifetime: int,
        still_valid: Callable[[], bool],
    ) -> list[tuple[str, OSError]]:
        failed: list[tuple[str, OSError]] = []
        for vip, _family in vips:
            now = time.monotonic()
            if not still_valid():
                failed.append((vip, ClaimLost(vip, "validity ended")))
                continue
            self.segment.addresses.setdefault(vip, {})[self.node] = now + lifetime
            self.segment.check(vip)
        return failed

    def release(self, interface: str, vips: list[tuple[str, int]]) -> list[tuple[str, OSError]]:
        for vip, _family in vips:
            self.segment.addresses.get(vip, {}).pop(self.node, None)
        return []

    def held(self) -> dict[str, str]:
        return {}

    def probe(self, interface: str, vips: list[tuple[str, int]], timeout: float) -> dict[str, set[str]]:
        return {vip: self.segment.holders(vip) - {self.node} for vip, _family in vips}

    def announce(
        self, interface: str, vips: list[tuple[str, int]], still_valid: Callable[[], bool] = lambda: True
    ) -> tuple[int, list[tuple[str, OSError]]]:
        if not still_valid():
            return 0, []
        self.announced.extend(vip for vip, _family in vips)
        return 2 * len(vips), []

    def monitor(self, interface: str) -> None:
        return None


@dataclass
class _Spec:
    family: int = AF_INET
    node_selector: dict[str, str] = field(default_factory=dict)


@dataclass
class _Memo:
    spec: _Spec


class FakeView:
    def __init__(self, vips: list[str], nodes: list[str]) -> None:
        self.memo = {ObjectRef("default", f"vs{i}"): _Memo(_Spec()) for i in range(len(vips))}
        self.labels_by_node: dict[str, dict[str, str]] = {node: {} for node in nodes}
        self.node_labels: dict[str, str] = {}
        self.node_seen = True
        self.node_address = ""
        self.director_nodes: set[str] = set()

    def set_director_nodes(self, nodes: Iterable[str]) -> None:
        self.director_nodes = set(nodes)


@dataclass
class FakeSync:
    desired: Any
    errors_by_ref: dict[ObjectRef, list[str]] = field(default_factory=dict)
    synced_once: bool = True


@dataclass
class _Desired:
    resolutions: dict[ObjectRef, Resolution]


class Cluster:
    def __init__(self, nodes: list[str], vips: list[str]) -> None:
        self.store = LeaseStore()
        self.segment = Segment()
        self.vips = vips
        self.nodes = nodes
        self.elections: dict[str, Election] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.frozen: set[str] = set()

    def start(self, node: str) -> None:
        loop = asyncio.get_running_loop()
        view = FakeView(self.vips, self.nodes)
        resolutions = {
            ref: Resolution(ref, keys=(), vip=vip, ready_backends=1)
            for ref, vip in zip(view.memo, self.vips, strict=True)
        }
        election = Election(
            ElectionConfig(node=node, timings=TIMINGS, peer_port=0, probe_timeout=0.01, announce_count=1),
            self.store.client(node),  # type: ignore[arg-type]
            FakeNet(self.segment, node),
            view,  # type: ignore[arg-type]
            Metrics(CollectorRegistry()),
            FakeSync(_Desired(resolutions)),
        )
        with self.store.lock:
            self.store.watchers.append((loop, election.on_lease))
            listed = [_copy(o) for o in self.store.leases.values()]
        election.on_leases_relisted(listed)
        self.elections[node] = election
        self.tasks[node] = asyncio.create_task(election.run())

    def kill(self, node: str) -> None:
        """SIGKILL: the process is gone, its claim addresses stay until their lifetime ends."""
        self.tasks.pop(node).cancel()
        election = self.elections.pop(node)
        if election._fence_timer is not None:
            election._fence_timer.cancel()
        self.store.watchers = [(loop, cb) for loop, cb in self.store.watchers if cb != election.on_lease]

    async def stop_all(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    def owners(self) -> dict[str, set[str]]:
        return {vip: self.segment.holders(vip) for vip in self.vips}


async def until(what: str, check: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def balanced(cluster: Cluster, nodes: Iterable[str]) -> bool:
    owners = cluster.owners()
    if any(len(holders) != 1 for holders in owners.values()):
        return False
    counts = {node: 0 for node in nodes}
    for holders in owners.values():
        (node,) = holders
        if node not in counts:
            return False
        counts[node] += 1
    return max(counts.values()) - min(counts.values()) <= 1


VIPS = [f"192.0.2.{i}" for i in range(1, 7)]


@contextlib.asynccontextmanager
async def running(nodes: str, vips: list[str] = VIPS, started: str | None = None) -> AsyncIterator[Cluster]:
    """Directors ``nodes`` (one letter each), those in ``started`` (default: all) running and
    balanced; stopped afterwards, and never two holders of a VIP meanwhile."""
    started = nodes if started is None else started
    cluster = Cluster(list(nodes), vips)
    try:
        for node in started:
            cluster.start(node)
        await until(f"balanced on {started}", lambda: balanced(cluster, started))
        yield cluster
    finally:
        await cluster.stop_all()
    assert not cluster.segment.overlaps, cluster.segment.overlaps


def test_one_owner_per_vip_balanced_and_claims_written_only_on_change() -> None:
    async def scenario() -> None:
        async with running("abc") as cluster:
            claims_before = cluster.store.writes["claim"]
            heartbeats_before = cluster.store.writes["heartbeat"]
            reports_before = cluster.store.writes["unfit"]
            await asyncio.sleep(1.0)
            assert cluster.store.writes["claim"] == claims_before, "claims are written only when an owner changes"
            assert cluster.store.writes["unfit"] == reports_before, "unfit reports only when they change"
            beats = cluster.store.writes["heartbeat"] - heartbeats_before
            assert beats <= 3 * (1.0 / TIMINGS.retry_period + 2), beats  # directors / retry period
            assert balanced(cluster, "abc")

    asyncio.run(scenario())


def test_a_killed_owner_is_replaced_without_two_holders(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with running("abc") as cluster:
            with caplog.at_level(logging.INFO, logger="kubelvs.director.election"):
                cluster.kill("a")
                await until("a's VIPs on b and c", lambda: balanced(cluster, "bc"))
        # Each takeover says where its time went: the silence it waited out, then its own steps.
        lines = [r.getMessage() for r in caplog.records if "took over from a," in r.getMessage()]
        assert lines, [r.getMessage() for r in caplog.records]
        assert all("when decided" in line and "claim write" in line for line in lines), lines

    asyncio.run(scenario())


def test_shutting_down_hands_every_vip_over_and_waits_for_the_new_owners() -> None:
    async def scenario() -> None:
        async with running("abc") as cluster:
            leaving = cluster.elections["a"]
            moved = set(leaving.held)
            assert moved
            assert await leaving.drain(timeout=10.0) == set()
            owners = cluster.owners()
            assert all(len(owners[vip]) == 1 and "a" not in owners[vip] for vip in moved), owners
            cluster.kill("a")
            await asyncio.sleep(3 * TIMINGS.retry_period)
            assert balanced(cluster, "bc"), cluster.owners()

    asyncio.run(scenario())


def test_shutting_down_says_so_before_handing_over_so_no_vip_comes_back() -> None:
    """Seen in the VM's rolling restart: the leaving director wrote the claims before its
    heartbeat said ShuttingDown; the new owner, still seeing it fit and preferred, handed each
    VIP back as a rebalance, and the two ping-ponged until the shutdown timeout."""

    async def scenario() -> None:
        async with running("abc") as cluster:
            leaving = cluster.elections["a"]
            moved = set(leaving.held)
            assert moved
            cluster.store.slow["a"] = 3 * TIMINGS.retry_period  # each renewal takes 0.3 s
            log = cluster.store.claim_log
            start = len(log)
            draining = asyncio.create_task(leaving.drain(timeout=10.0))
            await asyncio.sleep(TIMINGS.retry_period)  # no renewal sent since has been written yet
            assert [w for w in log[start:] if w[0] == "a"] == [], "handed over before the heartbeat said so"
            assert await draining == set()
            await asyncio.sleep(4 * TIMINGS.retry_period)
            handed = [w for w in log[start:] if w[0] == "a"]
            assert sorted(vip for _a, vip, _to in handed) == sorted(moved), handed  # each once
            assert [w for w in log[start:] if w[2] == "a"] == [], "a VIP was handed back to the leaving director"
            assert all("a" not in holders for holders in cluster.owners().values()), cluster.owners()
            cluster.kill("a")

    asyncio.run(scenario())


def test_a_lone_director_keeps_its_vips_when_shutting_down() -> None:
    async def scenario() -> None:
        async with running("a", VIPS[:2]) as cluster:
            assert await cluster.elections["a"].drain(timeout=1.0) == set(VIPS[:2])
            assert balanced(cluster, "a"), "no other director: kept until the process ends"

    asyncio.run(scenario())


def test_an_owner_cut_off_from_the_api_stops_answering_before_anyone_takes_over() -> None:
    async def scenario() -> None:
        async with running("ab") as cluster:
            cluster.store.down.add("a")  # no peer channel here: a must release
            await until("every VIP on b", lambda: balanced(cluster, "b"))
            cluster.store.down.discard("a")
            await until("balanced again, by handover", lambda: balanced(cluster, "ab"))

    asyncio.run(scenario())


def test_an_owner_whose_kernel_work_stalls_never_revives_a_claim_taken_since() -> None:
    """As a SIGSTOP between queueing a refresh and running it (seen in the VM: the continued
    owner's kernel thread refreshed, so re-created, an address that had ended its lifetime,
    while another director held the VIP): the refresh runs long after our validity ended,
    and must add nothing."""

    async def scenario() -> None:
        async with running("ab") as cluster:
            stalled = cluster.elections["a"]
            held = set(stalled.held)
            assert held
            unblock = threading.Event()
            stalled.kernel.submit(unblock.wait)  # the kernel thread stops; refreshes queue behind it
            await asyncio.sleep(2 * TIMINGS.retry_period)  # at least one refresh queued
            cluster.store.down.add("a")  # and it can no longer renew
            await until("a's VIPs on b", lambda: all(cluster.segment.holders(vip) == {"b"} for vip in held))
            unblock.set()  # the queued refreshes run now
            await asyncio.sleep(3 * TIMINGS.retry_period)
            assert all(cluster.segment.holders(vip) == {"b"} for vip in held), cluster.owners()
            cluster.store.down.discard("a")
            await until("balanced again, by handover", lambda: balanced(cluster, "ab"))

    asyncio.run(scenario())


def test_a_director_that_joins_gets_its_share_by_handover() -> None:
    async def scenario() -> None:
        async with running("abc", started="ab") as cluster:
            transitions_before = cluster.store.writes["claim"]
            cluster.start("c")
            await until("balanced on a, b and c", lambda: balanced(cluster, "abc"))
            assert cluster.store.writes["claim"] - transitions_before == 2  # c's share, one handover each

    asyncio.run(scenario())


def test_a_director_joins_only_after_its_first_sync() -> None:
    """A restarted director still listing has no IPVS rules: no VIP may be handed to it."""

    async def scenario() -> None:
        async with running("abc", started="ab") as cluster:
            cluster.start("c")
            late = cluster.elections["c"]
            late.sync_state.synced_once = False
            await asyncio.sleep(4 * TIMINGS.handover_delay)
            assert heartbeat_name("c") not in cluster.store.leases, "renewed before its first sync"
            assert balanced(cluster, "ab")
            late.sync_state.synced_once = True
            await until("balanced on a, b and c", lambda: balanced(cluster, "abc"))

    asyncio.run(scenario())


def test_a_link_down_owner_hands_its_vips_over() -> None:
    async def scenario() -> None:
        async with running("ab") as cluster:
            cluster.segment.down.add("a")
            await until("every VIP on b", lambda: all(h == {"b"} for h in cluster.owners().values()))
            decisions = cluster.elections["a"].decisions
            assert all(d.action is not el.Action.HOLD for d in decisions.values()), decisions

    asyncio.run(scenario())


@pytest.mark.parametrize("vips", [[], ["2001:db8::1"]])
def test_no_vips_or_ipv6_vips(vips: list[str]) -> None:
    async def scenario() -> None:
        cluster = Cluster(["a"], vips)
        try:
            cluster.start("a")
            await until("settled", lambda: all(len(h) == 1 for h in cluster.owners().values()) or not vips)
        finally:
            await cluster.stop_all()

    asyncio.run(scenario())


def test_a_sync_that_empties_a_vip_moves_it_to_a_director_with_ready_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a sync changes reaches the decisions through ``on_synced`` (only the VirtualServers
    it covered are looked at): the owner's VIP with no ready backend left goes to the other."""
    monkeypatch.setattr(election_module, "FULL_DECISION_PERIODS", 10**6)  # no safety net: on_synced alone

    async def scenario() -> None:
        async with running("ab") as cluster:
            vip = VIPS[0]
            (owner,) = cluster.owners()[vip]
            election = cluster.elections[owner]
            ref = next(ref for ref, res in election.sync_state.desired.resolutions.items() if res.vip == vip)
            resolutions = dict(election.sync_state.desired.resolutions)
            resolutions[ref] = replace(resolutions[ref], ready_backends=0)
            election.sync_state.desired = _Desired(resolutions)
            election.on_synced({ref})
            (other,) = set("ab") - {owner}
            await until(f"{vip} on {other}", lambda: cluster.owners()[vip] == {other})
            assert election.unfit.get(vip) == "NoReadyBackends"

    asyncio.run(scenario())


def test_when_only_the_clock_moves_the_election_does_not_decide_about_every_vip_again() -> None:
    """The loop wakes every retry period; with nothing changed it only keeps its addresses
    and announcements (a decision over every VIP each time was the cost of 10,000 VIPs)."""

    async def scenario() -> None:
        async with running("ab") as cluster:
            election = next(iter(cluster.elections.values()))
            calls: list[tuple[Any, Any]] = []  # (the moment now, the moment of the last decision)
            real = election.decide

            def counted(now: float, vips: Any) -> Any:
                calls.append((election._moment(now), election._decided_on[2]))
                return real(now, vips)

            election.decide = counted  # type: ignore[method-assign]
            await asyncio.sleep(10 * TIMINGS.retry_period)
            # A renewal late on a loaded machine changes the moment (who is live, our validity):
            # a decision then is due. With the moment unchanged, at most one: the safety net
            # every FULL_DECISION_PERIODS retry periods.
            unchanged = [now for now, last in calls if now == last]
            assert len(unchanged) <= 10 // FULL_DECISION_PERIODS + 1, calls
            # And the moment itself is stable while nothing happens: not one decision a period.
            assert len(calls) <= 10 // 2, calls
            assert balanced(cluster, "ab")

    asyncio.run(scenario())


_REFS = [ObjectRef("default", f"vs{i}") for i in range(6)]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sets(st.sampled_from(_REFS), min_size=1),  # the scope of one sync
            st.lists(st.tuples(st.sampled_from(["", *VIPS[:3]]), st.booleans(), st.booleans()), min_size=6, max_size=6),
        ),
        max_size=6,
    )
)
def test_the_vips_kept_up_by_each_sync_equal_the_vips_found_anew(
    syncs: list[tuple[set[ObjectRef], list[tuple[str, bool, bool]]]],
) -> None:
    """``on_synced`` updates the VIPs from the VirtualServers a sync covered; the result is what
    a pass over every VirtualServer finds, and it wakes the loop exactly when a VIP changed."""
    view = FakeView(VIPS[: len(_REFS)], ["a"])
    sync = FakeSync(_Desired({ref: Resolution(ref, vip=VIPS[0], ready_backends=1) for ref in _REFS}))
    election = Election(
        ElectionConfig(node="a", timings=TIMINGS, peer_port=0),
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        view,  # type: ignore[arg-type]
        Metrics(CollectorRegistry()),
        sync,
    )
    election.vips()
    election.on_synced(None)  # the first sync: everything
    for scope, states in syncs:
        before = dict(election.vips())
        election.wake.clear()
        resolutions = dict(sync.desired.resolutions)
        errors = {ref: errors for ref, errors in sync.errors_by_ref.items() if ref not in scope}
        for ref, (vip, ready, failed) in zip(_REFS, states, strict=True):
            if ref in scope:
                resolutions[ref] = Resolution(ref, vip=vip, ready_backends=int(ready))
                if failed:
                    errors[ref] = ["boom"]
        sync.desired, sync.errors_by_ref = _Desired(resolutions), errors
        election.on_synced(scope)
        kept = election.vips()
        fresh = Election(election.config, None, None, view, Metrics(CollectorRegistry()), sync)  # type: ignore[arg-type]
        assert kept == fresh.vips()
        assert election.wake.is_set() == (kept != before)


def test_renewal_round_trips_are_measured_and_a_slow_one_says_where_its_time_went(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async with running("ab") as cluster:
            election = cluster.elections["a"]
            registry = election.metrics.registry
            before = registry.get_sample_value("kubelvs_heartbeat_renewal_seconds_count") or 0.0
            cluster.store.slow["a"] = TIMINGS.renew_deadline / 2  # slow, but one alone keeps the VIPs
            with caplog.at_level(logging.INFO, logger="kubelvs.director.election"):
                await until(
                    "a slow renewal logged",
                    lambda: any("slow heartbeat renewal" in r.getMessage() for r in caplog.records),
                )
            cluster.store.slow["a"] = 0.0
            assert (registry.get_sample_value("kubelvs_heartbeat_renewal_seconds_count") or 0.0) > before
            slow = registry.get_sample_value("kubelvs_heartbeat_renewal_seconds_bucket", {"le": "0.2"}) or 0.0
            total = registry.get_sample_value("kubelvs_heartbeat_renewal_seconds_count") or 0.0
            assert total > slow, "the slow renewals fall in the buckets above 0.2 s"
            line = next(r.getMessage() for r in caplog.records if "slow heartbeat" in r.getMessage())
            assert "in the request" in line and "before its thread ran it" in line, line

    asyncio.run(scenario())


def test_a_lagging_lease_watch_is_measured_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A heartbeat seen long after its renewTime (a watch behind): the lag is observed and said."""

    async def scenario() -> None:
        async with running("ab") as cluster:
            election = cluster.elections["a"]
            registry = election.metrics.registry
            stale = datetime.fromtimestamp(time.time() - 12, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            lease = {
                "metadata": {
                    "name": heartbeat_name("b"),
                    "resourceVersion": "999999",
                    "labels": {"app.kubernetes.io/name": "kubelvs", "kubelvs.io/lease": "heartbeat"},
                    "annotations": {},
                },
                "spec": {"holderIdentity": "b", "leaseDurationSeconds": 1, "renewTime": stale},
            }
            with caplog.at_level(logging.WARNING, logger="kubelvs.director.election"):
                election.on_lease("MODIFIED", lease)
            assert (registry.get_sample_value("kubelvs_lease_watch_lag_seconds_bucket", {"le": "10.0"}) or 0) == 0
            assert registry.get_sample_value("kubelvs_lease_watch_lag_seconds_count") == 1
            line = next(r.getMessage() for r in caplog.records if "Lease watch is behind" in r.getMessage())
            assert "b's heartbeat seen 12." in line, line

    asyncio.run(scenario())


def test_log_records_are_written_by_a_thread_of_their_own() -> None:
    script = (
        "import logging, threading\n"
        "from kubelvs.director.app import log_through_a_thread\n"
        "listener = log_through_a_thread('INFO')\n"
        "logging.getLogger('kubelvs.t').info('hello %s', 'there')\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError:\n    logging.getLogger('kubelvs.t').exception('failed')\n"
        "logging.getLogger('kubelvs.t').debug('not shown')\n"
        "listener.stop()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    lines = done.stderr.splitlines()
    assert lines[0].endswith(" INFO kubelvs.t: hello there"), lines
    assert lines[1].endswith(" ERROR kubelvs.t: failed") and "ZeroDivisionError" in done.stderr, lines
    assert "not shown" not in done.stderr


def test_a_renewal_older_than_one_seen_is_no_sign_of_life() -> None:
    """A watch behind a fresh read brings a director's earlier renewals: by that director's own
    clock they are older than one seen, and must not make it live again."""

    def lease(version: str, renewed: float) -> dict[str, Any]:
        return {
            "metadata": {
                "name": heartbeat_name("b"),
                "resourceVersion": version,
                "labels": {"app.kubernetes.io/name": "kubelvs", "kubelvs.io/lease": "heartbeat"},
                "annotations": {},
            },
            "spec": {
                "holderIdentity": "b",
                "leaseDurationSeconds": 1,
                "renewTime": datetime.fromtimestamp(renewed, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            },
        }

    async def scenario() -> None:
        async with running("a") as cluster:
            election = cluster.elections["a"]
            base = time.time() - 100  # b's clock: any, as long as it moves forward
            election.on_lease("MODIFIED", lease("10", base + 2))
            seen = election.obs.seen["b"]
            assert seen.version == "10"
            changed_at = seen.changed_at
            election.on_lease("MODIFIED", lease("9", base + 1))  # late: renewed before "10"
            assert (seen.version, seen.changed_at) == ("10", changed_at)
            election.on_lease("MODIFIED", lease("11", base + 3))  # a newer renewal counts
            assert seen.version == "11"
            election.on_lease("DELETED", lease("11", base + 3))
            assert "b" not in election._newest_renewal

    asyncio.run(scenario())
