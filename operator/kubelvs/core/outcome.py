"""What one sync attempt came to, and what the loop does next (MetalLB's ``SyncState``, made
explicit): the retry policy is a pure function, tested on its own and visible in metrics."""

from __future__ import annotations

import enum
from dataclasses import dataclass

BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0


class Verdict(enum.Enum):
    OK = "ok"  # done (per-operation failures are reported on their VirtualServers; the resync retries them)
    RETRY = "retry"  # a transient failure (the kernel answered with an error, a timeout): again after a backoff
    GIVE_UP = "give_up"  # cannot work until something outside changes (no IPVS, an unreadable record):
    # reported on every VirtualServer, retried only slowly


@dataclass(frozen=True, slots=True)
class SyncOutcome:
    verdict: Verdict
    reason: str = ""  # CamelCase, for status and metrics: KernelUnavailable, OwnershipRecordUnreadable, ...
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.OK


OK = SyncOutcome(Verdict.OK)


def retry_delay(outcome: SyncOutcome, failures_in_a_row: int) -> float:
    """Seconds before the next attempt after ``failures_in_a_row`` failed ones (0 when OK):
    exponential from 1 s, capped at 60 s; a give-up waits the cap at once (nothing will change
    sooner, and a tight loop only fills the log)."""
    if outcome.ok or failures_in_a_row <= 0:
        return 0.0
    if outcome.verdict is Verdict.GIVE_UP:
        return BACKOFF_MAX_SECONDS
    return min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** (failures_in_a_row - 1))
