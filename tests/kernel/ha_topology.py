"""Several directors, each in its own network namespace and reaching the API server: the
high-availability test bed (runs inside the IPVS VM; used by tests/kernel/test_ha.py and
bench/ha_bench.py).

:class:`HATopology` is a :class:`topology.Topology` (one bridge ``br0`` in a switch namespace,
STP off, forward delay 0, multicast snooping off; one IPv4 /24 and one IPv6 /64) whose directors
are named ``dirA``, ``dirB``, ... and whose every port has a fixed MAC, ``02:77:<N>:00:00:<host>``
(so a capture names directors by MAC). Real servers get the VIPs on ``lo`` with
``arp_ignore=1``/``arp_announce=2`` (DR) and an HTTP server.

With ``api=True`` (the default inside the VM), the VM's root namespace gets a port on the bridge
(``.1``), IP forwarding and an nftables masquerade of the bridge subnet out of its NIC, and each
director namespace a host route ``10.0.2.2/32 via .1``: directors reach the API server on the
host through qemu's user networking (TESTBED §6), and the test process, in the root namespace,
reaches each director's metrics on its bridge address.

Faults: :meth:`kill`, :meth:`stop` / :meth:`cont`, :meth:`link_down` / :meth:`link_up`,
:meth:`cut_api` / :meth:`heal_api` (one director), :meth:`api_down` / :meth:`api_up` (all).

:class:`HACluster` creates what the directors serve in the API server: Nodes for the directors
and a worker, a Service whose pods have the real servers' addresses, VirtualServers.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import os
import re
import selectors
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from capture import Capture, Prober, enter_netns, in_netns
from pod_login import pod_login_env
from topology import Topology, TopologyError, _run

API_HOST = "10.0.2.2"  # the host's loopback as qemu user networking shows it
KUBELVS = str(Path(sys.executable).with_name("kubelvs"))
METRICS_PORT = 19345
DIRECTOR_LABEL = "kubelvs.io/director"


def wait_for(
    what: str,
    check: Callable[[], Any],
    timeout: float = 90.0,
    interval: float = 0.3,
    context: Callable[[], str] | None = None,
) -> Any:
    """Poll ``check`` until it returns something truthy (returned) or ``timeout`` passes; the
    failure says what was last seen (its value or exception) and ``context()`` (log tails...)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except Exception as error:  # the API may be briefly unavailable
            last = error
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    extra = ""
    if context is not None:
        try:
            extra = "\n" + context()
        except Exception as error:
            extra = f"\n(context failed: {error!r})"
    raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}; last seen: {last!r}{extra}")


def output_dir(name: str) -> Path:
    """A directory for logs the host should keep: next to the kernel suite's results (shared
    read-write with the host), else under the checkout's VM output directory, else /tmp."""
    results = os.environ.get("KUBELVS_VM_RESULTS")
    base = Path(results).parent if results else None
    if base is None and os.environ.get("KUBELVS_VMOUT"):
        base = Path(os.environ["KUBELVS_VMOUT"]) / "ha"
    if base is None:
        base = Path(os.environ.get("TMPDIR", "/tmp"))
    out = base / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def copy_output(pipe: IO[bytes], path: Path) -> None:
    """Append what comes out of ``pipe`` to ``path`` until it ends, in chunks as they come."""
    with pipe, open(path, "ab") as out:
        while chunk := os.read(pipe.fileno(), 1 << 16):
            out.write(chunk)
            out.flush()


@dataclass
class Director:
    name: str
    node: str
    log: Path
    state_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    args: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class HATopology(Topology):
    """Client, ``dirA``..``dir<X>``, ``rs1``..``rsK`` on one bridge, plus the path to the API.

    Logical names as in Topology ("client", "dirA", "rs1"); ``node_name("dirA")`` is the
    Kubernetes Node name ("dira").  ``logdir``: where director logs go (see output_dir).
    """

    _forwarding_users = 0

    def __init__(
        self,
        directors: int = 3,
        real_servers: int = 2,
        *,
        ports: Iterable[int] | None = (80,),
        index: int | None = None,
        api: bool | None = None,
        kubeconfig: str | None = None,
        logdir: Path | None = None,
        metrics_port: int = METRICS_PORT,
    ) -> None:
        self._ha_directors = directors
        self.api = os.environ.get("KUBELVS_IN_VM") == "1" if api is None else api
        self.kubeconfig = kubeconfig
        self.metrics_port = metrics_port
        self.root_if = ""
        self.nic = ""
        self._nft_tables: list[str] = []
        self._saved_forward: str | None = None
        self.running: dict[str, Director] = {}
        super().__init__(real_servers=real_servers, directors=directors, ports=(), udp_ports=(), index=index)
        self.logdir = logdir or output_dir(f"ha-{self.index}-{time.strftime('%H%M%S')}")
        try:
            if ports:
                self.start_servers(list(ports), [])
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- build
    def _build(self) -> None:
        # Rename the directors before the base class builds them (dir1 -> dirA, ...).
        self.directors = [f"dir{chr(ord('A') + i)}" for i in range(self._ha_directors)]
        self.nodes = [self.client, *self.directors, *self.real_servers]
        self._hosts = {self.client: 10}
        self._hosts.update({d: 2 + i for i, d in enumerate(self.directors)})
        self._hosts.update({r: 100 + i for i, r in enumerate(self.real_servers, start=1)})
        # New namespaces are new nodes: a state directory left by an earlier topology with the same
        # index (another test module in this VM) records other namespaces, and the director rightly
        # refuses it (OwnershipRecordOfOtherNamespace).
        shutil.rmtree(self.state_root, ignore_errors=True)
        super()._build()
        for node in self.nodes:
            self.exec(node, ["ip", "link", "set", "eth0", "address", self.mac(node)])
        if self.api:
            self._build_api_path()

    @property
    def state_root(self) -> Path:
        """Where this topology's directors keep their state directories (one per director, kept
        across restarts of the director, removed with the topology)."""
        return Path("/run/kubelvs-ha") / str(self.index)

    def mac(self, node: str) -> str:
        """The fixed MAC of ``node``'s eth0 ("root": the VM root namespace's bridge port)."""
        host = 1 if node == "root" else self._hosts[node]
        return f"02:77:{self.index:02x}:00:00:{host:02x}"

    def names_by_mac(self) -> dict[str, str]:
        names = {self.mac(n): n for n in self.nodes}
        names[f"02:77:{self.index:02x}:00:00:{self.PROBE_HOST:02x}"] = "prober"
        if self.api:
            names[self.mac("root")] = "root"
        return names

    PROBE_HOST = 9  # the prober's own identity: an address and MAC no node has

    def capture(self, vips: Iterable[str]) -> Capture:
        """A (not yet started) capture of the VIPs' ARP/NDP on every port of the bridge."""
        return Capture(self.ns("sw"), list(vips), names=self.names_by_mac())

    def prober(self, vips: Iterable[str], interval: float = 0.1) -> Prober:
        """A (not yet started) ARP/NS prober for the VIPs, sent from the client's port under an
        identity of its own (see capture.Prober)."""
        host = self.PROBE_HOST
        mac = f"02:77:{self.index:02x}:00:00:{host:02x}"
        ip4 = str(self.subnet4.network_address + host)
        return Prober(self.ns(self.client), "eth0", list(vips), mac, ip4, f"fd77:0:0:{self.index:x}::{host}", interval)

    @property
    def gateway4(self) -> str:
        return str(self.subnet4.network_address + 1)

    def _build_api_path(self) -> None:
        self.root_if = f"kha{self.index}"
        route = _run(["ip", "-o", "-4", "route", "get", API_HOST]).stdout
        match = re.search(r"\bdev (\S+)", route)
        if not match:
            raise TopologyError(f"no route to {API_HOST} in the VM's root namespace: {route!r}")
        self.nic = match.group(1)
        sw = self.ns("sw")
        script = [
            f"ip link add {self.root_if} address {self.mac('root')} type veth peer name root netns {sw}",
            f"ip -n {sw} link set root master br0",
            f"ip -n {sw} link set root up",
            f"ip addr add {self.gateway4}/24 dev {self.root_if}",
            f"ip link set {self.root_if} up",
        ]
        script += [f"ip -n {self.ns(d)} route add {API_HOST}/32 via {self.gateway4}" for d in self.directors]
        _run(["sh", "-ec", "\n".join(script)])
        if HATopology._forwarding_users == 0:
            self._saved_forward = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
        HATopology._forwarding_users += 1
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        table = f"kubelvs_ha{self.index}"
        self._nft(
            f"table ip {table} {{\n"
            f"  chain post {{ type nat hook postrouting priority srcnat; "
            f'ip saddr {self.subnet4} oifname "{self.nic}" masquerade; }}\n'
            f"}}\n"
        )
        self._nft_tables.append(f"ip {table}")

    def _nft(self, script: str, netns: str | None = None) -> None:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        _run([*prefix, "nft", "-f", "-"], input=script)

    def api_port(self) -> int:
        """The API server's port, from the kubeconfig's server URL."""
        if not self.kubeconfig:
            raise TopologyError("no kubeconfig given")
        text = Path(self.kubeconfig).read_text()
        match = re.search(r"server:\s*(\S+)", text)
        if not match:
            raise TopologyError(f"no server in {self.kubeconfig}")
        return urllib.parse.urlsplit(match.group(1)).port or 443

    def check_api(self, name: str, timeout: float = 10.0) -> float:
        """A TCP connect from ``name``'s namespace to the API server; its duration (raises)."""
        port = self.api_port()
        with in_netns(self.ns(name)):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            started = time.monotonic()
            sock.connect((API_HOST, port))
            return time.monotonic() - started
        finally:
            sock.close()

    # ----------------------------------------------------------------- directors
    @staticmethod
    def node_name(name: str) -> str:
        """The Kubernetes Node name of director ``name`` (Node names are lower case)."""
        return name.lower()

    def start_director(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``kubelvs director`` inside ``name``'s namespace (``ip netns exec`` execs it, so
        the Popen's pid is the director's), metrics on its bridge address, log appended to
        ``<logdir>/<name>.log``.  ``args``: extra flags, as given."""
        if name not in self.directors:
            raise KeyError(f"no director {name!r} ({', '.join(self.directors)})")
        old = self.running.get(name)
        if old is not None and old.alive():
            raise TopologyError(f"director {name} already runs (pid {old.pid})")
        state = self.state_root / name
        state.mkdir(parents=True, exist_ok=True)
        log = self.logdir / f"{name}.log"
        argv = [
            "ip",
            "netns",
            "exec",
            self.ns(name),
            KUBELVS,
            "director",
            "--node-name",
            self.node_name(name),
            "--state-dir",
            str(state),
            "--metrics-port",
            str(self.metrics_port),
            "--metrics-address",
            self.ip4(name),
            *args,
        ]
        # As in a pod: a ServiceAccount's token (pod_login), not the admin kubeconfig.
        login = pod_login_env(self.kubeconfig) if self.kubeconfig else {}
        full_env = {**os.environ, **login, **(env or {})}
        with open(log, "ab") as f:
            f.write(f"\n===== {time.strftime('%H:%M:%S')} start: {shlex.join(argv)}\n".encode())
        # Through a pipe, copied to the log by a thread of ours in chunks, as a pod logs to a pipe:
        # the log is on the VM's 9p share, where a write costs 50-200 ms under emulation, and the
        # director writes a line at a time. (Its stalls while logging a takeover of 300 VIPs were
        # not this: they stayed with the pipe, until a thread of its own wrote its log.)
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env
        )
        assert proc.stdout is not None
        threading.Thread(target=copy_output, args=(proc.stdout, log), name=f"log-{name}", daemon=True).start()
        self.running[name] = Director(name, self.node_name(name), log, state, proc, list(args))
        return proc

    def director(self, name: str) -> Director:
        return self.running[name]

    def live_directors(self) -> list[str]:
        return [n for n, d in self.running.items() if d.alive()]

    def kill(self, name: str, sig: int = signal.SIGKILL, wait: bool = True) -> None:
        """Send ``sig`` to ``name``'s director (a frozen one gets SIGCONT after a SIGTERM/KILL)."""
        d = self.running.get(name)
        if d is None or not d.alive():
            return
        assert d.proc is not None
        d.proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            with contextlib.suppress(ProcessLookupError):
                d.proc.send_signal(signal.SIGCONT)
            if wait:
                try:
                    d.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    d.proc.kill()
                    d.proc.wait(timeout=30)

    def stop(self, name: str) -> None:
        self.kill(name, signal.SIGSTOP)

    def cont(self, name: str) -> None:
        self.kill(name, signal.SIGCONT)

    def ipvs_connections(self, director: str, client: str) -> set[tuple[str, int]]:
        """(protocol, client port) of ``client``'s live connections (TCP established, UDP) in
        ``director``'s IPVS table."""
        found = set()
        for line in self.exec(director, ["ipvsadm", "-Lnc"]).stdout.splitlines():
            words = line.split()
            live = len(words) == 6 and (words[0] == "UDP" or (words[0] == "TCP" and words[2] == "ESTABLISHED"))
            if live and words[3].startswith(f"{client}:"):
                found.add((words[0], int(words[3].rsplit(":", 1)[1])))
        return found

    def director_log(self, name: str, tail: int = 4000) -> str:
        d = self.running.get(name)
        path = d.log if d is not None else self.logdir / f"{name}.log"
        try:
            return path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def logs(self, tail: int = 1500, names: Sequence[str] | None = None) -> str:
        """The tail of every director's log, for failure messages."""
        out = []
        for name in names or list(self.running):
            d = self.running[name]
            state = "running" if d.alive() else f"exited {d.proc.returncode if d.proc else '-'}"
            out.append(f"----- {name} ({state}, {d.log}) -----\n{self.director_log(name, tail)}")
        return "\n".join(out)

    # ----------------------------------------------------------------- faults
    def link_down(self, name: str) -> float:
        """Take ``name``'s link down: its bridge port goes down, so its eth0 loses carrier (as a
        pulled cable or a dead switch port; unlike ``ip link set eth0 down`` inside, it keeps
        its addresses and routes).  Done over rtnetlink, no process started; returns the
        monotonic time at which the kernel acknowledged it."""
        return _set_link(self.ns("sw"), name, up=False)

    def link_up(self, name: str) -> float:
        return _set_link(self.ns("sw"), name, up=True)

    def cut_api(self, name: str) -> None:
        """Drop everything ``name``'s namespace sends to the API server (its link and peers stay)."""
        self._nft(
            "table inet kubelvs_ha_cut {\n"
            f"  chain out {{ type filter hook output priority 0; ip daddr {API_HOST} drop; }}\n"
            "}\n",
            self.ns(name),
        )

    def heal_api(self, name: str) -> None:
        _run(["ip", "netns", "exec", self.ns(name), "nft", "delete", "table", "inet", "kubelvs_ha_cut"], check=False)

    def api_down(self) -> None:
        """Cut every director from the API at once: the VM root namespace drops what it would
        forward to the API server (the test process itself, in the root namespace, still
        reaches it)."""
        if not self.api:
            raise TopologyError("api_down needs the API path (api=True)")
        table = f"kubelvs_ha{self.index}_down"
        self._nft(
            f"table ip {table} {{\n"
            f"  chain drop_api {{ type filter hook forward priority 0; ip daddr {API_HOST} drop; }}\n"
            f"}}\n"
        )

    def api_up(self) -> None:
        _run(["nft", "delete", "table", "ip", f"kubelvs_ha{self.index}_down"], check=False)

    def heal_all(self) -> None:
        """Undo every fault (not process deaths): links up, API reachable, frozen directors
        continued."""
        for name in self.directors:
            with contextlib.suppress(Exception):
                self.link_up(name)
            self.heal_api(name)
            d = self.running.get(name)
            if d is not None and d.alive():
                self.cont(name)
        if self.api:
            self.api_up()

    # ----------------------------------------------------------------- metrics
    def metrics(self, name: str, timeout: float = 5.0) -> str:
        url = f"http://{self.ip4(name)}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return str(resp.read().decode())

    # ----------------------------------------------------------------- teardown
    def close(self) -> None:
        for name in list(self.running):
            with contextlib.suppress(Exception):
                self.kill(name, signal.SIGKILL)
        for table in self._nft_tables:
            _run(["nft", "delete", "table", *table.split()], check=False)
        self._nft_tables.clear()
        if self.root_if:
            _run(["nft", "delete", "table", "ip", f"kubelvs_ha{self.index}_down"], check=False)
            _run(["ip", "link", "del", self.root_if], check=False)
            self.root_if = ""
            HATopology._forwarding_users -= 1
            if HATopology._forwarding_users == 0 and self._saved_forward is not None:
                Path("/proc/sys/net/ipv4/ip_forward").write_text(self._saved_forward + "\n")
        shutil.rmtree(self.state_root, ignore_errors=True)
        super().close()

    def __enter__(self) -> HATopology:
        return self


# =========================================================================== rtnetlink

RTM_NEWLINK = 16
NLM_F_REQUEST = 1
NLM_F_ACK = 4
IFF_UP = 1


def _set_link(netns: str, ifname: str, up: bool) -> float:
    """``ip link set IFNAME up|down`` in ``netns`` as one rtnetlink request (no fork+exec, which
    costs tens of milliseconds under emulation); the time of the kernel's acknowledgement."""
    with in_netns(netns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        index = socket.if_nametoindex(ifname)
    try:
        ifinfo = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, IFF_UP)
        header = struct.pack("=IHHII", 16 + len(ifinfo), RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, 1, 0)
        sock.sendto(header + ifinfo, (0, 0))
        reply = sock.recv(4096)
        done = time.monotonic()
        _length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", reply)
        if kind == 2:  # NLMSG_ERROR: error 0 is the acknowledgement
            (error,) = struct.unpack_from("=i", reply, 16)
            if error:
                raise OSError(-error, f"link {ifname} {'up' if up else 'down'} in {netns}: {os.strerror(-error)}")
        return done
    finally:
        sock.close()


# =========================================================================== traffic


@dataclass(frozen=True, slots=True)
class Attempt:
    started: float
    finished: float
    ok: bool
    answer: str  # the HTTP body (a real server's name), "" for a bare connect, or the error


class ConnectProber:
    """From ``netns`` (the client), every ``interval`` seconds a new TCP connection to
    ``host:port`` (an HTTP GET of ``path`` when given, else just the connect), each given
    ``timeout`` seconds; many in flight at once, in one thread, so a dead VIP does not slow
    the probing down.  Records every attempt."""

    def __init__(
        self,
        netns: str,
        host: str,
        port: int = 80,
        *,
        interval: float = 0.05,
        timeout: float = 1.0,
        path: str | None = "/",
    ) -> None:
        self.netns, self.host, self.port = netns, host, port
        self.interval, self.timeout, self.path = interval, timeout, path
        self.attempts: list[Attempt] = []  # in the order they finished
        self._finished: list[float] = []  # their finish times (non-decreasing): for bisect
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> ConnectProber:
        self._thread = threading.Thread(target=self._run, name=f"connect-{self.host}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> ConnectProber:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            self.error = exc

    def _loop(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        request = f"GET {self.path} HTTP/1.0\r\nHost: {self.host}\r\n\r\n".encode() if self.path else b""
        sel = selectors.DefaultSelector()
        # state per socket: [started, phase, buffer]
        live: dict[socket.socket, list[Any]] = {}
        next_at = time.monotonic()
        enter_netns(self.netns)  # this thread lives in the client namespace; its sockets too

        def finish(sock: socket.socket, ok: bool, answer: str) -> None:
            started = live.pop(sock)[0]
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(sock)
            sock.close()
            with self._lock:
                finished = time.monotonic()
                self.attempts.append(Attempt(started, finished, ok, answer))
                self._finished.append(finished)

        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_at:
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                err = sock.connect_ex((self.host, self.port))
                live[sock] = [now, "connect", b""]
                if err not in (0, 115):  # EINPROGRESS
                    finish(sock, False, f"connect errno {err}")
                else:
                    sel.register(sock, selectors.EVENT_WRITE)
                next_at += self.interval
                if next_at < now:
                    next_at = now + self.interval
            for key, _ in sel.select(timeout=max(0.0, min(next_at - time.monotonic(), 0.05))):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                state = live.get(sock)
                if state is None:
                    continue
                if state[1] == "connect":
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        finish(sock, False, f"connect errno {err}")
                    elif not request:
                        finish(sock, True, "")
                    else:
                        try:
                            sock.send(request)
                        except OSError as exc:
                            finish(sock, False, f"send: {exc}")
                            continue
                        state[1] = "read"
                        sel.modify(sock, selectors.EVENT_READ)
                else:
                    try:
                        chunk = sock.recv(4096)
                    except OSError as exc:
                        finish(sock, False, f"recv: {exc}")
                        continue
                    if chunk:
                        state[2] += chunk
                        continue
                    head, _, body = bytes(state[2]).partition(b"\r\n\r\n")
                    if b" 200 " in head.split(b"\r\n", 1)[0] + b" ":
                        finish(sock, True, body.decode(errors="replace").strip())
                    else:
                        finish(sock, False, f"bad response {head[:40]!r}")
            now = time.monotonic()
            for sock, state in list(live.items()):
                if now - state[0] > self.timeout:
                    finish(sock, False, "timeout")
        for sock in list(live):
            finish(sock, False, "stopped")

    # ----------------------------------------------------------------- queries
    def results(self, since: float = float("-inf"), finished_after: float | None = None) -> list[Attempt]:
        """Attempts started at or after ``since`` (and finished at or after ``finished_after``),
        found by bisection: a long benchmark piles up hundreds of thousands."""
        low = since if finished_after is None else max(since, finished_after)
        with self._lock:
            start = bisect.bisect_left(self._finished, low) if low > float("-inf") else 0
            out = [a for a in self.attempts[start:] if a.started >= since]
        return out if finished_after is None else [a for a in out if a.finished >= finished_after]

    def first_success_after(self, t: float) -> Attempt | None:
        """The first attempt started at or after ``t`` that succeeded."""
        ok = [a for a in self.results(t) if a.ok]
        return min(ok, key=lambda a: a.started) if ok else None

    def outage(self, since: float, until: float | None = None) -> float:
        """The longest time without a successful attempt completing, from ``since`` on."""
        until = time.monotonic() if until is None else until
        done = sorted(a.finished for a in self.results(finished_after=since) if a.ok and a.finished <= until)
        edges = [since, *done, until]
        return max(b - a for a, b in itertools.pairwise(edges))

    def describe(self, since: float = float("-inf"), limit: int = 12) -> str:
        rs = self.results(since)
        ok = sum(a.ok for a in rs)
        lines = [f"{len(rs)} attempts to {self.host}:{self.port} since {since:.3f}, {ok} ok"]
        lines += [
            f"  {a.started:.3f}+{a.finished - a.started:.3f}s {'ok' if a.ok else 'FAIL'} {a.answer}"
            for a in rs[-limit:]
        ]
        return "\n".join(lines)


# =========================================================================== the cluster side


class HACluster:
    """The API objects the HA directors serve, in a namespace of their own (Leases too)."""

    def __init__(self, kubeconfig: str, prefix: str = "ha") -> None:
        import uuid

        from kubernetes import client, config

        self.api = config.new_client_from_config(config_file=kubeconfig)
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.coordination = client.CoordinationV1Api(self.api)
        self.run = uuid.uuid4().hex[:6]
        self.namespace = f"{prefix}-{self.run}"
        self.selector = {f"kubelvs.io/ha-{self.run}": "true"}
        self.nodes: list[str] = []
        self.core.create_namespace({"metadata": {"name": self.namespace}})

    # ----------------------------------------------------------------- nodes
    def node(self, name: str, ip: str, director: bool = True) -> None:
        labels = {**self.selector, DIRECTOR_LABEL: "true"} if director else {}
        body = {
            "metadata": {"name": name, "labels": labels},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
        }
        try:
            self.core.create_node(body)
        except Exception as error:
            if getattr(error, "status", None) != 409:
                raise
            self.core.patch_node(name, {"metadata": {"labels": labels}})
            self.core.patch_node_status(name, {"status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
        if name not in self.nodes:
            self.nodes.append(name)

    def select(self, name: str, selected: bool) -> None:
        """Add or remove node ``name``'s selection label (the VirtualServers select on it)."""
        labels: dict[str, str | None] = dict.fromkeys(self.selector, "true" if selected else None)
        self.core.patch_node(name, {"metadata": {"labels": labels}})

    def delete_node(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.core.delete_node(name)
        if name in self.nodes:
            self.nodes.remove(name)

    # ----------------------------------------------------------------- workloads
    def service(self, name: str, ips: Sequence[str], worker: str = "ha-worker", port: int = 80) -> None:
        """A Service selecting pods ``<name>-<i>`` on node ``worker`` with ``ips``, made Running
        and Ready by writing their status (no kubelet here)."""
        self.node(worker, "10.0.2.250", director=False)
        self.core.create_namespaced_service(
            self.namespace,
            {
                "metadata": {"name": name},
                "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": port, "targetPort": port}]},
            },
        )
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for i, ip in enumerate(ips, start=1):
            pod = f"{name}-{i}"
            self.core.create_namespaced_pod(
                self.namespace,
                {
                    "metadata": {"name": pod, "labels": {"app": name}},
                    "spec": {
                        "nodeName": worker,
                        "containers": [{"name": "web", "image": "web", "ports": [{"containerPort": port}]}],
                    },
                },
            )
            self.core.patch_namespaced_pod_status(
                pod,
                self.namespace,
                {
                    "status": {
                        "phase": "Running",
                        "podIP": ip,
                        "podIPs": [{"ip": ip}],
                        "conditions": [
                            {"type": "Ready", "status": "True", "lastTransitionTime": now},
                            {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                        ],
                    }
                },
            )

    def virtual_server(
        self,
        name: str,
        vip: str,
        *,
        service: str | None = None,
        addresses: Sequence[str] = (),
        port: int = 80,
        scheduler: str = "rr",
        scheduler_flags: Sequence[str] = (),
        selector: dict[str, str] | None = None,
    ) -> None:
        backends: dict[str, Any] = (
            {"serviceRef": {"name": service, "port": "http"}}
            if service
            else {"addresses": [{"ip": a} for a in addresses]}
        )
        spec = {
            "vip": vip,
            "ports": [{"name": "http", "port": port}],
            "scheduler": scheduler,
            "schedulerFlags": list(scheduler_flags),
            "forwarding": {"method": "DR"},
            "backends": backends,
            "directors": {"nodeSelector": selector or self.selector},
        }
        self.custom.create_namespaced_custom_object(
            "kubelvs.io",
            "v1alpha1",
            self.namespace,
            "virtualservers",
            {"apiVersion": "kubelvs.io/v1alpha1", "kind": "VirtualServer", "metadata": {"name": name}, "spec": spec},
        )

    def get_vs(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(  # type: ignore[no-any-return]
            "kubelvs.io", "v1alpha1", self.namespace, "virtualservers", name
        )

    def list_vs(self) -> list[dict[str, Any]]:
        got = self.custom.list_namespaced_custom_object("kubelvs.io", "v1alpha1", self.namespace, "virtualservers")
        return list(got.get("items", []))

    def owner(self, name: str) -> str | None:
        return ((self.get_vs(name).get("status") or {}).get("owner")) or None

    def owners(self) -> dict[str, str | None]:
        """VirtualServer name -> status.owner (a Node name), for all of this namespace."""
        return {vs["metadata"]["name"]: (vs.get("status") or {}).get("owner") or None for vs in self.list_vs()}

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        conditions = (self.get_vs(name).get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == kind), {})

    def leases(self) -> dict[str, str | None]:
        """Lease name -> holderIdentity, in this namespace (where the directors keep them)."""
        items = self.coordination.list_namespaced_lease(self.namespace).items
        return {lease.metadata.name: lease.spec.holder_identity for lease in items}

    def close(self) -> None:
        for name in list(self.nodes):
            self.delete_node(name)
        with contextlib.suppress(Exception):
            self.core.delete_namespace(self.namespace)


# =========================================================================== metrics


def metric_values(text: str, name: str) -> dict[str, float]:
    """Prometheus text -> {label string: value} for metric ``name`` ("" for no labels)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        match = re.match(rf"{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)", line)
        if match:
            out[match.group(1) or ""] = float(match.group(2))
    return out


def metric_total(text: str, name: str) -> float:
    return sum(metric_values(text, name).values())


# =========================================================================== the election seen from outside


class HAView:
    """What the HA tests and the benchmark judge the election by: the capture (who answers on
    the wire: the placement) and the VirtualServers' ``status.owner`` (what the directors
    report).

    ``vips``: VirtualServer name -> its VIP.  :meth:`settled` and :meth:`status_agrees` keep the
    reason they said no in ``last_reason`` (for failure messages)."""

    def __init__(self, topo: HATopology, cluster: HACluster, capture: Capture, vips: dict[str, str]) -> None:
        self.topo, self.cluster, self.capture, self.vips = topo, cluster, capture, vips
        self.names = topo.names_by_mac()
        self.last_reason = ""

    def wire_owner(self, vip: str, window: float = 0.6) -> str | None:
        """The one node that answered for ``vip`` in the last ``window`` seconds (None: none or
        several)."""
        seen = self.capture.responders(time.monotonic() - window, vip=vip)
        return self.names.get(next(iter(seen))) if len(seen) == 1 else None

    def wire_owners(self, window: float = 0.6) -> dict[str, list[str]]:
        """VIP -> every node that answered for it in the last ``window`` seconds."""
        since = time.monotonic() - window
        return {
            vip: sorted(self.names.get(m, m) for m in self.capture.responders(since, vip=vip))
            for vip in self.vips.values()
        }

    def placement(self, window: float = 1.0) -> dict[str, str | None]:
        """VirtualServer name -> the one director answering for its VIP on the wire in the last
        ``window`` seconds (None: nobody, or several)."""
        wire = self.wire_owners(window)
        return {vs: (wire[vip][0] if len(wire[vip]) == 1 else None) for vs, vip in self.vips.items()}

    def settled(self, directors: Sequence[str], window: float = 1.0) -> bool:
        """On the wire: ``directors`` all running, each VIP answered by exactly one of them, and
        the counts balanced (they differ by at most one).  (What status reports is checked
        apart, by :meth:`status_agrees`: the wire is what clients see.)"""
        reason = ""
        dead = [d for d in directors if d not in self.topo.running or not self.topo.director(d).alive()]
        if dead:
            reason = f"directors not running: {dead}"
        else:
            placement = self.placement(window)
            counts = {d: sum(1 for owner in placement.values() if owner == d) for d in directors}
            stray = {vs: owner for vs, owner in placement.items() if owner not in directors}
            if stray:
                wire = self.wire_owners(window)
                reason = f"VIPs answered by nobody, several, or others than {list(directors)}: {stray} ({wire})"
            elif max(counts.values()) - min(counts.values()) > 1:
                reason = f"unbalanced: {counts}"
        self.last_reason = reason
        return not reason

    def status_agrees(self, window: float = 1.0) -> bool:
        """Every VirtualServer's ``status.owner`` names the director answering for its VIP."""
        placement = self.placement(window)
        owners = self.cluster.owners()
        wrong = {
            vs: {"status.owner": owners.get(vs), "wire": placement[vs]}
            for vs in self.vips
            if placement[vs] is None or owners.get(vs) != self.topo.node_name(placement[vs] or "")
        }
        self.last_reason = f"status.owner disagrees with the wire: {wrong}" if wrong else ""
        return not wrong

    def wait_stable(
        self,
        directors: Sequence[str],
        hold: float,
        timeout: float,
        context: Callable[[], str] | None = None,
    ) -> dict[str, str | None]:
        """Wait until :meth:`settled` has held, with the same placement, for ``hold`` seconds on
        end (a rebalance that starts meanwhile restarts the clock); the placement."""
        deadline = time.monotonic() + timeout
        since: float | None = None
        owners: dict[str, str | None] | None = None
        while True:
            now_owners = self.placement() if self.settled(directors) else None
            now = time.monotonic()
            if now_owners is None:
                since, owners = None, None
            elif now_owners != owners:
                since, owners = now, now_owners
            elif since is not None and now - since >= hold:
                return owners
            if now > deadline:
                extra = context() if context is not None else self.context()
                raise AssertionError(
                    f"timed out after {timeout:.0f}s waiting for {list(directors)} to hold a balanced placement for "
                    f"{hold:.0f}s; last judged: {self.last_reason or 'settled, but owners kept moving'}\n{extra}"
                )
            time.sleep(0.3)

    def context(self, since: float = float("-inf"), probe: ConnectProber | None = None) -> str:
        """Everything worth seeing when a check fails: what was last judged, the wire, status,
        Leases, the HTTP probe, the directors' log tails."""
        parts = [f"last judged: {self.last_reason or '-'}"]
        with contextlib.suppress(Exception):
            parts.append(f"status.owner: {self.cluster.owners()}")
        with contextlib.suppress(Exception):
            parts.append(f"leases: {self.cluster.leases()}")
        parts.append(f"answering now: {self.wire_owners()}")
        parts.append("capture:\n" + self.capture.describe(since, limit=25))
        if probe is not None:
            parts.append("http probe:\n" + probe.describe(since))
        parts.append(self.topo.logs(tail=1500))
        return "\n".join(parts)
