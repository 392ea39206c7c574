"""One director's reconciliation: desired state in, kernel changed, ownership recorded.

This is the glue of the pure core (``spec``, ``plan``) and the kernel layer (``netlink``), shared
by the standalone CLI and the director agent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kubelvs.model import Observed, ServiceKey, VirtualService
from kubelvs.netlink.addresses import VipInterface
from kubelvs.netlink.ipvs import ApplyResult, IPVSClient
from kubelvs.ownership import Ownership, OwnershipStore
from kubelvs.plan import Operation, Plan, Verb, plan
from kubelvs.spec import DesiredState, ObjectRef


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

    def sync(
        self,
        desired: DesiredState,
        keep: Iterable[ObjectRef] = (),
        only: Iterable[ObjectRef] | None = None,
        observed: Observed | None = None,
    ) -> SyncReport:
        """Make the kernel match ``desired`` for what kubelvs owns.

        ``keep``: VirtualServers whose current spec is invalid; what they had is left as it is.
        ``only``: limit the change to these VirtualServers (``kubelvs delete``).
        """
        owned = self.store.load()
        observed = observed or self.client.dump(with_counters=False)
        kept = {str(ref) for ref in keep}
        scope = None if only is None else {str(ref) for ref in only}
        services = dict(desired.services)
        for key, origin in owned.services.items():
            if origin in kept and key in observed.services:
                services[key] = observed.services[key]
        keys: set[ServiceKey] | None = None
        if scope is not None:
            keys = {k for k, origin in owned.services.items() if origin in scope}
            keys |= {k for k, ref in desired.origins.items() if str(ref) in scope and k in services}
        the_plan = plan(services, observed.services, set(owned.services), only=keys)

        wanted_vips = dict(desired.vips)
        for key in services:
            wanted_vips.setdefault(key.address, key.family)
        report = SyncReport(the_plan, ApplyResult())
        with self.vips.session():  # one rtnetlink socket for every VIP of this sync
            for address, family in sorted(wanted_vips.items()):
                if address and self.vips.add(address, family):
                    owned.addresses[address] = family
                    report.vips_added.append(address)

            report.result = self.client.apply(the_plan)
            self._record(owned, desired, report.result.succeeded, observed, services)

            still_used = {k.address for k in owned.services}
            for address, family in sorted(owned.addresses.items()):
                if address not in wanted_vips and address not in still_used:
                    self.vips.remove(address, family)
                    del owned.addresses[address]
                    report.vips_removed.append(address)
        self.store.save(owned)
        return report

    @staticmethod
    def _record(
        owned: Ownership,
        desired: DesiredState,
        succeeded: Iterable[Operation],
        observed: Observed,
        services: Mapping[ServiceKey, VirtualService],
    ) -> None:
        for op in succeeded:
            if op.verb is Verb.ADD_SERVICE:
                owned.services[op.key] = str(desired.origins.get(op.key, ""))
            elif op.verb is Verb.DELETE_SERVICE:
                owned.services.pop(op.key, None)
        for key in list(owned.services):
            if key not in observed.services and key not in services:
                del owned.services[key]  # gone from the kernel and not wanted: nothing to own
            elif key in desired.origins:
                owned.services[key] = str(desired.origins[key])
