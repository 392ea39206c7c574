"""The per-VIP owner election, wired: Leases in, decisions (:mod:`kubelvs.core.election`), the
claim address and announcements out.

One task renews this director's heartbeat Lease every ``retry_period`` (in a worker thread: the
client is blocking), beats to its peers, and then decides about every VIP. It also wakes at the
moments a decision may change: a claim or heartbeat event, the desired state of a sync, our own
validity ending, another director's heartbeat going silent. Every claim write is a
compare-and-set on the VIP's claim Lease; a takeover from a silent owner also reads that owner's
heartbeat fresh first (a lagging watch is no proof of silence) and probes the segment for
anyone still answering (a frozen owner answers until its address lifetime ends).

Effects on the node go through :class:`VipNet` (``kubelvs.kernel.claims`` and
``kubelvs.kernel.announce`` in production, a fake in the unit tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
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
from kubelvs.kube.leases import ClaimRecord, Conflict, HeartbeatRecord, LeaseClient, claim_name, heartbeat_name

log = logging.getLogger("kubelvs.director.election")


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


class VipNet(Protocol):
    """The node side of ownership (the claim address on the uplink, announcements, probes)."""

    def uplinks(self, vips: Iterable[str]) -> dict[str, tuple[str, bool] | None]:
        """Per VIP, the interface that carries its subnet and whether it is up (None: no such)."""

    def hold(self, interface: str, vip: str, family: int, lifetime: int) -> bool: ...

    def refresh(self, interface: str, vips: list[tuple[str, int]], lifetime: int) -> list[tuple[str, OSError]]:
        """``hold`` for many (VIP, family) on one interface at once; the failures."""

    def release(self, interface: str, vip: str, family: int) -> None: ...

    def held(self) -> dict[str, str]:
        """The claim addresses we hold now: VIP -> interface."""

    def probe(self, interface: str, vip: str, family: int, timeout: float) -> set[str]:
        """MACs other than ours that answer for the VIP."""

    def announce(self, interface: str, vip: str, family: int) -> int: ...

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
        self.obs = el.Observations(self.timings.lease_duration)
        self.heartbeats: dict[str, HeartbeatRecord] = {}
        self.claims: dict[str, ClaimRecord] = {}
        self.renewed_at: float | None = None  # send time of our last good renewal
        self.api_ok = False
        self.confirmed: set[str] = set()  # our claims written or read fresh since our last lapse
        self.held: dict[str, Held] = {}
        self.decisions: dict[str, el.Decision] = {}
        self.unfit: dict[str, str] = {}  # VIP -> why we cannot serve it
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

    # --- inputs -----------------------------------------------------------------------------

    def on_lease(self, event_type: str, obj: dict[str, Any]) -> None:
        """A Lease event (event loop thread)."""
        now = self.clock()
        heartbeat = HeartbeatRecord.from_lease(obj)
        if heartbeat is not None and heartbeat.node != self.me:
            if event_type == "DELETED":
                # Not a proof of death (anyone may delete a Lease): its observation ages out
                # from the last change, as a silent heartbeat's would.
                self.heartbeats.pop(heartbeat.node, None)
            else:
                self.heartbeats[heartbeat.node] = heartbeat
                self.obs.heartbeat(heartbeat.node, heartbeat.version, now)
            self.view.set_director_nodes({*self.heartbeats, self.me})
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

    def on_leases_relisted(self, listed: list[dict[str, Any]]) -> None:
        names = set()
        for obj in listed:
            self.on_lease("MODIFIED", obj)
            names.add((obj.get("metadata") or {}).get("name"))
        for node in [n for n in self.heartbeats if heartbeat_name(n) not in names]:
            self.heartbeats.pop(node, None)
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
        """Every VIP of an accepted VirtualServer, with what the election needs of it."""
        found: dict[str, VipInfo] = {}
        desired = self.sync_state.desired
        if desired is None:
            return found
        errors: Mapping[ObjectRef, Any] = getattr(self.sync_state, "errors_by_ref", {}) or {}
        for ref, resolution in desired.resolutions.items():
            entry = self.view.memo.get(ref)
            if resolution.error is not None or entry is None or not resolution.vip:
                continue
            info = found.setdefault(resolution.vip, VipInfo(entry.spec.family))
            info.refs.append(ref)
            info.selectors.append(entry.spec.node_selector)
            info.ready |= resolution.ready_backends > 0
            info.failed |= bool(errors.get(ref))
        return found

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

    def decide(self, now: float, vips: Mapping[str, VipInfo]) -> dict[str, el.Decision]:
        valid = now < self.valid_until()
        live = self.obs.api_live_nodes(now) - {self.me}
        if valid:
            live |= {self.me}
        labels = self.view.labels_by_node
        unfit: dict[str, frozenset[str]] = {node: record.unfit for node, record in self.heartbeats.items()}
        unfit[self.me] = frozenset(self.unfit)
        candidates = {
            vip: frozenset(
                node for node in live if all(selects_node(sel, labels.get(node, {})) for sel in info.selectors)
            )
            for vip, info in vips.items()
        }
        current = {vip: claim.holder for vip, claim in self.claims.items() if claim.holder}
        preferred = el.assign(candidates, unfit, current)
        decisions = {}
        for vip, info in vips.items():
            claim = self.claims.get(vip)
            holder = claim.holder if claim is not None else ""
            target = preferred.get(vip)
            selected_here = all(selects_node(sel, self.view.node_labels) for sel in info.selectors)
            decisions[vip] = el.decide(
                el.Situation(
                    me=self.me,
                    vip=vip,
                    claim=el.Claim(holder, claim.version) if claim is not None else None,
                    preferred=target,
                    candidate=selected_here and self.view.node_seen,
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
        if self.config.peer_port:
            try:
                self.peer_channel = await PeerChannel.open(self.peer_state, self.config.peer_port, self.on_beat)
            except OSError as error:
                log.error("peer heartbeat port %d: %s (running without it)", self.config.peer_port, error)
        await loop.run_in_executor(None, self._adopt_addresses)
        renewer = asyncio.create_task(self._renew_loop(loop), name="heartbeat")
        beater = asyncio.create_task(self._beat_loop(loop), name="peer-beats")
        try:
            while True:
                for task in (renewer, beater):
                    if task.done():
                        task.result()  # they never end by themselves: raise what killed them
                await self._evaluate(loop)
                timeout = max(0.0, self._next_deadline() - self.clock())
                await wait_event(self.wake, timeout)
                self.wake.clear()
        finally:
            renewer.cancel()
            beater.cancel()
            if self._fence_timer is not None:
                self._fence_timer.cancel()
            if self.peer_channel is not None:
                self.peer_channel.close()

    async def _renew_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Renew, beat, re-arm the fence, wake the decisions; every ``retry_period``, on its own
        task: a hanging request must not delay the fence or the other decisions."""
        while True:
            started = self.clock()
            await self._renew(loop)
            self._arm_fence(loop)
            self.wake.set()
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
        for vip in list(self.held):
            self._release(vip, "LeaseLapsed")
        self.lapsed = True
        self.confirmed.clear()
        self.wake.set()

    def _next_deadline(self) -> float:
        """The next moment a decision can change without any event: our validity ending, a
        holder going silent, a pending announcement."""
        moments = [self.valid_until(), self.clock() + self.timings.retry_period]
        moments += [self.obs.expires_at(claim.holder) for claim in self.claims.values() if claim.holder]
        moments += [self.obs.expires_at(node) for node in self.heartbeats]
        for held in self.held.values():
            if held.bursts_left:
                moments.append(held.announced_at + self.config.announce_interval)
            elif self.config.announce_refresh:
                moments.append(held.announced_at + self.config.announce_refresh)
        now = self.clock()
        return min((m for m in moments if m > now), default=now + self.timings.retry_period)

    async def _renew(self, loop: asyncio.AbstractEventLoop) -> None:
        sent = self.clock()
        try:
            record = await loop.run_in_executor(
                None,
                self.leases.renew_heartbeat,
                self.me,
                math.ceil(self.timings.lease_duration),
                frozenset(self.unfit),
                self.config.peer_address or self.view.node_address,
            )
        except Exception as error:
            if self.api_ok:
                log.warning("heartbeat renewal failed: %s", error)
            self.api_ok = False
            self.metrics.api_errors.inc()
            return
        answered = self.clock()
        del record
        self.api_ok = True
        self.renewed_at = sent
        if self.known_peers != (self.obs.api_live_nodes(answered) | self._peer_live(answered)):
            self.known_peers = set(self.obs.api_live_nodes(answered) | self._peer_live(answered)) - {self.me}
        if self.timings.may_refresh_address(answered - sent):
            self._refresh_addresses()

    def _refresh_from_peers(self) -> None:
        """The API is away but every peer acknowledges our beats: keep the claim addresses
        alive, as long as they would still end before the earliest takeover those
        acknowledgements allow."""
        now = self.clock()
        until = self.valid_until()
        if not self.held or now >= until:
            return
        if not math.isfinite(until):  # alone: nobody can take over
            self._refresh_addresses()
            return
        earliest_takeover = until - self.timings.renew_deadline + self.timings.lease_duration
        if now + self.timings.address_lifetime <= earliest_takeover:
            self._refresh_addresses()

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

    def _refresh_addresses(self) -> None:
        by_interface: dict[str, list[tuple[str, int]]] = {}
        for vip, held in self.held.items():
            by_interface.setdefault(held.interface, []).append((vip, held.family))
        for interface, vips in by_interface.items():
            for vip, error in self.net.refresh(interface, vips, self.timings.address_lifetime):
                log.warning("refreshing the claim address %s on %s: %s", vip, interface, error)

    def _adopt_addresses(self) -> None:
        """Claim addresses an earlier run of ours left (a restart): kept, not announced, until
        the first decision, which confirms them with a claim write or drops them. Until then
        they end by their kernel lifetime at the latest, as if that run had been frozen."""
        now = self.clock()
        for vip, interface in self.net.held().items():
            family = AF_INET6 if ":" in vip else AF_INET
            self.held[vip] = Held(interface, family, now, announced_at=now)
            log.info("found the claim address %s on %s from an earlier run", vip, interface)

    async def _evaluate(self, loop: asyncio.AbstractEventLoop) -> None:
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
        vips = self.vips()
        self.vip_refs = {vip: info.refs for vip, info in vips.items()}
        self.uplinks = await loop.run_in_executor(None, self.net.uplinks, list(vips))
        self.unfit = self._unfit_reasons(vips)
        decisions = self.decide(now, vips)
        for vip in [v for v in self.held if v not in decisions]:  # no VirtualServer uses it any more
            self._release(vip, "NotUsed")
        for vip, decision in decisions.items():
            await self._act(loop, vip, vips[vip], decision)
        self.decisions = decisions
        try:
            self._watch_conflicts(loop)
        except OSError as error:
            log.warning("conflict monitor: %s", error)
        self._publish(now, vips)

    async def _act(self, loop: asyncio.AbstractEventLoop, vip: str, info: VipInfo, decision: el.Decision) -> None:
        action = decision.action
        if action is el.Action.HOLD:
            self._hold(vip, info)
        elif action is el.Action.CLAIM:
            await self._claim(loop, vip, info, decision)
        elif action is el.Action.HAND_OVER:
            self._release(vip, decision.reason)
            await self._write_claim(loop, vip, decision.target, decision.reason)
        elif vip in self.held:  # RELEASE, STANDBY
            self._release(vip, decision.reason)

    async def _claim(self, loop: asyncio.AbstractEventLoop, vip: str, info: VipInfo, decision: el.Decision) -> None:
        # The write is a compare-and-set against the claim as it was when we decided: if the
        # owner confirms its claim while we read its heartbeat and probe, our write fails.
        claim = self.claims.get(vip)
        holder = claim.holder if claim is not None else ""
        if holder and holder != self.me:
            # A takeover: confirm the silence with a fresh read (the watch may lag).
            try:
                fresh = await loop.run_in_executor(None, self.leases.get_heartbeat, holder)
            except Exception as error:
                log.warning("reading %s's heartbeat before taking %s over: %s", holder, vip, error)
                return
            if fresh is not None and fresh.version != self.obs.seen.get(holder, el._Seen()).version:
                self.obs.heartbeat(holder, fresh.version, self.clock())
                return
        if holder != self.me:
            uplink = self.uplinks.get(vip)
            if uplink is None:
                return
            others = await loop.run_in_executor(
                None, self.net.probe, uplink[0], vip, info.family, self.config.probe_timeout
            )
            if others:
                log.warning("not claiming %s yet: %s still answer for it", vip, ", ".join(sorted(others)))
                self.metrics.vip_conflicts.labels(vip).inc()
                return
        if self.claims.get(vip) != claim:
            return  # changed while we looked: decide again
        silent_since = self.obs.seen[holder].changed_at if holder and holder in self.obs.seen else None
        if await self._write_claim(loop, vip, self.me, decision.reason, expected=claim):
            self.confirmed.add(vip)
            self._hold(vip, info)
            if silent_since is not None and vip in self.held:
                self.metrics.vip_failover.observe(max(0.0, self.held[vip].announced_at - silent_since))

    async def _write_claim(
        self,
        loop: asyncio.AbstractEventLoop,
        vip: str,
        holder: str,
        reason: str,
        expected: ClaimRecord | None = None,
    ) -> bool:
        expected = expected if expected is not None else self.claims.get(vip)
        try:
            record = await loop.run_in_executor(None, self.leases.claim, vip, holder, expected)
        except Conflict as conflict:
            fresh = getattr(conflict, "record", None)
            if fresh is not None:
                self.claims[vip] = fresh
            log.info("claim of %s for %s lost a race (%s)", vip, holder or "nobody", reason)
            return False
        except Exception as error:
            log.warning("writing the claim of %s for %s: %s", vip, holder or "nobody", error)
            self.metrics.api_errors.inc()
            return False
        previous = expected.holder if expected is not None else ""
        self.claims[vip] = record
        if previous != holder:
            self.metrics.vip_transitions.labels(vip, reason).inc()
            log.info("VIP %s: owner %s -> %s (%s)", vip, previous or "-", holder or "-", reason)
            for ref in self.vip_refs.get(vip, []):
                message = f"VIP {vip} owner: {previous or 'none'} -> {holder or 'none'} ({reason})"
                self.post_event(ref, "Normal", "VIPOwnerChanged", message)
        return True

    def _hold(self, vip: str, info: VipInfo) -> None:
        now = self.clock()
        held = self.held.get(vip)
        if held is None:
            uplink = self.uplinks.get(vip)
            if uplink is None:
                return
            try:
                self.net.hold(uplink[0], vip, info.family, self.timings.address_lifetime)
            except OSError as error:
                log.warning("adding the claim address %s on %s: %s", vip, uplink[0], error)
                return
            held = self.held[vip] = Held(uplink[0], info.family, now, bursts_left=self.config.announce_count)
        due = held.announced_at + (self.config.announce_interval if held.bursts_left else self.config.announce_refresh)
        if now >= due and (held.bursts_left or self.config.announce_refresh):
            try:
                sent = self.net.announce(held.interface, vip, held.family)
                self.metrics.announcements.inc(sent)
            except OSError as error:
                log.warning("announcing %s on %s: %s", vip, held.interface, error)
            held.announced_at = now
            held.bursts_left = max(0, held.bursts_left - 1)

    def _release(self, vip: str, reason: str) -> None:
        held = self.held.pop(vip, None)
        if held is None:
            return
        try:
            self.net.release(held.interface, vip, held.family)
        except OSError as error:
            log.error("removing the claim address %s on %s: %s", vip, held.interface, error)
        log.info("VIP %s: stopped answering (%s)", vip, reason)

    # --- conflicts ------------------------------------------------------------------------------

    def _watch_conflicts(self, loop: asyncio.AbstractEventLoop) -> None:
        """Listen on every interface that carries one of our claims for others claiming them."""
        by_interface: dict[str, set[str]] = {}
        for vip, held in self.held.items():
            by_interface.setdefault(held.interface, set()).add(vip)
        for interface in set(by_interface) | set(self.monitored):
            monitor = self.net.monitor(interface)
            if monitor is None:
                continue
            monitor.watch(by_interface.get(interface, set()))
            if interface not in self.monitored:
                loop.add_reader(monitor.fileno(), self._on_frames, monitor)
                self.monitored.add(interface)

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
                self._release(vip, "SplitBrainSuspected")
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
        for vip, owner in owners.items():
            self.metrics.vip_owner.labels(vip).set(1 if owner == self.me else 0)
        changed = {ref for vip, owner in owners.items() if self.owners.get(vip) != owner for ref in vips[vip].refs}
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
