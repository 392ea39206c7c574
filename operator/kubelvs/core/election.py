"""Who owns each VIP: the election's decisions, as pure functions of what a director has seen.

The protocol (the effects are in :mod:`kubelvs.kube.leases` and :mod:`kubelvs.director.election`):

- Every director renews one **heartbeat** Lease every ``retry_period``. API writes in steady
  state are ``directors / retry_period`` per second, whatever the number of VIPs.
- Every VIP has one **claim** Lease naming its owner. It is written only when the owner
  changes, with the resourceVersion last seen, so of two directors that try, one wins.
- A director judges another's heartbeat by its **own monotonic clock**, from the moment it saw
  the heartbeat change (as client-go's leader election does): never by comparing wall clocks.
  It may take over a VIP only when the holder's heartbeat has not changed for
  ``lease_duration`` and the holder has not been heard on the direct peer channel for as long.
- An owner answers for its VIPs only while it is **valid**: it renewed its heartbeat less than
  ``renew_deadline`` ago (by the send time of the request), or every director it knows
  acknowledged, on the peer channel, a beat it sent less than ``renew_deadline`` ago. Since
  ``renew_deadline < lease_duration`` and an observer sees a renewal only after it was sent,
  an owner stops answering before anyone may take over. The kernel enforces it too: the
  owner's claim address carries a lifetime refreshed at each renewal.
- Placement: each VIP's preferred owner is computed by every director from the same inputs
  (bounded-load rendezvous hashing), so counts differ by at most one when all directors serve
  all VIPs. A live owner is never preempted: it hands a VIP over itself (releases, then writes
  the claim to the new owner), which only then announces.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kubelvs.core.spec import ObjectRef


@dataclass(frozen=True, slots=True)
class Timings:
    """The election's clock, in seconds (all judged on each director's own monotonic clock).

    ``lease_duration``: a heartbeat unchanged this long means its director is gone.
    ``renew_deadline``: an owner that could not renew for this long stops answering.
    ``retry_period``: how often a director renews its heartbeat (and beats to its peers).
    """

    lease_duration: float = 2.0
    renew_deadline: float = 1.4
    retry_period: float = 0.5
    # A director that (re)joins takes over VIPs only after its heartbeat was live this long, so
    # a flapping director does not pull VIPs back and forth (and a restarted one gets the
    # connection sync stream first).
    handover_delay: float = 2.0

    def problems(self) -> list[str]:
        found = []
        if not 0 < self.retry_period < self.renew_deadline:
            found.append(f"retry period {self.retry_period} s must be > 0 and < renew deadline {self.renew_deadline} s")
        if not self.renew_deadline < self.lease_duration:
            found.append(f"renew deadline {self.renew_deadline} s must be < lease duration {self.lease_duration} s")
        if self.handover_delay < 0:
            found.append(f"handover delay {self.handover_delay} s must be >= 0")
        return found

    @property
    def address_lifetime(self) -> int:
        """The claim address's kernel lifetime (whole seconds, at least 1): it ends by itself
        about when the owner's validity ends, should the process freeze or die."""
        return max(1, math.floor(self.renew_deadline))

    def may_refresh_address(self, round_trip: float) -> bool:
        """Whether a renewal that took ``round_trip`` seconds may refresh the address lifetime.

        Refreshed at the answer, the address ends ``round_trip + address_lifetime`` after the
        request was sent; with the defaults (2.0/1.4/0.5 s, lifetime 1 s) that is before anyone
        may take over whenever the answer came within 1 s. Tighter timings (a lease under the
        lifetime's one-second floor, or a slow answer) can leave a tail: a director taking
        over first probes the segment and waits while the old owner's kernel still answers.
        A renewal slower than the renew deadline refreshes nothing (it did not count)."""
        return round_trip < self.renew_deadline

    def strict_address_lifetime(self, round_trip: float = 0.0) -> bool:
        """Whether the kernel lifetime alone ends before the earliest takeover."""
        return round_trip + self.address_lifetime <= self.lease_duration


TUNED = Timings(lease_duration=1.2, renew_deadline=0.7, retry_period=0.2, handover_delay=1.2)


# --- what a director has seen of the others ---------------------------------------------------


@dataclass(slots=True)
class _Seen:
    version: str = ""
    changed_at: float = -math.inf  # our monotonic time when we saw ``version`` first
    heard_at: float = -math.inf  # our monotonic time of the last direct peer beat
    api_live_since: float = math.inf  # start of the current run of liveness on the API


@dataclass(slots=True)
class Observations:
    """Liveness of other directors on the observer's own clock (pure: the caller passes ``now``)."""

    lease_duration: float
    seen: dict[str, _Seen] = field(default_factory=dict)

    def heartbeat(self, node: str, version: str, now: float) -> None:
        """The director's heartbeat Lease is at ``version`` (from a watch event, a listing or a GET)."""
        entry = self.seen.setdefault(node, _Seen())
        was_live = self.api_live(node, now)
        if version != entry.version:
            entry.version = version
            entry.changed_at = now
            if not was_live:
                entry.api_live_since = now

    def peer(self, node: str, now: float) -> None:
        """A direct beat from that director reached us."""
        self.seen.setdefault(node, _Seen()).heard_at = now

    def forget(self, node: str) -> None:
        self.seen.pop(node, None)

    def api_live(self, node: str, now: float) -> bool:
        entry = self.seen.get(node)
        return entry is not None and now - entry.changed_at < self.lease_duration

    def peer_live(self, node: str, now: float) -> bool:
        entry = self.seen.get(node)
        return entry is not None and now - entry.heard_at < self.lease_duration

    def live(self, node: str, now: float) -> bool:
        """Neither silent on the API nor on the peer channel: never to be taken over from."""
        return self.api_live(node, now) or self.peer_live(node, now)

    def settled(self, node: str, now: float, delay: float) -> bool:
        """Live on the API for ``delay`` already: may receive VIPs by handover."""
        entry = self.seen.get(node)
        return self.api_live(node, now) and entry is not None and now - entry.api_live_since >= delay

    def expires_at(self, node: str) -> float:
        """When the director becomes silent if nothing more is heard (for the caller's timer)."""
        entry = self.seen.get(node)
        if entry is None:
            return -math.inf
        return max(entry.changed_at, entry.heard_at) + self.lease_duration

    def api_live_nodes(self, now: float) -> frozenset[str]:
        return frozenset(node for node in self.seen if self.api_live(node, now))


def valid_until(
    renewed_at: float | None,
    acked_at: Mapping[str, float],
    peers: Iterable[str],
    renew_deadline: float,
    alone_holds: bool = False,
) -> float:
    """Until when this director may answer for the VIPs it holds.

    ``renewed_at``: the send time of its last successful heartbeat renewal. ``acked_at``: per
    peer, the send time of the newest direct beat of ours that peer acknowledged. ``peers``:
    every other director we know. The peer evidence counts only when every peer acknowledged
    (a peer that cannot hear us may take over once the API says we are gone). ``alone_holds``:
    with no other director known (and a peer channel on which a newcomer would make itself
    known), nobody can take over, so an API outage releases nothing.
    """
    until = -math.inf if renewed_at is None else renewed_at + renew_deadline
    peers = list(peers)
    if not peers and alone_holds and renewed_at is not None:
        return math.inf
    if peers and all(peer in acked_at for peer in peers):
        until = max(until, min(acked_at[peer] for peer in peers) + renew_deadline)
    return until


# --- placement ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1 << 16)  # every decision ranks every VIP: hash each pair once
def _score(node: str, vip: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{node}\0{vip}".encode(), digest_size=8).digest(), "big")


def preference(vip: str, nodes: Iterable[str]) -> list[str]:
    """Rendezvous (highest random weight) order of ``nodes`` for ``vip``: the same on every director."""
    return list(_ranking(vip, frozenset(nodes)))


@functools.lru_cache(maxsize=1 << 14)  # the candidates of a VIP rarely change between decisions
def _ranking(vip: str, nodes: frozenset[str]) -> tuple[str, ...]:
    return tuple(sorted(nodes, key=lambda node: (-_score(node, vip), node)))


def assign(
    candidates: Mapping[str, frozenset[str]],
    unfit: Mapping[str, frozenset[str]],
    current: Mapping[str, str] | None = None,
) -> dict[str, str | None]:
    """The preferred owner of each VIP among its candidates (the live directors selected for it).

    Each VIP starts with its ``current`` owner when that is a fit candidate (placement is
    sticky: a handover costs a moment of silence, so nothing moves without need), else with its
    highest-ranked candidate by rendezvous hashing (fit ones before unfit ones); then the
    fewest moves that even the counts out: VIPs leave directors above the
    ceiling of the even share for their best-ranked candidate below it, then directors below
    the floor take VIPs from those above it. With every director a candidate for every VIP,
    counts differ by at most one, and a director that joins takes about 1/n of the VIPs, most
    of them the ones it ranks first. A director that reports a VIP ``unfit`` (programming
    failed, no interface, no ready backend) gets it only when no fit candidate remains, and
    evening out never moves a VIP from a fit director to an unfit one.
    """
    result: dict[str, str | None] = {vip: None for vip, group in candidates.items() if not group}
    pending = sorted(vip for vip, group in candidates.items() if group)
    if not pending:
        return result
    nodes = sorted({node for vip in pending for node in candidates[vip]})
    none: frozenset[str] = frozenset()
    ranked: dict[str, list[str]] = {}
    for vip in pending:
        order = preference(vip, candidates[vip])
        ranked[vip] = [n for n in order if vip not in unfit.get(n, none)] + [
            n for n in order if vip in unfit.get(n, none)
        ]
    current = current or {}

    def start(vip: str) -> str:
        holder = current.get(vip, "")
        if holder in candidates[vip] and vip not in unfit.get(holder, none):
            return holder
        return ranked[vip][0]

    owner = {vip: start(vip) for vip in pending}
    held: dict[str, set[str]] = {node: set() for node in nodes}
    for vip, node in owner.items():
        held[node].add(vip)
    # The even share counts the directors that can serve something: one unfit for all its VIPs
    # (shutting down, its link down) is not owed a share, nor does it shrink the others'.
    sharing = [n for n in nodes if any(n in candidates[vip] and vip not in unfit.get(n, none) for vip in pending)]
    shares = len(sharing) or len(nodes)
    floor, ceiling = len(pending) // shares, -(-len(pending) // shares)

    def may_take(vip: str, node: str) -> bool:
        return vip not in unfit.get(node, none) or vip in unfit.get(owner[vip], none)

    def move(vip: str, node: str) -> None:
        held[owner[vip]].discard(vip)
        held[node].add(vip)
        owner[vip] = node

    # Both passes move the best-ranked valid option first, again and again. An option only ever
    # stops being valid as moves happen (a receiver fills up, a giver empties), so one pass
    # over the options in rank order makes the same moves as re-taking the minimum each time,
    # without its quadratic cost (a rebalance of a thousand VIPs is decided at every wake-up).
    for node in nodes:  # shed: above the ceiling
        if len(held[node]) <= ceiling:
            continue
        options = sorted(
            (rank, vip, other)
            for vip in held[node]
            for rank, other in enumerate(ranked[vip])
            if other != node and may_take(vip, other)
        )
        for _, vip, other in options:
            if len(held[node]) <= ceiling:
                break
            if owner[vip] == node and len(held[other]) < ceiling:
                move(vip, other)
        # Still above: its VIPs have no other candidate with room (heterogeneous selections).
    for node in nodes:  # fill: below the floor
        if len(held[node]) >= floor:
            continue
        offers = sorted(
            (ranked[vip].index(node), vip) for vip in pending if node in candidates[vip] and may_take(vip, node)
        )
        for _, vip in offers:
            if len(held[node]) >= floor:
                break
            if owner[vip] != node and len(held[owner[vip]]) > floor:
                move(vip, node)
    result.update(owner)
    return result


# --- the decision per VIP ------------------------------------------------------------------------


class Action(enum.Enum):
    STANDBY = "standby"  # another director owns it, or will: keep the rules, never answer
    CLAIM = "claim"  # write the claim to us (create, take over, or confirm after a lapse)
    HOLD = "hold"  # ours and confirmed: hold the address, announce
    HAND_OVER = "hand-over"  # ours, but another should have it: stop answering, then write the claim to it
    RELEASE = "release"  # ours in the API, but we may not answer now (lapsed): stop answering


@dataclass(frozen=True, slots=True)
class Claim:
    """A VIP's claim as last seen: ``holder`` is "" when released."""

    holder: str
    version: str


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str  # one CamelCase word, for metrics, Events and logs
    target: str = ""  # CLAIM: us; HAND_OVER: the new owner; STANDBY: the owner (or "")
    message: str = ""


@dataclass(frozen=True, slots=True)
class Situation:
    """What one director knows when deciding about one VIP."""

    me: str
    vip: str
    claim: Claim | None
    preferred: str | None  # assign()'s choice among the live candidates
    candidate: bool  # we are selected for this VIP
    valid: bool  # we may answer now (valid_until > now)
    api_ok: bool  # our last heartbeat renewal succeeded: a claim write can be tried
    confirmed: bool  # our claim was written or read fresh since our validity last lapsed
    holder_live: bool  # the claim's holder (when another) is live on the API or the peer channel
    preferred_settled: bool  # the preferred director has been live for the handover delay
    unfit: str = ""  # why we cannot serve it now (a reason), or ""


def decide(s: Situation) -> Decision:
    """What this director does about one VIP (MetalLB's ``ShouldAnnounce``: a decision with a
    reason, apart from the effect)."""
    holder = s.claim.holder if s.claim is not None else ""
    if holder == s.me:
        if not s.valid:
            return Decision(Action.RELEASE, "LeaseLapsed", message="could not renew in time")
        if not s.candidate:
            return _hand_over(s, "NotSelected", "no longer selected for this VIP", urgent=True)
        if s.preferred and s.preferred != s.me:
            if s.unfit:  # assign() preferred another because we cannot serve it: no settling wait
                return _hand_over(s, s.unfit, f"cannot serve it here ({s.unfit})", urgent=True)
            if s.preferred_settled:
                return _hand_over(s, "Rebalance", f"{s.preferred} is preferred for it")
        return _keep(s)
    if not s.candidate or s.preferred != s.me:
        return Decision(Action.STANDBY, "Standby", holder or (s.preferred or ""))
    if holder and s.holder_live:
        return Decision(Action.STANDBY, "OwnedElsewhere", holder, f"owned by {holder}, which is live")
    if not s.api_ok or not s.valid:
        return Decision(Action.STANDBY, "CannotClaim", holder, "our own heartbeat is not current")
    if s.claim is None:
        return Decision(Action.CLAIM, "Unclaimed", s.me, "no director holds it")
    if not holder:
        return Decision(Action.CLAIM, "Released", s.me, "released by its owner")
    return Decision(Action.CLAIM, "OwnerSilent", s.me, f"{holder} stopped renewing its heartbeat")


def _hand_over(s: Situation, reason: str, message: str, urgent: bool = False) -> Decision:
    if s.preferred and s.preferred != s.me and (s.preferred_settled or urgent) and s.api_ok:
        return Decision(Action.HAND_OVER, reason, s.preferred, message)
    if s.preferred is None and s.api_ok and not s.candidate:
        return Decision(Action.HAND_OVER, reason, "", message + "; no director can take it")
    return _keep(s, message + "; kept until another director can take it")


def _keep(s: Situation, message: str = "") -> Decision:
    if not s.confirmed:  # another may have taken it while we lapsed: a claim write settles it
        if not s.api_ok:
            return Decision(Action.RELEASE, "Unconfirmed", message="lapsed, and the API is unreachable")
        return Decision(Action.CLAIM, "Reconfirm", s.me, "confirming our claim after a lapse")
    return Decision(Action.HOLD, "Owner", s.me, message)


# --- VirtualServers sharing a VIP must share a director -------------------------------------------


@dataclass(frozen=True, slots=True)
class Sharer:
    """One VirtualServer on a VIP, for :func:`selection_conflicts`."""

    ref: ObjectRef
    age: tuple[str, ...]  # oldest first (creationTimestamp, namespace, name)
    selector: Mapping[str, str]


def selection_conflicts(
    sharers: Mapping[str, list[Sharer]], directors: Mapping[str, Mapping[str, str]]
) -> dict[ObjectRef, str]:
    """The VirtualServers to refuse because they share a VIP with older ones whose
    ``directors.nodeSelector`` have no director in common with theirs: one VIP has one owner,
    so the directors that may own it must be selected by every VirtualServer on it. The older
    ones keep the VIP; the message names them. ``directors``: every director node -> its labels."""
    refused: dict[ObjectRef, str] = {}
    for vip, group in sharers.items():
        if len(group) < 2:
            continue
        common: set[str] | None = None
        kept: list[Sharer] = []
        for sharer in sorted(group, key=lambda s: s.age):
            selected = {node for node, labels in directors.items() if _selects(sharer.selector, labels)}
            if common is None:
                common, kept = selected, [sharer]
            elif common & selected:
                common &= selected
                kept.append(sharer)
            elif not common or not selected:
                kept.append(sharer)  # selects no director at all (yet): nothing to choose between
            else:
                older = ", ".join(str(s.ref) for s in kept)
                refused[sharer.ref] = (
                    f"VIP {vip} is shared with {older}, and no director is selected by both "
                    f"spec.directors.nodeSelector (one director must own the VIP for all of them)"
                )
    return refused


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())
