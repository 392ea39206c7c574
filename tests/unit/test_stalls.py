"""The event-loop stall watch: a loop blocked on purpose is reported with where it was."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from kubelvs.director.stalls import StallWatch, where


def block_the_loop(seconds: float) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        sum(range(1000))


class Lag:
    def __init__(self) -> None:
        self.seen: list[float] = []

    def observe(self, value: float) -> None:
        self.seen.append(value)


def test_a_blocked_loop_is_reported_with_its_stack(caplog: pytest.LogCaptureFixture) -> None:
    lag = Lag()
    watch = StallWatch(0.3, lag, sample_every=0.02)

    async def scenario() -> None:
        task = asyncio.create_task(watch.run())
        await asyncio.sleep(0.3)
        block_the_loop(0.6)
        deadline = time.monotonic() + 5
        while not watch.stalls and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        task.cancel()

    with caplog.at_level(logging.WARNING, "kubelvs.director.stalls"):
        asyncio.run(scenario())
    assert watch.stalls == 1, caplog.text
    assert 0.4 < watch.longest < 1.5
    assert "block_the_loop" in caplog.text and "test_stalls.py" in caplog.text, caplog.text
    assert max(lag.seen) > 0.4


def test_a_quiet_loop_reports_nothing(caplog: pytest.LogCaptureFixture) -> None:
    watch = StallWatch(0.3, sample_every=0.02)

    async def scenario() -> None:
        task = asyncio.create_task(watch.run())
        for _ in range(10):
            block_the_loop(0.05)  # short blocks: under the threshold
            await asyncio.sleep(0.02)
        task.cancel()

    with caplog.at_level(logging.WARNING, "kubelvs.director.stalls"):
        asyncio.run(scenario())
    assert watch.stalls == 0 and not caplog.text


def test_where_names_the_innermost_frame_and_ours() -> None:
    import sys

    assert where(sys._getframe()).startswith("unit/test_stalls.py:")
    assert where(None) == "(not running Python)"
