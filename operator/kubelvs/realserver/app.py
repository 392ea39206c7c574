"""`kubelvs realserver`: prepare this node's DR and TUN backends to receive, and say when they can.

A DaemonSet with ``hostPID`` (to see every pod's network namespace) and ``hostNetwork`` (the
node's own namespace, for ``target: Node``). The informers (VirtualServers, Services, this node's
pods) feed a queue; one thread owns the view and syncs (:mod:`kubelvs.realserver.agent`) after
each burst of events, every ``--resync-seconds``, and every second while a target waits for
its namespace. ``--pod`` is the init-container mode: prepare the namespace the process runs in,
from the command line alone, and exit.
"""

from __future__ import annotations

import argparse
import errno
import logging
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

from kubelvs.core import receive as rc
from kubelvs.core.spec import SpecError, parse_virtual_server
from kubelvs.kernel.podnetns import NetnsFinder
from kubelvs.kernel.receive import converge
from kubelvs.kube import client as kube
from kubelvs.kube.informers import BACKOFF_SECONDS
from kubelvs.kube.pods import node_addresses, realserver_informers, set_receiver_ready
from kubelvs.realserver.agent import Agent, SyncReport
from kubelvs.realserver.options import RealServerConfig, config_from
from kubelvs.realserver.records import RecordStore

log = logging.getLogger("kubelvs.realserver")

TARGETS = Gauge("kubelvs_realserver_targets", "Namespaces on this node that receive DR/TUN traffic", ["state"])
CHANGES = Counter("kubelvs_realserver_changes_total", "Receive-side changes made (add, remove)", ["op"])
ERRORS = Counter("kubelvs_realserver_errors_total", "Failed namespace preparations and condition writes")
SYNCS = Histogram("kubelvs_realserver_sync_duration_seconds", "Duration of one sync of every target")
CONDITIONS = Counter(
    "kubelvs_realserver_condition_writes_total", "Writes of the kubelvs.io/receiver-ready pod condition", ["status"]
)
WATCH_RESTARTS = Counter("kubelvs_realserver_watch_restarts_total", "Watch restarts", ["resource", "reason"])


def _record_metrics(report: SyncReport, seconds: float) -> None:
    TARGETS.labels("prepared").set(report.prepared)
    TARGETS.labels("waiting").set(report.waiting)
    CHANGES.labels("add").inc(report.adds)
    CHANGES.labels("remove").inc(report.removals)
    ERRORS.inc(report.errors)
    SYNCS.observe(seconds)
    for status in report.condition_writes.values():
        CONDITIONS.labels(str(status).lower()).inc()


def serve(address: str, port: int, alive: Callable[[], tuple[bool, str]], ready: Callable[[], tuple[bool, str]]) -> Any:
    """/metrics, /healthz (the loop turns), /readyz (listed, and a recent sync)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, status, kind = generate_latest(REGISTRY), 200, CONTENT_TYPE_LATEST
            elif path in ("/healthz", "/readyz"):
                ok, why = (alive if path == "/healthz" else ready)()
                body, status, kind = f"{why}\n".encode(), 200 if ok else 503, "text/plain; charset=utf-8"
            else:
                body, status, kind = b"not found\n", 404, "text/plain; charset=utf-8"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # probes: no log line each
            pass

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in address else socket.AF_INET

    server = Server((address or "0.0.0.0", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


class Runner:
    """The agent's loop: events in, syncs out."""

    def __init__(self, config: RealServerConfig, agent: Agent) -> None:
        self.config = config
        self.agent = agent
        self.events: queue.Queue[tuple[Callable[..., None], Any]] = queue.Queue()
        self.stop = threading.Event()
        self.last_turn = time.monotonic()

    def deliver(self, callback: Callable[..., None], args: Any) -> None:
        self.events.put((callback, args))

    def alive(self) -> tuple[bool, str]:
        age = time.monotonic() - self.last_turn
        limit = 3 * self.config.resync_seconds + 30
        return (age < limit), f"loop turned {age:.0f} s ago"

    def ready(self) -> tuple[bool, str]:
        if not self.agent.synced_once() or not self.agent.last_sync:
            return False, "listing the cluster"
        age = time.monotonic() - self.agent.last_sync
        return age < 3 * self.config.resync_seconds, f"last sync {age:.0f} s ago"

    def run(self) -> None:
        next_sync = 0.0
        while not self.stop.is_set():
            self.last_turn = time.monotonic()
            timeout = max(0.0, next_sync - time.monotonic())
            try:
                callback, args = self.events.get(timeout=min(timeout, 1.0))
                callback(*args)
                while True:  # the whole burst, then one sync
                    callback, args = self.events.get(timeout=0.05)
                    callback(*args)
            except queue.Empty:
                pass
            else:
                next_sync = 0.0
            if time.monotonic() < next_sync or not self.agent.synced_once():
                continue
            started = time.monotonic()
            try:
                report = self.agent.sync()
            except Exception:  # a defect must not end the agent silently: logged, counted, retried
                log.exception("sync failed; retrying in %.0f s", self.config.retry_seconds)
                ERRORS.inc()
                next_sync = time.monotonic() + self.config.retry_seconds
                continue
            _record_metrics(report, time.monotonic() - started)
            waiting = report.waiting or report.errors
            next_sync = time.monotonic() + (self.config.retry_seconds if waiting else self.config.resync_seconds)


def run_agent(config: RealServerConfig) -> int:
    if not config.node_name:
        print("error: realserver: --node-name (or $NODE_NAME) is required", file=sys.stderr)
        return 2
    kube.load_config()
    api = kube.new_api_client()
    finder = NetnsFinder(config.proc)

    def write_condition(pod: Mapping[str, str], ready: bool, message: str) -> None:
        set_receiver_ready(api, pod, ready, message)

    agent = Agent(
        RecordStore(config.state_dir),
        finder,
        lambda netns, items, record, save: converge(netns, items, record, save, config.proc),
        write_condition,
        lambda: node_addresses(api, config.node_name),
        config.tunnel_path_mtu,
    )
    runner = Runner(config, agent)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: runner.stop.set())
    if config.metrics_port:
        serve(config.metrics_address, config.metrics_port, runner.alive, runner.ready)

    def restarted(resource: str, reason: str) -> None:
        WATCH_RESTARTS.labels(resource, reason).inc()

    informers = realserver_informers(api, agent, config.node_name, restarted, config.api_timeout_seconds)
    for informer in informers:
        threading.Thread(target=_list_then_watch, args=(informer, runner), daemon=True).start()
    log.info("realserver agent on node %s (state %s)", config.node_name, config.state_dir)
    runner.run()
    return 0


def _list_then_watch(informer: Any, runner: Runner) -> None:
    failures = 0
    while not runner.stop.is_set():
        try:
            items, version = informer.list()
            break
        except Exception as error:  # the API server is away: wait for it
            delay = BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS) - 1)]
            failures += 1
            log.warning("%s: list failed (%s); retrying in %.1f s", informer.resource, error, delay)
            runner.stop.wait(delay)
    else:
        return
    runner.deliver(informer.on_relist, (items,))
    informer.run(version, runner.deliver, runner.stop)


# --- init-container mode ---------------------------------------------------------------------


def pod_items(args: argparse.Namespace) -> frozenset[rc.Item]:
    """What the command line asks this pod to receive; SpecError names a bad option."""
    items: set[rc.Item] = set()
    for vip in args.vip:
        forwarding: dict[str, Any] = {"method": args.method}
        if args.method == "TUN":
            forwarding["tunnel"] = {"type": args.tunnel}
            if args.tunnel == "gue":
                forwarding["tunnel"]["port"] = args.tunnel_port
        spec = parse_virtual_server(
            {
                "metadata": {"name": "--pod", "namespace": "-"},
                "spec": {
                    "vip": vip,
                    "ports": [{"port": 1}],
                    "forwarding": forwarding,
                    "backends": {"serviceRef": {"name": "-"}},
                },
            }
        )
        items |= rc.receive_items(spec, args.tunnel_path_mtu)
    return frozenset(items)


def run_pod(args: argparse.Namespace) -> int:
    if not args.vip:
        print("error: realserver --pod: at least one --vip is required", file=sys.stderr)
        return 2
    try:
        items = pod_items(args)
    except SpecError as error:
        print(f"error: realserver --pod: {error.path.replace('spec.', '--')}: {error.message}", file=sys.stderr)
        return 2
    try:
        actions, ok = converge(None, items, {}, lambda record: None, args.proc)
    except OSError as error:
        if error.errno in (errno.EROFS, errno.EACCES) and getattr(error, "filename", None):
            name = str(error.filename).split("/sys/", 1)[-1].replace("/", ".")
            print(
                f"error: realserver --pod: cannot write {name} ({error.strerror}): a container's /proc/sys is "
                f"read-only; set it in the pod's securityContext.sysctls instead",
                file=sys.stderr,
            )
            return 1
        raise
    for action in actions:
        print(f"{action.op} {action.item}")
    if not ok:
        reasons = sorted(item.reason for item in items if isinstance(item, rc.Unsupported))
        why = "; ".join(reasons) or "the receive side is not complete"
        print(f"error: realserver --pod: {why}", file=sys.stderr)
        return 1
    return 0


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.pod:
        return run_pod(args)
    return run_agent(config_from(args))
