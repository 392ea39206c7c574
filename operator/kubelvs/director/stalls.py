"""Event-loop stalls: how late the loop runs, and where its thread was when it ran late.

Everything time-critical in a director (heartbeat answers, the fence, claims) waits for the
event loop. A piece of work that holds it for seconds (seen under emulation at 1,000 VIPs)
delays all of them, and nothing else says what held it. A tick on the loop measures its lag; a
watchdog thread samples the loop thread's stack while a tick is overdue, and when the stall ends
logs how long it lasted and the stacks it saw, most frequent first: a sampling profile of the
stalls alone, cheap enough to stay on in production.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger("kubelvs.director.stalls")

TICK_SECONDS = 0.1


def where(frame: FrameType | None, depth: int = 6) -> str:
    """A frame's stack in one line, innermost first: the innermost frame wherever it is (a
    library's loop shows as itself), then the innermost kubelvs frames around it."""
    parts: list[str] = []
    first = True
    while frame is not None and len(parts) < depth:
        code = frame.f_code
        if first or "kubelvs" in code.co_filename:
            module = code.co_filename.rsplit("/", 2)
            parts.append(f"{'/'.join(module[-2:])}:{frame.f_lineno} {code.co_name}")
            first = False
        frame = frame.f_back
    return " < ".join(parts) or "(not running Python)"


class StallWatch:
    """Run :meth:`run` as a task of the loop to watch; stalls longer than ``threshold`` seconds
    are logged with the stacks sampled every ``sample_every`` seconds while they lasted."""

    def __init__(
        self,
        threshold: float,
        lag: Any = None,  # a Histogram: observed at each tick
        sample_every: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.lag = lag
        self.sample_every = sample_every
        self.clock = clock
        self.ticked = clock()
        self.stalls = 0
        self.longest = 0.0
        self._loop_thread = 0
        self._done = threading.Event()

    async def run(self) -> None:
        self._loop_thread = threading.get_ident()
        watchdog = threading.Thread(target=self._watch, name="stall-watch", daemon=True)
        watchdog.start()
        try:
            while True:
                self.ticked = before = self.clock()
                await asyncio.sleep(TICK_SECONDS)
                if self.lag is not None:
                    self.lag.observe(max(0.0, self.clock() - before - TICK_SECONDS))
        finally:
            self._done.set()

    def _watch(self) -> None:
        samples: Counter[str] = Counter()
        stalled_since = 0.0
        while not self._done.wait(self.sample_every):
            ticked = self.ticked
            overdue = self.clock() - ticked - TICK_SECONDS
            if overdue > self.threshold / 2:
                # Sample from half the threshold on: a stall just over it still gets its stacks.
                stalled_since = stalled_since or ticked
                samples[where(sys._current_frames().get(self._loop_thread))] += 1
            elif stalled_since:
                self._report(ticked - stalled_since - TICK_SECONDS, samples)
                samples.clear()
                stalled_since = 0.0

    def _report(self, lasted: float, samples: Counter[str]) -> None:
        if lasted < self.threshold:
            return
        self.stalls += 1
        self.longest = max(self.longest, lasted)
        total = sum(samples.values())
        top = "; ".join(f"{count}/{total} in {stack}" for stack, count in samples.most_common(3))
        log.warning("the event loop was blocked for %.1f s (heartbeats and the fence wait for it): %s", lasted, top)
