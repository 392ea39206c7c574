"""`kubelvs director`: watch the Kubernetes API, program this node's IPVS, report status.

The process wiring of the director role; each part owns one job:

- :mod:`~kubelvs.director.view`: the cluster as last seen, fed by the informers
  (:mod:`kubelvs.kube.informers`), and what the next sync covers;
- :mod:`~kubelvs.director.loop`: the sync loop (kernel I/O through :mod:`kubelvs.apply`), its
  outcomes and retry policy, liveness and readiness;
- :mod:`~kubelvs.director.status_loop`: status and Events (requests in :mod:`kubelvs.kube`);
- :mod:`~kubelvs.director.metrics`: ``/metrics``, ``/healthz``, ``/readyz``.

Every director is active: each programs its own node. When the API server is unreachable the
view stays as it was: the kernel is left alone (fail static) and the director catches up when
the watches resume. A background task that dies is logged and makes the pod unhealthy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import logging.handlers
import queue
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from kubelvs.apply import CachedReconciler, adopt
from kubelvs.core import election as el
from kubelvs.core import status as st
from kubelvs.core.model import Observed
from kubelvs.core.outcome import SyncOutcome, Verdict
from kubelvs.core.spec import ObjectRef
from kubelvs.core.syncd import DaemonState, SyncConfig, SyncConfigError, desired_daemons, validate
from kubelvs.director.election import Election, ElectionConfig, VipNet
from kubelvs.director.loop import KernelReconciler, KernelUnavailable, SyncLoop
from kubelvs.director.metrics import Metrics
from kubelvs.director.options import DirectorConfig, config_from
from kubelvs.director.stalls import StallWatch
from kubelvs.director.status_loop import StatusLoop, Writer
from kubelvs.director.view import ClusterView
from kubelvs.director.vipnet import KernelVipNet
from kubelvs.kernel.addresses import VipInterface
from kubelvs.kernel.claims import ArpGuard
from kubelvs.kernel.ipvs import IPVSClient
from kubelvs.kernel.syncdaemon import SyncDaemons, resolve_interface
from kubelvs.kernel.vipfilter import VipPortFilter
from kubelvs.kube import client as kube
from kubelvs.kube.informers import BACKOFF_SECONDS, Informer, cluster_informers
from kubelvs.kube.leases import LeaseClient, lease_informer
from kubelvs.kube.rest import KubeApi
from kubelvs.kube.status_writer import StatusWriter
from kubelvs.state.lock import StateLock
from kubelvs.state.ownership import CachedStore, OwnershipError

log = logging.getLogger("kubelvs.director")


def start_connection_sync(config: DirectorConfig, metrics: Metrics | None = None) -> bool:
    """The kernel's IPVS sync daemons (a master and a backup) and their sysctls as configured
    (:mod:`kubelvs.core.syncd`), or stopped when ``--no-sync-daemon``; True when done. A failure
    is logged as an error and leaves load balancing alone: only connections across a VIP move
    are at stake."""
    sync = SyncConfig(
        enabled=config.sync_daemon,
        sync_id=config.sync_id,
        refresh_seconds=config.sync_refresh_period,
    )
    try:
        if sync.enabled:
            interface = resolve_interface(
                config.netns, config.sync_interface, config.announce_interface, exclude=[config.interface]
            )
            sync = replace(sync, interface=interface)
            validate(sync)
        report = SyncDaemons(config.state_dir, config.netns).ensure(sync)
    except (SyncConfigError, OSError) as error:
        log.error("connection sync is not running: %s (established connections will not survive a VIP move)", error)
        return False
    running = {
        daemon.state for daemon in report.running if any(want.satisfied_by(daemon) for want in desired_daemons(sync))
    }
    if metrics is not None:
        for state in DaemonState:
            metrics.sync_daemons.labels(state.label).set(1 if state in running else 0)
    for daemon in report.plan.foreign:
        log.error("sync daemon %s was not started by kubelvs: left alone, and kubelvs's not started", daemon)
    if report.plan.changes or report.sysctls_changed:
        log.info(
            "connection sync: started %s, stopped %s, sysctls set %s",
            ", ".join(map(str, report.plan.start)) or "-",
            ", ".join(state.label for state in report.plan.stop) or "-",
            report.sysctls_changed or "-",
        )
    elif sync.enabled:
        log.info("connection sync: running as configured (%s)", ", ".join(map(str, report.plan.kept)))
    return True


class KernelSeam:
    """The real kernel behind the sync loop: the state directory's lock (held for the process's
    life), the ownership record, IPVS, the VIP interface and the VIP port filter; once, the
    connection-sync daemons."""

    def __init__(self, config: DirectorConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.lock: StateLock | None = None
        self.arp_guarded = False
        self.sync_started = False

    def __call__(self) -> CachedReconciler:
        config = self.config
        if self.lock is None:
            self.lock = StateLock(config.state_dir).acquire()  # StateLockedError: another kubelvs runs here
        store = CachedStore(config.state_dir, netns=config.netns)
        try:
            client = IPVSClient(netns=config.netns)
        except OSError as error:  # no ip_vs module, or a kernel built without IPVS
            raise KernelUnavailable(str(error)) from error
        if config.election and not self.arp_guarded:
            # Before any VIP is made local: only the owner's claim address may answer ARP.
            try:
                ArpGuard(config.state_dir, config.netns).ensure("all")
            except BaseException:
                client.close()
                raise
            self.arp_guarded = True
        if not self.sync_started:  # after the IPVS client: ip_vs is loaded, its sysctls exist
            self.sync_started = start_connection_sync(config, self.metrics)
        vips = VipInterface(config.interface, netns=config.netns)
        try:
            self.adopt_if_lost(client, vips, store)  # OwnershipError: an unreadable record
        except BaseException:
            client.close()  # retried every minute: no socket left behind each time
            raise
        port_filter = VipPortFilter(config.netns) if config.port_filter else None
        return CachedReconciler(client, store, vips, port_filter)

    @staticmethod
    def adopt_if_lost(client: IPVSClient, vips: VipInterface, store: CachedStore) -> None:
        """A lost record (a new /run, a changed --state-dir) while the interface still carries
        addresses with kubelvs's mark: rebuild it from them before the first sync, so that what
        this director made is not taken for foreign state. An unreadable record is not touched
        (``OwnershipError``: reported, and left for a person to look at)."""
        owned = store.load()
        if owned.services or owned.addresses or owned.has_pending:
            return
        with vips.session():
            if not vips.tagged():
                return
            adopted = adopt(client, vips, store)
        log.warning(
            "ownership record %s was missing: adopted %d VIPs and %d services marked as kubelvs's (%s)",
            store.path,
            len(adopted.addresses),
            len(adopted.services),
            ", ".join(adopted.addresses) or "-",
        )


def classify_error(error: BaseException) -> SyncOutcome | None:
    """Errors of the effect layers that no retry will fix soon."""
    if isinstance(error, OwnershipError):
        return SyncOutcome(Verdict.GIVE_UP, error.reason, str(error))
    return None


class Director:
    def __init__(
        self,
        config: DirectorConfig,
        metrics: Metrics | None = None,
        make_reconciler: Callable[[], KernelReconciler] | None = None,
        kernel_dump: Callable[[], Observed] | None = None,
        make_vipnet: Callable[[], VipNet] | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()  # the process-wide registry /metrics serves
        self.view = ClusterView(config.node_name, wake=self._wake)
        self.sync = SyncLoop(
            self.view,
            config,
            self.metrics,
            make_reconciler or KernelSeam(config, self.metrics),
            on_synced=self._synced,
            classify=classify_error,
        )
        self.kernel_dump = kernel_dump
        self.make_vipnet = make_vipnet or (
            lambda: KernelVipNet(config.state_dir, config.netns, config.announce_interface)
        )
        self.election: Election | None = None
        self.status: StatusLoop | None = None
        self.ready = asyncio.Event()
        self.tasks: list[asyncio.Task[Any]] = []
        self.fatal: str | None = None

    def _wake(self) -> None:
        self.sync.mark()

    def _synced(self, scope: Any) -> None:
        if self.status is not None:
            self.status.request(scope)
        if self.election is not None:
            self.election.on_synced(scope)  # VIPs may have come, gone, or failed to program

    # --- health ----------------------------------------------------------------------------

    def alive(self) -> tuple[bool, str]:
        if self.fatal:
            return False, self.fatal
        return self.sync.alive()

    def ready_check(self) -> tuple[bool, str]:
        if self.fatal:
            return False, self.fatal
        if not self.ready.is_set():
            return False, "listing the cluster"
        return self.sync.health()

    def _watch_task(self, task: asyncio.Task[Any]) -> None:
        """A background task must never die unseen (a node without IPVS once ran 1/1 Running,
        silent, doing nothing)."""
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self.fatal = f"task {task.get_name()} failed: {type(error).__name__}: {error}"
            log.critical("%s", self.fatal, exc_info=error)

    def spawn(self, coroutine: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine, name=name)
        task.add_done_callback(self._watch_task)
        self.tasks.append(task)
        return task

    # --- start-up --------------------------------------------------------------------------

    async def list_and_watch(self, informers: list[Informer], stop: threading.Event) -> None:
        """List every kind once before the first sync (so a restart adopts the kernel as it is),
        then watch each from its listing's version. An API server that is away is waited for."""
        loop = asyncio.get_running_loop()

        def deliver(callback: Any, args: Any) -> None:  # from a watch thread to the event loop's
            loop.call_soon_threadsafe(callback, *args)

        for informer in informers:
            failures = 0
            while True:
                try:
                    items, version = await loop.run_in_executor(None, informer.list)
                    break
                except Exception as error:
                    delay = BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS) - 1)]
                    failures += 1
                    log.warning("listing %s failed (%s); retrying in %.1f s", informer.resource, error, delay)
                    self.metrics.api_errors.inc()
                    await asyncio.sleep(delay)
            for obj in items:
                informer.on_event("ADDED", obj)
            del items
            informer.start(version, deliver, stop)
        if not self.view.node_seen:
            log.warning(
                "Node %s not found: VirtualServers with a directors.nodeSelector are not served here",
                self.config.node_name,
            )
        if self.election is not None:
            self.election.listed = True  # the other directors and the claims are known now
            self.election.wake.set()
        self.view.mark(everything=True)
        self.ready.set()

    def serve_metrics(self) -> None:
        if not self.config.metrics_port:
            return
        address = self.config.metrics_address or self.view.node_address or "127.0.0.1"
        dump = self.kernel_dump
        if dump is None:
            holder: list[IPVSClient] = []
            scrape = threading.Lock()  # one IPVS socket, and scrapes come in threads of their own

            def dump() -> Observed:
                with scrape:
                    if not holder:
                        holder.append(IPVSClient(netns=self.config.netns))
                    try:
                        return holder[0].dump(with_counters=True)
                    except OSError:
                        holder.pop().close()
                        raise

        self.metrics.serve(
            address,
            self.config.metrics_port,
            self.alive,
            self.ready_check,
            lambda: self.sync.desired,
            dump,
            backends=self.config.backend_metrics,
        )
        log.info("metrics and health on %s:%d", address, self.config.metrics_port)

    def start_election(self, api: Any) -> Informer:
        """The per-VIP owner election; returns the informer of its Leases."""
        config = self.config
        timings = el.Timings(config.lease_duration, config.renew_deadline, config.retry_period, config.handover_delay)
        # A connection pool of its own (same configuration): a renewal must not wait for a
        # connection behind the watches and a burst of status writes.
        leases = LeaseClient(
            KubeApi(api.configuration),
            config.lease_namespace,
            min(config.api_timeout_seconds, config.renew_deadline),  # a renewal later than that is useless
            on_write=lambda kind: self.metrics.election_writes.labels(kind).inc(),
        )

        def post_event(ref: ObjectRef, kind: str, reason: str, message: str) -> None:
            vs = self.view.virtual_servers.get(ref)
            if vs is not None and self.status is not None:  # the status loop comes next, before any run
                event = st.event(vs, kind, reason, message, config.node_name, st.now_rfc3339())
                self.status.events.post(ref.namespace, event)

        self.election = Election(
            ElectionConfig(
                node=config.node_name,
                timings=timings,
                announce_interface=config.announce_interface,
                announce_count=config.announce_count,
                announce_interval=config.announce_interval,
                announce_refresh=config.announce_refresh,
                peer_port=config.peer_port,
                peer_address=config.peer_address,
                follow_backends=config.follow_backends,
            ),
            leases,
            self.make_vipnet(),
            self.view,
            self.metrics,
            self.sync,
            post_event,
            on_owners_changed=lambda refs: self.status.request(refs) if self.status is not None else None,
        )
        self.view.on_nodes_changed = self.election.wake.set
        return lease_informer(
            api,
            config.lease_namespace,
            self.election.on_lease,
            self.election.on_leases_relisted,
            config.api_timeout_seconds,
            self.metrics.watch_restarted,
        )

    async def main(self, api: Any, writer: Writer, stop: asyncio.Event) -> None:
        watches_stop = threading.Event()
        informers = cluster_informers(api, self.view, self.metrics.watch_restarted, self.config.api_timeout_seconds)
        if self.config.election:
            informers.insert(0, self.start_election(api))
        self.status = StatusLoop(
            self.view,
            self.sync,
            writer,
            self.metrics,
            self.config.node_name,
            ownership=self.election,
            qps=self.config.status_qps,
        )
        try:
            if self.config.stall_report_seconds > 0:
                watch = StallWatch(self.config.stall_report_seconds, self.metrics.event_loop_lag)
                self.spawn(watch.run(), "stall-watch")
            self.spawn(self.sync.run(self.ready), "sync")
            self.spawn(self.status.run(), "status")
            if self.election is not None:
                self.spawn(self.election.run(), "election")
            if self.config.metrics_address:  # known now: health answers while the API is still away
                self.serve_metrics()
            lister = self.spawn(self.list_and_watch(informers, watches_stop), "list")
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({lister, stopping}, return_when=asyncio.FIRST_COMPLETED)  # SIGTERM while listing
            if not stop.is_set():
                if not self.config.metrics_address:  # the Node's address: known after the listing
                    self.serve_metrics()
                await stopping
            if self.election is not None and self.config.shutdown_handover_seconds > 0:
                await self.election.drain(self.config.shutdown_handover_seconds)
        finally:
            watches_stop.set()
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)


def log_through_a_thread(level: str) -> logging.handlers.QueueListener:
    """Log records are queued by the threads that make them and written by a thread of their
    own. Written by the event loop's thread, each line was a write that gave the GIL away, and
    getting it back behind the claim, status and watch threads took 10-30 ms under emulation: a
    director logging the takeover of 300 VIPs held its loop for seconds (seen by its stall watch).
    """
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    out = logging.StreamHandler()
    out.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    queued = logging.handlers.QueueHandler(records)
    queued.setFormatter(logging.Formatter("%(message)s"))  # the message (and traceback) only: `out` adds the rest
    logging.basicConfig(level=level, handlers=[queued])
    listener = logging.handlers.QueueListener(records, out)
    listener.start()
    return listener


def main(args: argparse.Namespace) -> int:
    listener = log_through_a_thread(getattr(args, "log_level", "INFO"))
    try:
        return _main(args)
    finally:
        listener.stop()  # what is queued is written before the process ends


def _main(args: argparse.Namespace) -> int:
    if not args.node_name:
        print("error: --node-name (or NODE_NAME) is required", file=sys.stderr)
        return 2
    config = config_from(args)
    kube.load_config()
    api = kube.new_api_client()

    async def run() -> None:
        director = Director(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await director.main(api, StatusWriter(api, config.api_timeout_seconds), stop)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0
