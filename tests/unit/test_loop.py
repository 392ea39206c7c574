"""The sync loop's outcomes, retry policy and health, with a fake kernel (no IPVS, no API)."""

from __future__ import annotations

import asyncio
import errno
import gc
import platform
import time
from pathlib import Path

import pytest
from kubelvs.apply import SyncReport
from kubelvs.core.desired import DesiredState
from kubelvs.core.model import AF_INET, ServiceKey, VirtualService
from kubelvs.core.outcome import BACKOFF_MAX_SECONDS, OK, SyncOutcome, Verdict, retry_delay
from kubelvs.core.plan import Operation, Plan, Verb
from kubelvs.core.spec import ObjectRef
from kubelvs.director.loop import KernelUnavailable, SyncLoop
from kubelvs.director.metrics import Metrics
from kubelvs.director.options import DirectorConfig
from kubelvs.director.view import ClusterView
from kubelvs.kernel.ipvs import ApplyResult, Failure, IPVSError
from prometheus_client import CollectorRegistry

A, B = ObjectRef("ns", "a"), ObjectRef("ns", "b")
KEY_A = ServiceKey(AF_INET, 6, "192.0.2.1", 80)
KEY_B = ServiceKey(AF_INET, 6, "192.0.2.2", 80)


def desired() -> DesiredState:
    return DesiredState(origins={KEY_A: A, KEY_B: B})


class FakeReconciler:
    def __init__(self, *outcomes: object) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[set[ObjectRef] | None] = []

    def sync_cached(self, desired: DesiredState, only: set[ObjectRef] | None, full: bool) -> SyncReport:
        self.calls.append(only)
        outcome = self.outcomes.pop(0) if self.outcomes else SyncReport(Plan(), ApplyResult())
        if isinstance(outcome, BaseException):
            raise outcome
        assert isinstance(outcome, SyncReport)
        return outcome


def loop(tmp_path: Path, make) -> SyncLoop:  # type: ignore[no-untyped-def]
    config = DirectorConfig(node_name="n1", state_dir=tmp_path, resync_seconds=30)
    return SyncLoop(ClusterView("n1"), config, Metrics(CollectorRegistry()), make)


def failed(key: ServiceKey) -> SyncReport:
    op = Operation(Verb.ADD_SERVICE, VirtualService(key))
    return SyncReport(Plan([op]), ApplyResult(failed=[Failure(op, errno.EINVAL, "Invalid argument")]))


def test_a_node_without_ipvs_gives_up_visibly_and_is_not_ready(tmp_path: Path) -> None:
    def no_ipvs() -> FakeReconciler:
        raise KernelUnavailable("[Errno 2] generic netlink family IPVS not found")

    sync = loop(tmp_path, no_ipvs)
    outcome = sync.sync_once(desired(), None, True)
    sync.record(outcome)
    assert outcome.verdict is Verdict.GIVE_UP and outcome.reason == "KernelUnavailable"
    assert "IPVS" in outcome.message
    ready, why = sync.health()
    assert not ready and why.startswith("KernelUnavailable")
    assert sync.alive()[0]  # restarting the pod would not load ip_vs: not ready, but alive
    assert retry_delay(outcome, sync.failures_in_a_row) == BACKOFF_MAX_SECONDS


def test_a_transient_kernel_error_is_retried_with_backoff_then_recovers(tmp_path: Path) -> None:
    reconciler = FakeReconciler(IPVSError(errno.ENOBUFS, "lost"), IPVSError(errno.ENOBUFS, "lost"))
    sync = loop(tmp_path, lambda: reconciler)
    delays = []
    for _ in range(3):
        outcome = sync.sync_once(desired(), None, True)
        sync.record(outcome)
        delays.append(retry_delay(outcome, sync.failures_in_a_row))
    assert delays == [1.0, 2.0, 0.0]
    assert sync.outcome is OK and sync.health()[0]


def test_an_incremental_sync_keeps_the_errors_of_virtual_servers_outside_its_scope(tmp_path: Path) -> None:
    reconciler = FakeReconciler(failed(KEY_A), SyncReport(Plan(), ApplyResult()))
    sync = loop(tmp_path, lambda: reconciler)
    sync.sync_once(desired(), None, True)
    assert list(sync.errors_by_ref) == [A]
    sync.sync_once(desired(), {B}, False)  # B synced fine: A's error still stands
    assert list(sync.errors_by_ref) == [A]
    sync.sync_once(desired(), {A}, False)
    assert sync.errors_by_ref == {}


def test_classified_errors_give_up_with_their_reason(tmp_path: Path) -> None:
    from kubelvs.state.ownership import OwnershipError

    reconciler = FakeReconciler(OwnershipError(Path("/run/kubelvs/owned.json"), "not JSON"))
    config = DirectorConfig(node_name="n1", state_dir=tmp_path)
    from kubelvs.director.app import classify_error

    metrics = Metrics(CollectorRegistry())
    sync = SyncLoop(ClusterView("n1"), config, metrics, lambda: reconciler, classify=classify_error)
    outcome = sync.sync_once(desired(), None, True)
    assert outcome.verdict is Verdict.GIVE_UP and outcome.reason == "OwnershipRecordUnreadable"
    assert "/run/kubelvs/owned.json" in outcome.message and "not JSON" in outcome.message


@pytest.mark.parametrize(("failures", "delay"), [(0, 0.0), (1, 1.0), (2, 2.0), (6, 32.0), (7, 60.0), (50, 60.0)])
def test_retry_delay_is_exponential_and_capped(failures: int, delay: float) -> None:
    assert retry_delay(SyncOutcome(Verdict.RETRY, "SyncFailed"), failures) == delay


def test_readiness_fails_when_the_last_success_is_too_old(tmp_path: Path) -> None:
    sync = loop(tmp_path, lambda: FakeReconciler())
    sync.record(sync.sync_once(desired(), None, True))
    assert sync.last_success_monotonic is not None
    assert sync.health(now=sync.last_success_monotonic + 60)[0]
    ready, why = sync.health(now=sync.last_success_monotonic + 91)
    assert not ready and "last successful sync" in why


def test_readiness_says_whether_the_first_sync_was_attempted_and_why_it_failed(tmp_path: Path) -> None:
    sync = loop(tmp_path, lambda: FakeReconciler(IPVSError(errno.ENOBUFS, "lost")))
    assert sync.health() == (False, "first sync pending")
    sync.record(sync.sync_once(desired(), None, True))
    ready, why = sync.health()
    assert not ready and why.startswith("no successful sync yet: ") and "lost" in why, why


def test_free_heap_pages_go_back_to_the_kernel() -> None:
    from kubelvs.director.allocator import release_free_memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    chunks = [bytearray(64 * 1024) for _ in range(2000)]  # below the mmap threshold: on the heap
    pin = bytearray(4096)  # above them: free() alone cannot give their pages back from the top
    del chunks
    assert release_free_memory()  # 125 MB free in the middle of the heap: pages to return
    del pin


@pytest.mark.parametrize("first_fails", [False, True])
def test_the_collector_is_paused_from_the_listing_to_the_first_sync_attempt(tmp_path: Path, first_fails: bool) -> None:
    """The listing and the first pass build what the director keeps: no cyclic GC walks it
    meanwhile; it runs again after the first attempt, whatever its outcome."""
    during: list[bool] = []

    class Recording(FakeReconciler):
        def sync_cached(self, desired: DesiredState, only: set[ObjectRef] | None, full: bool) -> SyncReport:
            during.append(gc.isenabled())
            return super().sync_cached(desired, only, full)

    reconciler = Recording(*([IPVSError(errno.ENOBUFS, "lost")] if first_fails else []))
    sync = loop(tmp_path, lambda: reconciler)
    assert gc.isenabled()

    async def main() -> tuple[bool, bool]:
        ready = asyncio.Event()
        task = asyncio.create_task(sync.run(ready))
        await asyncio.sleep(0.01)
        while_listing = gc.isenabled()
        ready.set()
        deadline = time.monotonic() + 10
        while not (during and gc.isenabled()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        after = gc.isenabled()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return while_listing, after

    try:
        while_listing, after = asyncio.run(main())
    finally:
        gc.unfreeze()
        gc.enable()
    assert (while_listing, during[:1], after) == (False, [False], True), (while_listing, during, after)


def test_every_give_up_reports_on_every_virtual_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node without IPVS: each attempt reports on every VirtualServer, not only the first one
    (a VirtualServer created after the first give-up once never got a status)."""
    from kubelvs.director import loop as loop_module

    monkeypatch.setattr(loop_module, "retry_delay", lambda outcome, failures: 0.01)  # not the 60 s cap

    def no_ipvs() -> FakeReconciler:
        raise KernelUnavailable("[Errno 2] generic netlink family IPVS not found")

    reported: list[set[ObjectRef] | None] = []
    config = DirectorConfig(node_name="n1", state_dir=tmp_path, resync_seconds=30)
    sync = SyncLoop(ClusterView("n1"), config, Metrics(CollectorRegistry()), no_ipvs, on_synced=reported.append)

    async def main() -> None:
        ready = asyncio.Event()
        ready.set()
        task = asyncio.create_task(sync.run(ready))
        deadline = time.monotonic() + 10
        while len(reported) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    try:
        asyncio.run(main())
    finally:
        gc.enable()
    assert sync.outcome.reason == "KernelUnavailable"
    assert len(reported) >= 3 and all(scope is None for scope in reported), reported
