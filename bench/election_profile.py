#!/usr/bin/env python3
"""The election alone at scale, natively: three directors in one process, many VIPs.

The unit tests' in-memory Leases and segment stand in for the API server and the kernel (this
is a profile of the election's own work, not a benchmark of failover: ``ha_bench.py`` is). It
reports the time to a balanced placement, then the time for the two survivors to take every
VIP of the director holding the most over after it is killed, with a cProfile of that takeover.

    python bench/election_profile.py --vips 1000
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(TESTS / "unit"), str(TESTS)]
import test_director_election as harness  # noqa: E402
from kubelvs.core import election as el  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vips", type=int, default=1000)
    parser.add_argument("--lease", type=float, default=2.0, help="lease duration (and handover delay)")
    parser.add_argument("--renew-deadline", type=float, default=1.4)
    parser.add_argument("--retry-period", type=float, default=0.5)
    parser.add_argument("--top", type=int, default=15, help="functions shown, by own time")
    args = parser.parse_args()
    harness.TIMINGS = el.Timings(args.lease, args.renew_deadline, args.retry_period, args.lease)
    vips = [f"10.78.{i // 250}.{i % 250 + 1}" for i in range(args.vips)]
    profile = cProfile.Profile()

    def share(cluster: harness.Cluster, node: str) -> int:
        return sum(1 for holders in cluster.owners().values() if holders == {node})

    async def run() -> None:
        cluster = harness.Cluster(list("abc"), vips)
        for node in "abc":
            cluster.start(node)
        started = time.monotonic()
        await harness.until("a balanced placement", lambda: harness.balanced(cluster, "abc"), timeout=600)
        print(f"balanced in {time.monotonic() - started:.1f} s: { ({n: share(cluster, n) for n in 'abc'}) }")
        await asyncio.sleep(3 * args.retry_period)
        victim = max("abc", key=lambda node: share(cluster, node))
        held = share(cluster, victim)
        survivors = [node for node in "abc" if node != victim]
        profile.enable()
        killed = time.monotonic()
        cluster.kill(victim)
        await harness.until("the takeover", lambda: harness.balanced(cluster, survivors), timeout=600)
        profile.disable()
        took = time.monotonic() - killed
        print(f"{victim} killed: its {held} VIPs taken over in {took:.1f} s (lease {args.lease} s)")
        await cluster.stop_all()

    asyncio.run(run())
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.top)
    print(out.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
