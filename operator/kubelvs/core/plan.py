"""The difference between desired and observed IPVS state, as an ordered list of operations.

Pure and minimal: settings and weights are edited in place (no delete-and-add, which would drop
connections), and a virtual service that kubelvs does not own is never touched, not even when the
desired state names the same key (that is reported as a conflict instead).
"""

from __future__ import annotations

import enum
import functools
import operator
from collections import Counter
from collections.abc import Container, Iterable, Mapping, Set
from dataclasses import dataclass, field, replace

from kubelvs.core.model import Destination, DestKey, IPVSState, ServiceKey, VirtualService, value_class
from kubelvs.core.resolve import Resolution
from kubelvs.core.spec import ObjectRef


class Verb(enum.Enum):
    # Members are singletons compared by identity: hash them as such, in C. Enum's own __hash__
    # is Python code, and a full plan's 110,000 operations are looked up by verb (the applier's
    # split into service and real-server requests, the counts of a report).
    __hash__ = object.__hash__

    ADD_SERVICE = "add-service"
    EDIT_SERVICE = "edit-service"
    DELETE_SERVICE = "delete-service"
    ADD_DEST = "add-dest"
    EDIT_DEST = "edit-dest"
    DELETE_DEST = "delete-dest"


@value_class  # a full plan makes one per real server
class Operation:
    verb: Verb
    service: VirtualService  # for service verbs its settings; for dest verbs only the key matters
    dest: Destination | None = None

    @property
    def key(self) -> ServiceKey:
        return self.service.key

    def __str__(self) -> str:
        target = f"{self.key}" + (f" -> {self.dest.key}" if self.dest else "")
        return f"{self.verb.value} {target}"


_VERB_OF = operator.attrgetter("verb")


@dataclass(slots=True)
class Plan:
    operations: list[Operation] = field(default_factory=list)
    conflicts: list[ServiceKey] = field(default_factory=list)  # desired, but held by someone else

    def __len__(self) -> int:
        return len(self.operations)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.operations)

    def counts(self) -> dict[str, int]:
        by_verb = Counter(map(_VERB_OF, self.operations))  # C all the way (Verb hashes in C)
        return {verb.value: n for verb, n in by_verb.items()}


def plan(
    desired: Mapping[ServiceKey, VirtualService],
    observed: Mapping[ServiceKey, VirtualService],
    owned: Set[ServiceKey],
    only: Iterable[ServiceKey] | None = None,
) -> Plan:
    """Operations that turn the owned part of ``observed`` into ``desired``.

    ``only`` limits the comparison to some keys (an incremental sync of one VirtualServer).
    Order: stale services go first (freeing addresses and ports), then new services with their
    real servers, then edits; within a service, real servers are deleted before they are added.
    """
    keys = set(desired) | (set(observed) & set(owned)) if only is None else set(only)
    result = Plan()
    deletes: list[Operation] = []
    adds: list[Operation] = []
    edits: list[Operation] = []
    for key in sorted(keys):
        want = desired.get(key)
        have = observed.get(key)
        # Values this version cannot represent (Method.UNKNOWN, ...): left alone like a foreign
        # service, never encoded back.
        if have is not None and (key not in owned or have.has_unknown_values):
            if want is not None:
                result.conflicts.append(key)
            continue
        if want is None:
            if have is not None:
                deletes.append(Operation(Verb.DELETE_SERVICE, have.without_destinations()))
            continue
        if have is None:
            adds.append(Operation(Verb.ADD_SERVICE, want.without_destinations()))
            adds.extend(map(functools.partial(Operation, Verb.ADD_DEST, want), want.destinations))
            continue
        if not want.same_settings(have):
            edits.append(Operation(Verb.EDIT_SERVICE, want))  # its settings are encoded, not its real servers
        # A service that becomes order-sensitive keeps whatever order its old scheduler left: re-add all.
        reorder_all = want.scheduler in ORDER_SENSITIVE_SCHEDULERS and have.scheduler != want.scheduler
        edits.extend(_dest_operations(want, have, reorder_all))
    result.operations = deletes + adds + edits
    return result


# Schedulers whose lookup table the kernel builds by walking the real servers in the order they
# were added (ip_vs_sh_reassign, ip_vs_dh_reassign, ip_vs_mh_populate: contested slots go to the
# first in the list). Two directors map a flow to the same real server without any sync state
# only if their lists are in the same order, so kubelvs keeps these lists in its canonical order
# (VirtualService.destinations: by address, then port) on every director.
ORDER_SENSITIVE_SCHEDULERS = frozenset({"sh", "dh", "mh"})


def _dest_operations(want: VirtualService, have: VirtualService, reorder_all: bool = False) -> list[Operation]:
    """Real-server operations for one service: deletes first, then adds and edits in canonical order.

    The kernel appends an added real server to the end of the service's list. For an
    order-sensitive scheduler a new real server that sorts before present ones would break the
    canonical order, so those present ones are deleted and added again after it: their
    connections go on (a deleted real server waits in the kernel's trash and the add revives it,
    with ``expire_nodest_conn`` at its default 0), and the table comes out as a director started
    afresh builds it.
    """
    wanted = want.dest_map()
    present = have.dest_map()
    service = want  # only its key is encoded; whole, it lets apply_operations share it with the cache
    deletes = [Operation(Verb.DELETE_DEST, service, d) for k, d in present.items() if k not in wanted]
    changes: list[Operation] = []
    after_an_add = reorder_all and want.scheduler in ORDER_SENSITIVE_SCHEDULERS
    reorder = want.scheduler in ORDER_SENSITIVE_SCHEDULERS
    for d in want.destinations:  # canonical order
        current = present.get(d.key)
        if current is None:
            changes.append(Operation(Verb.ADD_DEST, service, d))
            after_an_add = reorder
        elif after_an_add:
            deletes.append(Operation(Verb.DELETE_DEST, service, current))
            changes.append(Operation(Verb.ADD_DEST, service, d))
        elif current != d:
            changes.append(Operation(Verb.EDIT_DEST, service, d))
    return deletes + changes


def apply_operations(state: Mapping[ServiceKey, VirtualService], operations: Iterable[Operation]) -> IPVSState:
    """What the kernel holds after ``operations`` succeed on ``state`` (an in-memory model).

    Used to keep a cached view of the kernel current without a new dump, and by the tests.
    The real servers of each service are gathered first and the service is built once (not once
    per real server); when it comes out equal to the desired service its operations carry, that
    object is kept, so the cache and the desired state share it instead of holding two copies.
    """
    result: IPVSState = dict(state)
    dests_of: dict[ServiceKey, dict[DestKey, Destination]] = {}  # services whose real servers changed
    wanted_of: dict[ServiceKey, VirtualService] = {}  # the desired service their operations carry
    for op in operations:
        key = op.key
        verb = op.verb
        if verb is Verb.ADD_SERVICE:
            if key in result:
                raise ValueError(f"{key} exists")
            result[key] = op.service.without_destinations()
        elif verb is Verb.EDIT_SERVICE:
            if key not in dests_of:
                dests_of[key] = result[key].dest_map()
            result[key] = op.service
            wanted_of[key] = op.service
        elif verb is Verb.DELETE_SERVICE:
            del result[key]
            dests_of.pop(key, None)
            wanted_of.pop(key, None)
        else:
            assert op.dest is not None
            dests = dests_of.get(key)
            if dests is None:
                dests = dests_of[key] = result[key].dest_map()
            if verb is Verb.ADD_DEST:
                if op.dest.key in dests:
                    raise ValueError(f"{key} -> {op.dest.key} exists")
                dests[op.dest.key] = op.dest
            elif verb is Verb.EDIT_DEST:
                dests[op.dest.key] = op.dest
            else:
                del dests[op.dest.key]
            wanted_of[key] = op.service
    for key, dests in dests_of.items():
        built = replace(result[key], destinations=tuple(dests.values()))
        wanted = wanted_of.get(key)
        result[key] = wanted if wanted is not None and wanted == built else built
    return result


def share_desired(observed: IPVSState, desired: Mapping[ServiceKey, VirtualService]) -> int:
    """Replace, in place, each service of ``observed`` (a dump) that equals the desired one by
    the desired object itself: a cache of the kernel then costs no second copy of the state.
    Returns how many were replaced."""
    shared = 0
    for key, have in observed.items():
        want = desired.get(key)
        if want is not None and want is not have and want == have:
            observed[key] = want
            shared += 1
    return shared


def owned_after(owned: Iterable[ServiceKey], operations: Iterable[Operation]) -> set[ServiceKey]:
    """The keys once ``operations`` (the successful ones) are in the kernel: of the owned ones, or
    of every service (real-server operations change none)."""
    result = set(owned)
    add, delete = Verb.ADD_SERVICE, Verb.DELETE_SERVICE  # locals: a full plan has 110,000 operations
    for op in operations:
        verb = op.verb
        if verb is add:
            result.add(op.key)
        elif verb is delete:
            result.discard(op.key)
    return result


# --- VIPs: which addresses to make local, which to remove -------------------------------------


@dataclass(frozen=True, slots=True)
class AddressPlan:
    add: tuple[tuple[str, int], ...] = ()  # (address, family), to make local (then record)
    remove: tuple[tuple[str, int], ...] = ()  # owned addresses to remove (kernel first, record after)

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)


def plan_addresses(
    wanted: Mapping[str, int],
    present: Set[str],
    owned: Mapping[str, int],
    still_used: Set[str] = frozenset(),
    scope: Set[str] | None = None,
) -> AddressPlan:
    """The VIP changes that make ``wanted`` local and drop what kubelvs owns and no longer needs.

    ``present``: the addresses on the interface now. An address already present is not added (and,
    when not ``owned``, stays somebody else's). ``still_used``: addresses not to remove although
    not ``wanted`` (a service kubelvs still owns, a VIP another VirtualServer keeps). ``scope``:
    only these addresses may be removed (an incremental sync). Only ``owned`` addresses are ever
    removed; an owned address that is gone from the interface is still "removed" (a no-op in the
    kernel) so that the record forgets it.
    """
    add = tuple(sorted((a, f) for a, f in wanted.items() if a and a not in present))
    # With a scope, only its addresses are looked at: an incremental sync is O(scope), not O(VIPs).
    candidates = owned.items() if scope is None else [(a, owned[a]) for a in scope if a in owned]
    remove = tuple(sorted((a, f) for a, f in candidates if a not in wanted and a not in still_used))
    return AddressPlan(add, remove)


# --- which refused VirtualServers keep their rules ------------------------------------------


def kept_origins(
    resolutions: Mapping[ObjectRef, Resolution], scope: Iterable[ObjectRef] | None = None
) -> list[ObjectRef]:
    """The VirtualServers whose rules stay as they are: every refused one (an invalid spec, a VIP
    conflict, a port mismatch: a refusal never loses what was programmed), among ``scope`` (all
    when None). The CLI and the director use this one rule; :func:`with_kept` applies it."""
    refs = resolutions if scope is None else scope
    return sorted(
        (ref for ref in refs if (found := resolutions.get(ref)) is not None and found.error is not None),
        key=str,
    )


def with_kept(
    desired: Mapping[ServiceKey, VirtualService],
    claimed: Container[ServiceKey],
    kept_keys: Iterable[ServiceKey],
    observed: Mapping[ServiceKey, VirtualService],
) -> dict[ServiceKey, VirtualService]:
    """``desired`` plus the services a kept VirtualServer owns, as the kernel has them, except
    the keys ``claimed`` by an accepted VirtualServer (a VIPConflict loser never overrides the
    winner's service)."""
    services = dict(desired)
    for key in kept_keys:
        if key not in claimed and key not in services and key in observed:
            services[key] = observed[key]
    return services
