#!/usr/bin/env python3
"""VIP failover: kubelvs's election against keepalived (VRRP), in one VM run (`make bench-ha`).

Not a timed test: a benchmark writing ``{"ha": ...}`` (merged into bench/results.json by
bench/merge_results.py; bench/table.py renders it). Two halves, as bench/director_bench.py:

- ``host``: starts the local control plane (unless ``--only keepalived``), creates the bulk
  VirtualServers natively (fast), then boots one VM running the other half;
- ``vm``: builds tests/kernel/ha_topology.HATopology (client, dirA/dirB/dirC, rs1/rs2 with HTTP,
  the directors reaching the API server through the VM's root namespace), a capture on the
  bridge and an ARP prober (tests/kernel/capture.py), and a TCP connect to VIP:80 from the
  client every 50 ms. Then:

  * keepalived (dirA priority 150, dirB 100, ``virtual_ipaddress`` on eth0), profiles
    ``default`` (VRRPv2, advert_int 1) and ``tuned`` (VRRPv3, advert_int 0.1); faults: the
    owner's link down, the owner's keepalived SIGKILLed; ``--runs`` each;
  * kubelvs (3 directors), ``--default-timings`` and ``--tuned-timings``; the same two faults
    ``--runs`` each, then SIGSTOP, the owner cut from the API, the API down for all,
    ``--other-runs`` each; split brain (two MACs answering, from the capture) over
    ``--partition-runs`` API partitions and ``--freeze-runs`` freezes. Before all that (while
    the bulk VirtualServers exist, deleted after it): API writes per second with ``--bulk``
    VIPs over 3 directors, in steady state and during a failover (the sum of
    ``kubelvs_election_api_writes_total`` over the directors, over ``--window`` seconds).
    Profile by profile (keepalived's, then kubelvs's), within ``--budget-minutes``.

Per run: ``takeover_s`` = fault -> the first ARP answer or announcement for the VIP by another
director (the capture's kernel timestamp); ``service_s`` = fault -> the first successful TCP
connect among those started after the fault; ``outage_s`` = the longest time without a
successful connect from the fault until the state is stable again (0.05 s resolution);
``overlaps`` = split-brain findings in that span. ``failover_s`` is what the README compares:
``service_s`` for a link down (traffic is blackholed until the takeover), ``takeover_s`` for a
kill (the dead keepalived's kernel keeps the VIP and forwards, so service never stops; what
matters is when the other director owns the VIP).

Timing in the VM is emulated (TCG) and noisy: compare ratios of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "kernel"))
sys.path.insert(0, str(REPO / "bench"))
from vmout import ensure_vmout  # noqa: E402

BULK_NAMESPACE = "ha-bulk"
BULK_LABEL = "kubelvs.io/ha-bulk"
TOPOLOGY_INDEX = 1  # fixed, so the host knows the real servers' addresses for the bulk objects
KEEPALIVED_VIP_INDEX = 50
DEFAULT_TIMINGS = "--lease-duration 2.0 --renew-deadline 1.4 --retry-period 0.5"
TUNED_TIMINGS = "--lease-duration 1.2 --renew-deadline 0.7 --retry-period 0.2"
DIRECTOR_ARGS = "--lease-namespace {namespace}"


def bulk_vip(i: int) -> str:
    return f"10.78.{i // 250}.{i % 250 + 1}"


def summary(samples: Sequence[float | None]) -> dict[str, Any]:
    """p50/p99 (nearest rank), min, max, n, and how many runs gave no figure."""
    xs = sorted(x for x in samples if x is not None)
    out: dict[str, Any] = {"n": len(xs), "missing": len(samples) - len(xs)}
    if xs:
        out.update(
            p50=statistics.median(xs),
            p99=xs[min(len(xs) - 1, math.ceil(0.99 * len(xs)) - 1)],
            min=xs[0],
            max=xs[-1],
        )
    return out


def flag_value(args: Sequence[str], flag: str, default: float) -> float:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return float(args[i + 1])
        if a.startswith(flag + "="):
            return float(a.split("=", 1)[1])
    return default


# =========================================================================== host half


def create_bulk(kubeconfig: str, count: int, rs: Sequence[str]) -> float:
    """``count`` VirtualServers over static DR backends, selecting nodes labelled BULK_LABEL
    (none until the VM half labels the directors): created here, where it is fast; active only in
    the API-writes phase, which comes first; deleted after it."""
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=kubeconfig)
    client.CoreV1Api(api).create_namespace({"metadata": {"name": BULK_NAMESPACE}})
    custom = client.CustomObjectsApi(api)

    def create(i: int) -> None:
        body = {
            "apiVersion": "kubelvs.io/v1alpha1",
            "kind": "VirtualServer",
            "metadata": {"name": f"bulk-{i}"},
            "spec": {
                "vip": bulk_vip(i),
                "ports": [{"name": "http", "port": 80}],
                "scheduler": "rr",
                "forwarding": {"method": "DR"},
                "backends": {"addresses": [{"ip": a} for a in rs]},
                "directors": {"nodeSelector": {BULK_LABEL: "true"}},
            },
        }
        custom.create_namespaced_custom_object("kubelvs.io", "v1alpha1", BULK_NAMESPACE, "virtualservers", body)

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, range(count)))
    return time.perf_counter() - started


def host(args: argparse.Namespace, passthrough: list[str]) -> int:
    out = ensure_vmout()
    result = out / "ha_bench.vm.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, str(REPO / "hack" / "vm.py"), "--rwdir", str(out), "--network", "user"]
    command += ["--timeout", str(args.timeout), "--", sys.executable, __file__, "vm", *passthrough]
    command += ["--out", str(result)]
    with contextlib.ExitStack() as stack:
        if args.only != "keepalived":
            sys.path.insert(0, str(REPO / "tests"))
            import conftest  # the control plane helpers of the test suite

            controlplane = conftest.controlplane
            controlplane.build()
            cp = controlplane.ControlPlane(Path(tempfile.mkdtemp(prefix="kubelvs-habench-")), die_with_parent=True)
            cp.start()
            stack.callback(cp.stop)
            conftest._install_crds(conftest.Kubectl(cp.kubectl, cp.kubeconfig))
            if args.bulk:
                rs = [f"10.77.{TOPOLOGY_INDEX}.{101 + i}" for i in range(2)]
                seconds = create_bulk(str(cp.kubeconfig), args.bulk, rs)
                print(f"created {args.bulk} bulk VirtualServers in {seconds:.1f}s", flush=True)
            command += ["--kubeconfig", str(cp.kubeconfig_vm)]
        rc = subprocess.call(command)
    if not result.exists():
        print(f"ha_bench: the VM half failed (exit status {rc}) before any figure", file=sys.stderr)
        return rc or 1
    figures = json.loads(result.read_text())
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(_headline(figures), indent=2))
    if rc or figures["ha"].get("partial"):
        # The figures so far are in --out: merge them by hand if they are worth keeping.
        print(f"ha_bench: the VM half stopped early (exit status {rc}); partial figures in {args.out}", file=sys.stderr)
        return rc or 1
    return 0


def _headline(figures: dict[str, Any]) -> dict[str, Any]:
    ha = figures.get("ha", {})
    return {"ratios": ha.get("ratios"), "split_brain": (ha.get("kubelvs") or {}).get("split_brain")}


# =========================================================================== VM half


class Bed:
    """The topology, capture, prober and connect prober shared by every phase."""

    def __init__(self, args: argparse.Namespace, logdir: Path) -> None:
        from ha_topology import ConnectProber, HATopology

        self.args = args
        self.topo = HATopology(
            directors=3, index=TOPOLOGY_INDEX, api=bool(args.kubeconfig), kubeconfig=args.kubeconfig, logdir=logdir
        )
        self.vips = [self.topo.vip4(i) for i in range(3)]
        self.ka_vip = self.topo.vip4(KEEPALIVED_VIP_INDEX)
        for rs in self.topo.real_servers:
            for vip in [*self.vips, self.ka_vip]:
                self.topo.real_server_dr(rs, vip)
        if args.kubeconfig:
            self.topo.check_api("dirA")
        self.capture = self.topo.capture([*self.vips, self.ka_vip]).start()
        self.prober = self.topo.prober([*self.vips, self.ka_vip]).start()
        self._connect_cls = ConnectProber
        self.names = self.topo.names_by_mac()

    def connect_prober(self, vip: str) -> Any:
        return self._connect_cls(self.topo.ns("client"), vip, 80, interval=0.05, timeout=1.0, path=None)

    def owner_on_wire(self, vip: str, since: float) -> str | None:
        """The one director answering for ``vip`` since ``since`` (None if none or several)."""
        seen = self.capture.responders(since, vip=vip)
        if len(seen) != 1:
            return None
        return self.names.get(next(iter(seen)))

    def close(self) -> None:
        self.prober.stop()
        self.capture.stop()
        self.topo.close()


def wait(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    from ha_topology import wait_for

    return wait_for(what, check, timeout=timeout, interval=interval)


def measure(
    bed: Bed,
    probe: Any,
    vip: str,
    owner: str,
    fault: Callable[[], float],
    heal: Callable[[], None],
    settle: Callable[[], Any],
    *,
    takeover_timeout: float,
    observe: float | None = None,
) -> dict[str, Any]:
    """One fault run: apply ``fault`` (returns its time), wait for another director's first
    answer (or ``observe`` seconds when no takeover is expected), then the first successful
    connect, ``heal``, and ``settle`` (blocks until the state is stable again; raises
    AssertionError if it does not get there).  Never raises for a slow recovery: the run is
    recorded with what was reached, and an ``error``."""
    cap = bed.capture
    owner_mac = bed.topo.mac(owner)
    rec: dict[str, Any] = {"owner": owner}
    t_fault = fault()
    cap.mark(f"fault {owner}")
    try:
        deadline = t_fault + (observe if observe is not None else takeover_timeout)
        takeover = None
        while time.monotonic() < deadline:
            takeover = next(
                (e for e in cap.events(t_fault) if e.vip == vip and e.is_answer and e.mac != owner_mac), None
            )
            if takeover is not None and observe is None:
                break
            time.sleep(0.05)
        if takeover is not None:
            rec["takeover_s"] = takeover.t - t_fault
            rec["new_owner"] = bed.names.get(takeover.mac, takeover.mac)
        elif observe is None:
            rec["error"] = f"no takeover within {takeover_timeout}s"
        ok = None
        stop_at = time.monotonic() + (takeover_timeout if observe is None else 5.0)
        while ok is None and time.monotonic() < stop_at:
            ok = probe.first_success_after(t_fault)
            time.sleep(0.05)
        rec["service_s"] = ok.finished - t_fault if ok is not None else None
    finally:
        t_heal = time.monotonic()
        heal()
        cap.mark(f"heal {owner}")
    try:
        settle()
    except AssertionError as exc:
        rec["error"] = (rec.get("error", "") + f"; not settled: {exc}").strip("; ")
    t_end = time.monotonic()
    rec["heal_s"] = t_end - t_heal
    rec["outage_s"] = probe.outage(t_fault, t_end)
    found = cap.overlaps(since=t_fault - 0.5, until=t_end, vip=vip)
    rec["overlaps"] = len(found)
    if found:
        rec["overlap_detail"] = [
            f"{o.kind} {[bed.names.get(m, m) for m in o.macs]} at +{o.t - t_fault:.3f}s" for o in found[:5]
        ]
    return rec


def faults_summary(runs: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    out: dict[str, Any] = {"failover_metric": metric, "runs": runs}
    for key in ("failover_s", "takeover_s", "service_s", "outage_s"):
        values = [r.get(metric if key == "failover_s" else key) for r in runs]
        out[key] = summary(values)
    out["split_brain_runs"] = sum(1 for r in runs if r.get("overlaps"))
    out["errors"] = sum(1 for r in runs if r.get("error"))
    return out


# --------------------------------------------------------------------------- keepalived


def keepalived_phase(bed: Bed, args: argparse.Namespace, logdir: Path, profiles: Sequence[str]) -> dict[str, Any]:
    from keepalived import PROFILES, Keepalived

    topo, vip = bed.topo, bed.ka_vip
    rs = [topo.ip4(r) for r in topo.real_servers]
    for d in ("dirA", "dirB"):  # both directors forward VIP:80 to the real servers (DR)
        script = f"ipvsadm -A -t {vip}:80 -s rr\n" + "".join(f"ipvsadm -a -t {vip}:80 -r {r}:80 -g\n" for r in rs)
        topo.exec(d, ["sh", "-ec", script])
    out: dict[str, Any] = {
        "version": subprocess.run(["keepalived", "--version"], capture_output=True, text=True).stderr.split("\n")[0]
    }
    try:
        for profile in profiles:
            params = PROFILES[profile]
            a = Keepalived(topo, "dirA", vip, 150, logdir / f"keepalived-{profile}", **params)
            b = Keepalived(topo, "dirB", vip, 100, logdir / f"keepalived-{profile}", **params)
            quiet = max(1.0, 2 * params["advert_int"])  # only dirA answered for this long
            a.start()
            b.start()
            with bed.connect_prober(vip) as probe:

                def settled(a: Keepalived = a, b: Keepalived = b, quiet: float = quiet, probe: Any = probe) -> bool:
                    # dirA is master again (it preempts), dirB released, only dirA answered lately.
                    now = time.monotonic()
                    return (
                        a.holds_vip()
                        and not b.holds_vip()
                        and bed.owner_on_wire(vip, now - quiet) == "dirA"
                        and probe.first_success_after(now - 0.5) is not None
                    )

                wait(f"keepalived {profile}: dirA master", settled, timeout=60)
                result: dict[str, Any] = {"advert_int": params["advert_int"], "vrrp_version": params["version"]}
                timeout = 30 * params["advert_int"] + 20

                def settle(settled: Callable[[], bool] = settled) -> None:
                    wait("dirA master again", settled, timeout=180)

                runs = []
                for i in range(args.runs):
                    runs.append(
                        measure(
                            bed,
                            probe,
                            vip,
                            "dirA",
                            lambda: topo.link_down("dirA"),
                            lambda: topo.link_up("dirA"),
                            settle,
                            takeover_timeout=timeout,
                        )
                    )
                    print(f"keepalived {profile} link_down {i}: {_brief(runs[-1])}", flush=True)
                result["link_down"] = faults_summary(runs, "service_s")

                def restart(a: Keepalived = a) -> None:
                    a.drop_vip()  # a crashed keepalived leaves its VIP behind
                    a.start()

                runs = []
                for i in range(args.runs):
                    runs.append(measure(bed, probe, vip, "dirA", a.crash, restart, settle, takeover_timeout=timeout))
                    print(f"keepalived {profile} sigkill {i}: {_brief(runs[-1])}", flush=True)
                result["sigkill"] = faults_summary(runs, "takeover_s")
                out[profile] = result
            a.stop()
            b.stop()
    finally:
        for d in ("dirA", "dirB"):
            topo.exec(d, ["ipvsadm", "-C"], check=False)
            topo.exec(d, ["ip", "addr", "del", f"{vip}/32", "dev", "eth0"], check=False)
    return out


def _brief(rec: dict[str, Any]) -> str:
    keys = ("owner", "new_owner", "takeover_s", "service_s", "outage_s", "overlaps", "error")
    return " ".join(
        f"{k}={rec[k]:.3f}" if isinstance(rec.get(k), float) else f"{k}={rec.get(k)}" for k in keys if k in rec
    )


# --------------------------------------------------------------------------- kubelvs


class KubelvsBed:
    """Three directors serving three VIPs (one each once balanced) through one Service."""

    def __init__(self, bed: Bed, args: argparse.Namespace) -> None:
        from ha_topology import HACluster, HAView

        self.bed, self.topo, self.args = bed, bed.topo, args
        self.cluster = HACluster(args.kubeconfig, prefix="ha-bench")
        for d in self.topo.directors:
            self.cluster.node(self.topo.node_name(d), self.topo.ip4(d))
        self.cluster.service("web", [self.topo.ip4(r) for r in self.topo.real_servers])
        for i, vip in enumerate(bed.vips):
            self.cluster.virtual_server(f"web-{i}", vip, service="web")
        self.view = HAView(self.topo, self.cluster, bed.capture, {f"web-{i}": v for i, v in enumerate(bed.vips)})
        self.extra: list[str] = []
        self.timings: list[str] = []
        self.hold = 3.0

    def director_args(self) -> list[str]:
        template = shlex.split(self.args.director_args)
        return [a.replace("{namespace}", self.cluster.namespace) for a in template] + self.timings + self.extra

    def start_all(self) -> None:
        for d in self.topo.directors:
            if d not in self.topo.running or not self.topo.director(d).alive():
                self.topo.start_director(d, *self.director_args())

    def stop_all(self) -> None:
        for d in list(self.topo.running):
            self.topo.kill(d, signal.SIGTERM)

    def owner(self, vip: str) -> str | None:
        return self.view.wire_owner(vip)

    def settle(self) -> None:
        """Block until the three directors hold a balanced placement, unchanged for a while."""
        self.view.wait_stable(self.topo.directors, self.hold, timeout=self.args.settle_timeout)


class Budget:
    """The run's time budget (``--budget-minutes``; 0: none): once spent, no new run starts, and
    the report says which runs were skipped."""

    def __init__(self, minutes: float) -> None:
        self.ends = time.monotonic() + minutes * 60 if minutes > 0 else math.inf
        self.skipped: list[str] = []

    def allows(self, what: str) -> bool:
        if time.monotonic() < self.ends:
            return True
        self.skipped.append(what)
        return False


LAPSE_LINE = "could not renew within the renew deadline"


def director_logs(topo: Any) -> list[str]:
    """The text of every director's log so far (missing ones: empty)."""
    texts = []
    for d in topo.directors:
        try:
            texts.append((topo.logdir / f"{d}.log").read_text(errors="replace"))
        except OSError:
            texts.append("")
    return texts


def lapses(topo: Any) -> int:
    """Owners that lapsed (could not renew, nor hear every peer acknowledge, within the renew
    deadline), counted over every director's log: lapses of owners that had no fault are what
    slow API round trips cost."""
    return sum(text.count(LAPSE_LINE) for text in director_logs(topo))


TOOK_OVER = re.compile(
    r"took over from \S+, silent for ([\d.]+) s when decided .*? side by side ([\d.]+) s .*?"
    r"claim write ([\d.]+) s, address and announcement ([\d.]+) s"
)


def takeovers(topo: Any) -> list[dict[str, float]]:
    """Every takeover the directors logged so far, in steps: the silence waited out when the new
    owner decided, then its own work (read and probe, claim write, address and announcement)."""
    found = []
    for text in director_logs(topo):
        for m in TOOK_OVER.finditer(text):
            silent, probe, write, hold = map(float, m.groups())
            found.append({"silent_s": silent, "after_decision_s": probe + write + hold})
    return found


def kubelvs_phase(
    bed: Bed,
    kb: KubelvsBed,
    args: argparse.Namespace,
    profile: str,
    budget: Budget,
    checkpoint: Callable[[dict[str, Any]], None] = lambda out: None,
) -> dict[str, Any]:
    """One profile's runs: first an idle window (lapses with no fault), then link-down and
    SIGKILL (the comparison with keepalived), then the other faults, then split brain if this is
    ``--split-brain-profile``; ``checkpoint`` gets the figures so far after every run, so that a
    run cut short (hours at the full counts) still reports."""
    vip = bed.vips[0]
    kb.timings = shlex.split(args.default_timings if profile == "default" else args.tuned_timings)
    lease = flag_value(kb.timings, "--lease-duration", 3.0)
    kb.hold = max(3.0, 2 * lease + 1)  # past the handover delay (default: the lease duration)
    kb.start_all()
    result: dict[str, Any] = {"director_flags": kb.director_args()}
    try:
        kb.settle()
    except AssertionError as exc:
        result["error"] = f"the directors never settled after their start: {exc}"
        print(f"kubelvs {profile}: {result['error']}", flush=True)
        kb.stop_all()
        return result
    if args.idle_seconds:
        before = lapses(kb.topo)
        time.sleep(args.idle_seconds)
        result["idle"] = {"seconds": args.idle_seconds, "directors": 3, "lapses": lapses(kb.topo) - before}
        print(f"kubelvs {profile} idle: {result['idle']}", flush=True)
    plan: list[tuple[str, int, str]] = [
        # As keepalived's: a SIGKILLed owner's kernel keeps forwarding (until its claim address's
        # lifetime ends), so service does not stop; the failover is the other director's answer.
        ("link_down", args.runs, "service_s"),
        ("sigkill", args.runs, "takeover_s"),
        ("sigstop", args.other_runs, "service_s"),
        ("api_partition", args.other_runs, "outage_s"),
        ("api_down", args.other_runs, "outage_s"),
    ]
    with bed.connect_prober(vip) as probe:
        for fault, count, metric in plan:
            runs: list[dict[str, Any]] = []
            before = lapses(kb.topo)
            logged = len(takeovers(kb.topo))
            for i in range(count):
                if not budget.allows(f"kubelvs {profile} {fault} {i}"):
                    break
                runs.append(kubelvs_run(kb, probe, fault, lease))
                print(f"kubelvs {profile} {fault} {i}: {_brief(runs[-1])}", flush=True)
                result[fault] = faults_summary(runs, metric)
                result[fault]["lapses"] = lapses(kb.topo) - before
                steps = takeovers(kb.topo)[logged:]
                result[fault]["decision_to_announcement_s"] = summary([t["after_decision_s"] for t in steps])
                result[fault]["silence_at_decision_s"] = summary([t["silent_s"] for t in steps])
                checkpoint(result)
        if profile == args.split_brain_profile:
            result["split_brain"] = {}
            for fault, count in (("api_partition", args.partition_runs), ("sigstop", args.freeze_runs)):
                runs = []
                for i in range(count):
                    if not budget.allows(f"kubelvs {profile} split brain {fault} {i}"):
                        break
                    runs.append(kubelvs_run(kb, probe, fault, lease))
                    result["split_brain"][fault] = {
                        "runs": len(runs),
                        "split_brain_runs": sum(1 for r in runs if r.get("overlaps")),
                        "errors": sum(1 for r in runs if r.get("error")),
                        "details": [r for r in runs if r.get("overlaps") or r.get("error")],
                    }
                    checkpoint(result)
                if runs:
                    found = result["split_brain"][fault]["split_brain_runs"]
                    print(f"kubelvs split brain {fault}: {found}/{len(runs)}", flush=True)
    kb.stop_all()
    return result


def kubelvs_run(kb: KubelvsBed, probe: Any, fault: str, lease: float) -> dict[str, Any]:
    topo, bed, vip = kb.topo, kb.bed, kb.bed.vips[0]
    owner = wait("the owner of VIP 0", lambda: kb.owner(vip), timeout=120)

    def do_fault() -> float:
        if fault == "link_down":
            return topo.link_down(owner)
        t = time.monotonic()
        if fault == "sigkill":
            topo.kill(owner, signal.SIGKILL, wait=False)
        elif fault == "sigstop":
            topo.stop(owner)
        elif fault == "api_partition":
            topo.cut_api(owner)
        elif fault == "api_down":
            topo.api_down()
        return t

    def heal() -> None:
        if fault == "link_down":
            topo.link_up(owner)
        elif fault == "sigkill":
            topo.director(owner).proc.wait(timeout=30)  # type: ignore[union-attr]
            topo.start_director(owner, *kb.director_args())
        elif fault == "sigstop":
            topo.cont(owner)
        elif fault == "api_partition":
            topo.heal_api(owner)
        elif fault == "api_down":
            topo.api_up()

    # An owner cut from the API (alone or with everyone) may keep the VIP through its peers:
    # watch for a lease duration and then some, instead of waiting for a takeover.
    observe = 2 * lease + 1 if fault in ("api_partition", "api_down") else None
    return measure(bed, probe, vip, owner, do_fault, heal, kb.settle, takeover_timeout=10 * lease + 60, observe=observe)


def api_writes_phase(kb: KubelvsBed, args: argparse.Namespace) -> dict[str, Any]:
    """API writes per second with ``--bulk`` VIPs: steady state, then a director killed."""
    from kubernetes import client

    topo = kb.topo
    core = client.CoreV1Api(kb.cluster.api)
    kb.timings = shlex.split(args.default_timings)
    kb.extra = shlex.split(args.bulk_director_args)  # the bulk VIPs are outside the bridge subnet
    kb.start_all()
    for d in topo.directors:
        core.patch_node(topo.node_name(d), {"metadata": {"labels": {BULK_LABEL: "true"}}})

    coordination = client.CoordinationV1Api(kb.cluster.api)
    by_node = {topo.node_name(d): d for d in topo.directors}

    def owned() -> dict[str, str]:
        """Bulk VIP -> the director its claim Lease names (one list of the claims: the directors'
        metrics take too long to scrape with a thousand VIPs under emulation)."""
        out: dict[str, str] = {}
        with contextlib.suppress(Exception):
            claims = coordination.list_namespaced_lease(
                kb.cluster.namespace, label_selector="kubelvs.io/lease=vip", _request_timeout=120
            )
            for lease in claims.items:
                vip = (lease.metadata.annotations or {}).get("kubelvs.io/vip", "")
                holder = by_node.get(lease.spec.holder_identity or "")
                if holder and vip.startswith("10.78."):
                    out[vip] = holder
        return out

    def lease_writes() -> tuple[float, float]:
        """(now, the API server's count of Lease writes so far): every write the election makes,
        counted where it lands (kube-controller-manager's own leader Lease is in it too, about
        one write every 2 s)."""
        api = kb.cluster.api
        response = api.call_api("GET", api.configuration.host + "/metrics", _request_timeout=120)
        response.read()
        total = 0.0
        for line in response.data.decode().splitlines():
            if line.startswith("apiserver_request_total{") and 'resource="leases"' in line:
                verb = line.split('verb="', 1)[1].split('"', 1)[0]
                if verb in ("POST", "PUT", "PATCH", "DELETE"):
                    total += float(line.rsplit(" ", 1)[1])
        return time.monotonic(), total

    def rate(before: tuple[float, float], after: tuple[float, float]) -> float:
        return (after[1] - before[1]) / (after[0] - before[0])

    started = time.monotonic()
    result: dict[str, Any] = {"vips": args.bulk, "directors": 3, "window_s": args.window}
    # Every bulk VIP owned, by the same directors for 30 s on end (placement settled, no
    # handover under way): then start counting.
    stable_since: float | None = None
    last: dict[str, str] = {}
    report = 0.0
    while True:
        now_owned = owned()
        now = time.monotonic()
        if len(now_owned) < args.bulk or now_owned != last:
            stable_since = None if len(now_owned) < args.bulk else now
        elif stable_since is not None and now - stable_since >= 30:
            break
        last = now_owned
        if now - report > 30:
            report = now
            counts = {d: sum(1 for h in now_owned.values() if h == d) for d in topo.directors}
            print(f"bulk: {len(now_owned)}/{args.bulk} VIPs owned after {now - started:.0f}s: {counts}", flush=True)
        if now - started > 900:
            result["error"] = f"placement of {len(now_owned)} of {args.bulk} bulk VIPs not stable after 900 s"
            break
        time.sleep(2)
    result["startup_s"] = time.monotonic() - started
    result["placement"] = {d: sum(1 for h in last.values() if h == d) for d in topo.directors}
    before_api = lease_writes()
    time.sleep(args.window)
    result["steady_per_s"] = rate(before_api, lease_writes())
    # The victim: the director holding the most bulk VIPs.
    victim = max(topo.directors, key=lambda d: result["placement"][d])
    before_api = lease_writes()
    topo.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    time.sleep(args.window)
    result["failover_per_s"] = rate(before_api, lease_writes())
    result["failover_victim"] = victim
    moved = owned()
    result["after_failover"] = {d: sum(1 for h in moved.values() if h == d) for d in topo.directors}
    # Then until no claim names the victim: the time to take every one of its VIPs over.
    victims = result["placement"][victim]
    while victim in moved.values() and time.monotonic() - killed < args.takeover_timeout:
        time.sleep(2)
        moved = owned()
        left = sum(1 for h in moved.values() if h == victim)
        print(f"bulk: {left} of {victims} VIPs still name {victim} after {time.monotonic() - killed:.0f}s", flush=True)
    if victim not in moved.values():
        result["all_taken_over_s"] = time.monotonic() - killed
    else:
        result["not_taken_over"] = sum(1 for h in moved.values() if h == victim)
        result["takeover_timeout_s"] = args.takeover_timeout
    kb.stop_all()
    for d in topo.directors:
        core.patch_node(topo.node_name(d), {"metadata": {"labels": {BULK_LABEL: None}}})
    kb.extra = []
    return result


def remove_bulk(kb: KubelvsBed) -> None:
    """Delete the bulk VirtualServers and every claim Lease (the directors are stopped: the
    next ones claim the three VIPs afresh)."""
    from kubernetes import client

    custom = client.CustomObjectsApi(kb.cluster.api)
    custom.delete_collection_namespaced_custom_object("kubelvs.io", "v1alpha1", BULK_NAMESPACE, "virtualservers")
    client.CoordinationV1Api(kb.cluster.api).delete_collection_namespaced_lease(
        kb.cluster.namespace, label_selector="kubelvs.io/lease=vip"
    )
    left = wait(
        "the bulk VirtualServers gone",
        lambda: (
            not custom.list_namespaced_custom_object(
                "kubelvs.io", "v1alpha1", BULK_NAMESPACE, "virtualservers", limit=1
            )["items"]
        ),
        timeout=120,
        interval=1.0,
    )
    print(f"bulk VirtualServers and claims removed ({left})", flush=True)


# --------------------------------------------------------------------------- main of the VM half


def ratios(ka: dict[str, Any], kl: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for profile in ("default", "tuned"):
        if profile not in ka or profile not in kl:
            continue
        for fault in ("link_down", "sigkill"):
            k, r = kl[profile].get(fault, {}), ka[profile].get(fault, {})
            for stat in ("p50", "p99"):
                a, b = k.get("failover_s", {}).get(stat), r.get("failover_s", {}).get(stat)
                if a is not None and b:
                    out[f"{profile}_{fault}_{stat}"] = a / b
    return out


def vm(args: argparse.Namespace) -> int:
    from ha_topology import output_dir

    logdir = output_dir(f"ha-bench-{time.strftime('%Y%m%d-%H%M%S')}")
    report: dict[str, Any] = {
        "environment": "VM: qemu TCG, 2 vCPUs; directors in network namespaces, API server on the host",
        "logs": str(logdir),
        "runs": args.runs,
    }
    bed = Bed(args, logdir)

    def write(partial: bool) -> None:
        """The report so far (``partial``: the run is still going, or was cut short)."""
        if "keepalived" in report and "kubelvs" in report:
            report["ratios"] = ratios(report["keepalived"], report["kubelvs"])
        frames, drops = bed.capture.stats()
        report["capture"] = {"frames": frames, "drops": drops}
        report["partial"] = partial
        out = Path(args.out)
        staged = out.with_suffix(".tmp")
        staged.write_text(json.dumps({"ha": report}, indent=2) + "\n")
        staged.replace(out)  # whole or not at all: the run may be cut off at any moment

    budget = Budget(args.budget_minutes)
    kb: KubelvsBed | None = None
    try:
        if args.only in ("all", "kubelvs"):
            if not args.kubeconfig:
                raise SystemExit("the kubelvs part needs --kubeconfig (the host half passes it)")
            kb = KubelvsBed(bed, args)
        if kb is not None and args.bulk and budget.allows("api writes"):
            # First, while the host's bulk VirtualServers exist; then they go, so that the fault
            # runs measure three VIPs, not directors still digesting a thousand others.
            try:
                report.setdefault("kubelvs", {})["api_writes"] = api_writes_phase(kb, args)
            except Exception as error:  # recorded, and the fault runs still come
                report.setdefault("kubelvs", {})["api_writes"] = {"error": repr(error)}
                print(f"api writes phase: {error!r}", flush=True)
                kb.stop_all()
            write(partial=True)
        if kb is not None:
            remove_bulk(kb)
        # Profile by profile, keepalived beside kubelvs: a run cut short by the budget still
        # has each profile it reached complete on both sides.
        for profile in args.profiles:
            if args.only in ("all", "keepalived") and budget.allows(f"keepalived {profile}"):
                report.setdefault("keepalived", {}).update(keepalived_phase(bed, args, logdir, [profile]))
                write(partial=True)
            if kb is not None and budget.allows(f"kubelvs {profile}"):
                figures = report.setdefault("kubelvs", {})

                def checkpoint(
                    result: dict[str, Any], profile: str = profile, figures: dict[str, Any] = figures
                ) -> None:
                    figures[profile] = result
                    if "split_brain" in result:
                        figures["split_brain"] = {"profile": profile, **result["split_brain"]}
                    write(partial=True)

                checkpoint(kubelvs_phase(bed, kb, args, profile, budget, checkpoint))
                figures[profile].pop("split_brain", None)
        if budget.skipped:
            report["skipped_over_budget"] = budget.skipped
        write(partial=bool(budget.skipped))
    finally:
        if kb is not None:
            kb.stop_all()
            with contextlib.suppress(Exception):
                kb.cluster.close()
        bed.close()
    print(json.dumps(_headline({"ha": report}), indent=2), flush=True)
    return 0


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("half", choices=["host", "vm"])
    p.add_argument("--out", required=True)
    p.add_argument("--kubeconfig", help="(vm half) the API server's kubeconfig as the VM sees it")
    p.add_argument("--timeout", type=int, default=14400, help="(host half) seconds for the VM run")
    p.add_argument("--only", choices=["all", "keepalived", "kubelvs"], default="all")
    p.add_argument("--profiles", nargs="+", default=["default", "tuned"], choices=["default", "tuned"])
    p.add_argument("--runs", type=int, default=20, help="link-down and SIGKILL runs per profile (>= 20)")
    p.add_argument("--other-runs", type=int, default=5, help="SIGSTOP / API partition / API down runs (>= 5)")
    p.add_argument("--partition-runs", type=int, default=100, help="API partitions counted for split brain")
    p.add_argument("--freeze-runs", type=int, default=20, help="freezes (SIGSTOP) counted for split brain")
    p.add_argument("--split-brain-profile", default="default", choices=["default", "tuned"])
    p.add_argument("--bulk", type=int, default=1000, help="VIPs for the API-writes phase (0: skip)")
    p.add_argument("--window", type=float, default=30.0, help="seconds of each API-writes window")
    p.add_argument(
        "--takeover-timeout", type=float, default=300.0, help="seconds for the bulk VIPs of a killed director to move"
    )
    p.add_argument("--default-timings", default=DEFAULT_TIMINGS, help="director flags of the default profile")
    p.add_argument("--tuned-timings", default=TUNED_TIMINGS, help="director flags of the tuned profile")
    p.add_argument(
        "--director-args", default=DIRECTOR_ARGS, help="flags for every director ({namespace}: the Leases' namespace)"
    )
    p.add_argument("--bulk-director-args", default="--announce-interface eth0", help="extra flags in the bulk phase")
    p.add_argument("--settle-timeout", type=float, default=180.0, help="seconds for a balanced placement after a run")
    p.add_argument(
        "--idle-seconds", type=float, default=60.0, help="seconds with no fault, counting lapses, per profile"
    )
    p.add_argument("--budget-minutes", type=float, default=0.0, help="start no run after this many minutes (0: none)")
    p.add_argument("--quick", action="store_true", help="3 runs, 2 others, 10 partitions, 5 freezes, 200 bulk VIPs")
    args, rest = p.parse_known_args(argv)
    if rest:
        p.error(f"unknown arguments: {rest}")
    if args.quick:
        args.runs, args.other_runs, args.partition_runs, args.freeze_runs = 3, 2, 10, 5
        args.bulk, args.window = min(args.bulk, 200), min(args.window, 10.0)
    # What the host half passes on to the VM half (--quick already applied).
    passthrough = ["--only", args.only, "--profiles", *args.profiles, "--split-brain-profile", args.split_brain_profile]
    for name in (
        "runs",
        "other_runs",
        "partition_runs",
        "freeze_runs",
        "bulk",
        "window",
        "takeover_timeout",
        "settle_timeout",
        "idle_seconds",
        "budget_minutes",
    ):
        passthrough += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    for name in ("default_timings", "tuned_timings", "director_args", "bulk_director_args"):
        passthrough.append(f"--{name.replace('_', '-')}={getattr(args, name)}")
    return args, passthrough


def main(argv: list[str] | None = None) -> int:
    args, passthrough = parse(argv)
    return host(args, passthrough) if args.half == "host" else vm(args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
