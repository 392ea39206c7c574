"""Status of the VirtualServers a sync touched: this director's entry, the summary, Events.

What to write is decided by :mod:`kubelvs.core.status` (pure); the requests are
:class:`kubelvs.kube.status_writer.StatusWriter`'s. A write is recorded as written only when
it landed; a failed one is retried after a backoff, and an Event goes out only after the
summary it reports on was written. Summaries are debounced per VirtualServer (at most one write
per ``SUMMARY_DEBOUNCE_SECONDS``): a rolling restart of a Deployment flips its endpoints many
times a second, and each flip would otherwise be a summary write.

Requests are limited to ``qps`` per second (a token bucket, as client-go's QPS and burst): under
a churn of endpoints each change is a summary write, and those requests cost the director several
times the CPU of programming the change (measured natively: 7.2 s of status threads against
0.6 s of programming for 1,500 changes at 10,000 VirtualServers). What waits is coalesced: a
VirtualServer changed again meanwhile is written once, as it is then.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from kubelvs.core import status as st
from kubelvs.core.cluster import status_of
from kubelvs.core.desired import DesiredState
from kubelvs.core.outcome import SyncOutcome, Verdict
from kubelvs.core.spec import ObjectRef, meta
from kubelvs.director.metrics import Metrics
from kubelvs.director.view import ClusterView
from kubelvs.kube.status_writer import Written

log = logging.getLogger("kubelvs.director.status")
WRITES_IN_FLIGHT = 4
RETRY_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)
SUMMARY_DEBOUNCE_SECONDS = 1.0
VIEW_LAG_SECONDS = 5.0  # our own status write is in the view by then (else someone wrote after us)
SummaryWriterPolicy = Callable[[Mapping[str, Any], str], bool]  # (VirtualServer, this node) -> writes it?


class Result(enum.Enum):
    DONE = "done"
    FAILED = "failed"  # a request failed: retried after a backoff
    LATER = "later"  # debounced: written when the interval has passed


class Writer(Protocol):
    def apply_status(self, ref: ObjectRef, status: dict[str, Any], manager: str) -> Written: ...
    def post_event(self, namespace: str, event: dict[str, Any]) -> bool: ...
    def remove_directors(self, ref: ObjectRef, directors: list[dict[str, Any]], gone: set[str]) -> Written: ...


class Ownership(Protocol):
    """What the status needs of the election (``kubelvs.director.election.Election``)."""

    def writes_summary(self, vip: str, entries: Iterable[str]) -> bool: ...
    def announcement(self, vip: str) -> st.Announcement: ...
    def live_directors(self) -> set[str] | None: ...


class SyncState(Protocol):
    desired: DesiredState | None
    errors_by_ref: dict[ObjectRef, list[str]]
    outcome: SyncOutcome


class RateLimiter:
    """A token bucket shared by the writer threads: ``rate`` requests per second, ``burst`` at
    once; ``rate`` 0: no limit. :meth:`wait` blocks the calling thread until a token is free."""

    def __init__(
        self,
        rate: float,
        burst: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self.clock = clock
        self.sleep = sleep
        self.tokens = self.burst
        self.at = clock()
        self.waited = 0.0  # seconds the writers spent waiting, in total
        self._lock = threading.Lock()

    def wait(self) -> None:
        if self.rate <= 0:
            return
        with self._lock:  # take a token now, or the one that comes next, in order
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
            self.tokens -= 1.0
            delay = -self.tokens / self.rate if self.tokens < 0 else 0.0
            self.waited += delay
        if delay > 0:
            self.sleep(delay)


class LimitedWriter:
    """``writer`` with every request through ``limiter``."""

    def __init__(self, writer: Writer, limiter: RateLimiter) -> None:
        self.writer = writer
        self.limiter = limiter

    def apply_status(self, ref: ObjectRef, status: dict[str, Any], manager: str) -> Written:
        self.limiter.wait()
        return self.writer.apply_status(ref, status, manager)

    def post_event(self, namespace: str, event: dict[str, Any]) -> bool:
        self.limiter.wait()
        return self.writer.post_event(namespace, event)

    def remove_directors(self, ref: ObjectRef, directors: list[dict[str, Any]], gone: set[str]) -> Written:
        self.limiter.wait()
        return self.writer.remove_directors(ref, directors, gone)


class EventQueue:
    """Events posted from the event loop without waiting for them: one thread posts them in
    order through ``writer`` (rate-limited with the status writes). Past ``limit`` waiting, new
    ones are dropped and counted: Events are best effort, as client-go's recorder drops past its
    queue. A thread per Event, as before, ran 300 threads at once when a director took 300 VIPs
    over; under emulation starting each held the event loop, 25 s in all. A ``SimpleQueue``: its
    ``put`` takes no lock another thread holds, so the event loop never waits for the poster.
    """

    def __init__(self, writer: Writer, on_error: Callable[[], None] = lambda: None, limit: int = 1000) -> None:
        self.writer = writer
        self.on_error = on_error
        self.limit = limit
        self.waiting: queue.SimpleQueue[tuple[str, dict[str, Any]]] = queue.SimpleQueue()
        self.dropped = 0
        self.posted = 0  # sent, landed or not
        self._thread: threading.Thread | None = None

    def post(self, namespace: str, event: dict[str, Any]) -> bool:
        """Queue ``event``; False when dropped."""
        if self.waiting.qsize() >= self.limit:
            self.dropped += 1
            log.debug("event dropped (%d waiting): %s", self.limit, event.get("reason"))
            return False
        self.waiting.put((namespace, event))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="events", daemon=True)
            self._thread.start()
        return True

    def _run(self) -> None:
        while True:
            namespace, event = self.waiting.get()
            if not self.writer.post_event(namespace, event):
                self.on_error()
            self.posted += 1


class StatusLoop:
    def __init__(
        self,
        view: ClusterView,
        sync: SyncState,
        writer: Writer,
        metrics: Metrics,
        node: str,
        now: Callable[[], str] = st.now_rfc3339,
        is_summary_writer: SummaryWriterPolicy = st.summary_writer,  # the election's seam
        clock: Callable[[], float] = time.monotonic,
        ownership: Ownership | None = None,
        qps: float = 0.0,
    ) -> None:
        self.view = view
        self.ownership = ownership
        self.sync = sync
        self.limiter = RateLimiter(qps, 5 * qps)
        self.writer: Writer = LimitedWriter(writer, self.limiter) if qps > 0 else writer
        # Threads of their own: a writer waiting for a token must not hold a thread of the
        # shared pool that the election's claims need.
        self.threads = ThreadPoolExecutor(max_workers=WRITES_IN_FLIGHT, thread_name_prefix="status")
        self.events = EventQueue(self.writer, metrics.api_errors.inc)  # for other parts' Events
        self.metrics = metrics
        self.node = node
        self.now = now
        self.is_summary_writer = is_summary_writer
        self.clock = clock
        # What this director wrote, per VirtualServer *object* (keyed by name, checked by uid: one
        # deleted and created again under the same name is a new object). Touched only by the
        # writer threads, and by the sweep between their batches; never by request().
        # Kept for VIEW_LAG_SECONDS only (then the view has our write, and is what to compare
        # with): kept for ever, they were 2 KB per VirtualServer, 20 MB of a director's 150 at 10,000.
        self.written_entries: dict[ObjectRef, tuple[str, float, dict[str, Any]]] = {}  # uid, when, entry
        self.written_summaries: dict[ObjectRef, tuple[str, float, dict[str, Any]]] = {}  # uid, when, what
        self._swept_at = clock()
        self._sweep: asyncio.TimerHandle | None = None
        self.pending: set[ObjectRef] = set()
        self.wake = asyncio.Event()
        self.failures_in_a_row = 0

    def request(self, scope: set[ObjectRef] | None) -> None:
        """After a sync: write the status of ``scope`` (None: every VirtualServer)."""
        desired = self.sync.desired
        if scope is None:
            self.pending.update(desired.resolutions if desired is not None else ())
        else:
            self.pending.update(scope)
        self.wake.set()

    async def run(self) -> None:
        """A few writes in flight (a few workers, not a task per VirtualServer: start-up touches
        all of them); what failed goes back to the queue, after a backoff."""
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            queue = sorted(self.pending, reverse=True)
            self.pending = set()
            failed: list[ObjectRef] = []
            later: list[ObjectRef] = []
            await asyncio.gather(*(self._worker(loop, queue, failed, later) for _ in range(WRITES_IN_FLIGHT)))
            self._forget_old_writes()  # no writer runs now
            if (self.written_entries or self.written_summaries) and self._sweep is None:
                self._sweep = loop.call_later(VIEW_LAG_SECONDS + 0.5, self._sweep_due)  # even if idle by then
            if failed:
                self.failures_in_a_row += 1
            elif not later:
                self.failures_in_a_row = 0
            if failed or later:
                self.pending.update(failed)
                self.pending.update(later)
                delay = SUMMARY_DEBOUNCE_SECONDS
                if failed:
                    delay = RETRY_SECONDS[min(self.failures_in_a_row, len(RETRY_SECONDS)) - 1]
                asyncio.get_running_loop().call_later(delay, self.wake.set)

    def _sweep_due(self) -> None:
        self._sweep = None
        self.wake.set()

    def _forget_old_writes(self) -> None:
        """Drop what was written longer than VIEW_LAG_SECONDS ago (a pass at most that often)."""
        now = self.clock()
        if now - self._swept_at < VIEW_LAG_SECONDS:
            return
        self._swept_at = now
        for written in (self.written_entries, self.written_summaries):
            for ref in [ref for ref, (_uid, when, _what) in written.items() if now - when > VIEW_LAG_SECONDS]:
                del written[ref]

    async def _worker(
        self, loop: asyncio.AbstractEventLoop, queue: list[ObjectRef], failed: list[ObjectRef], later: list[ObjectRef]
    ) -> None:
        while queue:
            ref = queue.pop()
            try:
                result = await loop.run_in_executor(self.threads, self.write_status, ref)
            except Exception:
                log.exception("status of %s not written", ref)
                result = Result.FAILED
            if result is Result.FAILED:
                failed.append(ref)
            elif result is Result.LATER:
                later.append(ref)

    def write_status(self, ref: ObjectRef) -> Result:
        """In a worker thread: this director's entry, then (if it writes it) the summary, then
        the Events of the summary's transitions."""
        desired = self.sync.desired
        vs = self.view.virtual_servers.get(ref)
        if vs is None:  # deleted: forget what was written for it
            self.written_entries.pop(ref, None)
            self.written_summaries.pop(ref, None)
            return Result.DONE
        if desired is None or ref not in desired.resolutions:
            return Result.DONE
        vs = {**vs, "status": status_of(vs)}  # unpacked once: what follows reads it several times
        uid = str(meta(vs).get("uid") or "")
        written_entry = self._recent(self.written_entries, ref, uid)
        last_entry = written_entry[2] if written_entry is not None else None
        resolution = desired.resolutions[ref]
        outcome = self.sync.outcome
        errors = list(self.sync.errors_by_ref.get(ref, []))
        reason = ""
        if outcome.verdict is Verdict.GIVE_UP:  # nothing can be programmed here (no IPVS, an unreadable record)
            reason = outcome.reason
            errors.insert(0, f"{outcome.reason}: {outcome.message}")
        entry = st.director_entry(self.node, resolution, errors, reason)
        manager = f"kubelvs-director-{self.node}"
        if not resolution.selected:
            if self.node in st.entries(vs) and last_entry != {}:
                # No longer ours: applying an empty list drops the entry this manager owns.
                if not self._write(ref, {"directors": []}, manager):
                    return Result.FAILED
                self.written_entries[ref] = (uid, self.clock(), {})
            return Result.DONE
        # This director's own entry first: the summary is derived from the entries.
        if not st.same_entry(vs, entry) and last_entry != entry:
            if not self._write(ref, {"directors": [{**entry, "lastSyncTime": self.now()}]}, manager):
                return Result.FAILED
            self.written_entries[ref] = (uid, self.clock(), entry)
        announcement = None
        if self.ownership is not None:
            reported = st.entries(vs)
            if not self.ownership.writes_summary(resolution.vip, reported):
                return Result.DONE
            live = self.ownership.live_directors()
            gone = set(reported) - live - {self.node} if live is not None else set()
            if gone:  # a dead director's entry would count in the summary for ever
                directors = list((vs.get("status") or {}).get("directors") or [])
                if self.writer.remove_directors(ref, directors, gone) is Written.FAILED:
                    return Result.FAILED
                vs = {
                    **vs,
                    "status": {
                        **(vs.get("status") or {}),
                        "directors": [d for d in directors if d.get("node") not in gone],
                    },
                }
            announcement = self.ownership.announcement(resolution.vip)
        elif not self.is_summary_writer(vs, self.node):
            return Result.DONE
        summary = st.summary(vs, resolution, entry, self.now(), announcement)
        last = self._recent(self.written_summaries, ref, uid)
        if st.same_summary(vs, summary) or (last is not None and st.same_summary({"status": last[2]}, summary)):
            return Result.DONE  # as it is (or as we wrote it: the watch event may not be in yet)
        if last is not None and self.clock() - last[1] < SUMMARY_DEBOUNCE_SECONDS:
            return Result.LATER
        if not self._write(ref, summary, "kubelvs-status"):
            return Result.FAILED  # and no Event: it would report a change nobody can see
        # Transitions against what we last wrote, when we wrote it: the view may lag behind.
        before = vs if last is None else {"metadata": vs.get("metadata"), "status": last[2]}
        self.written_summaries[ref] = (uid, self.clock(), summary)
        for event in events_for(before, summary, self.node, self.now()):
            if not self.writer.post_event(str(event["metadata"]["namespace"]), event):
                self.metrics.api_errors.inc()
        return Result.DONE

    def _recent(
        self, written: dict[ObjectRef, tuple[str, float, dict[str, Any]]], ref: ObjectRef, uid: str
    ) -> tuple[str, float, dict[str, Any]] | None:
        """What we last wrote for ``ref``, while the view may not have it yet. None: nothing, a
        write for another object under that name, or one old enough for the watch to have
        brought it back, so that a view that differs now means another director wrote since
        (ownership of the VIP moved) and the view alone is what to compare with."""
        record = written.get(ref)
        if record is None or record[0] != uid or self.clock() - record[1] > VIEW_LAG_SECONDS:
            return None
        return record

    def _write(self, ref: ObjectRef, status: dict[str, Any], manager: str) -> bool:
        written = self.writer.apply_status(ref, status, manager)
        if written is Written.FAILED:
            self.metrics.api_errors.inc()
            return False
        return True


def events_for(vs: Mapping[str, Any], summary: Mapping[str, Any], node: str, now: str) -> list[dict[str, Any]]:
    """A Kubernetes Event for each condition that changed (Warning when it went bad)."""
    old = {c.get("type"): c for c in status_of(vs).get("conditions") or []}
    events = []
    for condition in summary["conditions"]:
        before = old.get(condition["type"]) or {}
        if (before.get("status"), before.get("reason")) == (condition["status"], condition["reason"]):
            continue
        warning = condition["status"] == "False" and condition["reason"] not in ("NoDirectors", "NoOwner")
        message = f"{condition['type']}={condition['status']}: {condition['message']}"
        events.append(st.event(vs, "Warning" if warning else "Normal", condition["reason"], message, node, now))
    return events
