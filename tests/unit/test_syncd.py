"""The pure decisions of connection sync (kubelvs.core.syncd): which daemons and sysctls a
configuration wants, and the changes against what the kernel reports."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kubelvs.core.syncd import (
    DaemonPlan,
    DaemonState,
    SyncConfig,
    SyncConfigError,
    SyncDaemon,
    desired_daemons,
    desired_sysctls,
    plan_daemons,
    validate,
)

MASTER, BACKUP = DaemonState.MASTER, DaemonState.BACKUP
CONFIG = SyncConfig(interface="eth0", sync_id=7)


def reported(daemon: SyncDaemon) -> SyncDaemon:
    """``daemon`` as a GET_DAEMON dump shows it: the kernel's defaults filled in."""
    return SyncDaemon(
        daemon.state,
        daemon.interface,
        daemon.sync_id,
        daemon.max_len or 1472,
        daemon.group or "224.0.0.81",
        daemon.port or 8848,
        daemon.ttl or 1,
    )


def test_every_director_runs_a_master_and_a_backup() -> None:
    assert desired_daemons(CONFIG) == (SyncDaemon(MASTER, "eth0", 7), SyncDaemon(BACKUP, "eth0", 7))
    assert desired_daemons(SyncConfig(enabled=False, interface="eth0")) == ()


def test_sysctls_refresh_live_connections_and_accept_mid_flow_packets() -> None:
    assert desired_sysctls(CONFIG) == {
        "net/ipv4/vs/sync_version": 1,
        "net/ipv4/vs/sync_threshold": "3 0",
        "net/ipv4/vs/sync_refresh_period": 1,
        "net/ipv4/vs/sloppy_tcp": 1,
    }
    # No refresh: the kernel's packet-count period.
    assert desired_sysctls(SyncConfig(interface="eth0", refresh_seconds=0))["net/ipv4/vs/sync_threshold"] == "3 50"
    assert desired_sysctls(SyncConfig(enabled=False)) == {}


@pytest.mark.parametrize(
    ("config", "option"),
    [
        (SyncConfig(interface=""), "--sync-interface"),
        (SyncConfig(interface="a-very-long-ifname"), "--sync-interface"),
        (SyncConfig(interface="eth0", sync_id=256), "--sync-id 256"),
        (SyncConfig(interface="eth0", sync_id=-1), "--sync-id -1"),
        (SyncConfig(interface="eth0", group="10.0.0.1"), "--sync-group 10.0.0.1: not a multicast"),
        (SyncConfig(interface="eth0", group="nope"), "--sync-group 'nope'"),
        (SyncConfig(interface="eth0", port=70000), "--sync-port 70000"),
        (SyncConfig(interface="eth0", ttl=256), "--sync-ttl 256"),
        (SyncConfig(interface="eth0", refresh_seconds=-1), "--sync-refresh-period -1"),
    ],
)
def test_bad_settings_name_their_option(config: SyncConfig, option: str) -> None:
    with pytest.raises(SyncConfigError, match=option):
        validate(config)


def test_good_settings_pass() -> None:
    validate(CONFIG)
    validate(SyncConfig(interface="eth0", group="ff02::8848", port=8849, ttl=2))
    validate(SyncConfig(enabled=False))  # nothing to check when off


def test_nothing_running_starts_both() -> None:
    plan = plan_daemons(desired_daemons(CONFIG), [], [])
    assert plan == DaemonPlan(start=desired_daemons(CONFIG))


def test_a_restart_adopts_daemons_running_as_wanted() -> None:
    desired = desired_daemons(CONFIG)
    plan = plan_daemons(desired, [reported(d) for d in desired], [])
    assert not plan.changes
    assert plan.kept == tuple(reported(d) for d in desired)


def test_changed_settings_replace_kubelvs_daemons_only() -> None:
    before = desired_daemons(SyncConfig(interface="eth0", sync_id=3))
    after = desired_daemons(CONFIG)
    plan = plan_daemons(after, [reported(d) for d in before], before)
    assert plan.stop == (MASTER, BACKUP) and plan.start == after
    # The same daemons, not started by kubelvs: somebody else's, left alone (and reported).
    plan = plan_daemons(after, [reported(d) for d in before], [])
    assert not plan.changes
    assert plan.foreign == tuple(reported(d) for d in before)


def test_sync_turned_off_stops_only_kubelvs_daemons() -> None:
    ours = SyncDaemon(MASTER, "eth0", 7)
    theirs = SyncDaemon(BACKUP, "eth1", 9)
    plan = plan_daemons((), [reported(ours), reported(theirs)], [ours])
    assert plan.stop == (MASTER,) and plan.start == ()
    assert plan.foreign == (reported(theirs),)


def test_explicit_group_port_and_ttl_must_match() -> None:
    want = SyncDaemon(MASTER, "eth0", 7, group="239.1.1.1", port=9000, ttl=2)
    assert want.satisfied_by(reported(want))
    assert not want.satisfied_by(reported(SyncDaemon(MASTER, "eth0", 7)))
    six = SyncDaemon(BACKUP, "eth0", 7, group="ff02::0:8848")
    assert six.satisfied_by(reported(SyncDaemon(BACKUP, "eth0", 7, group="ff02::8848")))  # same address


daemons = st.builds(
    SyncDaemon,
    st.sampled_from(list(DaemonState)),
    st.sampled_from(["eth0", "eth1"]),
    st.integers(0, 3),
    st.sampled_from([0, 1400]),
    st.sampled_from(["", "224.0.0.81", "239.1.1.1"]),
    st.sampled_from([0, 8848, 9000]),
    st.sampled_from([0, 1, 2]),
)


def _one_per_state(found: list[SyncDaemon]) -> list[SyncDaemon]:
    return list({d.state: d for d in found}.values())


@given(st.lists(daemons, max_size=2), st.lists(daemons, max_size=2), st.lists(daemons, max_size=3))
def test_plan_properties(desired: list[SyncDaemon], running: list[SyncDaemon], owned: list[SyncDaemon]) -> None:
    desired, running = _one_per_state(desired), [reported(d) for d in _one_per_state(running)]
    plan = plan_daemons(desired, running, owned)
    by_state = {d.state: d for d in running}
    for state in plan.stop:  # only a daemon kubelvs started is ever stopped
        assert any(record.satisfied_by(by_state[state]) for record in owned)
    for daemon in plan.foreign:
        assert daemon.state not in plan.stop and not any(d.state == daemon.state for d in plan.start)
    for daemon in plan.start:  # never started over a daemon that keeps running
        assert daemon.state not in by_state or daemon.state in plan.stop
    # Applying the plan gives, for each direction, the desired daemon or a foreign one.
    after = {state: d for state, d in by_state.items() if state not in plan.stop}
    after.update({d.state: reported(d) for d in plan.start})
    for want in desired:
        have = after.get(want.state)
        assert have is not None
        assert want.satisfied_by(have) or have in plan.foreign
    # And planning again changes nothing.
    again = plan_daemons(desired, list(after.values()), [*owned, *plan.start])
    assert not again.changes
