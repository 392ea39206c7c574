"""The planner: minimal, ordered, never touching what kubelvs does not own."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from kubelvs.core.model import AF_INET, Destination, Method, ServiceKey, VirtualService
from kubelvs.core.plan import (
    ORDER_SENSITIVE_SCHEDULERS,
    AddressPlan,
    Operation,
    Verb,
    apply_operations,
    kept_origins,
    owned_after,
    plan,
    plan_addresses,
    share_desired,
    with_kept,
)
from kubelvs.core.resolve import Resolution
from kubelvs.core.spec import ObjectRef, SpecError

KEY = ServiceKey(AF_INET, 6, "192.0.2.1", 80)


def _svc(key: ServiceKey = KEY, scheduler: str = "rr", *dests: Destination) -> VirtualService:
    return VirtualService(key, scheduler, destinations=dests)


def test_new_service_adds_service_then_dests() -> None:
    want = _svc(KEY, "rr", Destination("10.0.0.1", 80), Destination("10.0.0.2", 80))
    ops = plan({KEY: want}, {}, set())
    assert [op.verb for op in ops] == [Verb.ADD_SERVICE, Verb.ADD_DEST, Verb.ADD_DEST]


def test_edits_in_place() -> None:
    have = _svc(KEY, "rr", Destination("10.0.0.1", 80, weight=1))
    want = _svc(KEY, "wrr", Destination("10.0.0.1", 80, weight=5))
    ops = plan({KEY: want}, {KEY: have}, {KEY})
    assert [op.verb for op in ops] == [Verb.EDIT_SERVICE, Verb.EDIT_DEST]


def test_one_weight_change_is_one_operation_among_many_services() -> None:
    state = {
        ServiceKey(AF_INET, 6, "192.0.2.1", port): _svc(
            ServiceKey(AF_INET, 6, "192.0.2.1", port), "rr", *(Destination(f"10.0.0.{i}", port) for i in range(1, 11))
        )
        for port in range(1000, 3000)
    }
    changed = dict(state)
    key = ServiceKey(AF_INET, 6, "192.0.2.1", 1500)
    dests = list(changed[key].destinations)
    dests[3] = replace(dests[3], weight=7)
    changed[key] = replace(changed[key], destinations=tuple(dests))
    ops = plan(changed, state, set(state))
    assert [(op.verb, op.key) for op in ops] == [(Verb.EDIT_DEST, key)]
    assert len(plan(changed, state, set(state), only=[key])) == 1


def test_foreign_service_is_never_touched_even_when_desired() -> None:
    foreign = _svc(KEY, "wlc", Destination("10.9.9.9", 80))
    want = _svc(KEY, "rr", Destination("10.0.0.1", 80))
    result = plan({KEY: want}, {KEY: foreign}, set())
    assert result.operations == []
    assert result.conflicts == [KEY]


def test_deletes_come_first() -> None:
    old = ServiceKey(AF_INET, 6, "192.0.2.9", 80)
    ops = plan({KEY: _svc(KEY)}, {old: _svc(old)}, {old})
    assert [op.verb for op in ops] == [Verb.DELETE_SERVICE, Verb.ADD_SERVICE]


def test_draining_weight_zero_is_an_edit() -> None:
    have = _svc(KEY, "rr", Destination("10.0.0.1", 80, weight=1))
    want = _svc(KEY, "rr", Destination("10.0.0.1", 80, weight=0))
    assert [op.verb for op in plan({KEY: want}, {KEY: have}, {KEY})] == [Verb.EDIT_DEST]


# --- hashing schedulers: the kernel's real-server list stays in canonical order -------------


def _kernel_list(order: list[Destination], ops: list[Operation]) -> list[Destination]:
    """The kernel's real-server list of one service after ``ops``: an add appends, a delete
    removes, an edit changes in place (ip_vs_add_dest / __ip_vs_del_dest / ip_vs_edit_dest)."""
    result = list(order)
    for op in ops:
        assert op.dest is not None
        if op.verb is Verb.ADD_DEST:
            assert all(d.key != op.dest.key for d in result), f"{op} exists"
            result.append(op.dest)
        elif op.verb is Verb.DELETE_DEST:
            result = [d for d in result if d.key != op.dest.key]
        elif op.verb is Verb.EDIT_DEST:
            result = [op.dest if d.key == op.dest.key else d for d in result]
    return result


def _dests(*last_octets: int) -> list[Destination]:
    return [Destination(f"10.0.0.{n}", 80) for n in last_octets]


def test_a_real_server_sorting_first_is_added_before_the_present_ones_for_mh() -> None:
    have, want = _svc(KEY, "mh", *_dests(2, 3)), _svc(KEY, "mh", *_dests(1, 2, 3))
    ops = plan({KEY: want}, {KEY: have}, {KEY}).operations
    assert [(op.verb, op.dest.address if op.dest else "") for op in ops] == [
        (Verb.DELETE_DEST, "10.0.0.2"),
        (Verb.DELETE_DEST, "10.0.0.3"),
        (Verb.ADD_DEST, "10.0.0.1"),
        (Verb.ADD_DEST, "10.0.0.2"),
        (Verb.ADD_DEST, "10.0.0.3"),
    ]
    assert _kernel_list(_dests(2, 3), ops) == list(want.destinations)


def test_a_real_server_sorting_last_is_only_added_and_rr_is_never_reordered() -> None:
    have, want = _svc(KEY, "mh", *_dests(1, 2)), _svc(KEY, "mh", *_dests(1, 2, 3))
    assert [op.verb for op in plan({KEY: want}, {KEY: have}, {KEY})] == [Verb.ADD_DEST]
    have, want = _svc(KEY, "rr", *_dests(2, 3)), _svc(KEY, "rr", *_dests(1, 2, 3))
    assert [op.verb for op in plan({KEY: want}, {KEY: have}, {KEY})] == [Verb.ADD_DEST]


def test_switching_to_a_hashing_scheduler_adds_every_real_server_again_in_order() -> None:
    have, want = _svc(KEY, "rr", *_dests(1, 2)), _svc(KEY, "sh", *_dests(1, 2))
    verbs = [op.verb for op in plan({KEY: want}, {KEY: have}, {KEY})]
    assert verbs == [Verb.EDIT_SERVICE, Verb.DELETE_DEST, Verb.DELETE_DEST, Verb.ADD_DEST, Verb.ADD_DEST]
    assert [op.verb for op in plan({KEY: want}, {KEY: want}, {KEY})] == []  # and nothing once in place


@settings(max_examples=300, deadline=None)
@given(
    scheduler=st.sampled_from(sorted(ORDER_SENSITIVE_SCHEDULERS)),
    history=st.lists(st.sets(st.integers(1, 8)), min_size=1, max_size=8),
)
def test_any_history_leaves_a_hashing_schedulers_list_as_a_fresh_director_builds_it(
    scheduler: str, history: list[set[int]]
) -> None:
    """Two directors map a flow alike only with the same list order: whatever sequence of real
    server sets one of them went through, its kernel list equals a fresh director's."""
    kernel: list[Destination] = []
    observed: dict[ServiceKey, VirtualService] = {}
    for step in history:
        want = _svc(KEY, scheduler, *_dests(*sorted(step)))
        ops = plan({KEY: want}, observed, {KEY}).operations
        kernel = _kernel_list(kernel, [op for op in ops if op.dest is not None])
        observed = {KEY: replace(want, destinations=tuple(kernel))}
        fresh = _kernel_list([], [op for op in plan({KEY: want}, {}, set()).operations if op.dest is not None])
        assert kernel == fresh == list(want.destinations)


# --- property: plan then apply gives the desired owned state; foreign state is untouched -----

addresses = st.sampled_from([f"10.0.{i}.{j}" for i in range(2) for j in range(1, 5)])
keys = st.builds(
    ServiceKey,
    st.just(AF_INET),
    st.sampled_from([6, 17]),
    st.sampled_from(["192.0.2.1", "192.0.2.2"]),
    st.sampled_from([80, 443, 53]),
)
destinations = st.builds(
    Destination,
    addresses,
    st.sampled_from([80, 8080]),
    st.integers(0, 3),
    st.sampled_from([Method.DR, Method.TUN, Method.NAT]),
)


@st.composite
def services(draw: st.DrawFn, key: ServiceKey) -> VirtualService:
    dests = draw(st.lists(destinations, max_size=4, unique_by=lambda d: d.key))
    return VirtualService(
        key,
        draw(st.sampled_from(["rr", "wrr", "sh"])),
        draw(st.sampled_from([0, 0x8])),
        draw(st.sampled_from([0, 300])),
        draw(st.sampled_from([0, 24, 32])),
        tuple(dests),
    )


@st.composite
def states(draw: st.DrawFn) -> dict[ServiceKey, VirtualService]:
    chosen = draw(st.sets(keys, max_size=6))
    return {k: draw(services(k)) for k in chosen}


@settings(max_examples=300, deadline=None)
@given(desired=states(), observed=states(), owned_fraction=st.sets(keys), foreign_extra=states())
def test_plan_reaches_desired_and_spares_foreign(desired, observed, owned_fraction, foreign_extra) -> None:
    owned = set(observed) & owned_fraction
    for key, svc in foreign_extra.items():  # services somebody else created
        if key not in observed:
            observed[key] = svc
    foreign = {k: v for k, v in observed.items() if k not in owned}

    result = plan(desired, observed, owned)
    after = apply_operations(observed, result.operations)
    now_owned = owned_after(owned, result.operations)

    for key, svc in foreign.items():
        assert after[key] == svc  # foreign entries exactly as they were
    for key, svc in desired.items():
        if key in foreign:
            assert key in result.conflicts
        else:
            assert key in now_owned
            assert after[key].same_settings(svc)
            assert after[key].destinations == svc.destinations
    for key in now_owned:
        assert key in desired  # nothing owned is left over
    assert len(plan(desired, after, now_owned)) == 0  # re-planning gives an empty plan


@settings(max_examples=200, deadline=None)
@given(desired=states(), observed=states())
def test_applying_a_batch_equals_applying_one_operation_at_a_time(desired, observed) -> None:
    operations = plan(desired, observed, set(observed)).operations
    one_by_one = dict(observed)
    for op in operations:
        one_by_one = apply_operations(one_by_one, [op])
    assert apply_operations(observed, operations) == one_by_one


@settings(max_examples=100, deadline=None)
@given(desired=states(), observed=states())
def test_the_cache_after_an_apply_shares_the_desired_services(desired, observed) -> None:
    """A cached kernel must not hold a second copy of every service (10,000s at scale)."""
    operations = plan(desired, observed, set(observed)).operations
    after = apply_operations(observed, operations)
    for key in {op.key for op in operations} & desired.keys():  # touched by the plan
        if after[key] == desired[key]:  # (not when only an equivalent setting differs, e.g. netmask 0/32)
            assert after[key] is desired[key]


def test_share_desired_replaces_equal_services_only() -> None:
    want = _svc(KEY, "rr", Destination("10.0.0.1", 80))
    other_key = ServiceKey(AF_INET, 6, "192.0.2.2", 80)
    dumped = {KEY: _svc(KEY, "rr", Destination("10.0.0.1", 80)), other_key: _svc(other_key, "wrr")}
    different = _svc(other_key, "rr")
    assert share_desired(dumped, {KEY: want, other_key: different}) == 1
    assert dumped[KEY] is want
    assert dumped[other_key] == _svc(other_key, "wrr")


# --- VIP planning ------------------------------------------------------------------------------

vips = st.sampled_from([f"192.0.2.{i}" for i in range(1, 9)])
vip_maps = st.dictionaries(vips, st.just(AF_INET), max_size=6)


@settings(max_examples=300, deadline=None)
@given(wanted=vip_maps, present=st.sets(vips), owned=vip_maps, still_used=st.sets(vips), scoped=st.booleans())
def test_plan_addresses_reaches_wanted_and_removes_only_its_own(wanted, present, owned, still_used, scoped) -> None:
    owned = {a: f for a, f in owned.items() if a in present or a in wanted}  # what kubelvs added earlier
    scope = set(wanted) | set(list(owned)[:2]) if scoped else None
    result = plan_addresses(wanted, present, owned, still_used, scope)
    removed = {a for a, _ in result.remove}
    added = {a for a, _ in result.add}
    assert removed <= set(owned)  # never an address kubelvs does not own
    assert not removed & (set(wanted) | still_used)
    assert scope is None or removed <= scope
    assert not added & present  # what is there already is never "added" (nor owned by it)
    after = (present | added) - removed
    now_owned = {a: f for a, f in {**owned, **dict(result.add)}.items() if a not in removed}
    assert set(wanted) <= after  # reaches the wanted set
    for address in present - set(owned):
        assert address in after  # a foreign address stays
    assert not plan_addresses(wanted, after, now_owned, still_used, scope)  # second plan is empty


def test_plan_addresses_forgets_an_owned_address_gone_from_the_interface() -> None:
    result = plan_addresses({}, set(), {"192.0.2.1": AF_INET})
    assert result == AddressPlan((), (("192.0.2.1", AF_INET),))


# --- the keep rule -----------------------------------------------------------------------------


def test_kept_origins_are_every_refused_virtual_server_in_scope() -> None:
    a, b, c = ObjectRef("ns", "a"), ObjectRef("ns", "b"), ObjectRef("ns", "c")
    resolutions = {
        a: Resolution(a, keys=(KEY,)),
        b: Resolution(b, error=SpecError(b, "spec.vip", "taken", reason="VIPConflict")),
        c: Resolution(c, error=SpecError(c, "spec.scheduler", "bad")),
    }
    assert kept_origins(resolutions) == [b, c]
    assert kept_origins(resolutions, [a, b, ObjectRef("ns", "deleted")]) == [b]


def test_with_kept_never_overrides_a_claimed_key() -> None:
    other = ServiceKey(AF_INET, 6, "192.0.2.1", 81)
    winner = _svc(KEY, "wrr")
    kernel = {KEY: _svc(KEY, "rr"), other: _svc(other, "sh")}
    services = with_kept({KEY: winner}, {KEY}, [KEY, other], kernel)
    assert services == {KEY: winner, other: kernel[other]}
    assert with_kept({}, set(), [ServiceKey(AF_INET, 6, "192.0.2.9", 1)], kernel) == {}
