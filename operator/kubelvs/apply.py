"""One director's reconciliation: desired state in, kernel changed, ownership recorded.

This is the glue of the pure core (``spec``, ``plan``) and the kernel layer (``netlink``), shared
by the standalone CLI and the director agent.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from kubelvs.core.desired import DesiredState
from kubelvs.core.model import Observed, ServiceKey, VirtualService
from kubelvs.core.plan import Operation, Plan, Verb, apply_operations, plan
from kubelvs.core.spec import ObjectRef
from kubelvs.kernel.addresses import VipInterface
from kubelvs.kernel.ipvs import ApplyResult, IPVSClient
from kubelvs.state.ownership import Ownership, OwnershipStore


@dataclass(slots=True)
class SyncReport:
    plan: Plan
    result: ApplyResult
    vips_added: list[str] = field(default_factory=list)
    vips_removed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.result.ok and not self.plan.conflicts


class Reconciler:
    def __init__(self, client: IPVSClient, store: OwnershipStore, vips: VipInterface) -> None:
        self.client = client
        self.store = store
        self.vips = vips
        self.local_vips: set[str] = set()  # VIPs seen local; a full sync checks them again

    def sync(
        self,
        desired: DesiredState,
        keep: Iterable[ObjectRef] = (),
        only: Iterable[ObjectRef] | None = None,
        observed: Observed | None = None,
    ) -> SyncReport:
        """Make the kernel match ``desired`` for what kubelvs owns.

        ``keep``: VirtualServers whose current spec is invalid; what they had is left as it is.
        ``only``: limit the change to these VirtualServers (an incremental sync, or ``kubelvs
        delete``); the work is then proportional to them, not to everything kubelvs owns.
        """
        owned = self.store.load()
        observed = observed or self.client.dump(with_counters=False)
        services = dict(desired.services)
        for ref in keep:
            for key in owned.keys_of(str(ref)):
                if key in observed.services:
                    services[key] = observed.services[key]
        keys: set[ServiceKey] | None = None
        if only is not None:
            keys = set()
            for ref in only:
                keys |= owned.keys_of(str(ref))
                resolution = desired.resolutions.get(ref)
                if resolution is not None:
                    keys.update(k for k in resolution.keys if k in services)
        the_plan = plan(services, observed.services, owned.services.keys(), only=keys)

        if keys is None:
            self.local_vips.clear()  # a full sync: look at the interface again
            wanted_vips = dict(desired.vips)
            for key in services:
                wanted_vips.setdefault(key.address, key.family)
        else:
            wanted_vips = {k.address: k.family for k in keys if k in services}
        report = SyncReport(the_plan, ApplyResult())
        changed = False
        with self.vips.session():  # one rtnetlink socket for every VIP of this sync
            for address, family in sorted(wanted_vips.items()):
                if not address or address in self.local_vips:
                    continue
                if self.vips.add(address, family):
                    owned.addresses[address] = family
                    report.vips_added.append(address)
                    changed = True
                self.local_vips.add(address)

            report.result = self.client.apply(the_plan)
            changed |= self._record(owned, desired, report.result.succeeded, observed, services, keys)

            candidates = owned.addresses if keys is None else {k.address for k in keys} & owned.addresses.keys()
            unused = [a for a in candidates if a not in wanted_vips and a not in desired.vips]
            if unused:
                still_used = {k.address for k in owned.services}
                for address in sorted(a for a in unused if a not in still_used):
                    self.vips.remove(address, owned.addresses.pop(address))
                    self.local_vips.discard(address)
                    report.vips_removed.append(address)
                    changed = True
        if changed:
            self.store.save(owned)
        return report

    @staticmethod
    def _record(
        owned: Ownership,
        desired: DesiredState,
        succeeded: Iterable[Operation],
        observed: Observed,
        services: Mapping[ServiceKey, VirtualService],
        keys: set[ServiceKey] | None,
    ) -> bool:
        """Update the ownership record after an apply (for ``keys`` only, if given)."""
        changed = False
        for op in succeeded:
            if op.verb is Verb.ADD_SERVICE:
                changed |= owned.own(op.key, str(desired.origins.get(op.key, "")))
            elif op.verb is Verb.DELETE_SERVICE:
                changed |= owned.disown(op.key)
        for key in list(owned.services) if keys is None else [k for k in keys if k in owned.services]:
            if key not in observed.services and key not in services:
                changed |= owned.disown(key)  # gone from the kernel and not wanted: nothing to own
            elif key in desired.origins:
                changed |= owned.own(key, str(desired.origins[key]))
        return changed


class CachedReconciler(Reconciler):
    """A Reconciler that keeps the kernel's state between syncs: incremental syncs plan against
    the cache (no dump per event); a full sync dumps and replaces it."""

    observed: Observed | None = None

    def sync_cached(self, desired: DesiredState, only: Collection[ObjectRef] | None, full: bool) -> SyncReport:
        if full or self.observed is None:
            self.observed = self.client.dump(with_counters=False)
        # Invalid specs keep what they had. Only the synced VirtualServers matter: an incremental
        # sync does not look through every VirtualServer for them.
        resolutions = desired.resolutions
        keep = [
            ref
            for ref in (resolutions if only is None else only)
            if (found := resolutions.get(ref)) is not None
            and found.error is not None
            and found.error.reason == "InvalidSpec"
        ]
        report = self.sync(desired, keep=keep, only=only, observed=self.observed)
        if report.result.ok:
            self.observed.services = apply_operations(self.observed.services, report.result.succeeded)
        else:
            self.observed = None  # something failed: trust only a fresh dump next time
        return report
