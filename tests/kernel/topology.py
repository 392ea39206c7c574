"""Network-namespace topology for kernel traffic tests (runs inside the IPVS VM; stdlib only).

One L2 segment: a bridge ``br0`` in its own namespace ``<p>sw`` and, on it through a veth each
(``eth0`` inside), the namespaces::

    client            10.77.N.10    fd77:0:0:N::10     (extra client addresses .11-.99)
    dir1, dir2, ...   10.77.N.2, .3 fd77:0:0:N::2, ::3 (IP forwarding on, no redirects)
    rs1 .. rsK        10.77.N.101.. fd77:0:0:N::101..
    VIPs              10.77.N.200+i fd77:0:0:N::200+i  (vip4(i), vip6(i))

N (1..250) is unique per live Topology and so is the namespace prefix ``k<N>-``: tests don't
interfere, and close() deletes every namespace (processes inside are killed first).  IPVS state
is per namespace, so each director namespace has its own, empty, IPVS table.

All the addresses exist only in namespaces this class creates: traffic never leaves them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

AGENT = Path(__file__).resolve().parent / "nsagent.py"
NETNS_DIR = Path("/run/netns")

_used_indices: set[int] = set()


class TopologyError(RuntimeError):
    pass


def _is_v6(addr: str) -> bool:
    return ipaddress.ip_address(addr).version == 6


def _bracket(addr: str) -> str:
    """``[addr]`` for IPv6 (ipvsadm's ADDR:PORT syntax), addr for IPv4."""
    return f"[{addr}]" if _is_v6(addr) else addr


def _run(
    cmd: Sequence[str], *, check: bool = True, timeout: float = 60, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        cp = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired as exc:
        raise TopologyError(f"timed out after {timeout}s: {shlex.join(cmd)}") from exc
    if check and cp.returncode != 0:
        raise TopologyError(
            f"exit {cp.returncode}: {shlex.join(cmd)}\nstdout: {cp.stdout.strip()}\nstderr: {cp.stderr.strip()}"
        )
    return cp


class Topology:
    """Namespaces ``client``, ``dir1``..``dirD``, ``rs1``..``rsK`` on one bridge.

    Node names used by the methods are the logical ones ("client", "dir1", "rs2"); the real
    netns name is ``ns(name)``.
    """

    def __init__(
        self,
        real_servers: int = 2,
        directors: int = 2,
        *,
        ports: Iterable[int] | None = (80,),
        udp_ports: Iterable[int] | None = None,
        index: int | None = None,
    ) -> None:
        if os.environ.get("KUBELVS_IN_VM") != "1" and os.environ.get("KUBELVS_ALLOW_HOST_NETNS") != "1":
            raise TopologyError("Topology runs inside the IPVS VM only (KUBELVS_IN_VM=1)")
        if not 1 <= real_servers <= 99 or not 1 <= directors <= 5:
            raise ValueError("1..99 real servers, 1..5 directors")
        self.index = self._claim_index(index)
        self.prefix = f"k{self.index}-"
        self.directors = [f"dir{i}" for i in range(1, directors + 1)]
        self.real_servers = [f"rs{i}" for i in range(1, real_servers + 1)]
        self.client = "client"
        self.nodes = [self.client, *self.directors, *self.real_servers]
        self.subnet4 = ipaddress.ip_network(f"10.77.{self.index}.0/24")
        self.subnet6 = ipaddress.ip_network(f"fd77:0:0:{self.index}::/64")
        self._hosts = {self.client: 10}
        self._hosts.update({d: 1 + i for i, d in enumerate(self.directors, start=1)})
        self._hosts.update({r: 100 + i for i, r in enumerate(self.real_servers, start=1)})
        self._extra_client: list[int] = []
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.workdir = Path(tempfile.mkdtemp(prefix=f"topo{self.index}-"))
        self._created: list[str] = []
        try:
            self._build()
            tcp = list(ports or [])
            udp = list(udp_ports if udp_ports is not None else tcp)
            if tcp or udp:
                self.start_servers(tcp, udp)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- naming and addresses
    @staticmethod
    def _claim_index(index: int | None) -> int:
        candidates = [index] if index is not None else range(1, 251)
        for i in candidates:
            if i in _used_indices or (NETNS_DIR / f"k{i}-sw").exists():
                continue
            _used_indices.add(i)
            return i
        raise TopologyError("no free topology index")

    def ns(self, node: str) -> str:
        """The netns name of a logical node ("dir1" -> "k3-dir1"); "sw" is the bridge's."""
        if node != "sw" and node not in self.nodes:
            raise KeyError(f"no node {node!r} in this topology ({', '.join(self.nodes)})")
        return self.prefix + node

    def ip4(self, node: str) -> str:
        return str(self.subnet4.network_address + self._hosts[node])

    def ip6(self, node: str) -> str:
        return f"fd77:0:0:{self.index:x}::{self._hosts[node]}"

    def ip(self, node: str, family: int = 4) -> str:
        return self.ip6(node) if family == 6 else self.ip4(node)

    def vip4(self, i: int = 0) -> str:
        if not 0 <= i <= 54:
            raise ValueError("vip index 0..54")
        return str(self.subnet4.network_address + 200 + i)

    def vip6(self, i: int = 0) -> str:
        if not 0 <= i <= 54:
            raise ValueError("vip index 0..54")
        return f"fd77:0:0:{self.index:x}::{200 + i}"

    def vip(self, i: int = 0, family: int = 4) -> str:
        return self.vip6(i) if family == 6 else self.vip4(i)

    # ----------------------------------------------------------------- running things
    def exec(
        self, ns: str, cmd: Sequence[str] | str, *, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` (argv list, or a string for ``sh -c``) in node ``ns`` (``ip netns exec``).

        Returns the CompletedProcess (text); raises TopologyError on a non-zero exit if ``check``.
        """
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return _run(["ip", "netns", "exec", self.ns(ns), *argv], check=check, timeout=timeout, input=input)

    def ipvsadm(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ipvsadm ARGS`` in node ``ns`` (a director): ``topo.ipvsadm("dir1", "-Ln")``."""
        return self.exec(ns, ["ipvsadm", *args], check=check)

    def sysctl(self, ns: str, settings: dict[str, str | int]) -> None:
        """Write sysctls ("net.ipv4.ip_forward": 1) in node ``ns``, in one process."""
        self.exec(ns, ["sh", "-ec", self._sysctl_script(settings)])

    def _ip_batch(self, netns: str, lines: Iterable[str]) -> None:
        _run(["ip", "-n", netns, "-batch", "-"], input="\n".join(lines) + "\n")

    def _build(self) -> None:
        # Few processes: under TCG every fork+exec costs tens of milliseconds.
        root = [f"netns add {self.ns(node)}" for node in ["sw", *self.nodes]]
        root += [
            f"link add {node} netns {self.ns('sw')} type veth peer name eth0 netns {self.ns(node)}"
            for node in self.nodes
        ]
        self._created = [self.ns(node) for node in ["sw", *self.nodes]]
        _run(["ip", "-batch", "-"], input="\n".join(root) + "\n")
        lines = [
            "link set lo up",
            "link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0",
            "link set br0 up",
        ]
        for node in self.nodes:
            lines.append(f"link set {node} master br0")
            lines.append(f"link set {node} up")
        self._ip_batch(self.ns("sw"), lines)
        for node in self.nodes:
            settings: dict[str, str | int] = {
                "net.ipv6.conf.all.accept_dad": 0,
                "net.ipv6.conf.default.accept_dad": 0,
                "net.ipv6.conf.eth0.accept_dad": 0,
                "net.ipv6.conf.all.accept_ra": 0,
                "net.ipv6.conf.default.accept_ra": 0,
                "net.ipv6.conf.eth0.accept_ra": 0,
            }
            if node in self.directors:
                settings.update(
                    {
                        "net.ipv4.ip_forward": 1,
                        "net.ipv6.conf.all.forwarding": 1,
                        "net.ipv4.conf.all.send_redirects": 0,
                        "net.ipv4.conf.default.send_redirects": 0,
                        "net.ipv4.conf.eth0.send_redirects": 0,
                    }
                )
            script = [
                self._sysctl_script(settings),
                "ip -batch - <<'EOF'",
                "link set lo up",
                f"addr add {self.ip4(node)}/24 dev eth0",
                f"addr add {self.ip6(node)}/64 dev eth0 nodad",
                "link set eth0 up",
                "EOF",
            ]
            self.exec(node, ["sh", "-ec", "\n".join(script)])

    @staticmethod
    def _sysctl_script(settings: dict[str, str | int]) -> str:
        return "; ".join(f"echo {shlex.quote(str(v))} > /proc/sys/{k.replace('.', '/')}" for k, v in settings.items())

    # ----------------------------------------------------------------- servers
    def start_servers(
        self,
        tcp_ports: Sequence[int] = (80,),
        udp_ports: Sequence[int] | None = None,
        nodes: Sequence[str] | None = None,
        timeout: float = 90,
    ) -> None:
        """Start the agent in each real server (or ``nodes``): HTTP on ``tcp_ports`` answering its
        node name, UDP echo-with-name on ``udp_ports`` (default: same as tcp); IPv4 and IPv6,
        bound to the wildcard address so it answers on a VIP too.  Killed by close()."""
        udp_ports = list(tcp_ports) if udp_ports is None else list(udp_ports)
        pending = {}
        for node in nodes or self.real_servers:
            self.stop_server(node)
            ready = self.workdir / f"{node}.ready"
            ready.unlink(missing_ok=True)
            argv = [
                "ip",
                "netns",
                "exec",
                self.ns(node),
                sys.executable,
                "-S",
                str(AGENT),
                "serve",
                "--name",
                node,
                "--ready",
                str(ready),
            ]
            argv += [a for p in tcp_ports for a in ("--tcp", str(p))]
            argv += [a for p in udp_ports for a in ("--udp", str(p))]
            log = open(self.workdir / f"{node}.log", "wb")  # noqa: SIM115
            self._procs[node] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            log.close()
            pending[node] = ready
        deadline = time.monotonic() + timeout
        while pending:
            for node, ready in list(pending.items()):
                if ready.exists():
                    del pending[node]
                elif self._procs[node].poll() is not None:
                    raise TopologyError(f"server in {node} exited: {self.server_log(node)}")
            if pending and time.monotonic() > deadline:
                raise TopologyError(f"servers not ready after {timeout}s: {sorted(pending)}")
            time.sleep(0.1)

    def server_log(self, node: str) -> str:
        p = self.workdir / f"{node}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop_server(self, node: str) -> None:
        proc = self._procs.pop(node, None)
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    # ----------------------------------------------------------------- roles
    def director_vip(self, director: str, vip: str) -> None:
        """Put ``vip`` on the director's eth0 (/32, or /128 nodad), so it answers ARP/ND for it.

        An IPv6 VIP is added deprecated (preferred_lft 0): a /128 otherwise wins source address
        selection (longest match, RFC 6724 rule 8) for everything the director sends on eth0,
        and a TUN real server drops tunnel packets whose outer source is its own VIP."""
        if _is_v6(vip):
            self.exec(director, ["ip", "-6", "addr", "add", f"{vip}/128", "dev", "eth0", "nodad", "preferred_lft", "0"])
        else:
            self.exec(director, ["ip", "addr", "add", f"{vip}/32", "dev", "eth0"])

    def real_server_dr(self, rs: str, vip: str) -> None:
        """DR real server: VIP on lo (/32 or /128), and for IPv4 arp_ignore=1, arp_announce=2
        (all + eth0) so only the director answers ARP for the VIP.  (IPv6 answers neighbour
        solicitations only for addresses of the receiving interface: nothing to set.)"""
        if _is_v6(vip):
            self.exec(rs, ["ip", "-6", "addr", "add", f"{vip}/128", "dev", "lo"])
        else:
            self.exec(rs, ["ip", "addr", "add", f"{vip}/32", "dev", "lo"])
            self._arp_hide(rs)

    def _arp_hide(self, rs: str) -> None:
        self.sysctl(
            rs,
            {
                "net.ipv4.conf.all.arp_ignore": 1,
                "net.ipv4.conf.eth0.arp_ignore": 1,
                "net.ipv4.conf.all.arp_announce": 2,
                "net.ipv4.conf.eth0.arp_announce": 2,
            },
        )

    def real_server_tun(self, rs: str, vip: str) -> None:
        """TUN real server.  IPv4: ``tunl0`` (ipip) up with the VIP, rp_filter=0 (all, default,
        tunl0: the inner source arrives on tunl0 but routes via eth0), ARP hidden as for DR.
        IPv6: an ip6tnl device ``tun6`` (IPv6-in-IPv6, local = the real server's address,
        remote any) up with the VIP."""
        if _is_v6(vip):
            # Not the fallback ip6tnl0: its flags never get the receive capability (the kernel
            # skips ip6_tnl_link_config for it), so it drops everything.  A tunnel with our
            # own address as local end and any remote end takes the director's packets.
            _run(["modprobe", "ip6_tunnel"], check=False)
            self.exec(
                rs,
                f"ip link show tun6 >/dev/null 2>&1 || ip link add tun6 type ip6tnl mode ip6ip6 "
                f"local {self.ip6(rs)} remote any && ip link set tun6 up",
            )
            self.exec(rs, ["ip", "-6", "addr", "add", f"{vip}/128", "dev", "tun6", "nodad"])
        else:
            _run(["modprobe", "ipip"], check=False)
            self.exec(rs, ["ip", "link", "set", "tunl0", "up"])
            self.exec(rs, ["ip", "addr", "add", f"{vip}/32", "dev", "tunl0"])
            self.sysctl(
                rs,
                {
                    "net.ipv4.conf.all.rp_filter": 0,
                    "net.ipv4.conf.default.rp_filter": 0,
                    "net.ipv4.conf.tunl0.rp_filter": 0,
                    "net.ipv4.conf.eth0.rp_filter": 0,
                },
            )
            self._arp_hide(rs)

    def real_server_nat(self, rs: str, director: str) -> None:
        """NAT real server: replies must go back through the director.  ``director`` is a node
        name (both families) or one director address (that family).  The client shares the L2
        segment, so the on-link subnet route is replaced by a host route to the director plus a
        default route via it; ICMP redirects are refused."""
        gateways = [self.ip4(director), self.ip6(director)] if director in self.nodes else [director]
        for gw in gateways:
            if _is_v6(gw):
                self.exec(
                    rs,
                    f"ip -6 route del {self.subnet6} dev eth0 2>/dev/null; "
                    f"ip -6 route replace {gw}/128 dev eth0 && "
                    f"ip -6 route replace default via {gw} dev eth0",
                )
                self.sysctl(rs, {"net.ipv6.conf.all.accept_redirects": 0, "net.ipv6.conf.eth0.accept_redirects": 0})
            else:
                self.exec(
                    rs,
                    f"ip route del {self.subnet4} dev eth0 2>/dev/null; "
                    f"ip route replace {gw}/32 dev eth0 && "
                    f"ip route replace default via {gw} dev eth0",
                )
                self.sysctl(rs, {"net.ipv4.conf.all.accept_redirects": 0, "net.ipv4.conf.eth0.accept_redirects": 0})

    def add_client_addrs(self, count: int, family: int = 4) -> list[str]:
        """Add ``count`` more addresses to the client (to simulate different clients with
        ``src=``); returns them.  IPv4 .11-.99 of the subnet, IPv6 ::11-::99."""
        out = []
        for _ in range(count):
            host = 11 + len(self._extra_client)
            if host > 99:
                raise TopologyError("at most 89 extra client addresses")
            self._extra_client.append(host)
            a4 = str(self.subnet4.network_address + host)
            a6 = f"fd77:0:0:{self.index:x}::{host}"
            self._ip_batch(self.ns(self.client), [f"addr add {a4}/24 dev eth0", f"addr add {a6}/64 dev eth0 nodad"])
            out.append(a6 if family == 6 else a4)
        return out

    # ----------------------------------------------------------------- client traffic
    def _agent(self, ns: str, args: list[str], n: int, timeout: float) -> list[str]:
        cp = self.exec(ns, [sys.executable, "-S", str(AGENT), *args], timeout=n * (timeout + 2) + 60)
        result = json.loads(cp.stdout)
        assert isinstance(result, list)
        return [str(x) for x in result]

    def client_http(
        self,
        vip: str,
        port: int = 80,
        n: int = 1,
        *,
        src: str | None = None,
        path: str = "/",
        timeout: float = 3.0,
        node: str = "client",
    ) -> list[str]:
        """``n`` HTTP GETs of ``path`` from the client, each on a new TCP connection; the bodies
        (stripped), "ERR:<reason>" for a failed one."""
        args = ["http", "--host", vip, "--port", str(port), "--n", str(n), "--timeout", str(timeout), "--path", path]
        if src:
            args += ["--src", src]
        return self._agent(node, args, n, timeout)

    def client_get(
        self, vip: str, port: int = 80, n: int = 1, *, src: str | None = None, timeout: float = 3.0
    ) -> list[str]:
        """``n`` HTTP GETs (new connection each) from the client; the answering server names,
        in order ("ERR:<reason>" for a failed one).  ``src`` binds a client address."""
        return self.client_http(vip, port, n, src=src, timeout=timeout)

    def client_udp(
        self,
        vip: str,
        port: int = 80,
        n: int = 1,
        *,
        src: str | None = None,
        timeout: float = 3.0,
        payload: str = "ping",
        node: str = "client",
    ) -> list[str]:
        """``n`` UDP datagrams (new socket, so new source port, each) from the client; the names
        answering ("ERR:<reason>" for none).  The client socket is connected, so only an answer
        coming from ``vip`` counts."""
        args = [
            "udp",
            "--host",
            vip,
            "--port",
            str(port),
            "--n",
            str(n),
            "--timeout",
            str(timeout),
            "--payload",
            payload,
        ]
        if src:
            args += ["--src", src]
        return self._agent(node, args, n, timeout)

    # ----------------------------------------------------------------- teardown
    def close(self) -> None:
        for node in list(self._procs):
            with contextlib.suppress(Exception):
                self.stop_server(node)
        if self._created:
            # Anything else still running in there (a test's own background process) goes too.
            names = " ".join(shlex.quote(n) for n in reversed(self._created))
            _run(
                [
                    "sh",
                    "-c",
                    f"for ns in {names}; do [ -e /run/netns/$ns ] || continue; "
                    "for p in $(ip netns pids $ns); do kill -9 $p; done; ip netns del $ns; done",
                ],
                check=False,
            )
        self._created.clear()
        _used_indices.discard(self.index)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """Addresses, routes, IPVS tables of every node (for failure messages)."""
        out = []
        for node in self.nodes:
            cp = self.exec(node, "ip -br addr; ip route; ip -6 route; ipvsadm -Ln 2>/dev/null", check=False)
            out.append(f"--- {node} ({self.ns(node)})\n{cp.stdout}{cp.stderr}")
        return "\n".join(out)


def alternates(names: Sequence[str], expected: Iterable[str]) -> bool:
    """True if ``names`` cycles through exactly ``expected`` (round robin): every window of
    len(expected) consecutive answers holds each expected name once."""
    exp = sorted(expected)
    k = len(exp)
    if len(names) < k:
        return False
    return all(sorted(names[i : i + k]) == exp for i in range(len(names) - k + 1))
