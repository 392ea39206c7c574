"""High availability end to end: three `kubelvs director`s, each in its own network namespace on
one L2 segment, elect an owner per VIP through the real API server (on the host) and their peer
channel; a capture on the switch proves who answers ARP for each VIP, an HTTP prober from the
client proves the service.

For each fault (the owner SIGKILLed, frozen, cut off the link, cut off the API; the API down
for everyone; a director added; a director removed) the checks are:

- HTTP through the VIP answers again within ``BOUND`` (the longest gap without an answer);
- afterwards exactly one director answers for the VIP;
- at no moment do two MACs answer or announce the VIP (capture.overlaps == []), including while
  the fault heals and the placement rebalances (so a live owner is only ever replaced by a
  graceful handover);
- once healed, the placement on the wire is balanced (3 VIPs over 3 directors: one each) and
  stays put;
- then (judged after the wire, so a reporting problem does not hide a wire problem) every
  VirtualServer's ``status.owner`` names the director answering for its VIP.

Every test starts from a healthy state (the ``healthy`` fixture restores it, and checks that
restoring caused no overlap either), so the tests are independent of their order. Short
election timings keep the module within a few minutes in the emulated VM.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from capture import Capture, Prober
from ha_topology import KUBELVS, ConnectProber, HACluster, HATopology, HAView, output_dir, wait_for

# The host side of the kernel suite starts the control plane and gives the VM user networking.
pytestmark = pytest.mark.vm_control_plane

KUBECONFIG = os.environ.get("KUBELVS_E2E_KUBECONFIG", "")
# Election timings for CI (KUBELVS_HA_TIMINGS overrides them, as director flags).
TIMINGS = shlex.split(
    os.environ.get("KUBELVS_HA_TIMINGS", "--lease-duration 2.0 --renew-deadline 1.4 --retry-period 0.5")
)
LEASE_DURATION = float(TIMINGS[TIMINGS.index("--lease-duration") + 1]) if "--lease-duration" in TIMINGS else 3.0
# Flags of every director; {namespace} is the Leases' namespace.  KUBELVS_HA_DIRECTOR_ARGS
# replaces them (e.g. after a flag rename) without editing the test.
DIRECTOR_ARGS = shlex.split(os.environ.get("KUBELVS_HA_DIRECTOR_ARGS", "--lease-namespace {namespace}")) + TIMINGS
# Service gap allowed after a fault: a lease duration for the takeover to be allowed, plus the
# claim write through qemu's user network and the emulator's slowness.
BOUND = float(os.environ.get("KUBELVS_HA_BOUND", str(2 * LEASE_DURATION + 6)))
# Rounds of the rolling restart (1 in CI; bench/flow_bench.py runs more), and where its figures go.
ROLLING_ROUNDS = int(os.environ.get("KUBELVS_HA_ROLLING_ROUNDS", "1"))
ROLLING_FIGURES = os.environ.get("KUBELVS_HA_ROLLING_FIGURES")
# A placement counts as stable once it held this long (longer than the handover delay, which
# defaults to the lease duration, so a rebalance due to a joiner has started by then).
HOLD = max(3.0, 2 * LEASE_DURATION + 1)
SETTLE_TIMEOUT = 240.0
DIRECTORS = ["dirA", "dirB", "dirC"]
SPARE = "dirD"  # the director test_director_added brings in
SELF_TEST_VIP = 9  # a VIP index no VirtualServer uses


@dataclass
class Bed:
    topo: HATopology
    capture: Capture
    prober: Prober
    vips: dict[str, str]  # VirtualServer name -> VIP


@dataclass
class HA:
    bed: Bed
    cluster: HACluster
    view: HAView

    @property
    def topo(self) -> HATopology:
        return self.bed.topo

    @property
    def vip(self) -> str:
        return self.bed.vips["web-0"]

    def args(self) -> list[str]:
        return [a.replace("{namespace}", self.cluster.namespace) for a in DIRECTOR_ARGS]

    def start(self, name: str) -> None:
        self.cluster.node(self.topo.node_name(name), self.topo.ip4(name))
        if name not in self.topo.running or not self.topo.director(name).alive():
            self.topo.start_director(name, *self.args())

    def settled(self, directors: list[str]) -> bool:
        return self.view.settled(directors)


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    if not KUBECONFIG:
        pytest.fail("KUBELVS_E2E_KUBECONFIG is not set: the host side of the kernel suite starts the control plane")
    topo = HATopology(directors=4, kubeconfig=KUBECONFIG, logdir=output_dir(f"ha-tests-{time.strftime('%H%M%S')}"))
    try:
        vips = {f"web-{i}": topo.vip4(i) for i in range(3)}
        for rs in topo.real_servers:
            for vip in [*vips.values(), topo.vip4(SELF_TEST_VIP)]:
                topo.real_server_dr(rs, vip)
        capture = topo.capture([*vips.values(), topo.vip4(SELF_TEST_VIP)]).start()
        prober = topo.prober([*vips.values(), topo.vip4(SELF_TEST_VIP)]).start()
        try:
            yield Bed(topo, capture, prober, vips)
        finally:
            prober.stop()
            capture.stop()
    finally:
        topo.close()


def test_testbed_directors_reach_the_api_and_the_capture_sees_two_answerers(bed: Bed) -> None:
    """The test bed itself, without kubelvs: every director namespace reaches the API server
    (route + masquerade through the VM's root namespace), and the capture catches a standby
    that answers ARP."""
    topo, capture = bed.topo, bed.capture
    for d in topo.directors:
        took = topo.check_api(d)
        assert took < 10, f"{d}: connect to the API server took {took:.1f}s"
    vip = topo.vip4(SELF_TEST_VIP)
    start = time.monotonic()
    topo.director_vip("dirA", vip)
    try:
        wait_for(
            "dirA answering alone",
            lambda: set(capture.responders(start, vip=vip)) == {topo.mac("dirA")},
            timeout=10,
            context=lambda: capture.describe(start),
        )
        assert capture.overlaps(since=start, vip=vip) == []
        both = time.monotonic()
        topo.director_vip("dirB", vip)
        found = wait_for(
            "an overlap of dirA and dirB",
            lambda: capture.overlaps(since=both, vip=vip),
            timeout=10,
            context=lambda: capture.describe(both),
        )
        assert found[0].macs == tuple(sorted((topo.mac("dirA"), topo.mac("dirB")))), found
        assert bed.prober.error is None and capture.error is None
    finally:
        for d in ("dirA", "dirB"):
            topo.exec(d, ["ip", "addr", "del", f"{vip}/32", "dev", "eth0"], check=False)


@pytest.fixture(scope="module")
def ha(bed: Bed) -> Iterator[HA]:
    help_text = subprocess.run([KUBELVS, "director", "--help"], capture_output=True, text=True, timeout=120).stdout
    if "--lease-duration" not in help_text:
        pytest.skip("`kubelvs director` has no election yet (no --lease-duration in its --help)")
    cluster = HACluster(KUBECONFIG, prefix="ha")
    view = HAView(bed.topo, cluster, bed.capture, bed.vips)
    env = HA(bed, cluster, view)
    try:
        cluster.service("web", [bed.topo.ip4(r) for r in bed.topo.real_servers])
        # mh with mh-port, as the README advises for services that must keep every connection
        # across a VIP move: a connection younger than the sync delay (1-3 s) is unknown to the new
        # owner, and mh maps it to the same real server there (kubelvs keeps the real servers in
        # one order on every director), where rr picks its own next one and that one resets it.
        # rr with sync is what tests/kernel/test_ha_flows.py and test_syncdaemon.py cover.
        for name, vip in bed.vips.items():
            cluster.virtual_server(name, vip, service="web", scheduler="mh", scheduler_flags=["mh-port"])
        for d in DIRECTORS:
            env.start(d)
        view.wait_stable(DIRECTORS, HOLD, SETTLE_TIMEOUT)
        yield env
    finally:
        for d in list(bed.topo.running):
            bed.topo.kill(d, signal.SIGTERM)
        cluster.close()


@pytest.fixture
def healthy(ha: HA) -> float:
    """Undo whatever the last test left (faults, a killed, removed or extra director), wait
    until the three directors hold one VIP each, and check that getting there caused no
    overlap either."""
    topo, started = ha.topo, time.monotonic()
    topo.heal_all()
    if SPARE in topo.running and topo.director(SPARE).alive():
        ha.cluster.select(topo.node_name(SPARE), False)
        topo.kill(SPARE, signal.SIGTERM)
    for d in DIRECTORS:
        ha.start(d)  # selects its Node again, starts it if it is not running
    ha.view.wait_stable(DIRECTORS, HOLD, SETTLE_TIMEOUT, context=lambda: ha.view.context(started))
    assert ha.bed.capture.overlaps(since=started) == [], f"restoring overlapped\n{ha.view.context(started)}"
    return time.monotonic()


def exercise(
    ha: HA,
    fault: Callable[[str], None],
    heal: Callable[[str], None],
    *,
    takeover: bool,
    after: list[str] | None = None,
) -> dict[str, Any]:
    """Fault the owner of VIP 0, check the service comes back within BOUND, answered by one
    director; heal; check the placement settles over ``after`` (default: the three) and holds
    still; and that nothing overlapped from the fault to the end.  ``takeover``: whether another
    director must take the VIP over (False: observe for twice the lease duration instead)."""
    topo, view, capture, vip = ha.topo, ha.view, ha.bed.capture, ha.vip
    owner = wait_for("the owner of VIP 0", lambda: view.wire_owner(vip), timeout=30, context=view.context)
    with ConnectProber(topo.ns("client"), vip, 80, interval=0.1, timeout=1.5, path="/") as probe:

        def context() -> str:
            return view.context(t_fault - 1, probe)

        t_fault = time.monotonic()
        wait_for(
            "HTTP through the VIP before the fault",
            lambda: probe.first_success_after(t_fault),
            timeout=15,
            context=context,
        )
        t_fault = capture.mark(f"fault on {owner}")
        fault(owner)
        result: dict[str, Any] = {"owner": owner}
        if takeover:
            new = wait_for(
                f"another director than {owner} answering for {vip}",
                lambda: next(
                    (e for e in capture.events(t_fault) if e.vip == vip and e.is_answer and e.mac != topo.mac(owner)),
                    None,
                ),
                timeout=BOUND,
                interval=0.1,
                context=context,
            )
            result["takeover_s"] = new.t - t_fault
            back = new.t
        else:
            time.sleep(2 * LEASE_DURATION + 1)  # the observation window, not a check
            back = t_fault
        answered = wait_for(
            "HTTP through the VIP again", lambda: probe.first_success_after(back), timeout=BOUND, context=context
        )
        result["service_s"] = answered.finished - t_fault
        result["new_owner"] = wait_for(
            "exactly one director answering for the VIP",
            lambda: view.wire_owner(vip, window=1.0),
            timeout=BOUND,
            context=context,
        )
        outage = probe.outage(t_fault)
        assert outage <= BOUND, f"HTTP was down {outage:.2f}s (bound {BOUND}s)\n{context()}"
        assert capture.overlaps(since=t_fault - 1) == [], (
            f"two directors answered\n{capture.overlaps(since=t_fault - 1)}\n{context()}"
        )
        result["outage_s"] = outage
        capture.mark(f"heal {owner}")
        heal(owner)
        directors = after or DIRECTORS
        ha.view.wait_stable(directors, HOLD, SETTLE_TIMEOUT, context=context)
        check_no_overlap(ha, t_fault, probe)
        check_status(ha, context)
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    print(f"{test}: {result}")  # shown with -rA: the figures of a passing run
    return result


def check_status(ha: HA, context: Callable[[], str] | None = None) -> None:
    """status.owner of every VirtualServer names the director answering for its VIP (after
    the wire checks: what clients see is judged first)."""
    wait_for(
        "status.owner to name the directors answering on the wire",
        ha.view.status_agrees,
        timeout=BOUND,
        context=context or ha.view.context,
    )


def check_no_overlap(ha: HA, since: float, probe: ConnectProber | None = None) -> None:
    """Nothing overlapped from ``since - 1`` on, and the capture saw every frame."""
    capture = ha.bed.capture
    found = capture.overlaps(since=since - 1)
    assert found == [], f"two directors answered: {found}\n{ha.view.context(since - 1, probe)}"
    _frames, drops = capture.stats()
    assert drops == 0, f"the capture dropped {drops} frames: its verdicts are incomplete"


def test_owner_sigkill(ha: HA, healthy: float) -> None:
    topo = ha.topo
    result = exercise(
        ha, lambda d: topo.kill(d, signal.SIGKILL), lambda d: topo.start_director(d, *ha.args()), takeover=True
    )
    # The takeover is told as an Event on the VirtualServer, posted by the new owner through its
    # queue of Events, in the real API server.
    told = f"owner: {topo.node_name(result['owner'])} -> {topo.node_name(result['new_owner'])} (OwnerSilent)"
    cluster = ha.cluster

    def owner_changed() -> list[str]:
        events = cluster.core.list_namespaced_event(cluster.namespace).items
        return [e.message for e in events if e.reason == "VIPOwnerChanged" and told in (e.message or "")]

    wait_for(f"a VIPOwnerChanged Event saying {told!r}", owner_changed, timeout=BOUND, context=ha.view.context)


def test_owner_frozen_then_continued(ha: HA, healthy: float) -> None:
    """SIGSTOP: the kernel keeps running, the process does not renew; after SIGCONT the old
    owner must not answer again (its claim address expired) unless handed the VIP back."""
    exercise(ha, ha.topo.stop, ha.topo.cont, takeover=True)


def test_owner_link_down_then_up(ha: HA, healthy: float) -> None:
    exercise(ha, ha.topo.link_down, ha.topo.link_up, takeover=True)


def test_owner_cut_from_the_api_only(ha: HA, healthy: float) -> None:
    """The owner keeps its link and its peers: the service must go on (whether it keeps the VIP
    through its peers or hands it over), with never two answering."""
    exercise(ha, ha.topo.cut_api, ha.topo.heal_api, takeover=False)


def test_api_down_for_everyone(ha: HA, healthy: float) -> None:
    """Nobody can write a Lease: the owners must keep serving (fail static), nobody may take
    over, and the return of the API must not shuffle the VIPs."""
    topo = ha.topo
    before = ha.cluster.owners()
    exercise(ha, lambda _: topo.api_down(), lambda _: topo.api_up(), takeover=False)
    assert ha.cluster.owners() == before, (
        f"owners changed while nobody could reach the API: {before} -> {ha.cluster.owners()}"
    )


def test_director_added(ha: HA, healthy: float) -> None:
    """A fourth director joins (started fresh, as a new pod): VIPs may move to it, by graceful
    handovers only: no outage beyond the bound, no overlap, then a stable placement."""
    topo, capture = ha.topo, ha.bed.capture
    with ConnectProber(topo.ns("client"), ha.vip, 80, interval=0.1, timeout=1.5, path="/") as probe:
        t0 = capture.mark(f"add {SPARE}")
        ha.start(SPARE)
        everyone = [*DIRECTORS, SPARE]
        wait_for(
            f"{SPARE} serving metrics",
            lambda: _metrics_up(topo, SPARE),
            timeout=SETTLE_TIMEOUT,
            context=lambda: ha.view.context(t0, probe),
        )
        ha.view.wait_stable(everyone, HOLD, SETTLE_TIMEOUT, context=lambda: ha.view.context(t0, probe))
        outage = probe.outage(t0)
        assert outage <= BOUND, f"HTTP was down {outage:.2f}s while {SPARE} joined\n{ha.view.context(t0, probe)}"
        check_no_overlap(ha, t0, probe)
        check_status(ha, lambda: ha.view.context(t0, probe))


def test_director_removed(ha: HA, healthy: float) -> None:
    """The owner of VIP 0 is no longer a director (its Node loses the selecting label; the
    process goes on): it must hand its VIPs over, a short gap and no overlap."""
    topo = ha.topo
    owner = wait_for("the owner of VIP 0", lambda: ha.view.wire_owner(ha.vip), timeout=30, context=ha.view.context)
    rest = [d for d in DIRECTORS if d != owner]
    exercise(
        ha,
        lambda d: ha.cluster.select(topo.node_name(d), False),
        lambda d: None,  # the next test's `healthy` selects it again
        takeover=True,
        after=rest,
    )


def test_rolling_restart_loses_no_request(ha: HA, healthy: float) -> None:
    """Each director in turn gets SIGTERM (as a DaemonSet's rolling update does), exits after
    handing its VIPs over, and starts again; requests to every VIP go on meanwhile and none
    fails (a moved VIP's clients still reach the old director's kernel until the new owner's
    announcement reaches them; a request whose connection opened on one director and goes on
    through the other keeps its real server because both map it alike with mh), and never do
    two directors answer."""
    topo, capture, view = ha.topo, ha.bed.capture, ha.view
    probes = [
        ConnectProber(topo.ns("client"), vip, 80, interval=0.2, timeout=1.5, path="/").start()
        for vip in ha.bed.vips.values()
    ]
    t0 = capture.mark("rolling restart")

    def context() -> str:
        return "\n".join(view.context(t0 - 1, probe) for probe in probes)

    figures: dict[str, Any] = {"rounds": 0, "restarts": 0, "exits_s": []}
    try:
        for _ in range(ROLLING_ROUNDS):
            for d in DIRECTORS:
                capture.mark(f"SIGTERM {d}")
                stopped = time.monotonic()
                topo.kill(d, signal.SIGTERM)
                exited = time.monotonic() - stopped
                figures["exits_s"].append(round(exited, 2))
                log = topo.director_log(d)
                assert "shutting down: every VIP is answered by its new owner" in log or "handing over" not in log, (
                    f"{d} exited after {exited:.1f}s without confirming its VIPs taken over\n{context()}"
                )
                topo.start_director(d, *ha.args())
                view.wait_stable(DIRECTORS, HOLD, SETTLE_TIMEOUT, context=context)
                figures["restarts"] += 1
            figures["rounds"] += 1
        failed = [(probe.host, a) for probe in probes for a in probe.results(t0) if not a.ok]
        assert failed == [], f"{len(failed)} requests failed during the rolling restart: {failed[:10]}\n{context()}"
        total = sum(len(probe.results(t0)) for probe in probes)
        assert total > 0
        print(f"rolling restart: {total} requests, 0 failed")  # shown with -rA
        check_no_overlap(ha, t0)
        check_status(ha, context)
    finally:
        for probe in probes:
            probe.stop()
        results = [a for probe in probes for a in probe.results(t0)]
        figures.update(requests=len(results), failed=sum(1 for a in results if not a.ok))
        figures["overlaps"] = len(capture.overlaps(since=t0))
        if ROLLING_FIGURES:
            Path(ROLLING_FIGURES).write_text(json.dumps(figures, indent=1) + "\n")


def test_vip_owner_metric_and_announced_condition(ha: HA, healthy: float) -> None:
    """Each director's kubelvs_vip_owner{vip} is 1 exactly for the VIPs it answers for on the
    wire, status.owner agrees, and each VirtualServer has Announced=True."""
    from ha_topology import metric_values

    topo, placement = ha.topo, ha.view.placement()
    for d in DIRECTORS:
        values = metric_values(topo.metrics(d), "kubelvs_vip_owner")
        expected = {ha.bed.vips[vs] for vs, owner in placement.items() if owner == d}
        owned = {vip for vip, value in _by_vip(values).items() if value == 1}
        assert owned == expected, f"{d}: kubelvs_vip_owner says {owned}, the wire says {expected} ({values})"
    check_status(ha)
    for vs in ha.bed.vips:
        condition = ha.cluster.condition(vs, "Announced")
        assert condition.get("status") == "True", f"{vs}: Announced is {condition}"


def _by_vip(values: dict[str, float]) -> dict[str, float]:
    out = {}
    for labels, value in values.items():
        for part in labels.strip("{}").split(","):
            key, _, raw = part.partition("=")
            if key.strip() == "vip":
                out[raw.strip('"')] = value
    return out


def _metrics_up(topo: HATopology, name: str) -> bool:
    try:
        return bool(topo.metrics(name, timeout=2))
    except OSError:
        return False
