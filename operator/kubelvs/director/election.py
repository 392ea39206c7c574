"""The per-VIP owner election, wired: Leases in, decisions (:mod:`kubelvs.core.election`), the
claim address and announcements out.

One task renews this director's heartbeat Lease every ``retry_period`` (in a worker thread: the
client is blocking), beats to its peers, and then decides about every VIP. It also wakes at the
moments a decision may change: a claim or heartbeat event, the desired state of a sync, our own
validity ending, another director's heartbeat going silent. Every claim write is a
compare-and-set on the VIP's claim Lease; a takeover from a silent owner also reads that owner's
heartbeat fresh first (a lagging watch is no proof of silence) and, meanwhile, probes the
segment for anyone still answering (a frozen owner answers until its address lifetime ends).

Effects on the node go through :class:`VipNet` (``kubelvs.kernel.claims`` and
``kubelvs.kernel.announce`` in production, a fake in the unit tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubelvs.core import election as el
from kubelvs.core import status as st
from kubelvs.core.desired import selects_node
from kubelvs.core.model import AF_INET, AF_INET6
from kubelvs.core.spec import ObjectRef
from kubelvs.director.loop import wait_event
from kubelvs.director.metrics import Metrics
from kubelvs.director.peers import PeerChannel, PeerState
from kubelvs.director.view import ClusterView
from kubelvs.kube.leases import (
    ClaimRecord,
    Conflict,
    HeartbeatRecord,
    LeaseClient,
    UnfitRecord,
    claim_name,
    heartbeat_name,
    unfit_name,
)

log = logging.getLogger("kubelvs.director.election")
_NO_ERRORS: Mapping[ObjectRef, Any] = {}
_KEEP = el.Decision(el.Action.HOLD, "Owner")
# A decision over every VIP at least every this many retry periods, even when nothing it
# depends on was seen to change.
FULL_DECISION_PERIODS = 20
CLAIM_BATCHES = 4  # claim writes side by side (each batch a thread's run of requests)
_NO_CLAIM: Any = object()  # a claim write that expects no claim to exist


@dataclass(frozen=True, slots=True)
class ElectionConfig:
    node: str
    timings: el.Timings = field(default_factory=el.Timings)
    announce_interface: str = ""  # "": the interface whose subnet holds the VIP
    announce_count: int = 3  # gratuitous ARP / unsolicited NA frames at a takeover
    announce_interval: float = 0.2
    announce_refresh: float = 10.0  # while owned, announce again this often (0: never)
    probe_timeout: float = 0.15  # listen this long for another answer before claiming
    peer_port: int = 9345  # 0: no direct peer heartbeat
    peer_address: str = ""  # where peers reach us (the Node's address by default)
    follow_backends: bool = True  # a VIP without ready backends goes to a candidate that has some


class ClaimLost(OSError):
    """A claim address that was not added or refreshed because our validity had ended before
    the request (the process or its kernel thread stalled with it queued)."""

    def __init__(self, vip: str, why: str) -> None:
        super().__init__(f"{vip}: {why}")
        self.vip = vip


class VipNet(Protocol):
    """The node side of ownership (the claim address on the uplink, announcements, probes).

    Everything but ``uplinks``, ``held`` and ``probe`` runs on one worker thread, in order:
    a release queued after a hold undoes it, whatever the event loop did meanwhile. Each call
    takes many VIPs of one interface (a director holds hundreds; one socket and one read of
    the interface serve them all)."""

    def uplinks(self, vips: Iterable[str]) -> dict[str, tuple[str, bool] | None]:
        """Per VIP, the interface that carries its subnet and whether it is up (None: no such)."""

    def hold(
        self,
        interface: str,
        vips: list[tuple[str, int]],
        lifetime: int,
        still_valid: Callable[[], bool],
    ) -> list[tuple[str, OSError]]:
        """Add or refresh the claim addresses of (VIP, family), each only while ``still_valid()``
        (asked just before its request; ClaimLost for those skipped). The failures."""

    def release(self, interface: str, vips: list[tuple[str, int]]) -> list[tuple[str, OSError]]:
        """Remove those claim addresses (only ours); the failures."""

    def held(self) -> dict[str, str]:
        """The claim addresses we hold now: VIP -> interface."""

    def probe(self, interface: str, vips: list[tuple[str, int]], timeout: float) -> dict[str, set[str]]:
        """Per VIP, the MACs other than ours that answer for it."""

    def announce(
        self, interface: str, vips: list[tuple[str, int]], still_valid: Callable[[], bool]
    ) -> tuple[int, list[tuple[str, OSError]]]:
        """Gratuitous ARP / unsolicited NA for each: the frames sent, the failures."""

    def monitor(self, interface: str) -> Any:
        """A ``kubelvs.kernel.announce.ConflictMonitor`` for the interface, or None."""


@dataclass(slots=True)
class Held:
    interface: str
    family: int
    since: float
    announced_at: float = -math.inf
    bursts_left: int = 0


@dataclass(slots=True)
class VipInfo:
    family: int
    refs: list[ObjectRef] = field(default_factory=list)
    selectors: list[Mapping[str, str]] = field(default_factory=list)
    ready: bool = False
    failed: bool = False


class Election:
    def __init__(
        self,
        config: ElectionConfig,
        leases: LeaseClient,
        net: VipNet,
        view: ClusterView,
        metrics: Metrics,
        sync_state: Any,  # SyncLoop: .desired, .errors_by_ref
        post_event: Callable[[ObjectRef, str, str, str], None] = lambda ref, kind, reason, message: None,
        clock: Callable[[], float] = time.monotonic,
        on_owners_changed: Callable[[set[ObjectRef]], None] = lambda refs: None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.me = config.node
        self.timings = config.timings
        self.leases = leases
        self.net = net
        self.view = view
        self.metrics = metrics
        self.sync_state = sync_state
        self.post_event = post_event
        self.on_owners_changed = on_owners_changed  # their status (owner, Announced) is to be written again
        self.clock = clock
        self.wall_clock = wall_clock  # only to measure how far behind the Lease watch is
        self._watch_lag_logged = -math.inf
        self.obs = el.Observations(self.timings.lease_duration)
        self._own_leases = {heartbeat_name(self.me), unfit_name(self.me)}
        self.heartbeats: dict[str, HeartbeatRecord] = {}
        self._newest_renewal: dict[str, float] = {}  # node -> its newest renewTime seen, by its clock
        self.unfit_reports: dict[str, UnfitRecord] = {}  # node -> the VIPs it reported it cannot serve
        self.claims: dict[str, ClaimRecord] = {}
        self.renewed_at: float | None = None  # send time of our last good renewal
        self.api_ok = False
        self.confirmed: set[str] = set()  # our claims written or read fresh since our last lapse
        self.held: dict[str, Held] = {}
        self.decisions: dict[str, el.Decision] = {}
        self.unfit: dict[str, str] = {}  # VIP -> why we cannot serve it
        self._unfit_vips: frozenset[str] = frozenset()  # its keys: the same object while they stay
        # The VIPs our unfit report says, as last written (None: not yet since we started), and
        # the write in flight: the report is written beside the renewals, only when it changes.
        self._reported_unfit: frozenset[str] | None = None
        self._reporting: asyncio.Future[UnfitRecord] | None = None
        self.known_peers: set[str] = set()
        self.peer_state = PeerState(self.me)
        self.peer_sources: dict[str, str] = {}  # node -> address its beats come from
        self.peer_channel: PeerChannel | None = None
        self.wake = asyncio.Event()
        self.lapsed = True
        self.uplinks: dict[str, tuple[str, bool] | None] = {}
        self._fence_timer: asyncio.TimerHandle | None = None
        self.monitored: set[str] = set()
        self.suspects: set[str] = set()
        self.last_conflict: dict[str, str] = {}
        self.vip_refs: dict[str, list[ObjectRef]] = {}
        self.listed = False  # the Leases were listed: we know the other directors
        self.owners: dict[str, str] = {}  # VIP -> owner as we last judged (for status and metrics)
        # Kernel work on the claim addresses and announcements: one thread, in order, never on
        # the event loop (hundreds of VIPs at a time would stall the renewals and the fence).
        self.kernel = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vipnet")
        # Renewals on a thread of their own: in the shared pool they could queue behind a burst
        # of status writes, and a renewal late by its wait for a thread lapses VIPs all the same.
        self.renewer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heartbeat")
        self._uplinks_read: tuple[float, frozenset[str]] = (-math.inf, frozenset())
        self._vips: dict[str, VipInfo] | None = None
        self.draining = False  # shutting down: every VIP goes to another director
        self._drain_started = math.inf
        self._decided_draining = False  # a decision was made since draining began (and announced)
        self._vips_from: tuple[Any, Any] = (None, None)
        self._vip_of: dict[ObjectRef, str] = {}  # VirtualServer -> its VIP, as in self._vips
        self._synced_desired: Any = None  # the desired state of the last on_synced
        # The inputs of the last full decision (VIPs, uplinks, moment, actions) and when the
        # next one is due anyway; the HOLD decisions among them.
        self._decided_on: tuple[Any, ...] = (None, None, None, -1, -math.inf)
        self._holding: list[str] = []
        self._actions = 0  # claims written, addresses added or removed: counted, to decide again
        self._watched: dict[str, set[str]] | None = None  # the claims the conflict monitors watch

    # --- inputs -----------------------------------------------------------------------------

    def on_lease(self, event_type: str, obj: dict[str, Any]) -> None:
        """A Lease event (event loop thread)."""
        if (obj.get("metadata") or {}).get("name") in self._own_leases:
            return  # our own renewal or report coming back: nothing to learn
        now = self.clock()
        heartbeat = HeartbeatRecord.from_lease(obj)
        if heartbeat is not None and heartbeat.node != self.me:
            if event_type == "DELETED":
                # Not a proof of death (anyone may delete a Lease): its observation ages out
                # from the last change, as a silent heartbeat's would.
                self.heartbeats.pop(heartbeat.node, None)
                self._newest_renewal.pop(heartbeat.node, None)
                self.view.set_director_nodes({*self.heartbeats, self.me})
                self.wake.set()
                return
            self._observe_watch_lag(heartbeat, now)
            if self._older_than_seen(heartbeat):
                return  # a watch behind a fresh read: a renewal older than one seen, no sign of life
            before = self.heartbeats.get(heartbeat.node)
            was_live = self.obs.api_live(heartbeat.node, now)
            self.heartbeats[heartbeat.node] = heartbeat
            self.obs.heartbeat(heartbeat.node, heartbeat.version, now)
            if before is None:
                self.view.set_director_nodes({*self.heartbeats, self.me})
            # A renewal of a live director changes no decision (its expiry moves, which the
            # loop's next deadline follows): decide again only when it comes back or starts
            # shutting down. Three directors renew 6 times a second; a thousand VIPs each.
            if not was_live or before is None or before.draining != heartbeat.draining:
                self.wake.set()
            return
        report = UnfitRecord.from_lease(obj)
        if report is not None:
            reported = self.unfit_reports.pop(report.node, None)
            if event_type != "DELETED":
                self.unfit_reports[report.node] = report
            if reported is None or event_type == "DELETED" or reported.vips != report.vips:
                self.wake.set()
            return
        claim = ClaimRecord.from_lease(obj)
        if claim is not None:
            if event_type == "DELETED":
                self.claims.pop(claim.vip, None)
            else:
                known = self.claims.get(claim.vip)
                if known is None or known.version != claim.version:
                    self.claims[claim.vip] = claim
                    handed_to_us = claim.holder == self.me and (known is None or known.holder != self.me)
                    if handed_to_us and not self.lapsed:  # a newer version than we knew: fresh
                        self.confirmed.add(claim.vip)
            self.wake.set()

    def _older_than_seen(self, heartbeat: HeartbeatRecord) -> bool:
        """Whether ``heartbeat`` is an older renewal of its director than one already seen (by
        that director's own clock: two of its renewals, never two nodes' clocks). A takeover
        reads the silent holder's heartbeat fresh; a watch that lags behind that read then
        brings the holder's earlier renewals, and each, a version not seen yet, made it live
        again for a lease duration: takeovers waited for the watch to catch up. If the holder's
        clock steps back, its renewals are ignored here until it passes the newest seen; the
        fresh read before any takeover still sees them change, so nothing is taken from it."""
        if heartbeat.renewed is None:
            return False
        newest = self._newest_renewal.get(heartbeat.node)
        if newest is not None and heartbeat.renewed < newest:
            return True
        self._newest_renewal[heartbeat.node] = heartbeat.renewed
        return False

    def _observe_watch_lag(self, heartbeat: HeartbeatRecord, now: float) -> None:
        """How long ago (by the writer's clock) a heartbeat we see now was renewed: a director is
        judged silent a lease duration after the last renewal *seen*, so a watch that far behind
        delays every takeover as long. Logged when over the lease duration (once a minute)."""
        if heartbeat.renewed is None:
            return
        lag = max(0.0, self.wall_clock() - heartbeat.renewed)
        self.metrics.lease_watch_lag.observe(lag)
        if lag > self.timings.lease_duration and now >= self._watch_lag_logged + 60:
            self._watch_lag_logged = now
            log.warning(
                "the Lease watch is behind: %s's heartbeat seen %.1f s after it was renewed (lease %.1f s; "
                "clock skew between the nodes included): takeovers from a dead director wait as long",
                heartbeat.node,
                lag,
                self.timings.lease_duration,
            )

    def on_leases_relisted(self, listed: list[dict[str, Any]]) -> None:
        names = set()
        for obj in listed:
            self.on_lease("MODIFIED", obj)
            names.add((obj.get("metadata") or {}).get("name"))
        for node in [n for n in self.heartbeats if heartbeat_name(n) not in names]:
            self.heartbeats.pop(node, None)
        for node in [n for n in self.unfit_reports if unfit_name(n) not in names]:
            self.unfit_reports.pop(node, None)
        self.view.set_director_nodes({*self.heartbeats, self.me})
        for vip in [v for v in self.claims if claim_name(v) not in names]:
            self.claims.pop(vip, None)
        self.listed = True

    def on_beat(self, node: str, source: str) -> None:
        self.obs.peer(node, self.clock())
        self.peer_sources[node] = source
        if node not in self.known_peers:
            self.known_peers.add(node)
            self.wake.set()
        if not self.api_ok and self.held:  # the acknowledgements may extend our validity
            with contextlib.suppress(RuntimeError):
                self._arm_fence(asyncio.get_running_loop())

    def vips(self) -> dict[str, VipInfo]:
        """Every VIP of an accepted VirtualServer, with what the election needs of it: kept up
        to date by :meth:`on_synced`, found again in full only when it could not be."""
        desired, errors = self._synced_state()
        if self._vips is not None and self._vips_from[0] is desired and self._vips_from[1] is errors:
            return self._vips
        self._vip_of = {}
        found: dict[str, VipInfo] = {}
        if desired is not None:
            by_vip: dict[str, list[ObjectRef]] = {}
            for ref in desired.resolutions:
                vip = self._vip_of_ref(desired, ref)
                if vip:
                    self._vip_of[ref] = vip
                    by_vip.setdefault(vip, []).append(ref)
            found = {vip: self._vip_info(desired, errors, sorted(refs)) for vip, refs in by_vip.items()}
        self._vips, self._vips_from = found, (desired, errors)
        return found

    def on_synced(self, scope: Collection[ObjectRef] | None) -> None:
        """A sync succeeded (event loop thread): bring the VIPs up to date with its desired state,
        looking only at the VirtualServers it covered, and decide again only if a VIP changed.
        Under churn most syncs move real servers of VIPs that keep ready backends: they change
        nothing here, and a decision over every VIP after each (a tenth of a second at 10,000
        natively, a second under emulation) held up the event loop and with it the next sync."""
        desired, errors = self._synced_state()
        previous, self._synced_desired = self._synced_desired, desired
        # ``scope`` is relative to the previous successful sync: usable only on VIPs found from it.
        if scope is None or self._vips is None or previous is None or self._vips_from[0] is not previous:
            self._vips = None
            self.wake.set()
            return
        # Linear in the scope: a director behind under churn syncs hundreds of VirtualServers at
        # once, and matching every affected VIP against the whole scope (quadratic) held its
        # event loop for 11 s under emulation.
        in_scope = set(scope)
        affected: set[str] = set()
        scoped_refs: dict[str, list[ObjectRef]] = {}  # VIP -> the VirtualServers in scope that claim it now
        for ref in in_scope:
            old, new = self._vip_of.pop(ref, None), self._vip_of_ref(desired, ref)
            if new:
                self._vip_of[ref] = new
                scoped_refs.setdefault(new, []).append(ref)
            affected.update(vip for vip in (old, new) if vip)
        changes: dict[str, VipInfo | None] = {}
        for vip in affected:
            before = self._vips.get(vip)
            refs = [ref for ref in (before.refs if before else ()) if ref not in in_scope]
            refs += scoped_refs.get(vip, ())
            after = self._vip_info(desired, errors, sorted(refs)) if refs else None
            if after != before:
                changes[vip] = after
        self._vips_from = (desired, errors)
        if changes:
            vips = dict(self._vips)  # a new object: the loop tells a changed set of VIPs by identity
            for vip, after in changes.items():
                if after is None:
                    vips.pop(vip, None)
                else:
                    vips[vip] = after
            self._vips = vips
            self.wake.set()

    def _synced_state(self) -> tuple[Any, Mapping[ObjectRef, Any]]:
        """The sync loop's latest desired state and kernel errors. Both are replaced, never
        changed in place, by each sync (and the desired state by every change of a spec)."""
        return self.sync_state.desired, getattr(self.sync_state, "errors_by_ref", None) or _NO_ERRORS

    def _vip_of_ref(self, desired: Any, ref: ObjectRef) -> str:
        """The VIP a VirtualServer claims ("": none, or not accepted)."""
        resolution = desired.resolutions.get(ref)
        if resolution is None or resolution.error is not None or ref not in self.view.memo:
            return ""
        return str(resolution.vip or "")

    def _vip_info(self, desired: Any, errors: Mapping[ObjectRef, Any], refs: list[ObjectRef]) -> VipInfo:
        info = VipInfo(self.view.memo[refs[0]].spec.family, refs)
        for ref in refs:
            info.selectors.append(self.view.memo[ref].spec.node_selector)
            info.ready |= desired.resolutions[ref].ready_backends > 0
            info.failed |= bool(errors.get(ref))
        return info

    # --- the decision -------------------------------------------------------------------------

    def valid_until(self) -> float:
        return el.valid_until(
            self.renewed_at,
            self.peer_state.acked_at,
            self.known_peers,
            self.timings.renew_deadline,
            alone_holds=self.listed and self.peer_channel is not None,
        )

    def _unfit_reasons(self, vips: Mapping[str, VipInfo]) -> dict[str, str]:
        if self.draining:
            return dict.fromkeys(vips, "ShuttingDown")
        reasons: dict[str, str] = {}
        for vip, info in vips.items():
            uplink = self.uplinks.get(vip)
            if uplink is None:
                reasons[vip] = "NoInterfaceForVIP"
            elif not uplink[1]:
                reasons[vip] = "InterfaceDown"
            elif info.failed:
                reasons[vip] = "ProgrammingFailed"
            elif self.config.follow_backends and not info.ready:
                reasons[vip] = "NoReadyBackends"
        return reasons

    def _set_unfit(self, reasons: dict[str, str]) -> None:
        self.unfit = reasons
        vips = frozenset(reasons)
        if vips != self._unfit_vips:
            self._unfit_vips = vips

    def decide(self, now: float, vips: Mapping[str, VipInfo]) -> dict[str, el.Decision]:
        valid = now < self.valid_until()
        live = self.obs.api_live_nodes(now) - {self.me}
        if valid:
            live |= {self.me}
        labels = self.view.labels_by_node
        unfit: dict[str, frozenset[str]] = {node: report.vips for node, report in self.unfit_reports.items()}
        draining = [node for node, record in self.heartbeats.items() if record.draining]
        if draining:  # a director shutting down serves none of them
            every_vip = frozenset(vips)
            unfit.update(dict.fromkeys(draining, every_vip))
        unfit[self.me] = self._unfit_vips
        # Per distinct selection, not per VIP: most VIPs share one (or none).
        selections: dict[tuple[tuple[tuple[str, str], ...], ...], tuple[frozenset[str], bool]] = {}
        candidates: dict[str, frozenset[str]] = {}
        selected_here: dict[str, bool] = {}
        for vip, info in vips.items():
            key = tuple(tuple(sorted(sel.items())) for sel in info.selectors)
            selection = selections.get(key)
            if selection is None:
                selection = selections[key] = (
                    frozenset(
                        node for node in live if all(selects_node(sel, labels.get(node, {})) for sel in info.selectors)
                    ),
                    all(selects_node(sel, self.view.node_labels) for sel in info.selectors),
                )
            candidates[vip], selected_here[vip] = selection
        current = {vip: claim.holder for vip, claim in self.claims.items() if claim.holder}
        preferred = el.assign(candidates, unfit, current)
        decisions = {}
        for vip in vips:
            claim = self.claims.get(vip)
            holder = claim.holder if claim is not None else ""
            target = preferred.get(vip)
            decisions[vip] = el.decide(
                el.Situation(
                    me=self.me,
                    vip=vip,
                    claim=el.Claim(holder, claim.version) if claim is not None else None,
                    preferred=target,
                    candidate=selected_here[vip] and self.view.node_seen,
                    valid=valid,
                    api_ok=self.api_ok,
                    confirmed=vip in self.confirmed,
                    holder_live=bool(holder) and holder != self.me and self.obs.live(holder, now),
                    preferred_settled=target is not None
                    and (target == self.me or self.obs.settled(target, now, self.timings.handover_delay)),
                    unfit=self.unfit.get(vip, ""),
                )
            )
        return decisions

    # --- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # Join only once our IPVS rules are programmed: a live heartbeat makes us a candidate,
        # and a VIP handed to a director without its rules (a restart still listing) is a black
        # hole. Until then the others go on without us.
        if not getattr(self.sync_state, "synced_once", True):
            log.info("joining the election after the first sync")
            while not self.sync_state.synced_once:
                await asyncio.sleep(0.1)
        if self.config.peer_port:
            try:
                self.peer_channel = await PeerChannel.open(self.peer_state, self.config.peer_port, self.on_beat)
            except OSError as error:
                log.error("peer heartbeat port %d: %s (running without it)", self.config.peer_port, error)
        await loop.run_in_executor(None, self._adopt_addresses)
        renewer = asyncio.create_task(self._renew_loop(loop), name="heartbeat")
        beater = asyncio.create_task(self._beat_loop(loop), name="peer-beats")
        try:
            woken = True  # by an event (anything may have changed), not only by the clock
            while True:
                for task in (renewer, beater):
                    if task.done():
                        task.result()  # they never end by themselves: raise what killed them
                started = self.clock()
                await self._evaluate(loop, woken)
                took = self.clock() - started
                timeout = max(0.0, self._next_deadline() - self.clock())
                await wait_event(self.wake, timeout)
                # Coalesce a burst of wake-ups (a VIP's sync, claims, heartbeats coming back): a
                # decision over 10,000 VIPs takes a tenth of a second, so the next one waits
                # twice as long as the last took. The fence does not wait for this.
                await asyncio.sleep(max(0.0, started + 3 * took - self.clock()))
                woken = self.wake.is_set()
                self.wake.clear()
        finally:
            renewer.cancel()
            beater.cancel()
            if self._fence_timer is not None:
                self._fence_timer.cancel()
            if self.peer_channel is not None:
                self.peer_channel.close()
            self.kernel.shutdown(wait=False)
            self.renewer.shutdown(wait=False)

    async def _renew_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Renew, beat, re-arm the fence, wake the decisions; every ``retry_period``, on its own
        task: a hanging request must not delay the fence or the other decisions."""
        while True:
            started = self.clock()
            was_valid = started < self.valid_until()
            await self._renew(loop)
            self._arm_fence(loop)
            # Valid again: decide now (else the deadline wakes us). Not while renewals fail:
            # nothing changes, and a decision at each retry is a pass over every VIP.
            if (not was_valid or self.lapsed) and self.clock() < self.valid_until():
                self.wake.set()
            if self.draining and not self._decided_draining and self._drain_announced():
                self.wake.set()  # our peers can see that we leave: hand over now
            await asyncio.sleep(max(0.0, started + self.timings.retry_period - self.clock()))

    async def _beat_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Beat to the peers every ``retry_period``, on a schedule of its own: a renewal that
        hangs until its timeout (the API server cut off) must not delay the beats, whose
        acknowledgements are then all that keeps our VIPs."""
        while True:
            self._beat()
            if not self.api_ok:
                self._refresh_from_peers()
                self._arm_fence(loop)
            await asyncio.sleep(self.timings.retry_period)

    def _arm_fence(self, loop: asyncio.AbstractEventLoop) -> None:
        """A timer at the end of our validity: it drops every claim address at that moment,
        whatever else the loop is waiting for."""
        if self._fence_timer is not None:
            self._fence_timer.cancel()
        until = self.valid_until()
        if math.isfinite(until):
            self._fence_timer = loop.call_later(max(0.0, until - self.clock()), self._fence, loop)

    def _fence(self, loop: asyncio.AbstractEventLoop) -> None:
        self._fence_timer = None
        if self.clock() < self.valid_until():  # extended meanwhile (a peer's acknowledgement)
            self._arm_fence(loop)
            return
        if self.held:
            log.warning("could not renew within the renew deadline: no longer answering for %s", ", ".join(self.held))
        self._release(list(self.held), "LeaseLapsed")
        self.lapsed = True
        self.confirmed.clear()
        self.wake.set()

    def _next_deadline(self) -> float:
        """The next moment a decision can change without any event: our validity ending, a
        holder going silent, a pending announcement."""
        moments = [self.valid_until(), self.clock() + self.timings.retry_period]
        # Every director seen (holders of claims and heartbeats among them), not every claim:
        # 10,000 claims were a pass over each at every turn of the loop.
        moments += [self.obs.expires_at(node) for node in self.obs.seen]
        for held in self.held.values():
            if held.bursts_left:
                moments.append(held.announced_at + self.config.announce_interval)
            elif self.config.announce_refresh:
                moments.append(held.announced_at + self.config.announce_refresh)
        now = self.clock()
        return min((m for m in moments if m > now), default=now + self.timings.retry_period)

    async def _renew(self, loop: asyncio.AbstractEventLoop) -> None:
        sent = self.clock()
        request: list[float] = []  # when the request started and ended, in the renewer's thread

        def renew() -> HeartbeatRecord:
            request.append(self.clock())
            try:
                return self.leases.renew_heartbeat(
                    self.me,
                    math.ceil(self.timings.lease_duration),
                    self.draining,
                    self.config.peer_address or self.view.node_address,
                )
            finally:
                request.append(self.clock())

        try:
            record = await loop.run_in_executor(self.renewer, renew)
        except Exception as error:
            if self.api_ok:
                log.warning("heartbeat renewal failed: %s", error)
            self.api_ok = False
            self.metrics.api_errors.inc()
            return
        answered = self.clock()
        del record
        self._report_round_trip(sent, request, answered)
        self.api_ok = True
        self._report_unfit(loop)
        self.renewed_at = sent
        if self.known_peers != (self.obs.api_live_nodes(answered) | self._peer_live(answered)):
            self.known_peers = set(self.obs.api_live_nodes(answered) | self._peer_live(answered)) - {self.me}
        if self.timings.may_refresh_address(answered - sent):
            await asyncio.wrap_future(self._refresh_addresses(self.valid_until()))

    def _report_round_trip(self, sent: float, request: list[float], answered: float) -> None:
        """Observe a renewal's round trip; a slow one (over a third of the renew deadline: two
        such in a row lapse our VIPs) is logged with where its time went."""
        took = answered - sent
        self.metrics.heartbeat_renewal.observe(took)
        if took > self.timings.renew_deadline / 3 and len(request) == 2:
            started, ended = request
            log.info(
                "slow heartbeat renewal: %.3f s (%.3f s before its thread ran it, %.3f s in the request, "
                "%.3f s before the event loop saw the answer; renew deadline %.3g s)",
                took,
                started - sent,
                ended - started,
                answered - ended,
                self.timings.renew_deadline,
            )

    def _report_unfit(self, loop: asyncio.AbstractEventLoop) -> None:
        """Write our unfit report if it changed, beside the renewals (one write at a time, not
        awaited: a slow one must not delay the next renewal). Not while shutting down: the
        heartbeat's flag says it for every VIP."""
        if self.draining or (self._reporting is not None and not self._reporting.done()):
            return
        vips = self._unfit_vips
        if vips is self._reported_unfit:
            return

        def written(future: asyncio.Future[UnfitRecord]) -> None:
            if future.cancelled():
                return
            error = future.exception()
            if error is None:
                self._reported_unfit = vips
                return
            log.warning("writing the unfit report (%d VIPs) failed: %s", len(vips), error)
            self.metrics.api_errors.inc()

        self._reporting = loop.run_in_executor(None, self.leases.report_unfit, self.me, vips)
        self._reporting.add_done_callback(written)

    def _refresh_from_peers(self) -> None:
        """The API is away but every peer acknowledges our beats: keep the claim addresses
        alive, as long as they would still end before the earliest takeover those
        acknowledgements allow."""
        now = self.clock()
        until = self.valid_until()
        if not self.held or now >= until:
            return
        if not math.isfinite(until):  # alone: nobody can take over
            self._refresh_addresses(until)
            return
        earliest_takeover = until - self.timings.renew_deadline + self.timings.lease_duration
        last_refresh = earliest_takeover - self.timings.address_lifetime  # it must end before a takeover
        if now <= last_refresh:
            self._refresh_addresses(min(until, last_refresh))

    def _peer_live(self, now: float) -> set[str]:
        return {node for node in self.peer_sources if self.obs.peer_live(node, now)}

    def _beat(self) -> None:
        if self.peer_channel is None:
            return
        port = self.config.peer_port
        addresses = {(address, port) for address in self.peer_sources.values()}
        for node, record in self.heartbeats.items():
            if record.peer_address and node not in self.peer_sources:
                addresses.add((record.peer_address, port))
        self.peer_channel.beat(self.clock(), addresses)

    def _refresh_addresses(self, deadline: float) -> Future[None]:
        """Extend the lifetime of every claim address we hold (queued on the kernel thread), each
        only before ``deadline`` (our validity as known now): a refresh that runs later (the
        process froze with it queued, seen in the VM) would give life to an address another
        director may have taken since, so it does nothing, and the fence releases the VIP. One
        that ended its lifetime while we are valid (a late refresh under load) is added again:
        nobody takes over before our validity ends."""
        by_interface = self._by_interface(list(self.held))
        lifetime = self.timings.address_lifetime
        still_valid = self._before(deadline)

        def refresh() -> None:
            for interface, vips in by_interface.items():
                for vip, error in self.net.hold(interface, vips, lifetime, still_valid):
                    if not isinstance(error, ClaimLost):
                        log.warning("refreshing the claim address %s on %s: %s", vip, interface, error)

        return self.kernel.submit(refresh)

    def _before(self, deadline: float) -> Callable[[], bool]:
        """For the kernel thread: whether ``deadline`` (a validity known when the work was queued)
        has not passed yet."""
        return lambda: self.clock() < deadline

    def _by_interface(self, vips: Iterable[str]) -> dict[str, list[tuple[str, int]]]:
        """Held VIPs grouped by their interface, as the kernel calls take them."""
        grouped: dict[str, list[tuple[str, int]]] = {}
        for vip in vips:
            held = self.held.get(vip)
            if held is not None:
                grouped.setdefault(held.interface, []).append((vip, held.family))
        return grouped

    def _adopt_addresses(self) -> None:
        """Claim addresses an earlier run of ours left (a restart): kept, not announced, until
        the first decision, which confirms them with a claim write or drops them. Until then
        they end by their kernel lifetime at the latest, as if that run had been frozen."""
        now = self.clock()
        for vip, interface in self.net.held().items():
            family = AF_INET6 if ":" in vip else AF_INET
            self.held[vip] = Held(interface, family, now, announced_at=now)
            log.info("found the claim address %s on %s from an earlier run", vip, interface)

    def _moment(self, now: float) -> tuple[Any, ...]:
        """What the passing of time alone can change in the decisions (a handful of directors:
        cheap). Equal at two evaluations with no event between them: the same decisions."""
        seen, delay = self.obs.seen, self.timings.handover_delay
        return (
            now < self.valid_until(),
            self.lapsed,
            self.api_ok,
            self.draining,
            self.draining and self._drain_announced(),
            frozenset(node for node in seen if self.obs.api_live(node, now)),
            frozenset(node for node in seen if self.obs.peer_live(node, now)),
            frozenset(node for node in seen if self.obs.settled(node, now, delay)),
        )

    async def _evaluate(self, loop: asyncio.AbstractEventLoop, woken: bool = True) -> None:
        """Decide about every VIP and act, or, when only the clock moved and nothing a decision
        depends on changed since the last one (the common case: the loop wakes every retry
        period), only keep the held VIPs' addresses and announcements going."""
        if not self.listed:
            return  # until the Leases are listed we know neither the claims nor the other directors
        now = self.clock()
        if now >= self.valid_until() and not self.lapsed:
            if self.held:
                log.warning("could not renew within the renew deadline: releasing %s", ", ".join(self.held))
            self.lapsed = True
            self.confirmed.clear()
        elif now < self.valid_until():
            self.lapsed = False
        if self.suspects:
            await self._settle_conflicts(loop)
            woken = True
        vips = self.vips()
        await self._read_uplinks(loop, vips)
        moment = self._moment(now)
        last_vips, last_uplinks, last_moment, last_actions, full_due = self._decided_on
        same_inputs = vips is last_vips and self.uplinks is last_uplinks and self._actions == last_actions
        if same_inputs and moment == last_moment and not woken and now < full_due:
            if await self._hold(loop, self._holding, vips):
                self._watch_conflicts(loop)
                self._publish(now, vips)
            return
        if vips is not last_vips:
            self.vip_refs = {vip: info.refs for vip, info in vips.items()}
        self._set_unfit(self._unfit_reasons(vips))
        decisions = self.decide(now, vips)
        Action = el.Action
        announced = self._drain_announced()
        if self.draining and not announced:
            # No handover before a heartbeat that says we shut down is written (see drain).
            decisions = {v: _KEEP if d.action is Action.HAND_OVER else d for v, d in decisions.items()}
        self._release([v for v in self.held if v not in decisions], "NotUsed")  # no VirtualServer uses it
        handed_off: list[Future[None]] = []
        for action in (Action.RELEASE, Action.STANDBY, Action.HAND_OVER):
            for reason in {d.reason for d in decisions.values() if d.action is action}:
                dropped = [v for v, d in decisions.items() if d.action is action and d.reason == reason]
                removal = self._release([v for v in dropped if v in self.held], reason)
                if removal is not None and action is Action.HAND_OVER:
                    handed_off.append(removal)
        # The new owner adds its address as soon as it reads the claim, without a probe: ours
        # must be gone first (the kernel thread may be busy with a refresh ahead of the removal).
        if handed_off:
            await asyncio.gather(*(asyncio.wrap_future(removal) for removal in handed_off))
        # Side by side, as the claims: a rebalance after a director joins hands over a third
        # of the VIPs, and one round trip each in a row took minutes under emulation.
        await self._write_claims(
            loop,
            [
                (vip, decision.target, decision.reason, None)
                for vip, decision in decisions.items()
                if decision.action is Action.HAND_OVER
            ],
        )
        claims = {vip: decision for vip, decision in decisions.items() if decision.action is Action.CLAIM}
        if claims:
            await self._claim(loop, claims, vips)
        self._holding = [vip for vip, decision in decisions.items() if decision.action is Action.HOLD]
        await self._hold(loop, self._holding, vips)
        self.decisions = decisions
        self._decided_draining = self.draining and announced
        self._watch_conflicts(loop)
        self._publish(now, vips)
        # A safety net, as the sync loop's full resync: decide in full now and then anyway.
        full_due = self.clock() + FULL_DECISION_PERIODS * self.timings.retry_period
        self._decided_on = (vips, self.uplinks, moment, self._actions, full_due)

    async def _read_uplinks(self, loop: asyncio.AbstractEventLoop, vips: Mapping[str, VipInfo]) -> None:
        """Which interface carries each VIP, and is it up: read again when the VIPs change and
        once per retry period (not at every wake-up: one dump of every address on the node)."""
        read_at, read_for = self._uplinks_read
        wanted = frozenset(vips)
        if wanted == read_for and self.clock() < read_at + self.timings.retry_period:
            return
        uplinks = await loop.run_in_executor(None, self.net.uplinks, list(wanted))
        if uplinks is not self.uplinks and uplinks != self.uplinks:  # else the loop sees the same object
            self.uplinks = uplinks
        self._uplinks_read = (self.clock(), wanted)

    async def _claim(
        self, loop: asyncio.AbstractEventLoop, claims: Mapping[str, el.Decision], vips: Mapping[str, VipInfo]
    ) -> None:
        """Take the VIPs the decisions say to claim, all in one go. Each write is a
        compare-and-set against the claim as it was when we decided: if its owner confirms it
        while we read its heartbeat and probe, our write fails."""
        decided = self.clock()
        seen = {vip: self.claims.get(vip) for vip in claims}
        holders = {vip: claim.holder for vip, claim in seen.items() if claim is not None and claim.holder}
        takeover_from = {holder for holder in holders.values() if holder != self.me}
        # Probe the segment for anyone still answering (a frozen owner answers until its claim
        # address's lifetime ends): one listening window per interface, during the fresh reads
        # below rather than after them (a failover's critical path is read, write, announce).
        by_interface: dict[str, list[tuple[str, int]]] = {}
        for vip in claims:
            uplink = self.uplinks.get(vip)
            if uplink is not None and holders.get(vip) != self.me:
                by_interface.setdefault(uplink[0], []).append((vip, vips[vip].family))
        probes = asyncio.gather(
            *(
                loop.run_in_executor(None, self.net.probe, interface, items, self.config.probe_timeout)
                for interface, items in by_interface.items()
            ),
            return_exceptions=True,
        )
        # A takeover: confirm each silent holder's silence with a fresh read (the watch may lag).
        speaking = set()
        for holder, fresh in zip(
            takeover_from,
            await asyncio.gather(
                *(loop.run_in_executor(None, self.leases.get_heartbeat, holder) for holder in takeover_from),
                return_exceptions=True,
            ),
            strict=True,
        ):
            if isinstance(fresh, BaseException):
                log.warning("reading %s's heartbeat before taking its VIPs over: %s", holder, fresh)
                speaking.add(holder)
            elif fresh is not None and fresh.version != self.obs.seen.get(holder, el._Seen()).version:
                self._older_than_seen(fresh)  # the newest renewal seen, for the watch's late events
                self.obs.heartbeat(holder, fresh.version, self.clock())
                speaking.add(holder)
        wanted = [vip for vip in claims if holders.get(vip, "") not in speaking]
        read = self.clock()
        answered: dict[str, set[str]] = {}
        for (interface, items), found in zip(by_interface.items(), await probes, strict=True):
            if isinstance(found, BaseException):  # not probed: not claimed now, decided again later
                log.warning("probing %d VIPs on %s before claiming them: %s", len(items), interface, found)
                unprobed = {vip for vip, _family in items}
                wanted = [vip for vip in wanted if vip not in unprobed]
                self.wake.set()
            else:
                answered.update(found)
        probed = self.clock()
        to_write = []
        for vip in wanted:
            if holders.get(vip) != self.me and self.uplinks.get(vip) is None:
                continue
            if answered.get(vip):
                log.warning("not claiming %s yet: %s still answer for it", vip, ", ".join(sorted(answered[vip])))
                self.metrics.vip_conflicts.labels(vip).inc()
                continue
            if self.claims.get(vip) != seen[vip]:
                continue  # changed while we looked: decide again
            to_write.append(vip)

        writing = self.clock()
        landed = await self._write_claims(
            loop, [(vip, self.me, claims[vip].reason, seen[vip] or _NO_CLAIM) for vip in to_write]
        )
        won = []
        for vip in to_write:
            landed_at = landed[vip]
            if landed_at is None:
                continue
            self.confirmed.add(vip)
            holder = holders.get(vip, "")
            silent_since = self.obs.seen[holder].changed_at if holder and holder in self.obs.seen else None
            won.append((vip, silent_since, landed_at - writing))
        written = self.clock()
        await self._hold(loop, [vip for vip, _since, _took in won], vips)
        held = self.clock()
        for vip, silent_since, write_took in won:
            if silent_since is None or vip not in self.held:
                continue
            self.metrics.vip_failover.observe(max(0.0, self.held[vip].announced_at - silent_since))
            # Where a takeover's time went, on our clock: what a user reads to see why a failover
            # took what it took (the detection is the lease; the rest is ours and the API's).
            log.info(
                "VIP %s: took over from %s, silent for %.2f s when decided (lease %.1f s); heartbeat read and "
                "probe side by side %.2f s (the read %.2f s), claim write %.2f s, address and announcement %.2f s",
                vip,
                holders.get(vip, "-"),
                decided - silent_since,
                self.timings.lease_duration,
                probed - decided,
                read - decided,
                write_took,
                held - written,
            )

    async def _write_claims(
        self, loop: asyncio.AbstractEventLoop, writes: list[tuple[str, str, str, ClaimRecord | None]]
    ) -> dict[str, float | None]:
        """Write claims (vip, new holder, reason, the claim expected: None for the one we know,
        ``_NO_CLAIM`` for none), each a compare-and-set; when each landed (our clock), None if
        not. Side by side in a few batches, each a thread's run of requests: a director taking
        over hundreds of VIPs must not pay one round trip per VIP in a row, and a thread handoff
        per VIP held the event loop for seconds under emulation (its stall watch showed the
        submissions and their answers waiting for the GIL)."""
        planned = [
            (vip, holder, reason, None if expected is _NO_CLAIM else expected or self.claims.get(vip))
            for vip, holder, reason, expected in writes
        ]
        self._actions += len(planned)
        batches = [planned[i::CLAIM_BATCHES] for i in range(min(CLAIM_BATCHES, len(planned)))]

        def run(batch: list[tuple[str, str, str, ClaimRecord | None]]) -> list[tuple[Any, float]]:
            outcomes: list[tuple[Any, float]] = []
            for vip, holder, _reason, expected in batch:
                try:
                    outcomes.append((self.leases.claim(vip, holder, expected), self.clock()))
                except Exception as error:
                    outcomes.append((error, self.clock()))
            return outcomes

        landed: dict[str, float | None] = {}
        for batch, outcomes in zip(
            batches, await asyncio.gather(*(loop.run_in_executor(None, run, batch) for batch in batches)), strict=True
        ):
            for (vip, holder, reason, expected), (outcome, at) in zip(batch, outcomes, strict=True):
                landed[vip] = at if self._claim_written(vip, holder, reason, expected, outcome) else None
        return landed

    def _claim_written(
        self, vip: str, holder: str, reason: str, expected: ClaimRecord | None, outcome: ClaimRecord | BaseException
    ) -> bool:
        if isinstance(outcome, Conflict):
            fresh = getattr(outcome, "record", None)
            if fresh is not None:
                self.claims[vip] = fresh
            log.info("claim of %s for %s lost a race (%s)", vip, holder or "nobody", reason)
            return False
        if isinstance(outcome, BaseException):
            log.warning("writing the claim of %s for %s: %s", vip, holder or "nobody", outcome)
            self.metrics.api_errors.inc()
            return False
        previous = expected.holder if expected is not None else ""
        self.claims[vip] = outcome
        if previous != holder:
            self.metrics.vip_transitions.labels(vip, reason).inc()
            log.info("VIP %s: owner %s -> %s (%s)", vip, previous or "-", holder or "-", reason)
            for ref in self.vip_refs.get(vip, []):
                message = f"VIP {vip} owner: {previous or 'none'} -> {holder or 'none'} ({reason})"
                self.post_event(ref, "Normal", "VIPOwnerChanged", message)
        return True

    async def _hold(self, loop: asyncio.AbstractEventLoop, vips: list[str], infos: Mapping[str, VipInfo]) -> bool:
        """Make the claim address of each VIP present (added at a takeover; refreshed by the
        renewals) and announce those whose announcement is due, in one kernel call per
        interface for each. Whether any address was added."""
        now = self.clock()
        actions = self._actions
        added: dict[str, list[tuple[str, int]]] = {}
        for vip in vips:
            uplink = self.uplinks.get(vip)
            if vip not in self.held and uplink is not None:
                added.setdefault(uplink[0], []).append((vip, infos[vip].family))
        still_valid = self._before(self.valid_until())
        for interface, items in added.items():
            failures = await loop.run_in_executor(
                self.kernel, self.net.hold, interface, items, self.timings.address_lifetime, still_valid
            )
            for vip, error in failures:
                if not isinstance(error, ClaimLost):
                    log.warning("adding the claim address %s on %s: %s", vip, interface, error)
            failed = {vip for vip, _error in failures}
            fenced = self.clock() >= self.valid_until()  # our validity ended while we added them
            for vip, family in items:
                if vip in failed or vip in self.held:
                    continue
                self.held[vip] = Held(interface, family, now, bursts_left=self.config.announce_count)
                self._actions += 1
                if fenced:
                    self._release([vip], "LeaseLapsed")
        due = []
        for vip in vips:
            held = self.held.get(vip)
            if held is None:
                continue
            period = self.config.announce_interval if held.bursts_left else self.config.announce_refresh
            if (held.bursts_left or self.config.announce_refresh) and now >= held.announced_at + period:
                due.append(vip)
        # Only while valid, judged again on the kernel thread: after a freeze, the loop may still
        # find announcements due (or have queued them) before its fence runs.
        valid = self._before(self.valid_until())
        if not valid():
            due = []
        for interface, items in self._by_interface(due).items():
            try:
                sent, failures = await loop.run_in_executor(self.kernel, self.net.announce, interface, items, valid)
            except OSError as gone:  # the interface is gone: its VIPs become unfit at the next read
                log.warning("announcing on %s: %s", interface, gone)
                continue
            self.metrics.announcements.inc(sent)
            for vip, error in failures:
                log.warning("announcing %s on %s: %s", vip, interface, error)
            for vip, _family in items:
                held = self.held.get(vip)
                if held is not None:
                    held.announced_at = now
                    held.bursts_left = max(0, held.bursts_left - 1)
        return self._actions != actions

    def _release(self, vips: Iterable[str], reason: str) -> Future[None] | None:
        """Stop answering for these VIPs now: forgotten here at once, their addresses removed
        by the kernel thread after whatever it is doing (a hold queued before is undone). The
        removal's future (None: nothing held)."""
        dropped = {vip: self.held.pop(vip) for vip in list(vips) if vip in self.held}
        if not dropped:
            return None
        self._actions += 1
        grouped: dict[str, list[tuple[str, int]]] = {}
        for vip, held in dropped.items():
            grouped.setdefault(held.interface, []).append((vip, held.family))

        def remove() -> None:
            for interface, items in grouped.items():
                try:
                    failures = self.net.release(interface, items)
                except OSError as failure:
                    failures = [(vip, failure) for vip, _family in items]
                for vip, error in failures:
                    log.error("removing the claim address %s on %s: %s", vip, interface, error)

        removal = self.kernel.submit(remove)
        log.info("VIP %s: stopped answering (%s)", ", ".join(sorted(dropped)), reason)
        return removal

    # --- conflicts ------------------------------------------------------------------------------

    def _watch_conflicts(self, loop: asyncio.AbstractEventLoop) -> None:
        """Listen on every interface that carries one of our claims for others claiming them
        (the monitors are told again only when the claims we hold changed)."""
        by_interface: dict[str, set[str]] = {}
        for vip, held in self.held.items():
            by_interface.setdefault(held.interface, set()).add(vip)
        if by_interface == self._watched:
            return
        try:
            for interface in set(by_interface) | set(self.monitored):
                monitor = self.net.monitor(interface)
                if monitor is None:
                    continue
                monitor.watch(by_interface.get(interface, set()))
                if interface not in self.monitored:
                    loop.add_reader(monitor.fileno(), self._on_frames, monitor)
                    self.monitored.add(interface)
        except OSError as error:
            log.warning("conflict monitor: %s", error)
            return  # tried again at the next evaluation
        self._watched = by_interface

    def _on_frames(self, monitor: Any) -> None:
        for conflict in monitor.read():
            if conflict.vip not in self.held:
                continue
            self.metrics.vip_conflicts.labels(conflict.vip).inc()
            self.suspects.add(conflict.vip)
            log.warning("VIP %s: %s from %s, which is not us", conflict.vip, conflict.kind, conflict.mac)
            self.last_conflict[conflict.vip] = conflict.mac
        if self.suspects:
            self.wake.set()

    async def _settle_conflicts(self, loop: asyncio.AbstractEventLoop) -> None:
        """Another MAC answers for a VIP we hold: read the claims fresh. If the claim names
        another director, we are the stale one: step down at once. If it names us, someone
        outside the election answers for it (a static address, another load balancer): keep it,
        and say so loudly."""
        suspects, self.suspects = self.suspects, set()
        try:
            records, _version = await loop.run_in_executor(None, self.leases.list_claims)
        except Exception as error:
            log.warning("reading the claims after a conflict: %s", error)
            self.suspects |= suspects
            return
        fresh = {record.vip: record for record in records}
        for vip in suspects:
            record = fresh.get(vip)
            mac = self.last_conflict.get(vip, "?")
            refs = self.vip_refs.get(vip, [])
            if record is not None:
                self.claims[vip] = record
            if record is None or record.holder != self.me:
                self._release([vip], "SplitBrainSuspected")
                self.confirmed.discard(vip)
                for ref in refs:
                    message = (
                        f"VIP {vip}: {mac} answers for it and the claim names {record.holder if record else 'nobody'}"
                    )
                    self.post_event(ref, "Warning", "SplitBrainSuspected", message + f"; {self.me} stepped down")
            else:
                for ref in refs:
                    message = f"VIP {vip} is held by {self.me}, but {mac} answers for it too (outside kubelvs?)"
                    self.post_event(ref, "Warning", "VIPConflict", message)

    # --- shutting down ----------------------------------------------------------------------------

    def _drain_announced(self) -> bool:
        """A heartbeat renewal sent after draining began has been written: it says we are
        shutting down."""
        return self.renewed_at is not None and self.renewed_at >= self._drain_started

    async def drain(self, timeout: float) -> set[str]:
        """Hand every VIP we hold to another director before we exit (SIGTERM: a rolling
        update, a node drain), and wait until each is answered by the new owner: its clients
        move without waiting for a lease to expire. Our heartbeat says we are shutting down
        (every VIP unfit here), so nobody hands one back; a VIP no other director can take is kept
        until we exit (its address then ends with its lifetime). Returns the VIPs not confirmed
        taken over within ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = self.clock() + timeout
        held_before = set(self.held)
        if not held_before:
            return set()
        log.info("shutting down: handing over %s", ", ".join(sorted(held_before)))
        # Our heartbeat says we shut down before any claim is handed over: a peer that is handed
        # a VIP while it still sees us fit (and preferred) hands it back as a rebalance, and the
        # two ping-pong until our timeout (seen in the VM's rolling restart). The next renewal
        # carries it; heartbeats and claims reach the peers in one ordered watch stream.
        self.draining, self._decided_draining = True, False
        self._drain_started = self.clock()
        self._set_unfit(self._unfit_reasons(self.vips()))
        self.wake.set()
        while self.clock() < deadline and (
            not self._decided_draining
            or any(self.decisions.get(vip, _KEEP).action is not el.Action.HOLD for vip in self.held)
        ):
            await asyncio.sleep(0.05)
        handed = held_before - set(self.held)
        waiting = set(handed)
        while waiting and self.clock() < deadline:
            by_interface: dict[str, list[tuple[str, int]]] = {}
            for vip in waiting:
                uplink = self.uplinks.get(vip)
                if uplink is not None:
                    by_interface.setdefault(uplink[0], []).append((vip, AF_INET6 if ":" in vip else AF_INET))
            if not by_interface:
                break
            for interface, items in by_interface.items():
                found = await loop.run_in_executor(None, self.net.probe, interface, items, self.config.probe_timeout)
                waiting -= {vip for vip, macs in found.items() if macs}
        if waiting or len(handed) < len(held_before):
            log.warning(
                "shutting down: not confirmed taken over: %s; kept (no other director): %s",
                ", ".join(sorted(waiting)) or "-",
                ", ".join(sorted(self.held)) or "-",
            )
        else:
            log.info("shutting down: every VIP is answered by its new owner")
        return waiting | set(self.held)

    # --- what others read -------------------------------------------------------------------------

    def _publish(self, now: float, vips: Mapping[str, VipInfo]) -> None:
        owners = {}
        for vip in vips:
            claim = self.claims.get(vip)
            holder = claim.holder if claim is not None else ""
            if holder == self.me:
                owners[vip] = self.me if vip in self.held else ""
            elif holder and self.obs.live(holder, now):
                owners[vip] = holder
            else:
                owners[vip] = ""
        for vip in set(self.owners) - set(owners):
            with contextlib.suppress(KeyError):
                self.metrics.vip_owner.remove(vip)
        moved = [vip for vip, owner in owners.items() if vip not in self.owners or self.owners[vip] != owner]
        for vip in moved:
            self.metrics.vip_owner.labels(vip).set(1 if owners[vip] == self.me else 0)
        changed = {ref for vip in moved for ref in vips[vip].refs}
        self.owners = owners
        if changed:
            self.on_owners_changed(changed)

    def owner_of(self, vip: str) -> str:
        return self.owners.get(vip, "")

    def live_directors(self) -> set[str] | None:
        """The directors with a live heartbeat (us included while valid); None before the Leases
        were listed (then nobody can be called gone)."""
        if not self.listed:
            return None
        now = self.clock()
        live = {node for node in self.heartbeats if self.obs.live(node, now)}
        if now < self.valid_until():
            live.add(self.me)
        return live

    def announcement(self, vip: str) -> st.Announcement:
        """The ``Announced`` condition and ``status.owner`` of a VirtualServer on ``vip``."""
        owner = self.owners.get(vip, "")
        if owner:
            return st.Announcement(owner, True, "Announced", f"VIP {vip} is held and announced by director {owner}")
        reason = self.unfit.get(vip)
        if reason == "NoInterfaceForVIP":
            message = f"no interface of director {self.me} has a subnet that contains {vip}"
            return st.Announcement("", False, reason, message)
        return st.Announcement("", False, "NoOwner", f"no live director holds VIP {vip} yet")

    def writes_summary(self, vip: str, entries: Iterable[str]) -> bool:
        """The VIP's live owner writes a VirtualServer's summary; with no owner, the first live
        director among those that reported (a dead director never blocks it)."""
        owner = self.owners.get(vip, "")
        if owner:
            return owner == self.me
        live = self.live_directors() or {self.me}
        return self.me == min((node for node in entries if node in live), default=self.me)
