"""Long-lived flows through a VIP, to prove that established connections survive a director
change (runs inside the IPVS VM; used by tests/kernel/test_syncdaemon.py and test_ha_flows.py).

- :class:`EchoServers`: in each real server's namespace, a line echo on a TCP port and a
  datagram echo on the same UDP port, each answer prefixed with the server's name (so a flow
  that lands on another real server is seen). UDP is bound to the VIPs (on ``lo`` for DR), so
  the answers come from the VIP.
- :class:`Flows`: ``count`` TCP connections (or UDP sockets) from the client's namespace, each
  sending a numbered line every ``interval`` seconds and checking its echo, all in one thread.
  Each flow records its real server, its echoes, the longest gap between two echoes, and how it
  failed (reset, closed, a wrong echo, another real server).

Run as a script, this file is the echo server: ``flows.py serve --name rs1 --port 7 --ready F
[--udp-bind VIP ...]`` (standard library only: it starts in a fresh interpreter per namespace).
"""

from __future__ import annotations

import argparse
import contextlib
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


# =========================================================================== the server side


def _tcp_client(conn: socket.socket, prefix: bytes) -> None:
    with conn:
        buffer = b""
        while True:
            try:
                data = conn.recv(4096)
            except OSError:
                return
            if not data:
                return
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                try:
                    conn.sendall(prefix + line + b"\n")
                except OSError:
                    return


def serve(args: argparse.Namespace) -> int:
    prefix = f"{args.name} ".encode()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", args.port))
    listener.listen(512)
    udp = []
    for address in args.udp_bind:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, args.port))
        udp.append(sock)

    def udp_loop(sock: socket.socket) -> None:
        while True:
            data, peer = sock.recvfrom(4096)
            sock.sendto(prefix + data, peer)

    for sock in udp:
        threading.Thread(target=udp_loop, args=(sock,), daemon=True).start()
    Path(args.ready).write_text("ready\n")
    while True:
        conn, _peer = listener.accept()
        threading.Thread(target=_tcp_client, args=(conn, prefix), daemon=True).start()


class EchoServers:
    """:func:`serve` in each real server of ``topo`` (a tests/kernel Topology)."""

    def __init__(self, topo: Any, port: int, udp_vips: Sequence[str] = (), nodes: Sequence[str] | None = None) -> None:
        self.topo, self.port = topo, port
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        pending: dict[str, Path] = {}
        try:
            for node in nodes or topo.real_servers:
                ready = Path(topo.workdir) / f"echo-{node}-{port}.ready"
                ready.unlink(missing_ok=True)
                argv = ["ip", "netns", "exec", topo.ns(node), sys.executable, "-S", str(HERE), "serve"]
                argv += ["--name", node, "--port", str(port), "--ready", str(ready)]
                argv += [a for vip in udp_vips for a in ("--udp-bind", vip)]
                log = open(Path(topo.workdir) / f"echo-{node}-{port}.log", "wb")  # noqa: SIM115
                self.procs[node] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
                log.close()
                pending[node] = ready
            deadline = time.monotonic() + 90
            while pending:
                for node, ready in list(pending.items()):
                    if ready.exists():
                        del pending[node]
                    elif self.procs[node].poll() is not None:
                        log_text = (Path(topo.workdir) / f"echo-{node}-{port}.log").read_text(errors="replace")
                        raise RuntimeError(f"echo server in {node} exited: {log_text}")
                if pending and time.monotonic() > deadline:
                    raise RuntimeError(f"echo servers not ready after 90 s: {sorted(pending)}")
                time.sleep(0.1)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)
        self.procs.clear()

    def __enter__(self) -> EchoServers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# =========================================================================== the client side


@dataclass
class Flow:
    index: int
    opened: float = 0.0  # when the connection was established (monotonic)
    server: str = ""  # the real server of the first echo
    sent: int = 0
    echoed: int = 0
    last_echo: float = 0.0
    max_gap: float = 0.0  # the longest time between two echoes (or since the last one, while live)
    failure: str = ""  # "" while it works
    failed_at: float = 0.0
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (start, length) of gaps > 1 s

    @property
    def ok(self) -> bool:
        return not self.failure


class Flows:
    """``count`` flows from ``netns`` to ``host:port`` (``udp``: datagrams), one line every
    ``interval`` seconds each, in one thread; started by :meth:`start`, which returns once every
    flow is established and has had its first echo (or raises)."""

    def __init__(
        self,
        netns: str,
        host: str,
        port: int,
        count: int = 20,
        *,
        interval: float = 0.2,
        udp: bool = False,
        open_timeout: float = 30.0,
    ) -> None:
        self.netns, self.host, self.port, self.count = netns, host, port, count
        self.interval, self.udp, self.open_timeout = interval, udp, open_timeout
        self.flows = [Flow(i) for i in range(count)]
        self._socks: dict[socket.socket, Flow] = {}
        self._buffers: dict[int, bytes] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._opened = threading.Event()
        self.error: BaseException | None = None

    # ----------------------------------------------------------------- life
    def start(self) -> Flows:
        self._thread = threading.Thread(target=self._run, name=f"flows-{self.host}", daemon=True)
        self._thread.start()
        if not self._opened.wait(self.open_timeout + 5) or self.error is not None:
            self.stop()
            raise AssertionError(
                f"flows to {self.host}:{self.port} did not all open: {self.error!r}\n{self.describe()}"
            )
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for sock in list(self._socks):
            sock.close()
        self._socks.clear()

    def __enter__(self) -> Flows:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as error:
            self.error = error
            self._opened.set()

    def _open(self, sel: selectors.BaseSelector) -> None:
        from capture import enter_netns

        enter_netns(self.netns)  # this thread for good: its sockets live in the client namespace
        deadline = time.monotonic() + self.open_timeout
        for flow in self.flows:
            kind = socket.SOCK_DGRAM if self.udp else socket.SOCK_STREAM
            sock = socket.socket(socket.AF_INET, kind)
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock.connect((self.host, self.port))
            sock.setblocking(False)
            self._socks[sock] = flow
            self._buffers[flow.index] = b""
            sel.register(sock, selectors.EVENT_READ)
            flow.opened = time.monotonic()

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        self._open(sel)
        step = self.interval / max(1, self.count)
        start = time.monotonic()
        next_send = {flow.index: start + i * step for i, flow in enumerate(self.flows)}
        by_index = {flow.index: sock for sock, flow in self._socks.items()}
        while not self._stop.is_set():
            now = time.monotonic()
            for flow in self.flows:
                if flow.failure or now < next_send[flow.index]:
                    continue
                sock = by_index[flow.index]
                try:
                    sock.send(f"{flow.index} {flow.sent}\n".encode())
                except OSError as error:
                    self._fail(flow, f"send: {error}")
                    continue
                flow.sent += 1
                next_send[flow.index] += self.interval
                if next_send[flow.index] < now:
                    next_send[flow.index] = now + self.interval
            for key, _ in sel.select(timeout=min(0.05, step)):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                self._receive(sock, sel)
            if not self._opened.is_set() and all(f.echoed or f.failure for f in self.flows):
                self._opened.set()
            if not self._opened.is_set() and time.monotonic() - start > self.open_timeout:
                raise AssertionError("no first echo on every flow")

    def _receive(self, sock: socket.socket, sel: selectors.BaseSelector) -> None:
        flow = self._socks[sock]
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return self._fail(flow, "reset", sock, sel)
        except OSError as error:
            return self._fail(flow, f"recv: {error}", sock, sel)
        if not data and not self.udp:
            return self._fail(flow, "closed by the peer", sock, sel)
        lines = [data.rstrip(b"\n")] if self.udp else self._lines(flow, data)
        for line in lines:
            words = line.decode(errors="replace").split()
            if len(words) != 3 or words[1] != str(flow.index):
                return self._fail(flow, f"wrong echo {line!r}", sock, sel)
            if not flow.server:
                flow.server = words[0]
            elif words[0] != flow.server:
                return self._fail(flow, f"moved from {flow.server} to {words[0]}", sock, sel)
            now = time.monotonic()
            with self._lock:
                if flow.last_echo:
                    gap = now - flow.last_echo
                    flow.max_gap = max(flow.max_gap, gap)
                    if gap > 1.0:
                        flow.gaps.append((flow.last_echo, gap))
                flow.echoed += 1
                flow.last_echo = now
        return None

    def _lines(self, flow: Flow, data: bytes) -> list[bytes]:
        buffer = self._buffers[flow.index] + data
        *lines, rest = buffer.split(b"\n")
        self._buffers[flow.index] = rest
        return lines

    def _fail(
        self, flow: Flow, why: str, sock: socket.socket | None = None, sel: selectors.BaseSelector | None = None
    ) -> None:
        with self._lock:
            if not flow.failure:
                flow.failure, flow.failed_at = why, time.monotonic()
        if sock is not None and sel is not None:
            with contextlib.suppress(Exception):
                sel.unregister(sock)

    # ----------------------------------------------------------------- queries
    def snapshot(self) -> list[Flow]:
        """The flows now (a copy), with a live flow's current gap counted in its max_gap."""
        now = time.monotonic()
        with self._lock:
            out = []
            for flow in self.flows:
                copy = Flow(**{**flow.__dict__, "gaps": list(flow.gaps)})
                if not copy.failure and copy.last_echo:
                    copy.max_gap = max(copy.max_gap, now - copy.last_echo)
                out.append(copy)
            return out

    def echoes(self) -> int:
        with self._lock:
            return sum(flow.echoed for flow in self.flows)

    def all_echoed_since(self, t: float) -> bool:
        """Every live flow had an echo after ``t`` (monotonic)."""
        return all(flow.last_echo > t for flow in self.snapshot() if not flow.failure)

    def failed(self) -> list[Flow]:
        return [flow for flow in self.snapshot() if flow.failure]

    def client_ports(self) -> dict[int, int]:
        """flow index -> its local port (for finding it in a director's connection table)."""
        return {flow.index: sock.getsockname()[1] for sock, flow in self._socks.items()}

    def servers(self) -> dict[int, str]:
        return {flow.index: flow.server for flow in self.snapshot()}

    def describe(self, limit: int = 30) -> str:
        flows = self.snapshot()
        kind = "UDP" if self.udp else "TCP"
        lines = [
            f"{len(flows)} {kind} flows to {self.host}:{self.port}: {sum(f.ok for f in flows)} alive, "
            f"{sum(f.echoed for f in flows)} echoes, longest gap {max((f.max_gap for f in flows), default=0):.2f}s"
        ]
        for flow in flows[:limit]:
            state = f"FAILED {flow.failure} at {flow.failed_at:.2f}" if flow.failure else "ok"
            lines.append(
                f"  #{flow.index} via {flow.server or '?'}: sent {flow.sent}, echoed {flow.echoed}, "
                f"max gap {flow.max_gap:.2f}s, {state}"
                + (f", gaps {[(round(s, 2), round(g, 2)) for s, g in flow.gaps]}" if flow.gaps else "")
            )
        return "\n".join(lines)


def flow_virtual_server(cluster: Any, name: str, vip: str, port: int, addresses: Sequence[str]) -> None:
    """A VirtualServer for flows in ``cluster`` (a ha_topology.HACluster): TCP and UDP ``port``
    on ``vip``, DR to ``addresses``, ``rr`` (the scheduler that needs sync: the same flow on
    another director without its entry lands on any real server)."""
    spec = {
        "vip": vip,
        "ports": [{"name": "tcp", "port": port, "protocol": "TCP"}, {"name": "udp", "port": port, "protocol": "UDP"}],
        "scheduler": "rr",
        "forwarding": {"method": "DR"},
        "backends": {"addresses": [{"ip": a} for a in addresses]},
        "directors": {"nodeSelector": cluster.selector},
    }
    body = {"apiVersion": "kubelvs.io/v1alpha1", "kind": "VirtualServer", "metadata": {"name": name}, "spec": spec}
    cluster.custom.create_namespaced_custom_object("kubelvs.io", "v1alpha1", cluster.namespace, "virtualservers", body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("serve")
    server.add_argument("--name", required=True)
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--ready", required=True)
    server.add_argument("--udp-bind", action="append", default=[])
    args = parser.parse_args(argv)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
