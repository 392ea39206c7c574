"""The sync loop: coalesce events, sync what they touched, a full resync now and then.

Each attempt ends in a :class:`~kubelvs.core.outcome.SyncOutcome`; what happens next (at once,
after a backoff, or only slowly because nothing will change soon) is
:func:`~kubelvs.core.outcome.retry_delay`'s decision, not an exception handler's. The kernel I/O
runs in a worker thread; the view is read and marked only on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from kubelvs.apply import SyncReport
from kubelvs.collector import paused_collector
from kubelvs.core import status as st
from kubelvs.core.desired import DesiredState
from kubelvs.core.outcome import OK, SyncOutcome, Verdict, retry_delay
from kubelvs.core.spec import ObjectRef
from kubelvs.director.allocator import release_free_memory
from kubelvs.director.metrics import Metrics
from kubelvs.director.options import DirectorConfig
from kubelvs.director.view import ClusterView

log = logging.getLogger("kubelvs.director")


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Wait until ``event`` is set or ``timeout`` seconds pass. Not ``asyncio.wait_for``: in
    Python 3.11 it can swallow a cancellation that arrives just as the event is set
    (gh-86296), and the cancelled task then runs on (a director that never stops)."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()


class KernelReconciler(Protocol):
    """What the loop needs of :class:`kubelvs.apply.CachedReconciler` (a fake in the tests)."""

    def sync_cached(self, desired: DesiredState, only: set[ObjectRef] | None, full: bool) -> SyncReport: ...


class KernelUnavailable(Exception):
    """IPVS cannot be reached on this node (no ``ip_vs`` module, no netlink family)."""


class SyncLoop:
    def __init__(
        self,
        view: ClusterView,
        config: DirectorConfig,
        metrics: Metrics,
        make_reconciler: Callable[[], KernelReconciler],
        on_synced: Callable[[set[ObjectRef] | None], None] = lambda scope: None,
        classify: Callable[[BaseException], SyncOutcome | None] = lambda error: None,
    ) -> None:
        self.view = view
        self.config = config
        self.metrics = metrics
        self.make_reconciler = make_reconciler
        self.on_synced = on_synced  # status goes out on its own task: it never delays the kernel
        self.classify = classify  # effect-specific errors (an unreadable record) to an outcome
        self.reconciler: KernelReconciler | None = None
        # The kernel I/O's own thread: status writes and election requests share the default
        # executor, and programming must never queue behind them (10,000 status writes at start).
        self.kernel_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sync")
        self.wake = asyncio.Event()
        self.last_full = 0.0
        self.outcome: SyncOutcome = OK
        self.failures_in_a_row = 0
        self.last_success_monotonic: float | None = None
        self.last_attempt_monotonic = time.monotonic()
        self.synced_once = False
        # For status: the latest desired state (also when the kernel could not be reached) and
        # the kernel errors per VirtualServer of the last sync that covered it.
        self.desired: DesiredState | None = None
        self.errors_by_ref: dict[ObjectRef, list[str]] = {}

    def mark(self) -> None:
        self.wake.set()

    # --- one attempt ----------------------------------------------------------------------

    def sync_once(self, desired: DesiredState, scope: set[ObjectRef] | None, full: bool) -> SyncOutcome:
        """In a worker thread: the kernel I/O and its outcome."""
        started = time.perf_counter()
        try:
            if self.reconciler is None:
                self.reconciler = self.make_reconciler()  # raises KernelUnavailable without IPVS
            report = self.reconciler.sync_cached(desired, only=scope, full=full)
        except KernelUnavailable as error:
            return SyncOutcome(Verdict.GIVE_UP, "KernelUnavailable", f"IPVS is not available on this node: {error}")
        except Exception as error:
            outcome = self.classify(error)
            if outcome is not None:
                return outcome
            log.exception("sync failed")
            return SyncOutcome(Verdict.RETRY, "SyncFailed", f"{type(error).__name__}: {error}")
        if report.filter_error:
            log.warning("%s", report.filter_error)
        kind = "full" if full or scope is None else "incremental"
        self.metrics.observe_sync(kind, time.perf_counter() - started, report)
        failures = [(f.operation.key, str(f)) for f in report.result.failed]
        failures += [(key, f"{key} exists in the kernel and is not owned by kubelvs") for key in report.plan.conflicts]
        self.errors_by_ref = st.merge_errors(self.errors_by_ref, st.errors_by_origin(failures, desired.origins), scope)
        if not self.synced_once or len(report.plan) or not report.ok:
            log.info(
                "%s sync: %d operations %s, %d failed, %d conflicts",
                "initial" if not self.synced_once else kind,
                len(report.plan),
                report.plan.counts(),
                len(report.result.failed),
                len(report.plan.conflicts),
            )
        return OK

    # --- the loop -------------------------------------------------------------------------

    async def run(self, ready: asyncio.Event) -> None:
        """Coalesce events, sync, hand the scope to status; a full resync every resync_seconds."""
        loop = asyncio.get_running_loop()
        # No cyclic GC from the listing to the first sync's end: they build the state the
        # director keeps (no cycles in it), and each collection only walked the growing heap.
        # Natively at 10,000 VirtualServers the first desired-state pass took 0.82-1.09 s with
        # it, 0.58-0.65 s without.
        startup = contextlib.ExitStack()
        startup.enter_context(paused_collector())
        try:
            await ready.wait()  # the initial listing is in: never sync from a partial view
            await self._loop(loop, startup)
        finally:
            startup.close()

    async def _loop(self, loop: asyncio.AbstractEventLoop, startup: contextlib.ExitStack) -> None:
        frozen_after_sync = False
        delay = 0.0
        while True:
            due = self.last_full + self.config.resync_seconds - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # backoff after a failure: events wait too
            elif not self.view.pending and due > 0:
                await wait_event(self.wake, due)
            self.wake.clear()
            await asyncio.sleep(self.config.coalesce_seconds)  # let a burst of events land
            full = time.monotonic() >= self.last_full + self.config.resync_seconds or not self.outcome.ok
            desired, scope = self.view.plan_sync(full)
            outcome = await loop.run_in_executor(self.kernel_thread, self.sync_once, desired, scope, full)
            # Status reads this: only now, so it never reports a generation before its sync ran.
            self.desired = desired
            before = self.outcome
            self.record(outcome)
            if outcome.ok:
                self.view.desired = desired
                if not frozen_after_sync:
                    # The listing, the desired state and the kernel's cache live as long as the
                    # process: out of the GC's reach, a full collection no longer walks their
                    # 100,000s of objects (a pause of seconds at 10,000 VirtualServers under
                    # emulation). Not before the first sync: a freeze resets the GC's count of
                    # old objects, and the first pass would then trigger full collections over
                    # and over (measured: start-up 19 s instead of 14 s natively at 10,000).
                    # Only cyclic garbage among frozen objects is never freed: plain data here.
                    gc.freeze()
                    frozen_after_sync = True
                if full or scope is None:
                    self.last_full = time.monotonic()
                    # The listing's responses, the last pass's garbage: back to the kernel.
                    await loop.run_in_executor(self.kernel_thread, release_free_memory)
                # After a give-up every VirtualServer showed it: all of them are reported again.
                self.on_synced(scope if before.ok else None)
            else:
                self.view.sync_failed()
                if outcome.verdict is Verdict.GIVE_UP:
                    # On every VirtualServer, at every attempt: nothing is programmed here, and
                    # one created since the last attempt must say so too (the status loop skips
                    # the entries that are already as they would be written).
                    self.on_synced(None)
                # A transient failure (RETRY) writes no status: it is retried within seconds,
                # and reporting it would be a write per VirtualServer each time.
            startup.close()  # the collector runs again after the first attempt (frozen if it succeeded)
            delay = retry_delay(outcome, self.failures_in_a_row)

    def record(self, outcome: SyncOutcome) -> None:
        changed = outcome != self.outcome
        self.last_attempt_monotonic = time.monotonic()
        self.outcome = outcome
        self.metrics.sync_outcomes.labels(outcome.verdict.value, outcome.reason or "Ok").inc()
        if outcome.ok:
            self.failures_in_a_row = 0
            self.synced_once = True
            self.last_success_monotonic = time.monotonic()
            self.metrics.last_successful_sync.set_to_current_time()
            if changed:
                log.info("syncing again")
            return
        self.failures_in_a_row += 1
        if changed:
            log.error("sync: %s: %s", outcome.reason, outcome.message)

    # --- health ----------------------------------------------------------------------------

    @property
    def attempted(self) -> bool:
        """A sync was tried, whatever came of it (the outcome starts as OK)."""
        return self.synced_once or self.outcome != OK

    def alive(self, now: float | None = None) -> tuple[bool, str]:
        """Liveness: the loop still makes attempts (whatever their outcome: a node without IPVS
        is not fixed by restarting the pod, so that shows as not ready, not as dead)."""
        now = time.monotonic() if now is None else now
        limit = self.config.health_max_sync_age_seconds or 3 * self.config.resync_seconds
        limit = max(limit, 2 * 60.0)  # a give-up retries every minute
        age = now - self.last_attempt_monotonic
        if self.attempted:
            return (age <= limit, f"last sync attempt {age:.0f} s ago (limit {limit:.0f} s)")
        return True, "starting"

    def health(self, now: float | None = None) -> tuple[bool, str]:
        """Readiness: the last successful sync is recent enough."""
        now = time.monotonic() if now is None else now
        if not self.outcome.ok and self.outcome.verdict is Verdict.GIVE_UP:
            return False, f"{self.outcome.reason}: {self.outcome.message}"
        if self.last_success_monotonic is None:
            if not self.attempted:
                return False, "first sync pending"  # listed, not yet attempted
            return False, f"no successful sync yet: {self.outcome.reason}: {self.outcome.message}"
        limit = self.config.health_max_sync_age_seconds or 3 * self.config.resync_seconds
        age = now - self.last_success_monotonic
        if age > limit:
            return False, f"last successful sync {age:.0f} s ago (limit {limit:.0f} s): {self.outcome.message}"
        return True, "ok"
