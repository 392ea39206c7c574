"""The reconciler on an in-memory kernel: write-ahead ownership, crash recovery, the keep rule,
the cached reconciler's partial invalidation, and adopt."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeIPVS, FakeVips, Faults, Killed
from kubelvs.apply import CachedReconciler, Reconciler, adopt
from kubelvs.core.desired import DesiredState, desired_state
from kubelvs.core.model import AF_INET, Destination, ServiceKey, VirtualService
from kubelvs.core.plan import Operation
from kubelvs.core.spec import ObjectRef
from kubelvs.kernel.ipvs import IPVSError
from kubelvs.state.ownership import CachedStore, Identity, OwnershipStore

IDENTITY = Identity((1, 2), "boot-a")
FOREIGN_KEY = ServiceKey(AF_INET, 6, "198.51.100.7", 443)
FOREIGN = VirtualService(FOREIGN_KEY, "wlc", destinations=(Destination("10.9.9.9", 443),))
FOREIGN_VIP = "198.51.100.7"


def static_vs(name: str, vip: str, *ports: int, backends: int = 2, created: str = "2026-01-01T00:00:00Z") -> Any:
    return {
        "apiVersion": "kubelvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": name, "namespace": "ns", "creationTimestamp": created, "generation": 1},
        "spec": {
            "vip": vip,
            "ports": [{"port": p} for p in ports],
            "scheduler": "rr",
            "backends": {"addresses": [{"ip": f"10.0.0.{i}"} for i in range(1, backends + 1)]},
        },
    }


def store(tmp_path: Path) -> OwnershipStore:
    return OwnershipStore(tmp_path, identity=IDENTITY)


def kernel_with_foreign(faults: Faults | None = None) -> tuple[FakeIPVS, FakeVips]:
    faults = faults or Faults()
    ipvs = FakeIPVS(faults, {FOREIGN_KEY: FOREIGN})
    vips = FakeVips(faults, {FOREIGN_VIP: 0})
    return ipvs, vips


STATE_A = [static_vs("a", "192.0.2.1", 80, 81), static_vs("b", "192.0.2.2", 80), static_vs("gone", "192.0.2.9", 80)]
STATE_B = [
    static_vs("a", "192.0.2.1", 80, 82, backends=3),  # one port replaced, a backend added
    static_vs("b", "192.0.2.2", 80, backends=1),
    static_vs("c", "192.0.2.3", 8080),  # new; "gone" is deleted
]


def check_converged(ipvs: FakeIPVS, vips: FakeVips, st: OwnershipStore, desired: DesiredState) -> None:
    owned = st.load()
    assert not owned.has_pending
    assert ipvs.services[FOREIGN_KEY] == FOREIGN  # foreign state untouched
    assert vips.present[FOREIGN_VIP] == 0
    mine = {k: v for k, v in ipvs.services.items() if k != FOREIGN_KEY}
    assert mine == desired.services  # nothing leaked, nothing missing
    assert set(owned.services) == set(desired.services)
    assert {k: str(v) for k, v in desired.origins.items()} == owned.services
    assert set(vips.present) - {FOREIGN_VIP} == set(desired.vips) == set(owned.addresses)


def test_probe_1_enobufs_mid_apply_converges_without_conflicts(tmp_path: Path) -> None:
    """REVIEW Appendix probe 1: ENOBUFS after two of four operations."""
    faults = Faults(fail_at=2)
    ipvs, vips = FakeIPVS(faults), FakeVips(faults)
    desired = desired_state([static_vs("a", "192.0.2.1", 80, backends=1), static_vs("b", "192.0.2.2", 80, backends=1)])
    with pytest.raises(IPVSError):
        Reconciler(ipvs, store(tmp_path), vips).sync(desired)
    report = Reconciler(ipvs, store(tmp_path), vips).sync(desired)  # a restart
    assert report.plan.conflicts == []
    assert report.settled
    check_converged_plain(ipvs, vips, store(tmp_path), desired)


def check_converged_plain(ipvs: FakeIPVS, vips: FakeVips, st: OwnershipStore, desired: DesiredState) -> None:
    owned = st.load()
    assert ipvs.services == desired.services
    assert set(owned.services) == set(desired.services)
    assert set(vips.present) == set(owned.addresses) == set(desired.vips)


def _operations(start: list[Any], end: list[Any], tmp_path: Path) -> int:
    """How many kernel operations the transition start -> end takes (no faults)."""
    faults = Faults()
    ipvs, vips = kernel_with_foreign(faults)
    st = store(tmp_path)
    if start:
        Reconciler(ipvs, st, vips).sync(desired_state(start))
    faults.count = 0
    Reconciler(ipvs, st, vips).sync(desired_state(end))
    return faults.count


@pytest.mark.parametrize("kind", ["error", "kill"])
@pytest.mark.parametrize(
    ("start", "end"), [([], STATE_A), (STATE_A, STATE_B), (STATE_B, [])], ids=["new", "change", "empty"]
)
def test_a_failure_at_any_step_then_a_restart_converges(
    tmp_path: Path, kind: str, start: list[Any], end: list[Any]
) -> None:
    steps = _operations(start, end, tmp_path / "count")
    assert steps > 3
    desired = desired_state(end)
    for k in range(steps):
        state_dir = tmp_path / f"{kind}-{k}"
        faults = Faults()
        ipvs, vips = kernel_with_foreign(faults)
        if start:
            Reconciler(ipvs, store(state_dir), vips).sync(desired_state(start))
        faults.fail_at, faults.kind, faults.count = k, kind, 0
        with pytest.raises((IPVSError, Killed)):
            Reconciler(ipvs, store(state_dir), vips).sync(desired)
        # A restart: a new reconciler, the record read back from disk.
        report = Reconciler(ipvs, store(state_dir), vips).sync(desired)
        assert report.ok, (k, report.result.failed, report.plan.conflicts)
        check_converged(ipvs, vips, store(state_dir), desired)
        again = Reconciler(ipvs, store(state_dir), vips).sync(desired)
        assert len(again.plan) == 0 and not again.vips_added and not again.vips_removed


def test_a_failed_address_removal_keeps_the_address_owned(tmp_path: Path) -> None:
    ipvs, vips = kernel_with_foreign()
    st = CachedStore(tmp_path, identity=IDENTITY)  # the director's: the record lives in memory
    reconciler = Reconciler(ipvs, st, vips)
    reconciler.sync(desired_state([static_vs("a", "192.0.2.1", 80)]))

    def broken(address: str, family: int) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    vips.remove = broken  # type: ignore[method-assign]
    with pytest.raises(OSError):
        reconciler.sync(DesiredState())
    assert "192.0.2.1" in st.load().addresses  # still on the interface, still ours
    assert "192.0.2.1" in store(tmp_path).load().addresses
    del vips.remove
    report = reconciler.sync(DesiredState())
    assert report.vips_removed == ["192.0.2.1"]
    assert set(vips.present) == {FOREIGN_VIP}
    assert store(tmp_path).load().addresses == {}


def test_a_wanted_vip_already_present_is_not_owned_and_never_removed(tmp_path: Path) -> None:
    ipvs, vips = FakeIPVS(), FakeVips(present={"192.0.2.1": 0})
    reconciler = Reconciler(ipvs, store(tmp_path), vips)
    reconciler.sync(desired_state([static_vs("a", "192.0.2.1", 80)]))
    assert store(tmp_path).load().addresses == {}
    reconciler.sync(DesiredState())
    assert "192.0.2.1" in vips.present and ipvs.services == {}


def test_a_foreign_service_on_a_wanted_key_is_a_conflict_and_untouched(tmp_path: Path) -> None:
    key = ServiceKey(AF_INET, 6, "192.0.2.1", 80)
    theirs = VirtualService(key, "wlc")
    ipvs, vips = FakeIPVS(services={key: theirs}), FakeVips()
    report = Reconciler(ipvs, store(tmp_path), vips).sync(desired_state([static_vs("a", "192.0.2.1", 80)]))
    assert report.plan.conflicts == [key]
    assert ipvs.services == {key: theirs}
    assert not store(tmp_path).load().services


def test_an_add_refused_with_eexist_drops_the_intent(tmp_path: Path) -> None:
    """Somebody else created the service between the dump and the add."""
    key = ServiceKey(AF_INET, 6, "192.0.2.1", 80)
    ipvs, vips = FakeIPVS(), FakeVips()
    stale = ipvs.dump()
    ipvs.services[key] = VirtualService(key, "wlc")
    report = Reconciler(ipvs, store(tmp_path), vips).sync(
        desired_state([static_vs("a", "192.0.2.1", 80)]), observed=stale
    )
    assert [f.errno for f in report.result.failed] == [errno.EEXIST]
    owned = store(tmp_path).load()
    assert not owned.services and not owned.has_pending
    assert ipvs.services[key].scheduler == "wlc"


# --- the keep rule -----------------------------------------------------------------------------


def invalid(name: str, vip: str) -> Any:
    obj = static_vs(name, vip, 80)
    obj["spec"]["scheduler"] = "nope"
    return obj


@pytest.mark.parametrize("cached", [False, True], ids=["cli", "director"])
def test_a_refused_virtual_server_keeps_its_rules(tmp_path: Path, cached: bool) -> None:
    ipvs, vips = FakeIPVS(), FakeVips()
    st = CachedStore(tmp_path, identity=IDENTITY) if cached else store(tmp_path)
    reconciler = CachedReconciler(ipvs, st, vips)

    def sync(objs: list[Any]) -> None:
        if cached:
            reconciler.sync_cached(desired_state(objs), only=None, full=True)
        else:
            reconciler.sync(desired_state(objs))

    sync([static_vs("a", "192.0.2.1", 80)])
    before = dict(ipvs.services)
    sync([invalid("a", "192.0.2.1")])
    assert ipvs.services == before and "192.0.2.1" in vips.present
    # A port mismatch, a VIP conflict: refused too, and they keep too (one rule for both paths).
    sync([static_vs("a", "192.0.2.1", 80), static_vs("z", "192.0.2.1", 80, created="2026-02-01T00:00:00Z")])
    assert ipvs.services == before


@pytest.mark.parametrize("cached", [False, True], ids=["cli", "director"])
def test_a_vip_conflict_loser_never_overrides_the_winner(tmp_path: Path, cached: bool) -> None:
    key = ServiceKey(AF_INET, 6, "192.0.2.1", 80)
    ipvs, vips = FakeIPVS(), FakeVips()
    st = CachedStore(tmp_path, identity=IDENTITY) if cached else store(tmp_path)
    reconciler = CachedReconciler(ipvs, st, vips)
    late = static_vs("late", "192.0.2.1", 80, backends=1, created="2026-03-01T00:00:00Z")
    early = static_vs("early", "192.0.2.1", 80, backends=3, created="2026-01-01T00:00:00Z")
    objs_1, objs_2 = [late], [late, early]  # "late" alone first; then an older one claims its key
    for objs in (objs_1, objs_2):
        desired = desired_state(objs)
        if cached:
            reconciler.sync_cached(desired, only=None, full=True)
        else:
            reconciler.sync(desired)
    assert desired.resolutions[ObjectRef("ns", "late")].error is not None
    assert len(ipvs.services[key].destinations) == 3  # the winner's
    assert st.load().services[key] == "ns/early"


# --- the cached reconciler ---------------------------------------------------------------------


def test_cached_reconciler_plans_against_its_cache(tmp_path: Path) -> None:
    ipvs, vips = FakeIPVS(), FakeVips()
    reconciler = CachedReconciler(ipvs, CachedStore(tmp_path, identity=IDENTITY), vips)
    objs = [static_vs("a", "192.0.2.1", 80), static_vs("b", "192.0.2.2", 80)]
    reconciler.sync_cached(desired_state(objs), only=None, full=True)
    dumps = ipvs.dumps
    objs[0] = static_vs("a", "192.0.2.1", 80, backends=3)
    report = reconciler.sync_cached(desired_state(objs), only=[ObjectRef("ns", "a")], full=False)
    assert [op.verb.value for op in report.plan] == ["add-dest"]
    assert ipvs.dumps == dumps


def test_a_failed_operation_invalidates_only_its_key(tmp_path: Path) -> None:
    ipvs, vips = FakeIPVS(), FakeVips()
    reconciler = CachedReconciler(ipvs, CachedStore(tmp_path, identity=IDENTITY), vips)
    objs = [static_vs("a", "192.0.2.1", 80), static_vs("b", "192.0.2.2", 80)]
    reconciler.sync_cached(desired_state(objs), only=None, full=True)
    # Somebody deletes a real server of "a" behind our back: the next edit of "a" fails.
    key_a = ServiceKey(AF_INET, 6, "192.0.2.1", 80)
    ipvs.services[key_a] = VirtualService(key_a, "rr")
    objs[0] = static_vs("a", "192.0.2.1", 80, backends=1)
    objs[0]["spec"]["backends"]["addresses"][0]["weight"] = 5
    report = reconciler.sync_cached(desired_state(objs), only=[ObjectRef("ns", "a")], full=False)
    assert not report.result.ok and reconciler.observed is not None
    assert reconciler.unknown == {key_a}
    dumps = ipvs.dumps
    objs[1] = static_vs("b", "192.0.2.2", 80, backends=3)  # "b" is unaffected: the cache serves
    assert reconciler.sync_cached(desired_state(objs), only=[ObjectRef("ns", "b")], full=False).result.ok
    assert ipvs.dumps == dumps
    # "a" again: its key is unknown, so a fresh dump, and the repair succeeds.
    report = reconciler.sync_cached(desired_state(objs), only=[ObjectRef("ns", "a")], full=False)
    assert report.result.ok and ipvs.dumps == dumps + 1
    assert [d.weight for d in ipvs.services[key_a].destinations] == [5]
    assert reconciler.unknown == set()


def test_an_exception_drops_the_cache_and_the_next_sync_settles(tmp_path: Path) -> None:
    faults = Faults()
    ipvs, vips = FakeIPVS(faults), FakeVips(faults)
    reconciler = CachedReconciler(ipvs, CachedStore(tmp_path, identity=IDENTITY), vips)
    objs = [static_vs("a", "192.0.2.1", 80)]
    faults.fail_at = 1  # the VIP add succeeds, ADD_SERVICE is lost
    with pytest.raises(IPVSError):
        reconciler.sync_cached(desired_state(objs), only=None, full=False)
    assert reconciler.observed is None
    report = reconciler.sync_cached(desired_state(objs), only=[ObjectRef("ns", "a")], full=False)
    assert report.ok
    check_converged_plain(ipvs, vips, CachedStore(tmp_path, identity=IDENTITY), desired_state(objs))


# --- adopt -------------------------------------------------------------------------------------


def test_adopt_rebuilds_a_lost_record(tmp_path: Path) -> None:
    ipvs, vips = kernel_with_foreign()
    objs = [static_vs("a", "192.0.2.1", 80, 81), static_vs("b", "192.0.2.2", 80)]
    Reconciler(ipvs, store(tmp_path), vips).sync(desired_state(objs))
    before = store(tmp_path).load()
    (tmp_path / "owned.json").unlink()
    vips.present["192.0.2.200"] = 0  # somebody's address on kubelvs0, without the mark
    adopted = adopt(ipvs, vips, store(tmp_path), require_tag=True)
    assert adopted.addresses == ["192.0.2.1", "192.0.2.2"]
    assert len(adopted.services) == 3
    assert set(adopted.skipped_addresses) == {FOREIGN_VIP, "192.0.2.200"}
    report = Reconciler(ipvs, store(tmp_path), vips).sync(desired_state(objs))
    assert len(report.plan) == 0 and not report.vips_removed and not report.plan.conflicts
    assert store(tmp_path).load().services == before.services  # origins filled in by the sync
    assert ipvs.services[FOREIGN_KEY] == FOREIGN and FOREIGN_VIP in vips.present


# --- the VIP port filter ---------------------------------------------------------------------


class RecordingFilter:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[dict[str, set[tuple[int, int]]]] = []
        self.begun: list[dict[str, set[tuple[int, int]]]] = []
        self.fail = fail

    def sync(self, allowed: Any) -> None:
        self.calls.append({vip: set(ports) for vip, ports in allowed.items()})
        if self.fail:
            raise RuntimeError("nft: No such file or directory")

    def begin(self, allowed: Any) -> None:
        self.begun.append({vip: set(ports) for vip, ports in allowed.items()})


def test_the_port_filter_allows_exactly_the_service_ports_of_owned_vips(tmp_path: Path) -> None:
    ipvs, vips = kernel_with_foreign()
    # A foreign service on a VIP kubelvs owns must stay reachable: the filter allows it too.
    foreign_on_ours = ServiceKey(AF_INET, 17, "192.0.2.1", 53)
    ipvs.services[foreign_on_ours] = VirtualService(foreign_on_ours, "rr")
    port_filter = RecordingFilter()
    reconciler = Reconciler(ipvs, store(tmp_path), vips, port_filter)
    desired = desired_state([static_vs("a", "192.0.2.1", 80, 81), static_vs("b", "192.0.2.2", 80)])
    reconciler.sync(desired)
    # The foreign VIP (not kubelvs's address) is not filtered at all.
    assert port_filter.calls == [{"192.0.2.1": {(6, 80), (6, 81), (17, 53)}, "192.0.2.2": {(6, 80)}}]
    # The full sync began the same mapping before programming IPVS (nft beside the applier).
    assert port_filter.begun == port_filter.calls
    reconciler.sync(desired, only=[ObjectRef("ns", "b")])  # incremental, nothing changed: no call
    assert len(port_filter.calls) == 1
    reconciler.sync(desired)  # a full sync applies again (repairs a flushed ruleset)
    assert len(port_filter.calls) == 2 and len(port_filter.begun) == 1  # nothing new to begin
    reconciler.sync(DesiredState())  # everything removed: the VIPs go, and so does the filter
    assert port_filter.calls[-1] == {} and port_filter.begun[-1] == {}


def test_the_filter_begun_before_a_failed_add_is_corrected_by_the_sync(tmp_path: Path) -> None:
    """The filter begun assumes every operation succeeds; a service the kernel refused is not
    allowed by the one the sync then applies."""
    refused = ServiceKey(AF_INET, 6, "192.0.2.1", 81)

    class Refusing(FakeIPVS):
        def _refusal(self, op: Operation) -> int:
            return errno.EINVAL if op.key == refused else super()._refusal(op)

    ipvs, vips = Refusing(services={FOREIGN_KEY: FOREIGN}), FakeVips(present={FOREIGN_VIP: 0})
    port_filter = RecordingFilter()
    report = Reconciler(ipvs, store(tmp_path), vips, port_filter).sync(
        desired_state([static_vs("a", "192.0.2.1", 80, 81)])
    )
    assert not report.ok
    assert port_filter.begun == [{"192.0.2.1": {(6, 80), (6, 81)}}]
    assert port_filter.calls == [{"192.0.2.1": {(6, 80)}}]


def test_a_port_filter_failure_is_reported_not_raised(tmp_path: Path) -> None:
    ipvs, vips = kernel_with_foreign()
    reconciler = Reconciler(ipvs, store(tmp_path), vips, RecordingFilter(fail=True))
    report = reconciler.sync(desired_state([static_vs("a", "192.0.2.1", 80)]))
    assert report.ok and "nft" in report.filter_error
    assert ServiceKey(AF_INET, 6, "192.0.2.1", 80) in ipvs.services  # the rules are in place regardless


def test_a_vip_with_an_every_port_service_is_not_narrowed(tmp_path: Path) -> None:
    # ipvsadm -A -t VIP:0 -p: a persistent service of every port; the filter would cut it off
    # (and nft refuses port 0: that used to fail every sync).
    ipvs, vips = kernel_with_foreign()
    every_port = ServiceKey(AF_INET, 6, "192.0.2.2", 0)
    ipvs.services[every_port] = VirtualService(every_port, "rr", persistence_timeout=300)
    port_filter = RecordingFilter()
    reconciler = Reconciler(ipvs, store(tmp_path), vips, port_filter)
    report = reconciler.sync(desired_state([static_vs("a", "192.0.2.1", 80), static_vs("b", "192.0.2.2", 80)]))
    assert report.ok and not report.filter_error
    assert port_filter.calls == [{"192.0.2.1": {(6, 80)}}]


def test_a_value_the_filter_refuses_is_reported_not_raised(tmp_path: Path) -> None:
    class Refusing(RecordingFilter):
        def sync(self, allowed: Any) -> None:
            raise ValueError("port 70000 out of range")

    ipvs, vips = kernel_with_foreign()
    report = Reconciler(ipvs, store(tmp_path), vips, Refusing()).sync(desired_state([static_vs("a", "192.0.2.1", 80)]))
    assert report.ok and "70000" in report.filter_error


def test_incremental_syncs_keep_the_port_filter_right(tmp_path: Path) -> None:
    """The cached reconciler skips the filter's pass over every VIP when no VIP or service came or
    went; whenever one did, the filter follows."""
    ipvs, vips = kernel_with_foreign()
    port_filter = RecordingFilter()
    reconciler = CachedReconciler(ipvs, CachedStore(tmp_path), vips, port_filter)
    a, b = ObjectRef("ns", "a"), ObjectRef("ns", "b")
    reconciler.sync_cached(desired_state([static_vs("a", "192.0.2.1", 80)]), None, full=True)
    assert port_filter.calls[-1] == {"192.0.2.1": {(6, 80)}}
    # Other backends only: the ports are as they were.
    reconciler.sync_cached(desired_state([static_vs("a", "192.0.2.1", 80, backends=3)]), [a], full=False)
    assert len(port_filter.calls) == 1
    # A port more: a service came.
    reconciler.sync_cached(desired_state([static_vs("a", "192.0.2.1", 80, 81)]), [a], full=False)
    assert port_filter.calls[-1] == {"192.0.2.1": {(6, 80), (6, 81)}}
    # A new VIP.
    both = [static_vs("a", "192.0.2.1", 80, 81), static_vs("b", "192.0.2.2", 443)]
    reconciler.sync_cached(desired_state(both), [b], full=False)
    assert port_filter.calls[-1] == {"192.0.2.1": {(6, 80), (6, 81)}, "192.0.2.2": {(6, 443)}}
    # A VIP gone.
    reconciler.sync_cached(desired_state(both[:1]), [b], full=False)
    assert port_filter.calls[-1] == {"192.0.2.1": {(6, 80), (6, 81)}}


class OneVipRefused(FakeVips):
    """The kernel refuses one VIP of a pipelined batch; the others are added (as the real
    pipeline answers: each request its own outcome)."""

    def __init__(self, refused: str, *args: Any) -> None:
        super().__init__(*args)
        self.refused = refused

    def add_many(self, items: Any) -> list[bool | OSError]:
        return [
            OSError(errno.EACCES, "refused") if address == self.refused else self.add(address, family)
            for address, family in items
        ]


def test_a_refused_vip_among_many_fails_the_sync_with_every_other_outcome_recorded(tmp_path: Path) -> None:
    ipvs = FakeIPVS(Faults(), {FOREIGN_KEY: FOREIGN})
    vips = OneVipRefused("192.0.2.2", Faults(), {FOREIGN_VIP: 0, "192.0.2.3": 0})  # 192.0.2.3: somebody else's
    states = [static_vs("a", "192.0.2.1", 80), static_vs("b", "192.0.2.2", 80), static_vs("c", "192.0.2.3", 80)]
    with pytest.raises(OSError, match="refused"):
        Reconciler(ipvs, store(tmp_path), vips).sync(desired_state(states))
    owned = store(tmp_path).load()
    assert owned.addresses == {"192.0.2.1": AF_INET}  # added: ours at once, not an intent to settle
    assert owned.pending_addresses == {"192.0.2.2": AF_INET}  # refused: not there, settled away next time
    assert "192.0.2.3" not in owned.addresses  # there already: never ours
    vips.refused = ""
    Reconciler(ipvs, store(tmp_path), vips).sync(desired_state(states))
    owned = store(tmp_path).load()
    assert owned.addresses == {"192.0.2.1": AF_INET, "192.0.2.2": AF_INET}
    assert vips.present["192.0.2.3"] == 0 and not owned.has_pending
