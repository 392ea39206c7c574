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
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from kubelvs.apply import CachedReconciler
from kubelvs.core.model import Observed
from kubelvs.core.outcome import SyncOutcome, Verdict
from kubelvs.director.loop import KernelReconciler, SyncLoop
from kubelvs.director.metrics import Metrics
from kubelvs.director.options import DirectorConfig, config_from
from kubelvs.director.status_loop import StatusLoop, Writer
from kubelvs.director.view import ClusterView
from kubelvs.kernel.addresses import VipInterface
from kubelvs.kernel.ipvs import IPVSClient
from kubelvs.kube import client as kube
from kubelvs.kube.informers import BACKOFF_SECONDS, Informer, cluster_informers
from kubelvs.kube.status_writer import StatusWriter
from kubelvs.state.ownership import CachedStore

log = logging.getLogger("kubelvs.director")


def kernel_reconciler(config: DirectorConfig) -> CachedReconciler:
    """The real kernel: IPVS, the VIP interface, the ownership record (the default seam)."""
    return CachedReconciler(
        IPVSClient(netns=config.netns),
        CachedStore(config.state_dir),
        VipInterface(config.interface, netns=config.netns),
    )


def classify_error(error: BaseException) -> SyncOutcome | None:
    """Errors of the effect layers that no retry will fix soon."""
    if type(error).__name__ == "OwnershipError":
        return SyncOutcome(Verdict.GIVE_UP, "OwnershipRecordUnreadable", str(error))
    return None


class Director:
    def __init__(
        self,
        config: DirectorConfig,
        metrics: Metrics | None = None,
        make_reconciler: Callable[[], KernelReconciler] | None = None,
        kernel_dump: Callable[[], Observed] | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()  # the process-wide registry /metrics serves
        self.view = ClusterView(config.node_name, wake=self._wake)
        self.sync = SyncLoop(
            self.view,
            config,
            self.metrics,
            make_reconciler or (lambda: kernel_reconciler(config)),
            on_synced=self._synced,
            classify=classify_error,
        )
        self.kernel_dump = kernel_dump
        self.status: StatusLoop | None = None
        self.ready = asyncio.Event()
        self.tasks: list[asyncio.Task[Any]] = []
        self.fatal: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _wake(self) -> None:
        self.sync.mark()

    def _synced(self, scope: Any) -> None:
        if self.status is not None:
            self.status.request(scope)

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
        self.view.mark(everything=True)
        self.ready.set()

    def serve_metrics(self) -> None:
        if not self.config.metrics_port:
            return
        address = self.config.metrics_address or self.view.node_address or "127.0.0.1"
        dump = self.kernel_dump
        if dump is None:
            holder: list[IPVSClient] = []

            def dump() -> Observed:
                if not holder:
                    holder.append(IPVSClient(netns=self.config.netns))
                try:
                    return holder[0].dump(with_counters=True)
                except OSError:
                    holder.clear()
                    raise

        self.metrics.serve(
            address, self.config.metrics_port, self.alive, self.ready_check, lambda: self.sync.desired, dump
        )
        log.info("metrics and health on %s:%d", address, self.config.metrics_port)

    async def main(self, api: Any, writer: Writer, stop: asyncio.Event) -> None:
        watches_stop = threading.Event()
        self.status = StatusLoop(self.view, self.sync, writer, self.metrics, self.config.node_name)
        informers = cluster_informers(api, self.view, self.metrics.watch_restarted, self.config.api_timeout_seconds)
        try:
            self.spawn(self.sync.run(self.ready), "sync")
            self.spawn(self.status.run(), "status")
            lister = self.spawn(self.list_and_watch(informers, watches_stop), "list")
            await lister
            self.serve_metrics()
            await stop.wait()
        finally:
            watches_stop.set()
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
