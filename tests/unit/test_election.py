"""The per-VIP owner election's pure decisions (:mod:`kubelvs.core.election`): placement,
liveness on the observer's own clock, the owner's validity, the decision table, and a small
simulation of directors sharing a claim table written with compare-and-set.

Times in the property tests are whole multiples of 1/8 s, so every sum and difference is exact in
binary floating point and the boundaries (``<`` against ``<=``) are tested as written.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubelvs.core.election import (
    TUNED,
    Action,
    Claim,
    Decision,
    Observations,
    Situation,
    Timings,
    assign,
    decide,
    preference,
    valid_until,
)

E = 8  # the time unit of the property tests: 1/8 s


def _s(units: int) -> float:
    return units / E


NODE_NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=10)
NODES = st.lists(NODE_NAMES, min_size=1, max_size=8, unique=True)
SEEDED = st.integers(0, 2**32).map(random.Random)  # cheaper than st.randoms(); the seed is shown


def _vips(count: int, salt: int) -> list[str]:
    return [f"vip-{salt}-{i}" for i in range(count)]


def _counts(result: dict[str, str | None], nodes: list[str]) -> Counter[str]:
    counts: Counter[str] = Counter(dict.fromkeys(nodes, 0))
    counts.update(owner for owner in result.values() if owner is not None)
    return counts


# --- Timings ---------------------------------------------------------------------------------------


def test_default_and_tuned_timings_are_consistent() -> None:
    assert Timings().problems() == []
    assert TUNED.problems() == []


@pytest.mark.parametrize(
    ("timings", "words"),
    [
        (Timings(retry_period=0), "retry period"),
        (Timings(retry_period=2.0, renew_deadline=2.0, lease_duration=3.0), "retry period"),
        (Timings(renew_deadline=3.0, lease_duration=3.0), "renew deadline"),
        (Timings(handover_delay=-1), "handover delay"),
    ],
)
def test_inconsistent_timings_are_reported(timings: Timings, words: str) -> None:
    problems = timings.problems()
    assert len(problems) == 1
    assert words in problems[0]


@pytest.mark.parametrize(("deadline", "lifetime"), [(0.2, 1), (0.7, 1), (1.0, 1), (1.9, 1), (2.0, 2), (7.5, 7)])
def test_address_lifetime_is_whole_seconds_at_least_one(deadline: float, lifetime: int) -> None:
    assert Timings(lease_duration=10, renew_deadline=deadline, retry_period=0.1).address_lifetime == lifetime


def test_a_renewal_refreshes_the_address_unless_slower_than_the_renew_deadline() -> None:
    assert TUNED.address_lifetime == 1
    assert TUNED.may_refresh_address(0.0)
    assert TUNED.may_refresh_address(0.625)
    assert not TUNED.may_refresh_address(0.7)
    assert not Timings().may_refresh_address(2.0)


def test_with_the_defaults_a_quick_answer_leaves_no_address_tail() -> None:
    """Defaults (2.0/1.4/0.5 s, lifetime 1 s): refreshed after an answer within 1 s, the address
    ends before anyone may take over; a slower answer (up to the renew deadline) still refreshes it
    and leaves a tail (documented: a director taking over probes the segment first)."""
    tim = Timings()
    assert tim.address_lifetime == 1
    for eighths in range(0, 9):
        rtt = _s(eighths)
        assert tim.may_refresh_address(rtt) and tim.strict_address_lifetime(rtt)
    assert tim.may_refresh_address(1.35) and not tim.strict_address_lifetime(1.35)
    assert not TUNED.strict_address_lifetime(0.25)  # a lease barely over the 1 s floor: a tail


@st.composite
def timings(draw: st.DrawFn) -> Timings:
    lease = draw(st.integers(3, 80))
    deadline = draw(st.integers(2, lease - 1))
    retry = draw(st.integers(1, deadline - 1))
    return Timings(_s(lease), _s(deadline), _s(retry), _s(draw(st.integers(0, 80))))


@settings(max_examples=300, deadline=None)
@given(timings(), st.integers(0, 100), st.integers(0, 10**6))
def test_the_strict_lifetime_ends_before_anyone_may_take_over(tim: Timings, round_trip: int, sent: int) -> None:
    """Refreshed at the answer (send + round trip), the address is gone by send + lease_duration,
    the earliest moment another director may judge us silent, exactly when
    ``strict_address_lifetime`` says so; ``may_refresh_address`` only drops renewals slower than
    the renew deadline (they did not count for validity either)."""
    assert tim.problems() == []
    rtt, at = _s(round_trip), _s(sent)
    ends = at + rtt + tim.address_lifetime
    assert tim.strict_address_lifetime(rtt) == (ends <= at + tim.lease_duration)
    assert tim.may_refresh_address(rtt) == (rtt < tim.renew_deadline)
    assert tim.address_lifetime >= 1
    assert tim.address_lifetime <= max(1, tim.renew_deadline)


# --- preference --------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(NODES, st.text(max_size=20), SEEDED)
def test_preference_is_a_permutation_independent_of_input_order(nodes: list[str], vip: str, rng: random.Random) -> None:
    ranked = preference(vip, nodes)
    assert sorted(ranked) == sorted(nodes)
    shuffled = list(nodes)
    rng.shuffle(shuffled)
    assert preference(vip, shuffled) == ranked
    assert preference(vip, frozenset(nodes)) == ranked
    assert preference(vip, iter(reversed(nodes))) == ranked


def test_preference_differs_between_vips() -> None:
    nodes = [f"node-{i}" for i in range(5)]
    firsts = {preference(f"10.0.0.{i}", nodes)[0] for i in range(100)}
    assert firsts == set(nodes)


# --- assign ---------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(NODES, st.integers(0, 300), st.integers(0, 2**32))
def test_assign_balances_when_every_director_serves_every_vip(nodes: list[str], count: int, salt: int) -> None:
    vips = _vips(count, salt)
    result = assign({vip: frozenset(nodes) for vip in vips}, {})
    assert set(result) == set(vips)
    assert all(result[vip] in nodes for vip in vips)
    counts = _counts(result, nodes)
    assert max(counts.values()) - min(counts.values()) <= 1


@settings(max_examples=100, deadline=None)
@given(NODES, st.integers(0, 60), st.integers(0, 2**32), SEEDED)
def test_assign_is_deterministic_whatever_the_insertion_order(
    nodes: list[str], count: int, salt: int, rng: random.Random
) -> None:
    vips = _vips(count, salt)
    candidates = {vip: frozenset(rng.sample(nodes, rng.randint(0, len(nodes)))) for vip in vips}
    unfit = {node: frozenset(vip for vip in vips if rng.random() < 0.2) for node in nodes}
    first = assign(candidates, unfit)
    assert assign(candidates, unfit) == first
    order = list(vips)
    rng.shuffle(order)
    nodes_order = list(unfit)
    rng.shuffle(nodes_order)
    again = assign(
        {vip: frozenset(reversed(sorted(candidates[vip]))) for vip in order},
        {node: unfit[node] for node in nodes_order},
    )
    assert again == first


def test_assign_of_one_vip_is_its_first_preference() -> None:
    nodes = frozenset(f"node-{i}" for i in range(6))
    for i in range(50):
        vip = f"10.1.0.{i}"
        assert assign({vip: nodes}, {})[vip] == preference(vip, nodes)[0]


def test_assign_nothing() -> None:
    assert assign({}, {}) == {}
    assert assign({"v": frozenset()}, {}) == {"v": None}
    assert assign({"v": frozenset(), "w": frozenset({"a"})}, {"a": frozenset({"w"})}) == {"v": None, "w": "a"}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(NODE_NAMES, min_size=0, max_size=6, unique=True),
    st.integers(0, 40),
    st.integers(0, 2**32),
    SEEDED,
)
def test_assign_keeps_each_vip_among_its_own_candidates(
    nodes: list[str], count: int, salt: int, rng: random.Random
) -> None:
    """Heterogeneous candidate sets and ``unfit`` reports: every VIP goes to one of its own
    candidates, None when it has none, and to an unfit one only when all of them are unfit."""
    vips = _vips(count, salt)
    candidates = {vip: frozenset(rng.sample(nodes, rng.randint(0, len(nodes)))) for vip in vips}
    unfit = {node: frozenset(vip for vip in vips if rng.random() < 0.3) for node in nodes if rng.random() < 0.7}
    result = assign(candidates, unfit)
    assert set(result) == set(vips)
    for vip in vips:
        owner = result[vip]
        if not candidates[vip]:
            assert owner is None
            continue
        assert owner in candidates[vip]
        if vip in unfit.get(owner, frozenset()):
            assert all(vip in unfit.get(node, frozenset()) for node in candidates[vip])


def test_an_unfit_director_yields_even_its_preferred_vips() -> None:
    nodes = frozenset({"a", "b", "c"})
    vips = _vips(30, 7)
    plain = assign({vip: nodes for vip in vips}, {})
    mine = frozenset(vip for vip in vips if plain[vip] == "a")
    assert mine
    moved = assign({vip: nodes for vip in vips}, {"a": mine})
    assert all(moved[vip] != "a" for vip in mine)
    everyone = {node: mine for node in nodes}
    assert all(assign({vip: nodes for vip in vips}, everyone)[vip] in nodes for vip in mine)


# Adding one director to n: a perfect move takes ceil(V / (n + 1)) VIPs, all to the newcomer.
# Rendezvous moves exactly the VIPs the newcomer ranks first; evening the counts out afterwards
# can move a few more (the shedding differs once the floor and ceiling change). Measured over
# n = 1..7 and V = 1..300 (thousands of random name sets): at most 2 * ceil(V / (n + 1)) + n - 1,
# e.g. 7 -> 8 directors with 24 VIPs moves 8 (ideal 3). The bound asserted leaves n + 1 spare.
@settings(max_examples=120, deadline=None)
@given(st.lists(NODE_NAMES, min_size=2, max_size=8, unique=True), st.integers(0, 300), st.integers(0, 2**32))
def test_a_joining_director_moves_a_bounded_number_of_vips(nodes: list[str], count: int, salt: int) -> None:
    old, new = nodes[:-1], nodes[-1]
    vips = _vips(count, salt)
    before = assign({vip: frozenset(old) for vip in vips}, {})
    after = assign({vip: frozenset(nodes) for vip in vips}, {})
    moved = sum(before[vip] != after[vip] for vip in vips)
    ideal = math.ceil(count / len(nodes))
    assert sum(owner == new for owner in after.values()) <= ideal
    assert moved <= 2 * ideal + 2 * len(old)


def test_old_directors_do_not_trade_vips_when_one_joins() -> None:
    """Placement starts from the current owners (as the director passes them): a joining
    director takes its share, the others keep theirs."""
    vips = [f"10.0.0.{i}" for i in range(3)]
    before = assign({vip: frozenset({"n0", "n1"}) for vip in vips}, {})
    current = {vip: owner for vip, owner in before.items() if owner}
    after = assign({vip: frozenset({"n0", "n1", "new"}) for vip in vips}, {}, current)
    assert all(after[vip] in (before[vip], "new") for vip in vips), (before, after)
    assert sum(after[vip] != before[vip] for vip in vips) == 1


@given(
    count=st.integers(min_value=1, max_value=120),
    old=st.lists(st.text("abcdefgh", min_size=1, max_size=4), min_size=1, max_size=6, unique=True),
)
@settings(max_examples=150, deadline=None)
def test_with_the_current_owners_a_join_moves_only_the_newcomers_share(count: int, old: list[str]) -> None:
    new = "joiner!"
    vips = [f"10.1.{i // 200}.{i % 200}" for i in range(count)]
    before = assign({vip: frozenset(old) for vip in vips}, {})
    current = {vip: owner for vip, owner in before.items() if owner}
    after = assign({vip: frozenset([*old, new]) for vip in vips}, {}, current)
    moved = sum(before[vip] != after[vip] for vip in vips)
    assert moved == sum(owner == new for owner in after.values()) <= math.ceil(count / (len(old) + 1))
    counts = _counts(after, [*old, new])
    assert max(counts.values()) - min(counts.values()) <= 1, counts


@settings(max_examples=150, deadline=None)
@given(st.lists(NODE_NAMES, min_size=2, max_size=6, unique=True), st.integers(1, 120), st.integers(0, 2**32))
def test_a_director_unfit_for_everything_gets_nothing_and_the_rest_stay_even(
    nodes: list[str], count: int, salt: int
) -> None:
    """A director shutting down (its heartbeat reports every VIP unfit) hands all its VIPs to
    the others, evenly, from wherever placement stood."""
    leaving, staying = nodes[0], nodes[1:]
    vips = _vips(count, salt)
    before = assign({vip: frozenset(nodes) for vip in vips}, {})
    current = {vip: owner for vip, owner in before.items() if owner}
    after = assign({vip: frozenset(nodes) for vip in vips}, {leaving: frozenset(vips)}, current)
    assert leaving not in after.values()
    counts = _counts(after, staying)
    assert max(counts.values()) - min(counts.values()) <= 1, counts


def test_vips_without_candidates_do_not_unbalance_the_others() -> None:
    both = frozenset({"a", "b"})
    candidates = {f"v{i}": both for i in range(4)} | {"e0": frozenset(), "e1": frozenset()}
    counts = _counts(assign(candidates, {}), ["a", "b"])
    assert max(counts.values()) - min(counts.values()) <= 1, counts


# --- Observations ----------------------------------------------------------------------------------


def test_an_unchanged_heartbeat_goes_silent_after_the_lease_duration() -> None:
    obs = Observations(3.0)
    assert not obs.live("b", 0.0)
    obs.heartbeat("b", "1", 10.0)
    for now in (11.0, 12.0, 12.875):
        obs.heartbeat("b", "1", now)  # seen again (a relist, a GET): not a renewal
        assert obs.api_live("b", now)
    assert obs.api_live("b", 12.875)
    assert not obs.api_live("b", 13.0)
    assert obs.expires_at("b") == 13.0
    obs.heartbeat("b", "2", 13.5)  # a change resets it
    assert obs.api_live("b", 16.375)
    assert not obs.api_live("b", 16.5)


def test_a_peer_beat_keeps_a_director_live_but_not_api_live() -> None:
    obs = Observations(3.0)
    obs.heartbeat("b", "1", 0.0)
    obs.peer("b", 2.0)
    assert obs.api_live("b", 2.5)
    assert not obs.api_live("b", 3.0)
    assert obs.peer_live("b", 3.0)
    assert obs.live("b", 4.875)
    assert not obs.live("b", 5.0)
    assert obs.expires_at("b") == 5.0
    assert not obs.settled("b", 4.0, 0.0)  # handover needs the API
    assert obs.api_live_nodes(4.0) == frozenset()


def test_settled_waits_for_the_handover_delay() -> None:
    obs = Observations(3.0)
    for t in range(10):
        obs.heartbeat("b", str(t), float(t))
        assert obs.settled("b", float(t), 3.0) == (t >= 3)
    # Silent, then back: the delay starts again.
    obs.heartbeat("b", "x", 20.0)
    assert not obs.settled("b", 22.0, 3.0)
    assert obs.settled("b", 22.0, 2.0)


def test_forget_and_unknown() -> None:
    obs = Observations(3.0)
    assert obs.expires_at("b") == -math.inf
    assert not obs.settled("b", 0.0, 0.0)
    obs.heartbeat("b", "1", 0.0)
    obs.forget("b")
    obs.forget("b")
    assert not obs.live("b", 0.0)


def test_settled_needs_api_liveness_for_the_delay_even_after_peer_beats() -> None:
    """A director heard only on the peer channel (its API connection away) is not settled the
    moment its heartbeat comes back: the handover delay runs from then."""
    obs = Observations(3.0)
    for t in range(11):
        obs.peer("b", float(t))
    obs.heartbeat("b", "1", 10.0)
    assert obs.api_live("b", 10.0)
    assert not obs.settled("b", 10.0, 3.0)
    obs.heartbeat("b", "1b", 12.0)
    assert obs.settled("b", 13.0, 3.0)
    obs.peer("b", 15.0)  # API silent from 15.0, heard directly: live, but a new run on the API
    obs.heartbeat("b", "2", 15.5)
    assert not obs.settled("b", 15.5, 3.0)
    obs.heartbeat("b", "3", 17.5)
    assert not obs.settled("b", 18.375, 3.0)
    assert obs.settled("b", 18.5, 3.0)


# A history: (delay in 1/8 s, kind, version) with kind 0 a heartbeat, 1 a peer beat, 2 a query.
EVENTS = st.lists(st.tuples(st.integers(0, 30), st.integers(0, 2), st.integers(1, 3)), max_size=60)
DELAYS = (0, 8, 24)


def _replay(events: list[tuple[int, int, int]], offset: int, peers: bool = True) -> list[tuple[int, tuple]]:
    obs = Observations(3.0)
    answers: list[tuple[int, tuple]] = []
    t = 0
    for delay, kind, version in events:
        t += delay
        now = _s(t + offset)
        if kind == 0:
            obs.heartbeat("b", f"v{version}", now)
        elif kind == 1 and peers:
            obs.peer("b", now)
        else:
            answer = (
                obs.api_live("b", now),
                obs.peer_live("b", now),
                obs.live("b", now),
                tuple(obs.settled("b", now, _s(d)) for d in DELAYS),
                obs.expires_at("b") - _s(offset),
                obs.api_live_nodes(now),
            )
            answers.append((t, answer))
    return answers


@settings(max_examples=200, deadline=None)
@given(EVENTS, st.integers(-(10**6), 10**6))
def test_liveness_depends_only_on_the_observers_clock(events: list[tuple[int, int, int]], offset: int) -> None:
    """The same history shifted by a constant gives the same answers: only differences of the
    observer's own ``now`` values count, never an absolute time."""
    assert _replay(events, offset) == _replay(events, 0)


@settings(max_examples=200, deadline=None)
@given(EVENTS)
def test_liveness_against_a_model(events: list[tuple[int, int, int]]) -> None:
    """api_live: a version change seen less than lease_duration ago; peer_live: a direct beat
    heard less than lease_duration ago; live: either; expires_at: when both end; settled: api
    live, and api live at every query within the last ``delay`` seconds (peer beats do not count)."""
    lease = 3 * E
    for peers in (True, False):
        changed = heard = None
        version = ""
        t = 0
        history: list[tuple[int, bool]] = []
        answers = iter(_replay(events, 0, peers))
        for delay, kind, v in events:
            t += delay
            if kind == 0:
                if f"v{v}" != version:
                    version, changed = f"v{v}", t
                continue
            if kind == 1 and peers:
                heard = t
                continue
            at, (api, peer, live, settled, expires, nodes) = next(answers)
            assert at == t
            assert api == (changed is not None and t - changed < lease)
            assert peer == (heard is not None and t - heard < lease)
            assert live == (api or peer)
            assert live == (_s(t) < expires)
            assert nodes == (frozenset({"b"}) if api else frozenset())
            assert settled[0] == api
            for d, ok in zip(DELAYS, settled, strict=True):
                if ok:
                    window = [was for when, was in history if t - d < when]
                    assert all(window)
            history.append((t, api))


# --- the owner's validity against an observer's judgement --------------------------------------------

LEASES = [(24, 16), (10, 6), (32, 28), (24, 8)]  # (lease_duration, renew_deadline) in 1/8 s


@dataclass(frozen=True)
class _Renewal:
    sent: int
    answered: int | None  # None: the owner never learned it succeeded (it counts it as failed)
    observed: int | None  # None: never applied, so never seen


@dataclass(frozen=True)
class _Beat:
    sent: int
    heard: dict[str, int]  # peer -> when the beat reached it
    acked: dict[str, int]  # peer -> when its acknowledgement reached the owner


@dataclass(frozen=True)
class _Timeline:
    lease: int
    deadline: int
    renewals: list[_Renewal]
    peers: tuple[str, ...]
    beats: list[_Beat]
    alone_holds: bool = False

    def owner_valid_until(self, now: int) -> float:
        """The owner's ``valid_until`` from what it knows at ``now``: the answers and
        acknowledgements that reached it by then."""
        renewed = [r.sent for r in self.renewals if r.answered is not None and r.answered <= now]
        acked: dict[str, float] = {}
        for beat in self.beats:
            for peer, at in beat.acked.items():
                if at <= now:
                    acked[peer] = max(acked.get(peer, -math.inf), _s(beat.sent))
        renewed_at = _s(max(renewed)) if renewed else None
        return valid_until(renewed_at, acked, self.peers, _s(self.deadline), alone_holds=self.alone_holds)

    def peer_valid_until(self, now: int) -> float:
        acked: dict[str, float] = {}
        for beat in self.beats:
            for peer, at in beat.acked.items():
                if at <= now:
                    acked[peer] = max(acked.get(peer, -math.inf), _s(beat.sent))
        return valid_until(None, acked, self.peers, _s(self.deadline))


@st.composite
def timelines(draw: st.DrawFn, mode: str) -> _Timeline:
    """An owner renewing its heartbeat and beating to its peers, one of which ("obs") watches.

    ``mode`` bounds when the observer sees a renewal: "arbitrary" (any delay), "margin" (within
    lease_duration - renew_deadline of its send time) or "answer" (no later than the owner got
    the answer)."""
    lease, deadline = draw(st.sampled_from(LEASES))
    renewals = []
    t = 0
    for _ in range(draw(st.integers(0, 10))):
        t += draw(st.integers(0, 2 * lease))
        fate = draw(st.sampled_from(["ok", "ok", "ok", "lost", "unanswered"]))
        answer_lag = draw(st.integers(0, 2 * lease))
        if mode == "arbitrary":
            observe_lag = draw(st.integers(0, 3 * lease))
        elif mode == "margin":
            observe_lag = draw(st.integers(0, lease - deadline))
        else:
            observe_lag = draw(st.integers(0, answer_lag))
        renewals.append(
            _Renewal(t, t + answer_lag if fate == "ok" else None, None if fate == "lost" else t + observe_lag)
        )
    peers = ("obs", *draw(st.sampled_from([(), ("p",), ("p", "q")])))
    beats = []
    s = 0
    for _ in range(draw(st.integers(0, 10))):
        s += draw(st.integers(0, 2 * lease))
        heard: dict[str, int] = {}
        acked: dict[str, int] = {}
        for peer in peers:
            if draw(st.integers(0, 3)):  # it reached that peer
                heard[peer] = s + draw(st.integers(0, lease))
                if draw(st.integers(0, 3)):  # and the acknowledgement came back
                    acked[peer] = heard[peer] + draw(st.integers(0, lease))
        beats.append(_Beat(s, heard, acked))
    return _Timeline(lease, deadline, renewals, peers, beats, alone_holds=draw(st.booleans()))


def _check_timeline(tl: _Timeline, mode: str) -> None:
    margin = tl.lease - tl.deadline
    events: list[tuple[int, int, str]] = []
    for i, renewal in enumerate(tl.renewals):
        if renewal.observed is not None:
            events.append((renewal.observed, 0, f"v{i}"))
    for beat in tl.beats:
        if "obs" in beat.heard:
            events.append((beat.heard["obs"], 1, ""))
    events.sort()
    moments = {0}
    for r in tl.renewals:
        moments.update(x for x in (r.sent, r.answered, r.observed) if x is not None)
    for b in tl.beats:
        moments.update([b.sent, *b.heard.values(), *b.acked.values()])
    edges = (-1, 0, 1, tl.deadline, tl.deadline + 1, margin, tl.lease - 1, tl.lease, tl.lease + 1)
    obs = Observations(_s(tl.lease))
    i = 0
    for now in sorted({m + d for m in moments for d in edges}):
        while i < len(events) and events[i][0] <= now:
            at, kind, version = events[i]
            if kind == 0:
                obs.heartbeat("owner", version, _s(at))
            else:
                obs.peer("owner", _s(at))
            i += 1
        t = _s(now)
        # The peer path needs no assumption: an acknowledgement proves the observer heard the
        # beat, so an observer that has not heard the owner for lease_duration sees every
        # acknowledged beat's validity over, with lease_duration - renew_deadline to spare.
        if not obs.peer_live("owner", t):
            assert tl.peer_valid_until(now) <= _s(now - margin)
        # What the observer has seen of the API path, likewise, whatever the delays.
        if not obs.api_live("owner", t):
            seen = [r.sent for r in tl.renewals if r.observed is not None and r.observed <= now]
            assert valid_until(_s(max(seen)) if seen else None, {}, (), _s(tl.deadline)) <= _s(now - margin)
        if obs.live("owner", t):
            continue
        # The observer judges the owner gone: it may take over from now on.
        if mode == "answer":
            assert tl.owner_valid_until(now) <= t
        elif mode == "margin":
            # Any validity the owner has now began after a lapse (it was not valid margin ago),
            # so it holds nothing until a claim write reconfirms it (which alone does not fence
            # a takeover: test_a_reconfirmed_owner_is_not_taken_over_by_a_lagging_observer).
            assert tl.owner_valid_until(now - margin) <= _s(now - margin)


@pytest.mark.parametrize("mode", ["answer", "margin", "arbitrary"])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_an_owner_stops_answering_before_an_observer_may_take_over(mode: str, data: st.DataObject) -> None:
    _check_timeline(data.draw(timelines(mode)), mode)


def test_a_director_never_seen_is_not_live() -> None:
    """An observer judges only what it has seen: a holder it never heard of counts as silent at
    once. The director therefore lists the heartbeats before its first decision (each listed one
    is then live for a full lease_duration) and reads the holder's heartbeat before a takeover."""
    obs = Observations(3.0)
    assert not obs.live("b", 0.0)
    s = _sit(claim=OTHER, holder_live=obs.live("b", 0.0))
    assert decide(s).action is Action.CLAIM
    obs.heartbeat("b", "41", 0.0)  # listed: its current version, whatever its age
    assert obs.live("b", 2.875)
    assert decide(replace(s, holder_live=obs.live("b", 2.875))).action is Action.STANDBY


def test_an_observer_that_heard_the_owner_directly_defers() -> None:
    obs = Observations(3.0)
    obs.heartbeat("owner", "1", 0.0)
    obs.peer("owner", 2.5)  # the API is away for the owner, the peer channel is not
    acked = {"obs": 2.5, "other": 2.25}  # send times of the newest acknowledged beats
    until = valid_until(0.0, acked, ["obs", "other"], 2.0)
    assert until == 4.25
    assert not obs.api_live("owner", 4.0)
    assert obs.live("owner", 4.0)  # still valid at 4.0, and the observer defers
    # A peer that never acknowledged: the peer evidence does not count.
    assert valid_until(0.0, {"obs": 2.5}, ["obs", "silent"], 2.0) == 2.0
    assert valid_until(None, {}, [], 2.0) == -math.inf
    assert valid_until(1.0, {"gone": 9.0}, [], 2.0) == 3.0  # acks of peers we no longer know


def test_alone_an_owner_holds_through_an_api_outage_only_when_asked() -> None:
    assert valid_until(1.0, {}, [], 2.0, alone_holds=True) == math.inf
    assert valid_until(None, {}, [], 2.0, alone_holds=True) == -math.inf  # never renewed: nothing
    # As soon as another director is known, the usual evidence applies.
    assert valid_until(1.0, {}, ["b"], 2.0, alone_holds=True) == 3.0
    assert valid_until(1.0, {"b": 2.0}, ["b"], 2.0, alone_holds=True) == 4.0


def test_a_watch_lagging_beyond_the_margin_is_outside_the_pure_rule() -> None:
    """Why the margin matters (and why the director reads the holder's heartbeat fresh before a
    takeover): a renewal seen later than lease_duration - renew_deadline after it was sent leaves
    the observer judging a still-valid, never-lapsed owner silent."""
    obs = Observations(3.0)
    obs.heartbeat("owner", "1", 0.0)  # renewal sent and answered at 0
    # renewal sent and answered at 1.5, seen by the observer only at 3.5 (a 2 s lag > 1 s margin)
    assert valid_until(0.0, {}, [], 2.0) > 1.5  # so the owner never lapsed
    assert not obs.live("owner", 3.0)
    assert valid_until(1.5, {}, [], 2.0) > 3.0


def test_an_owner_back_from_a_lapse_reconfirms_before_answering() -> None:
    """Within the margin an observer can still judge silent an owner that just renewed after a
    lapse; that owner is unconfirmed, so it writes the claim (compare-and-set) before holding
    (the race that remains: test_a_reconfirmed_owner_is_not_taken_over_by_a_lagging_observer)."""
    obs = Observations(3.0)
    obs.heartbeat("owner", "1", 0.0)  # sent at 0; the next renewals failed
    # sent at 2.875 after the lapse at 2.0, answered at 2.9, seen at 3.25 (within the margin)
    assert not obs.live("owner", 3.0)
    assert valid_until(0.0, {}, [], 2.0) <= 2.0  # the owner was not valid margin ago
    assert valid_until(2.875, {}, [], 2.0) > 3.0
    owner = _sit(me="owner", claim=Claim("owner", "7"), preferred="owner", confirmed=False)
    assert decide(owner) == Decision(Action.CLAIM, "Reconfirm", "owner", "confirming our claim after a lapse")


# --- decide ---------------------------------------------------------------------------------------------


def _sit(**changes: object) -> Situation:
    base = Situation(
        me="a",
        vip="192.0.2.1",
        claim=Claim("a", "1"),
        preferred="a",
        candidate=True,
        valid=True,
        api_ok=True,
        confirmed=True,
        holder_live=False,
        preferred_settled=True,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


OTHER = Claim("b", "1")

TABLE = [
    # ours
    ({}, Action.HOLD, "Owner", "a"),
    ({"api_ok": False}, Action.HOLD, "Owner", "a"),
    ({"valid": False}, Action.RELEASE, "LeaseLapsed", ""),
    ({"valid": False, "confirmed": False, "api_ok": False}, Action.RELEASE, "LeaseLapsed", ""),
    ({"confirmed": False}, Action.CLAIM, "Reconfirm", "a"),
    ({"confirmed": False, "api_ok": False}, Action.RELEASE, "Unconfirmed", ""),
    ({"preferred": None}, Action.HOLD, "Owner", "a"),
    ({"preferred": "b"}, Action.HAND_OVER, "Rebalance", "b"),
    ({"preferred": "b", "confirmed": False}, Action.HAND_OVER, "Rebalance", "b"),
    ({"preferred": "b", "preferred_settled": False}, Action.HOLD, "Owner", "a"),
    ({"preferred": "b", "preferred_settled": False, "confirmed": False}, Action.CLAIM, "Reconfirm", "a"),
    ({"preferred": "b", "api_ok": False}, Action.HOLD, "Owner", "a"),
    (
        {"preferred": "b", "preferred_settled": False, "unfit": "NoReadyBackend"},
        Action.HAND_OVER,
        "NoReadyBackend",
        "b",
    ),
    ({"preferred": "b", "unfit": "NoReadyBackend", "api_ok": False}, Action.HOLD, "Owner", "a"),
    ({"preferred": "a", "unfit": "NoReadyBackend"}, Action.HOLD, "Owner", "a"),
    ({"candidate": False, "preferred": "b", "preferred_settled": False}, Action.HAND_OVER, "NotSelected", "b"),
    ({"candidate": False, "preferred": None}, Action.HAND_OVER, "NotSelected", ""),
    ({"candidate": False, "preferred": None, "api_ok": False}, Action.HOLD, "Owner", "a"),
    ({"candidate": False, "preferred": "b", "api_ok": False, "confirmed": False}, Action.RELEASE, "Unconfirmed", ""),
    # another's, or nobody's
    ({"claim": OTHER, "holder_live": True}, Action.STANDBY, "OwnedElsewhere", "b"),
    ({"claim": OTHER}, Action.CLAIM, "OwnerSilent", "a"),
    ({"claim": OTHER, "confirmed": False}, Action.CLAIM, "OwnerSilent", "a"),
    ({"claim": None}, Action.CLAIM, "Unclaimed", "a"),
    ({"claim": Claim("", "2")}, Action.CLAIM, "Released", "a"),
    ({"claim": Claim("", "2"), "holder_live": True}, Action.CLAIM, "Released", "a"),
    ({"claim": OTHER, "api_ok": False}, Action.STANDBY, "CannotClaim", "b"),
    ({"claim": OTHER, "valid": False}, Action.STANDBY, "CannotClaim", "b"),
    ({"claim": None, "api_ok": False}, Action.STANDBY, "CannotClaim", ""),
    ({"claim": OTHER, "preferred": "c"}, Action.STANDBY, "Standby", "b"),
    ({"claim": OTHER, "preferred": "c", "holder_live": True}, Action.STANDBY, "Standby", "b"),
    ({"claim": None, "preferred": "c"}, Action.STANDBY, "Standby", "c"),
    ({"claim": None, "preferred": None, "candidate": False}, Action.STANDBY, "Standby", ""),
    ({"claim": OTHER, "candidate": False, "preferred": None}, Action.STANDBY, "Standby", "b"),
]


@pytest.mark.parametrize(("changes", "action", "reason", "target"), TABLE)
def test_decide_table(changes: dict[str, object], action: Action, reason: str, target: str) -> None:
    decision = decide(_sit(**changes))
    assert (decision.action, decision.reason, decision.target) == (action, reason, target)


def test_decide_messages_say_why() -> None:
    assert decide(_sit(claim=OTHER, holder_live=True)).message == "owned by b, which is live"
    assert decide(_sit(claim=OTHER)).message == "b stopped renewing its heartbeat"
    assert decide(_sit(preferred="b")).message == "b is preferred for it"
    kept = decide(_sit(preferred="b", unfit="NoInterfaceForVIP", api_ok=False))
    assert kept.message == "cannot serve it here (NoInterfaceForVIP); kept until another director can take it"
    assert decide(_sit(candidate=False, preferred=None)).message.endswith("; no director can take it")


SITUATIONS = st.builds(
    Situation,
    me=st.just("a"),
    vip=st.just("192.0.2.1"),
    claim=st.one_of(st.none(), st.builds(Claim, st.sampled_from(["a", "b", "c", ""]), st.sampled_from(["1", "2"]))),
    preferred=st.sampled_from([None, "a", "b", "c"]),
    candidate=st.booleans(),
    valid=st.booleans(),
    api_ok=st.booleans(),
    confirmed=st.booleans(),
    holder_live=st.booleans(),
    preferred_settled=st.booleans(),
    unfit=st.sampled_from(["", "NoReadyBackend", "NoInterfaceForVIP"]),
)


@settings(max_examples=500, deadline=None)
@given(SITUATIONS)
def test_decide_never_breaks_the_rules(s: Situation) -> None:
    d = decide(s)
    holder = s.claim.holder if s.claim is not None else ""
    ours = holder == s.me
    assert d.reason and d.reason.isidentifier() and d.reason[0].isupper()
    if s.holder_live and holder and not ours:
        assert d.action is not Action.CLAIM
    if not s.valid:
        assert d.action in (Action.RELEASE, Action.STANDBY)
    if not s.api_ok:
        assert d.action not in (Action.CLAIM, Action.HAND_OVER)
    if d.action is Action.HOLD:
        assert ours and s.valid and s.confirmed
    if d.action is Action.CLAIM:
        assert d.target == s.me and s.valid and s.api_ok
        assert ours or (s.candidate and s.preferred == s.me)
    if d.action is Action.HAND_OVER:
        assert ours and d.target != s.me
        assert d.target == (s.preferred or "")
        assert d.target or not s.candidate
    if d.action is Action.RELEASE:
        assert ours
    if not ours:
        assert d.action in (Action.STANDBY, Action.CLAIM)


# --- simulation: directors sharing a claim table -------------------------------------------------------

SIM = Timings(lease_duration=3.0, renew_deadline=2.0, retry_period=1.0, handover_delay=3.0)
STEP = 0.25  # the simulated clock's resolution
PERIOD = round(SIM.retry_period / STEP)  # steps between two renewals of one director
MARGIN = round((SIM.lease_duration - SIM.renew_deadline) / STEP)  # the largest watch lag the rule covers


@dataclass
class _Director:
    name: str
    obs: Observations
    phase: int  # it renews at the steps k with k % PERIOD == phase
    view: dict[str, Claim] = field(default_factory=dict)  # its copy of the claims (may lag)
    confirmed: set[str] = field(default_factory=set)  # claims it wrote since its last lapse
    answering: set[str] = field(default_factory=set)  # VIPs whose address it holds
    renewed_at: float = -math.inf  # send time of its last successful renewal
    loss: float = 0.0  # the share of its renewals lost
    api_ok: bool = True
    alive: bool = True


class _Sim:
    """Directors renewing their heartbeats every retry_period (each director either loses none
    of its renewals or a share ``loss`` of them), seen by the others after a lag of 0 to
    lease_duration - renew_deadline, deciding per VIP from their own view of the claims, and writing claims with
    compare-and-set. The checks run after every step. ``fresh_read``: before a takeover, read
    the holder's heartbeat (as the director does), in the same step as the claim write."""

    def __init__(self, count: int, vips: list[str], rng: random.Random, loss: float, fresh_read: bool) -> None:
        self.names = [f"d{i}" for i in range(count)]
        self.vips = vips
        self.rng = rng
        self.fresh_read = fresh_read
        self.step = 0
        self.table: dict[str, Claim] = {}
        self.serial = 0
        self.writes = 0
        self.conflicts = 0
        self.actions: Counter[str] = Counter()
        self.directors = {
            name: _Director(name, Observations(SIM.lease_duration), rng.randrange(PERIOD), loss=rng.choice([0.0, loss]))
            for name in self.names
        }
        self.beats = dict.fromkeys(self.names, 0)
        self.pending: list[tuple[int, str, str, str]] = []  # (step seen, observer, node, version)
        self.placements: dict[frozenset[str], dict[str, str | None]] = {}
        for d in self.directors.values():
            self.renew(d, lossless=True)
        # Before its first decision a director lists the heartbeats (the director's ``listed``):
        # a holder it never saw would otherwise count as silent at once.
        for d in self.directors.values():
            for node, beat in self.beats.items():
                if node != d.name:
                    d.obs.heartbeat(node, str(beat), self.now)
        self.pending.clear()

    @property
    def now(self) -> float:
        return self.step * STEP

    def alive(self) -> list[_Director]:
        return [d for d in self.directors.values() if d.alive]

    def valid(self, d: _Director) -> bool:
        return self.now < d.renewed_at + SIM.renew_deadline

    def renew(self, d: _Director, lossless: bool = False) -> None:
        if not lossless and self.rng.random() < d.loss:
            d.api_ok = False
            return
        d.api_ok = True
        d.renewed_at = self.now
        self.beats[d.name] += 1
        for other in self.alive():
            if other is not d:
                seen = self.step + self.rng.randint(0, MARGIN)
                self.pending.append((seen, other.name, d.name, str(self.beats[d.name])))

    def tick(self, lossless: bool = False) -> None:
        self.step += 1
        for d in self.alive():
            if self.step % PERIOD == d.phase:
                self.renew(d, lossless)
        due = sorted(p for p in self.pending if p[0] <= self.step)
        self.pending = [p for p in self.pending if p[0] > self.step]
        for _at, observer, node, version in due:
            self.directors[observer].obs.heartbeat(node, version, self.now)
        for d in self.directors.values():
            if not self.valid(d):  # the fence: a lapsed (or dead) director stops answering
                d.answering.clear()
                d.confirmed.clear()
        self.check()

    def situation(self, d: _Director, vip: str) -> Situation:
        live = frozenset({d.name} | d.obs.api_live_nodes(self.now))
        if live not in self.placements:
            self.placements[live] = assign(dict.fromkeys(self.vips, live), {})
        preferred = self.placements[live][vip]
        claim = d.view.get(vip)
        holder = claim.holder if claim is not None else ""
        return Situation(
            me=d.name,
            vip=vip,
            claim=claim,
            preferred=preferred,
            candidate=True,
            valid=self.valid(d),
            api_ok=d.api_ok,
            confirmed=vip in d.confirmed,
            holder_live=bool(holder) and holder != d.name and d.obs.live(holder, self.now),
            preferred_settled=preferred is not None
            and (preferred == d.name or d.obs.settled(preferred, self.now, SIM.handover_delay)),
        )

    def write(self, d: _Director, vip: str, holder: str) -> bool:
        expected, current = d.view.get(vip), self.table.get(vip)
        if expected != current:  # 409 Conflict: the answer carries the current record
            self.conflicts += 1
            if current is None:
                d.view.pop(vip, None)
            else:
                d.view[vip] = current
            return False
        self.serial += 1
        self.writes += 1
        self.table[vip] = d.view[vip] = Claim(holder, str(self.serial))
        return True

    def sync(self, d: _Director, vip: str) -> None:
        if vip in self.table:
            d.view[vip] = self.table[vip]

    def decide(self, d: _Director, vip: str) -> Decision:
        decision = decide(self.situation(d, vip))
        self.actions[decision.reason] += 1
        if decision.action is Action.HOLD:
            assert self.table[vip].holder == d.name, (d.name, vip, self.table[vip])
            d.answering.add(vip)
        elif decision.action is Action.CLAIM:
            holder = d.view[vip].holder if vip in d.view else ""
            if self.fresh_read and holder and holder != d.name:
                current = str(self.beats[holder])
                if d.obs.seen[holder].version != current:  # it renewed after all: not silent
                    d.obs.heartbeat(holder, current, self.now)
                    return decision
            if self.write(d, vip, d.name):
                d.confirmed.add(vip)
                d.answering.add(vip)
        elif decision.action is Action.HAND_OVER:
            d.answering.discard(vip)  # stop answering first, then write the claim to the new owner
            assert decision.target != d.name
            if self.write(d, vip, decision.target):
                d.confirmed.discard(vip)
        else:
            d.answering.discard(vip)
        self.check()
        return decision

    def check(self) -> None:
        for d in self.directors.values():
            assert self.valid(d) or not d.answering, (self.now, d.name, d.answering)
        for vip in self.vips:
            answering = [d.name for d in self.directors.values() if vip in d.answering]
            assert len(answering) <= 1, (self.now, vip, answering, self.table.get(vip))

    def run(self, ops: list[tuple[int, int, int]]) -> None:
        for kind, who, which in ops:
            alive = self.alive()
            d, vip = alive[who % len(alive)], self.vips[which % len(self.vips)]
            if kind == 0:
                self.tick()
            elif kind == 1:
                for _ in range(PERIOD):
                    self.tick()
            elif kind == 2:
                self.sync(d, vip)
            else:
                self.decide(d, vip)

    def settle(self) -> int:
        """Rounds of a retry period (no renewal lost any more), each director then reading and
        deciding every VIP, until nothing was written for long enough that no judgement can
        change any more."""
        quiet_needed = math.ceil((2 * SIM.lease_duration + SIM.handover_delay) / SIM.retry_period) + 1
        quiet = 0
        for rounds in range(1, 80):
            for _ in range(PERIOD):
                self.tick(lossless=True)
            before = self.writes
            order = self.alive()
            self.rng.shuffle(order)
            for d in order:
                for vip in self.vips:
                    self.sync(d, vip)
                    self.decide(d, vip)
            quiet = quiet + 1 if self.writes == before else 0
            if quiet >= quiet_needed:
                return rounds
        raise AssertionError(f"no quiescence: {self.table}")

    def assert_settled(self) -> None:
        alive = [d.name for d in self.alive()]
        holds: dict[str, list[str]] = {vip: [] for vip in self.vips}
        for d in self.alive():
            for vip in self.vips:
                self.sync(d, vip)
                decision = decide(self.situation(d, vip))
                assert decision.action in (Action.HOLD, Action.STANDBY), (d.name, vip, decision)
                if decision.action is Action.HOLD:
                    holds[vip].append(d.name)
        for vip in self.vips:
            assert holds[vip] == [self.table[vip].holder], (vip, holds[vip], self.table[vip])
            assert self.table[vip].holder in alive
        counts = _counts({vip: claim.holder for vip, claim in self.table.items()}, alive)
        assert max(counts.values()) - min(counts.values()) <= 1, counts


# (kind, director, VIP): kind 0 a clock step, 1 a retry period, 2 a read of one claim, 3-5 a decision.
OPS = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 7), st.integers(0, 15)), min_size=20, max_size=150)


def _converge_then_kill(sim: _Sim, before: list, after: list, victim: int) -> None:
    sim.run(before)
    sim.settle()
    sim.assert_settled()
    count, vips = len(sim.names), len(sim.vips)
    dead = sim.names[victim % count]
    held = {vip for vip, claim in sim.table.items() if claim.holder == dead}
    assert len(held) in (vips // count, vips // count + 1)
    sim.directors[dead].alive = False  # it stops renewing and deciding; its addresses stay until it is invalid
    sim.run(after)
    sim.settle()
    sim.assert_settled()
    assert all(sim.table[vip].holder != dead for vip in held)


@settings(max_examples=40, deadline=None)
@given(
    count=st.integers(2, 5),
    vips=st.integers(1, 12),
    before=OPS,
    after=OPS,
    victim=st.integers(0, 4),
    rng=SEEDED,
)
def test_directors_converge_and_a_dead_ones_vips_move_safely(
    count: int, vips: int, before: list, after: list, victim: int, rng: random.Random
) -> None:
    """The pure rules alone (no fresh read): directors start together, act in random
    interleavings, settle; then one dies. At no instant do two directors answer for a VIP, a
    HOLD comes only from the claim's holder, and once quiet every VIP has exactly one live
    holder, the only one deciding HOLD, with counts balanced to within one."""
    sim = _Sim(count, [f"192.0.2.{i}" for i in range(1, vips + 1)], rng, loss=0.0, fresh_read=False)
    _converge_then_kill(sim, before, after, victim)


@settings(max_examples=40, deadline=None)
@given(
    count=st.integers(2, 5),
    vips=st.integers(1, 12),
    before=OPS,
    after=OPS,
    victim=st.integers(0, 4),
    loss=st.sampled_from([0.3, 0.6, 0.8]),
    rng=SEEDED,
)
def test_lapsing_directors_reconfirm_and_never_answer_twice(
    count: int, vips: int, before: list, after: list, victim: int, loss: float, rng: random.Random
) -> None:
    """Renewals get lost, so directors lapse, release, come back and reconfirm, and the others
    take over from those silent long enough; with the director's fresh read of the holder's
    heartbeat before a takeover, the same guarantees hold."""
    sim = _Sim(count, [f"192.0.2.{i}" for i in range(1, vips + 1)], rng, loss=loss, fresh_read=True)
    _converge_then_kill(sim, before, after, victim)


@pytest.mark.xfail(
    strict=True,
    reason="not closed by the pure rules, by design: after a lapse, an owner that renews and reconfirms its "
    "claim (CAS) can be judged silent by an observer whose view lags (within the margin), and a CAS against the "
    "reconfirmed version would succeed. kubelvs.director.election closes it: the takeover's CAS uses the claim "
    "version seen when deciding (a reconfirmation in between makes it fail), heartbeats and claims come in one "
    "ordered watch stream (an observer that sees the reconfirmed claim has seen the renewal before it), and the "
    "holder's heartbeat is read fresh before a takeover",
)
def test_a_reconfirmed_owner_is_not_taken_over_by_a_lagging_observer() -> None:
    obs = Observations(3.0)  # the observer, d0
    obs.heartbeat("d2", "7", 10.25)  # d2's renewal sent at 10.25, seen at once
    # d2's renewals at 11.25 and 12.25 are lost: it lapses at 12.25 and stops answering. Its
    # renewal at 13.25 succeeds; d0 will see it at 13.75 (0.5 s lag, within the 1 s margin).
    owner = valid_until(13.25, {}, ["d0"], 2.0)
    assert owner > 13.25
    back = _sit(me="d2", claim=Claim("d2", "1"), preferred="d2", confirmed=False)
    assert decide(back).action is Action.CLAIM  # Reconfirm: written, v1 -> v2; then d2 holds
    assert decide(replace(back, claim=Claim("d2", "2"), confirmed=True)).action is Action.HOLD
    # d0 reads the claim (v2) at 13.25 and judges d2 by what it has seen:
    taker = _sit(me="d0", claim=Claim("d2", "2"), preferred="d0", holder_live=obs.live("d2", 13.25))
    assert decide(taker).action is not Action.CLAIM  # got: CLAIM OwnerSilent, whose CAS on v2 wins


def test_an_owner_back_from_a_lapse_does_not_hold_what_was_taken_over() -> None:
    """The owner loses its renewals until another director takes its VIP over, then comes back
    and decides from its stale view of the claim: it reconfirms (and loses the race), never holds."""
    sim = _Sim(2, ["192.0.2.1"], random.Random(7), loss=0.0, fresh_read=True)
    sim.settle()
    owner_name = sim.table["192.0.2.1"].holder
    owner = sim.directors[owner_name]
    taker = next(d for d in sim.directors.values() if d is not owner)
    owner.loss = 1.0
    lost_from = sim.now
    while sim.table["192.0.2.1"].holder == owner_name:
        sim.tick()
        assert sim.now < lost_from + SIM.lease_duration + 2 * SIM.retry_period
        sim.sync(taker, "192.0.2.1")
        sim.decide(taker, "192.0.2.1")
    assert "192.0.2.1" in taker.answering
    assert owner.view["192.0.2.1"].holder == owner_name  # it has not seen the takeover
    owner.loss = 0.0
    while not sim.valid(owner):
        sim.tick()
    decision = sim.decide(owner, "192.0.2.1")
    assert (decision.action, decision.reason) == (Action.CLAIM, "Reconfirm")
    assert sim.table["192.0.2.1"].holder == taker.name
    assert "192.0.2.1" not in owner.answering
    assert sim.decide(owner, "192.0.2.1").action is Action.STANDBY
