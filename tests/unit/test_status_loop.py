"""The status writer's decisions with a stand-in API (the real API server cannot be made to
answer 429/503 on demand; the writes themselves are tested against it in the kernel e2e tests)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kubelvs.core.desired import DesiredState
from kubelvs.core.outcome import OK, SyncOutcome, Verdict
from kubelvs.core.resolve import Resolution
from kubelvs.core.spec import ObjectRef, Packed
from kubelvs.director.metrics import Metrics
from kubelvs.director.status_loop import (
    SUMMARY_DEBOUNCE_SECONDS,
    VIEW_LAG_SECONDS,
    EventQueue,
    RateLimiter,
    Result,
    StatusLoop,
)
from kubelvs.director.view import ClusterView
from kubelvs.kube.status_writer import Written
from prometheus_client import CollectorRegistry

REF = ObjectRef("ns", "web")


class FakeApi:
    def __init__(self, answers: list[Written] | None = None) -> None:
        self.answers = list(answers or [])
        self.writes: list[tuple[str, dict[str, Any]]] = []
        self.events: list[dict[str, Any]] = []

    def apply_status(self, ref: ObjectRef, status: dict[str, Any], manager: str) -> Written:
        answer = self.answers.pop(0) if self.answers else Written.OK
        if answer is Written.OK:
            self.writes.append((manager, status))
        return answer

    def post_event(self, namespace: str, event: dict[str, Any]) -> bool:
        self.events.append(event)
        return True


class Sync:
    def __init__(self, ready_backends: int = 2) -> None:
        self.desired = DesiredState(
            resolutions={REF: Resolution(REF, generation=1, keys=(("k",),), ready_backends=ready_backends)}  # type: ignore[arg-type]
        )
        self.errors_by_ref: dict[ObjectRef, list[str]] = {}
        self.outcome: SyncOutcome = OK


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def setup(api: FakeApi, sync: Sync | None = None) -> tuple[StatusLoop, Clock]:
    view = ClusterView("n1")
    view.virtual_servers[REF] = {"metadata": {"name": "web", "namespace": "ns", "generation": 1}, "status": {}}
    clock = Clock()
    loop = StatusLoop(view, sync or Sync(), api, Metrics(CollectorRegistry()), "n1", now=lambda: "T", clock=clock)
    return loop, clock


def test_a_failed_entry_write_is_not_recorded_as_written_and_is_retried() -> None:
    api = FakeApi([Written.FAILED])
    loop, _ = setup(api)
    assert loop.write_status(REF) is Result.FAILED
    assert REF not in loop.written_entries and not api.writes
    assert loop.write_status(REF) is Result.DONE
    assert [manager for manager, _ in api.writes] == ["kubelvs-director-n1", "kubelvs-status"]


def test_no_event_when_the_summary_write_failed() -> None:
    api = FakeApi([Written.OK, Written.FAILED, Written.FAILED])
    loop, _ = setup(api)
    assert loop.write_status(REF) is Result.FAILED
    assert loop.write_status(REF) is Result.FAILED
    assert not api.events  # the old code posted one per attempt while the API struggled
    assert loop.write_status(REF) is Result.DONE
    assert {e["reason"] for e in api.events} == {"Valid", "Programmed", "Ready"}
    assert loop.write_status(REF) is Result.DONE  # the view still shows the old status: no repeat
    assert len(api.events) == 3 and len(api.writes) == 2


def test_summary_writes_are_debounced_per_virtual_server() -> None:
    sync = Sync(ready_backends=2)
    api = FakeApi()
    loop, clock = setup(api, sync)
    assert loop.write_status(REF) is Result.DONE
    sync.desired = Sync(ready_backends=3).desired  # an endpoint flip
    assert loop.write_status(REF) is Result.LATER
    clock.now += SUMMARY_DEBOUNCE_SECONDS
    assert loop.write_status(REF) is Result.DONE
    assert [s.get("readyBackends") for m, s in api.writes if m == "kubelvs-status"] == [2, 3]


def test_a_node_without_ipvs_reports_kernel_unavailable() -> None:
    sync = Sync()
    sync.outcome = SyncOutcome(Verdict.GIVE_UP, "KernelUnavailable", "no ip_vs")
    api = FakeApi()
    loop, _ = setup(api, sync)
    assert loop.write_status(REF) is Result.DONE
    entry = api.writes[0][1]["directors"][0]
    assert entry["programmed"] is False and entry["reason"] == "KernelUnavailable"
    programmed = next(c for c in api.writes[1][1]["conditions"] if c["type"] == "Programmed")
    assert (programmed["status"], programmed["reason"]) == ("False", "KernelUnavailable")
    assert "no ip_vs" in programmed["message"]


def test_the_summary_writer_is_a_policy() -> None:
    api = FakeApi()
    loop, _ = setup(api)
    loop.is_summary_writer = lambda vs, node: False
    assert loop.write_status(REF) is Result.DONE
    assert [manager for manager, _ in api.writes] == ["kubelvs-director-n1"]


def test_a_virtual_server_deleted_and_created_again_gets_its_status_written_again() -> None:
    api = FakeApi()
    loop, _ = setup(api)
    loop.view.virtual_servers[REF]["metadata"]["uid"] = "uid-1"
    assert loop.write_status(REF) is Result.DONE
    writes = len(api.writes)
    # The same name, a new object (kubectl replace --force; or deleted and created while the
    # watch was down): nothing of its status is written yet.
    loop.view.virtual_servers[REF] = {
        "metadata": {"name": "web", "namespace": "ns", "generation": 1, "uid": "uid-2"},
        "status": {},
    }
    assert loop.write_status(REF) is Result.DONE
    assert [m for m, _ in api.writes[writes:]] == ["kubelvs-director-n1", "kubelvs-status"]


def test_what_was_written_for_a_deleted_virtual_server_is_forgotten_by_the_writer() -> None:
    api = FakeApi()
    loop, _ = setup(api)
    assert loop.write_status(REF) is Result.DONE
    del loop.view.virtual_servers[REF]
    loop.request({REF})  # on the event loop's thread: touches nothing the writer threads write
    assert REF in loop.written_entries
    assert loop.write_status(REF) is Result.DONE
    assert REF not in loop.written_entries and REF not in loop.written_summaries


class _Time:
    """A clock that moves only when a writer sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@given(rate=st.floats(0.5, 200), burst=st.integers(1, 50), requests=st.integers(0, 300))
def test_the_status_limiter_lets_a_burst_through_then_rate_per_second(rate: float, burst: int, requests: int) -> None:
    time_ = _Time()
    limiter = RateLimiter(rate, burst, clock=time_.clock, sleep=time_.sleep)
    for _ in range(requests):
        limiter.wait()
    expected = max(0, requests - burst) / rate
    assert time_.now == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert limiter.waited == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_the_status_limiter_refills_while_idle_but_not_beyond_its_burst() -> None:
    time_ = _Time()
    limiter = RateLimiter(10, 5, clock=time_.clock, sleep=time_.sleep)
    for _ in range(5):
        limiter.wait()
    assert time_.now == 0.0
    time_.now += 100.0  # idle for long: five tokens, not a thousand
    for _ in range(6):
        limiter.wait()
    assert time_.now == pytest.approx(100.1)


def test_no_limit_means_no_wait() -> None:
    limiter = RateLimiter(0, 0, sleep=lambda seconds: pytest.fail("slept"))
    for _ in range(1000):
        limiter.wait()


def test_with_a_qps_every_request_of_a_status_write_takes_a_token() -> None:
    api = FakeApi([])
    view = ClusterView("n1")
    view.virtual_servers[REF] = {"metadata": {"name": "web", "namespace": "ns", "generation": 1}, "status": {}}
    loop = StatusLoop(view, Sync(), api, Metrics(CollectorRegistry()), "n1", now=lambda: "T", qps=1000)
    taken: list[None] = []
    loop.limiter.wait = lambda: taken.append(None)  # type: ignore[method-assign]
    assert loop.write_status(REF) is Result.DONE
    assert len(api.writes) == 2  # the entry, then the summary
    assert len(taken) == len(api.writes) + len(api.events)


def test_what_was_written_is_forgotten_once_the_view_has_it() -> None:
    api = FakeApi()
    loop, clock = setup(api)
    assert loop.write_status(REF) is Result.DONE
    (_, entry), (_, summary) = api.writes
    loop._forget_old_writes()
    assert REF in loop.written_entries and REF in loop.written_summaries  # the view may lag: kept
    clock.now += VIEW_LAG_SECONDS + 1
    loop._forget_old_writes()
    assert not loop.written_entries and not loop.written_summaries
    # The watch brought both writes back: nothing to write again.
    loop.view.virtual_servers[REF] = {
        "metadata": {"name": "web", "namespace": "ns", "generation": 1},
        "status": {**summary, "directors": entry["directors"]},
    }
    assert loop.write_status(REF) is Result.DONE
    assert len(api.writes) == 2


def test_a_status_the_view_keeps_packed_is_read_back() -> None:
    """As the real view holds it (trimmed, its status packed): what came back is not written again."""
    api = FakeApi()
    loop, clock = setup(api)
    assert loop.write_status(REF) is Result.DONE
    (_, entry), (_, summary) = api.writes
    clock.now += VIEW_LAG_SECONDS + 1
    loop._forget_old_writes()
    loop.view.on_virtual_server(
        "MODIFIED",
        {
            "metadata": {"name": "web", "namespace": "ns", "generation": 1, "resourceVersion": "2"},
            "status": {**summary, "directors": entry["directors"]},
        },
    )
    assert isinstance(loop.view.virtual_servers[REF]["status"], Packed)
    assert loop.write_status(REF) is Result.DONE
    assert len(api.writes) == 2


def test_an_idle_status_loop_still_forgets_its_old_writes() -> None:
    api = FakeApi()
    loop, clock = setup(api)

    async def scenario() -> None:
        task = asyncio.create_task(loop.run())
        loop.request({REF})
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(api.writes) == 2:
                break
        assert REF in loop.written_entries
        clock.now += VIEW_LAG_SECONDS + 1  # then nothing happens: the sweep comes by itself
        loop._sweep.cancel()  # type: ignore[union-attr]
        loop._sweep_due()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not loop.written_entries and not loop.written_summaries:
                break
        task.cancel()
        assert not loop.written_entries and not loop.written_summaries

    asyncio.run(scenario())


def test_the_event_queue_posts_in_order_on_one_thread_and_drops_past_its_limit() -> None:
    import threading
    import time

    gate = threading.Event()
    posted: list[tuple[str, str]] = []
    errors: list[int] = []

    class SlowApi(FakeApi):
        def post_event(self, namespace: str, event: dict[str, Any]) -> bool:
            gate.wait(10)  # the API is slow: Events wait in the queue
            posted.append((event["reason"], threading.current_thread().name))
            return event["reason"] != "Refused"

    def settled(count: int) -> None:
        deadline = time.monotonic() + 10
        while events.posted < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert events.posted == count, posted

    events = EventQueue(SlowApi(), on_error=lambda: errors.append(1), limit=3)
    # The thread may already hold the first one: 3 or 4 of the 6 are taken, the rest dropped.
    accepted = [events.post("ns", {"reason": f"E{i}"}) for i in range(6)]
    assert accepted[:3] == [True] * 3 and accepted.count(False) == events.dropped in (2, 3)
    gate.set()
    settled(6 - events.dropped)
    assert posted == [(f"E{i}", "events") for i in range(6 - events.dropped)]  # in order, one thread
    assert not errors
    assert events.post("ns", {"reason": "Refused"})
    settled(7 - events.dropped)
    assert errors == [1]
