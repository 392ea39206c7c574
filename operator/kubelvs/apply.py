"""One director's reconciliation: desired state in, kernel changed, ownership recorded.

This is the glue of the pure core (``spec``, ``plan``) and the effectful layers (``kernel``,
``state``), shared by the standalone CLI and the director agent. :meth:`Reconciler.sync` makes
no decisions of its own: it plans (:func:`~kubelvs.core.plan.plan`,
:func:`~kubelvs.core.plan.plan_addresses`, :func:`~kubelvs.core.plan.kept_origins`), then acts,
then records, in an order that survives a kill at any point:

1. settle the write-ahead intents a previous run left (:meth:`Ownership.settle`);
2. record the intent to create (services, VIPs) and save durably;
3. add VIPs (before their services), apply the IPVS plan;
4. confirm or drop each intent from the kernel's answers;
5. remove VIPs no longer needed (after their services): kernel first, record after;
6. filter the VIPs kubelvs owns to the ports of their IPVS services (a port filter, when given:
   with the VIP local, every host listener would otherwise answer on it, kubernetes#72236).

Errors of the record itself are :class:`~kubelvs.state.ownership.OwnershipError` (raised by
``store.load``); kernel errors are ``OSError`` (``IPVSError``). Either leaves the record
consistent: an interrupted sync is finished by the next one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubelvs.core.desired import DesiredState
from kubelvs.core.model import AF_INET, AF_INET6, Observed, ServiceKey, VirtualService
from kubelvs.core.plan import (
    AddressPlan,
    Plan,
    Verb,
    apply_operations,
    kept_origins,
    owned_after,
    plan,
    plan_addresses,
    share_desired,
    with_kept,
)
from kubelvs.core.spec import ObjectRef
from kubelvs.kernel.addresses import ADDRESS_PROTO, supports_address_proto
from kubelvs.kernel.ipvs import ApplyResult
from kubelvs.state.ownership import Ownership, OwnershipStore


class Kernel(Protocol):
    """What the reconciler needs of IPVS (``IPVSClient``, or ``tests.fakes.FakeIPVS``)."""

    def dump(self, with_counters: bool = True) -> Observed: ...

    def apply(self, operations: Iterable[Any]) -> ApplyResult: ...


class Vips(Protocol):
    """What the reconciler needs of the VIP interface (``VipInterface``, or ``tests.fakes.FakeVips``)."""

    def session(self) -> contextlib.AbstractContextManager[Any]: ...

    def add(self, address: str, family: int) -> bool: ...

    def add_many(self, items: Sequence[tuple[str, int]]) -> list[bool | OSError]: ...

    def remove(self, address: str, family: int) -> None: ...

    def addresses(self) -> set[str]: ...

    def tagged(self) -> dict[str, int]: ...


@dataclass(slots=True)
class SyncReport:
    plan: Plan
    result: ApplyResult
    vips_added: list[str] = field(default_factory=list)
    vips_removed: list[str] = field(default_factory=list)
    observed: Observed | None = None  # the kernel state the plan was made against
    settled: bool = False  # intents of an interrupted earlier sync were settled first
    filter_error: str = ""  # the VIP port filter could not be applied (the IPVS rules are in place)

    @property
    def ok(self) -> bool:
        return self.result.ok and not self.plan.conflicts


class PortFilter(Protocol):
    """What :class:`Reconciler` needs of :class:`kubelvs.kernel.vipfilter.VipPortFilter`."""

    def sync(self, allowed: Mapping[str, Collection[tuple[int, int]]]) -> None: ...

    def begin(self, allowed: Mapping[str, Collection[tuple[int, int]]]) -> None:
        """Start a sync in the background; the next ``sync`` finishes it (or applies again)."""


class Reconciler:
    def __init__(
        self, client: Kernel, store: OwnershipStore, vips: Vips, port_filter: PortFilter | None = None
    ) -> None:
        self.client = client
        self.store = store
        self.vips = vips
        self.port_filter = port_filter
        self.filtered: dict[str, set[tuple[int, int]]] | None = None  # as last given to the filter
        self.local_vips: set[str] = set()  # VIPs seen local; a full sync reads the interface again

    def sync(
        self,
        desired: DesiredState,
        keep: Iterable[ObjectRef] | None = None,
        only: Iterable[ObjectRef] | None = None,
        observed: Observed | None = None,
    ) -> SyncReport:
        """Make the kernel match ``desired`` for what kubelvs owns.

        ``keep``: VirtualServers whose rules are left as they are; by default
        :func:`~kubelvs.core.plan.kept_origins` (every refused VirtualServer in scope).
        ``only``: limit the change to these VirtualServers (an incremental sync, or ``kubelvs
        delete``); the work is then proportional to them, not to everything kubelvs owns.
        ``observed``: the kernel's state if the caller knows it (a cache); ignored when intents
        of an interrupted sync must be settled (that needs a fresh dump).
        """
        owned = self.store.load()
        dumped = observed is None or owned.has_pending  # the kernel's state read afresh
        with self.vips.session():  # one rtnetlink socket for every VIP of this sync
            settled = False
            if owned.has_pending:
                observed = self.client.dump(with_counters=False)
                self.local_vips = self.vips.addresses()
                settled = owned.settle(observed.services, self.local_vips)
                self.store.save(owned)
            if observed is None:
                observed = self.client.dump(with_counters=False)
            scope = None if only is None else list(only)
            refs = kept_origins(desired.resolutions, scope) if keep is None else list(keep)
            kept_keys = [key for ref in refs for key in owned.keys_of(str(ref))]
            services = with_kept(desired.services, desired.origins, kept_keys, observed.services)
            keys: set[ServiceKey] | None = None
            if scope is not None:
                keys = set()
                for ref in scope:
                    keys |= owned.keys_of(str(ref))
                    resolution = desired.resolutions.get(ref)
                    if resolution is not None:
                        keys.update(k for k in resolution.keys if k in services)
            the_plan = plan(services, observed.services, owned.services.keys(), only=keys)

            if keys is None:
                wanted = dict(desired.vips)
                for key in services:
                    wanted.setdefault(key.address, key.family)
                address_scope: set[str] | None = None
            else:
                wanted = {k.address: k.family for k in keys if k in services}
                address_scope = {k.address for k in keys}
            wanted.pop("", None)  # fwmark services have no address
            present = self._present(wanted, full=keys is None)
            addresses = plan_addresses(wanted, present, owned.addresses, desired.vips.keys(), address_scope)

            report = SyncReport(the_plan, ApplyResult(), observed=observed, settled=settled)
            if keys is None:
                self._begin_filter(owned, observed, the_plan, addresses)
            try:
                changed = self._effects(owned, desired, services, keys, report, addresses.add)
                if addresses.remove:
                    # Again, now that the services are gone: an address an owned service still
                    # uses (a failed delete) stays.
                    still_used = set(desired.vips) | {k.address for k in owned.services}
                    removal = plan_addresses(wanted, present, owned.addresses, still_used, address_scope)
                    for address, family in removal.remove:
                        self.vips.remove(address, family)  # the kernel first, the record after
                        del owned.addresses[address]
                        self.local_vips.discard(address)
                        report.vips_removed.append(address)
                        changed = True
            except Exception:
                self.local_vips.clear()
                with contextlib.suppress(Exception):
                    self.store.save(owned)  # what is known so far; the intents stay for the next sync
                raise
        if changed:  # (a JSON rendering of the whole record costs O(owned): not on every event)
            self.store.save(owned)
        self._filter_ports(owned, report, full=keys is None, dumped=dumped)
        return report

    def _filter_ports(self, owned: Ownership, report: SyncReport, full: bool, dumped: bool = True) -> None:
        """Let each VIP kubelvs owns answer only on the ports of its IPVS services (kubelvs's,
        kept or foreign alike: the filter must never cut a service off). A filter error is
        reported, not raised: the IPVS rules are in place, only the exposure is not narrowed."""
        if self.port_filter is None or report.observed is None:
            return
        if not (full or dumped or report.vips_added or report.vips_removed) and not any(
            op.verb in (Verb.ADD_SERVICE, Verb.DELETE_SERVICE) for op in report.result.succeeded
        ):
            # No VIP and no service came or went, and the services known are the cache's: the
            # ports are as last filtered. (A pass over every VIP and service costs 9 ms natively
            # at 10,000, a third of a second under emulation, on every endpoint change.)
            return
        allowed = allowed_ports(owned.addresses, owned_after(report.observed.services, report.result.succeeded))
        if allowed == self.filtered and not full:  # a full sync re-applies (a flushed ruleset comes back)
            return
        try:
            self.port_filter.sync(allowed)
        except (OSError, RuntimeError, ValueError) as error:  # no nft binary, nft refused, a value it cannot take
            report.filter_error = f"VIP port filter not applied: {error}"
        # Also after a failure: the next full sync tries again, not every event.
        self.filtered = allowed

    def _begin_filter(self, owned: Ownership, observed: Observed, the_plan: Plan, addresses: AddressPlan) -> None:
        """Before a full sync's effects: start applying the port filter it will most likely end
        with (every operation succeeding), so that nft runs in its own process while IPVS is
        programmed. At 10,000 services nft takes about a second under emulation, beside the
        applier's five to seven. :meth:`_filter_ports` then syncs what really came out: the same mapping
        costs nothing more, another one is applied then."""
        if self.port_filter is None:
            return
        vips = (owned.addresses.keys() | {address for address, _ in addresses.add}) - {
            address for address, _ in addresses.remove
        }
        allowed = allowed_ports(vips, owned_after(observed.services, the_plan.operations))
        if allowed != self.filtered:
            self.port_filter.begin(allowed)

    def _present(self, wanted: Mapping[str, int], full: bool) -> set[str]:
        """The addresses on the interface: read in a full sync, or when a wanted one is not known."""
        if full or any(address not in self.local_vips for address in wanted):
            self.local_vips = self.vips.addresses()
        return self.local_vips

    def _effects(
        self,
        owned: Ownership,
        desired: DesiredState,
        services: Mapping[ServiceKey, VirtualService],
        keys: set[ServiceKey] | None,
        report: SyncReport,
        add: Iterable[tuple[str, int]],
    ) -> bool:
        """Write-ahead intents, the VIP adds, the IPVS apply, and the record of their outcome;
        True if the record changed."""
        add = list(add)
        for address, family in add:
            if address not in owned.addresses:
                owned.pending_addresses[address] = family
        add_service = Verb.ADD_SERVICE
        for op in report.plan:
            if op.verb is add_service:
                owned.pending_services[op.key] = str(desired.origins.get(op.key, ""))
        changed = owned.has_pending
        if changed:
            self.store.save(owned)  # durable before the kernel is touched

        refused = False
        failed: OSError | None = None
        # Pipelined (one request at a time took 13.6 s for 10,000 VIPs under emulation); every
        # outcome is recorded before the first error is raised.
        for (address, family), added in zip(add, self.vips.add_many(add), strict=True):
            if isinstance(added, OSError):
                failed = failed or added  # its intent stays: settled by the next sync's fresh read
                continue
            if added:
                if owned.pending_addresses.pop(address, None) is not None:
                    owned.addresses[address] = family
                report.vips_added.append(address)
            else:
                refused |= owned.pending_addresses.pop(address, None) is not None  # there already: not ours
            self.local_vips.add(address)
        if refused:
            self.store.save(owned)  # at once: a kill now must not settle the intent as ours
        if failed is not None:
            raise failed

        report.result = self.client.apply(report.plan)
        assert report.observed is not None
        changed = self._record(owned, desired, report.result, report.observed, services, keys) or changed
        if any(f.operation.verb is Verb.ADD_SERVICE for f in report.result.failed):
            self.store.save(owned)  # likewise for a refused service (EEXIST: somebody else's)
        return changed

    @staticmethod
    def _record(
        owned: Ownership,
        desired: DesiredState,
        result: ApplyResult,
        observed: Observed,
        services: Mapping[ServiceKey, VirtualService],
        keys: set[ServiceKey] | None,
    ) -> bool:
        """Update the ownership record after an apply (for ``keys`` only, if given); True if it
        changed."""
        changed = False
        add, delete = Verb.ADD_SERVICE, Verb.DELETE_SERVICE  # locals: a full plan has 110,000 operations
        for op in result.succeeded:
            verb = op.verb
            if verb is add:
                changed |= owned.own(op.key, str(desired.origins.get(op.key, "")))
            elif verb is delete:
                changed |= owned.disown(op.key)
        for failure in result.failed:
            if failure.operation.verb is Verb.ADD_SERVICE:
                # The kernel refused: EEXIST means somebody else's service, any other error
                # that nothing was created.
                changed |= owned.pending_services.pop(failure.operation.key, None) is not None
        for key in list(owned.services) if keys is None else [k for k in keys if k in owned.services]:
            if key not in observed.services and key not in services:
                changed |= owned.disown(key)  # gone from the kernel and not wanted: nothing to own
            elif key in desired.origins:
                changed |= owned.own(key, str(desired.origins[key]))
        return changed


def allowed_ports(vips: Iterable[str], services: Iterable[ServiceKey]) -> dict[str, set[tuple[int, int]]]:
    """The port filter's mapping: each VIP kubelvs owns -> the (protocol, port) of its services,
    kubelvs's or not (the filter must never cut a service off); a VIP with a service of every
    port (``ipvsadm -A -t VIP:0 -p``) is left out: nothing to narrow."""
    allowed: dict[str, set[tuple[int, int]]] = {address: set() for address in vips}
    every_port: set[str] = set()
    for key in services:
        ports = allowed.get(key.address)
        if ports is not None:
            ports.add((key.protocol, key.port))
            if key.port == 0:
                every_port.add(key.address)
    for address in every_port:
        del allowed[address]
    return allowed


class CachedReconciler(Reconciler):
    """A Reconciler that keeps the kernel's state between syncs: incremental syncs plan against
    the cache (no dump per event); a full sync dumps and replaces it.

    After a failed operation only the keys it touched are unknown: a later sync that touches one
    of them dumps again; the others keep using the cache. An exception (an outcome unknown,
    e.g. ENOBUFS) drops the whole cache.
    """

    def __init__(
        self, client: Kernel, store: OwnershipStore, vips: Vips, port_filter: PortFilter | None = None
    ) -> None:
        super().__init__(client, store, vips, port_filter)
        self.observed: Observed | None = None
        self.unknown: set[ServiceKey] = set()  # keys whose cached state may be wrong

    def sync_cached(self, desired: DesiredState, only: Collection[ObjectRef] | None, full: bool) -> SyncReport:
        if full or self.observed is None or (self.unknown and self._touches_unknown(desired, only)):
            self.observed = self.client.dump(with_counters=False)
            share_desired(self.observed.services, desired.services)  # one copy of the state, not two
            self.unknown = set()
        try:
            report = self.sync(desired, only=only, observed=self.observed)
        except Exception:
            self.observed = None  # the outcome is unknown: trust only a fresh dump next time
            raise
        observed = report.observed if report.observed is not None else self.observed
        observed.services = apply_operations(observed.services, report.result.succeeded)
        self.observed = observed
        self.unknown.update(f.operation.key for f in report.result.failed)
        self.unknown.update(op.key for op in report.result.skipped)
        return report

    def _touches_unknown(self, desired: DesiredState, only: Collection[ObjectRef] | None) -> bool:
        if only is None:
            return True
        owned = self.store.load()
        for ref in only:
            if not self.unknown.isdisjoint(owned.keys_of(str(ref))):
                return True
            resolution = desired.resolutions.get(ref)
            if resolution is not None and not self.unknown.isdisjoint(resolution.keys):
                return True
        return False


# --- recovery -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Adopted:
    addresses: list[str] = field(default_factory=list)
    services: list[ServiceKey] = field(default_factory=list)
    skipped_addresses: list[str] = field(default_factory=list)  # on the interface, not tagged as kubelvs's


def adopt(client: Kernel, vips: Vips, store: OwnershipStore, require_tag: bool | None = None) -> Adopted:
    """Rebuild the ownership record from what is provably kubelvs's, and save it.

    Provably kubelvs's: the addresses on kubelvs's own dummy interface (kubelvs creates it) that
    carry its IFA_PROTO mark (:data:`~kubelvs.kernel.addresses.ADDRESS_PROTO`; on a kernel before
    6.1, which keeps no mark, every address there; ``require_tag`` overrides the detection), and
    the IPVS services whose address is one of them. Their VirtualServer is not known: it is filled
    in by the next full sync from the desired state, and an adopted service that no VirtualServer
    wants is deleted by it. What the record holds already is kept.

    Safe when nobody else puts IPVS services on kubelvs's VIPs (such a service would be adopted
    and then changed or deleted) and no other kubelvs is running on this state directory (hold
    the :class:`~kubelvs.state.lock.StateLock`). A director may call it at start, before its
    first sync, when the record was lost (``store.load()`` returned an empty record while the
    interface has tagged addresses). A corrupt record raises ``OwnershipError``: move it away first.
    """
    owned = store.load()
    tagged = vips.tagged()
    if require_tag is None:
        require_tag = supports_address_proto()
    ours = {address for address, proto in tagged.items() if proto == ADDRESS_PROTO or not require_tag}
    observed = client.dump(with_counters=False)
    owned.settle(observed.services, tagged)
    result = Adopted(skipped_addresses=sorted(set(tagged) - ours))
    for address in sorted(ours):
        if address not in owned.addresses:
            owned.addresses[address] = AF_INET6 if ":" in address else AF_INET
            result.addresses.append(address)
    for key in sorted(observed.services):
        if key.address in ours and key not in owned.services:
            owned.own(key, "")
            result.services.append(key)
    store.save(owned)
    return result
