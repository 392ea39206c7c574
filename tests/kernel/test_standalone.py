"""`kubelvs apply/delete/show` on a real IPVS kernel, checked with ipvsadm and with real traffic.

Runs inside the VM (tests/kernel/conftest.py boots it once for the whole kernel suite). Each
test gets a director network namespace with an empty IPVS table of its own.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from flows import EchoServers, Flows
from ha_topology import wait_for
from topology import Topology, alternates

KUBELVS = str(Path(sys.executable).with_name("kubelvs"))


class Director:
    """The kubelvs CLI run inside one director namespace, with its own state directory."""

    def __init__(self, topo: Topology, name: str, workdir: Path) -> None:
        self.topo = topo
        self.name = name
        self.state_dir = workdir / f"state-{name}"
        self.workdir = workdir
        self._files = 0

    def write(self, *objects: dict[str, Any]) -> str:
        self._files += 1
        path = self.workdir / f"manifest-{self.name}-{self._files}.yaml"
        path.write_text(yaml.safe_dump_all(objects))
        return str(path)

    def kubelvs(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [KUBELVS, *args]
        if args[0] in ("apply", "delete", "show", "adopt"):
            command += ["--state-dir", str(self.state_dir)]
        result = self.topo.exec(self.name, command, check=False, timeout=240)
        if check and result.returncode:
            raise AssertionError(f"kubelvs {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result

    def apply(self, *objects: dict[str, Any]) -> str:
        return self.kubelvs("apply", "-f", self.write(*objects)).stdout

    def rules(self) -> list[str]:
        return sorted(self.topo.ipvsadm(self.name, "-Sn").stdout.splitlines())

    def plan_rules(self, *objects: dict[str, Any]) -> list[str]:
        return sorted(self.kubelvs("plan", "-f", self.write(*objects)).stdout.splitlines())

    def addresses(self) -> str:
        return self.topo.exec(self.name, ["ip", "-br", "addr", "show", "dev", "kubelvs0"], check=False).stdout


def virtual_server(name: str, vip: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"vip": vip, "ports": [{"name": "http", "port": 80}], "scheduler": "rr"}
    body.update(spec)
    return {
        "apiVersion": "kubelvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": name, "namespace": "kt"},
        "spec": body,
    }


def addresses(*ips: str, **extra: Any) -> dict[str, Any]:
    return {"addresses": [{"ip": ip, **extra} for ip in ips]}


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    with Topology(real_servers=3, directors=2, ports=(80, 8080), udp_ports=(53, 5353)) as topology:
        yield topology


@pytest.fixture
def director(topo: Topology, tmp_path: Path) -> Iterator[Director]:
    """dir1 with an empty IPVS table; whatever a test left there is flushed afterwards."""
    d = Director(topo, "dir1", tmp_path)
    yield d
    topo.ipvsadm("dir1", "-C", check=False)
    topo.exec("dir1", ["ip", "link", "del", "kubelvs0"], check=False)


def rs_ips(topo: Topology, family: int = 4) -> list[str]:
    return [topo.ip(rs, family) for rs in topo.real_servers]


_receiving: set[tuple[str, str]] = set()


def receive_dr(topo: Topology, vip: str) -> None:
    """Every real server accepts packets for ``vip`` (DR: on lo), once per topology."""
    for rs in topo.real_servers:
        if (topo.ns(rs), vip) not in _receiving:
            topo.real_server_dr(rs, vip)
            _receiving.add((topo.ns(rs), vip))


@pytest.fixture(scope="module")
def clients(topo: Topology) -> list[str]:
    return topo.add_client_addrs(6)


# --- programming, checked with an independent client ------------------------------------------


def test_ipvsadm_shows_exactly_the_planned_rules(topo: Topology, director: Director) -> None:
    rs = rs_ips(topo)
    rs6 = rs_ips(topo, 6)
    objects = [
        virtual_server("dr", topo.vip4(0), backends=addresses(*rs)),
        virtual_server(
            "tun-gue",
            topo.vip4(1),
            scheduler="wrr",
            forwarding={"method": "TUN", "tunnel": {"type": "gue", "port": 6080, "checksum": "csum"}},
            backends={"addresses": [{"ip": rs[0], "weight": 3}, {"ip": rs[1]}], "upperThreshold": 100},
        ),
        virtual_server(
            "nat-udp",
            topo.vip4(2),
            scheduler="lc",
            ports=[{"port": 53, "protocol": "UDP", "targetPort": 5353}],
            forwarding={"method": "NAT"},
            backends=addresses(*rs[:2]),
        ),
        virtual_server(
            "sticky",
            topo.vip4(3),
            scheduler="sh",
            schedulerFlags=["sh-fallback", "sh-port"],
            persistence={"timeoutSeconds": 120, "netmask": "255.255.255.0"},
            backends=addresses(*rs),
        ),
        virtual_server(
            "v6",
            topo.vip6(0),
            scheduler="mh",
            schedulerFlags=["mh-port"],
            persistence={"timeoutSeconds": 60, "netmask": 64},
            ports=[{"port": 80}, {"port": 443, "protocol": "SCTP"}],
            backends=addresses(*rs6),
        ),
    ]
    objects.append(
        virtual_server(
            "tun-gre",
            topo.vip4(12),
            forwarding={"method": "TUN", "tunnel": {"type": "gre"}},
            backends=addresses(rs[2]),
        )
    )
    planned = director.plan_rules(*objects)
    output = director.apply(*objects)
    assert "0 failed" in output
    # `ipvsadm -S` does not save connection thresholds: compare them through `-L --thresholds`.
    assert director.rules() == [re.sub(r" -x \d+", "", line) for line in planned]
    assert len(planned) == 7 + 3 + 2 + 2 + 3 + 2 * 3 + 1  # 7 services and their real servers
    thresholds = topo.ipvsadm("dir1", "-Ln", "--thresholds").stdout
    assert re.search(rf"{re.escape(rs[0])}:80\s+100\s+0\s", thresholds), thresholds  # Uthreshold, Lthreshold


def test_second_apply_makes_no_kernel_operations(topo: Topology, director: Director) -> None:
    vs = virtual_server("web", topo.vip4(0), backends=addresses(*rs_ips(topo)))
    first = director.apply(vs)
    assert first.startswith("4 operations")
    assert director.apply(vs).startswith("0 operations (no changes)")


def test_weight_change_edits_in_place(topo: Topology, director: Director) -> None:
    rs = rs_ips(topo)
    director.apply(virtual_server("web", topo.vip4(0), backends=addresses(*rs)))
    changed = virtual_server(
        "web", topo.vip4(0), scheduler="wrr", backends={"addresses": [{"ip": rs[0], "weight": 5}, {"ip": rs[1]}]}
    )
    output = director.apply(changed)
    assert output.startswith("3 operations (1 delete-dest, 1 edit-dest, 1 edit-service)"), output
    assert director.rules() == director.plan_rules(changed)


def test_foreign_service_survives_apply_reapply_and_delete(topo: Topology, director: Director) -> None:
    foreign_vip = topo.vip4(9)
    topo.ipvsadm("dir1", "-A", "-t", f"{foreign_vip}:80", "-s", "wlc")
    topo.ipvsadm("dir1", "-a", "-t", f"{foreign_vip}:80", "-r", f"{topo.ip4('rs1')}:80", "-g", "-w", "7")
    foreign = director.rules()

    vs = virtual_server("web", topo.vip4(0), backends=addresses(*rs_ips(topo)))
    # Also ask for the foreign service's key: kubelvs must refuse to take it over.
    clash = virtual_server("clash", foreign_vip, backends=addresses(topo.ip4("rs2")))
    result = director.kubelvs("apply", "-f", director.write(vs, clash), check=False)
    assert result.returncode == 1
    assert "not owned by kubelvs" in result.stderr
    director.apply(vs)
    director.apply(vs)
    assert set(foreign) <= set(director.rules())
    director.kubelvs("delete", "-f", director.write(vs))
    assert director.rules() == foreign


def test_delete_removes_exactly_its_rules_and_vip(topo: Topology, director: Director) -> None:
    a = virtual_server("a", topo.vip4(0), backends=addresses(*rs_ips(topo)))
    b = virtual_server("b", topo.vip4(1), backends=addresses(*rs_ips(topo)))
    director.apply(a, b)
    assert topo.vip4(0) in director.addresses() and topo.vip4(1) in director.addresses()
    director.kubelvs("delete", "-f", director.write(a))
    assert director.rules() == director.plan_rules(b)
    assert topo.vip4(0) not in director.addresses() and topo.vip4(1) in director.addresses()
    # Applying with fewer objects removes what the earlier apply added, and nothing else.
    director.apply(a)
    assert director.rules() == director.plan_rules(a)


def test_vip_that_was_already_local_is_not_removed(topo: Topology, director: Director) -> None:
    vip = topo.vip4(4)
    topo.exec("dir1", ["ip", "link", "add", "kubelvs0", "type", "dummy"])
    topo.exec("dir1", ["ip", "addr", "add", f"{vip}/32", "dev", "kubelvs0"])
    vs = virtual_server("web", vip, backends=addresses(*rs_ips(topo)))
    director.apply(vs)
    director.kubelvs("delete", "-f", director.write(vs))
    assert vip in director.addresses()


def test_invalid_virtual_server_keeps_what_it_had(topo: Topology, director: Director) -> None:
    good = virtual_server("web", topo.vip4(0), backends=addresses(*rs_ips(topo)))
    director.apply(good)
    before = director.rules()
    broken = virtual_server("web", topo.vip4(0), scheduler="no-such", backends=addresses(*rs_ips(topo)))
    result = director.kubelvs("apply", "-f", director.write(broken), check=False)
    assert result.returncode == 1
    assert "spec.scheduler" in result.stderr
    assert director.rules() == before


def test_show_lists_owned_services_with_counters(topo: Topology, director: Director) -> None:
    rs = rs_ips(topo)
    receive_dr(topo, topo.vip4(11))
    director.apply(virtual_server("web", topo.vip4(11), backends=addresses(*rs)))
    assert all(not n.startswith("ERR") for n in topo.client_get(topo.vip4(11), 80, 3))
    shown = director.kubelvs("show").stdout
    first = next(line for line in shown.splitlines() if line.startswith("-A"))
    assert "(kt/web)" in first
    assert int(first.split()[-5]) >= 3  # CONNS: connections counted by the kernel


def test_adopt_rebuilds_a_lost_record_from_tagged_vips(topo: Topology, director: Director) -> None:
    from kubelvs.kernel.addresses import ADDRESS_PROTO, VipInterface

    rs = rs_ips(topo)
    foreign_vip = topo.vip4(9)
    topo.ipvsadm("dir1", "-A", "-t", f"{foreign_vip}:80", "-s", "wlc")
    a = virtual_server("a", topo.vip4(0), backends=addresses(*rs))
    b = virtual_server("b", topo.vip4(1), backends=addresses(*rs))
    director.apply(a, b)
    # Somebody's address on kubelvs0, added without kubelvs's mark.
    untagged = topo.vip4(8)
    topo.exec("dir1", ["ip", "addr", "add", f"{untagged}/32", "dev", "kubelvs0"])
    tags = VipInterface("kubelvs0", netns=topo.ns("dir1")).tagged()  # read through setns
    assert tags[topo.vip4(0)] == ADDRESS_PROTO and tags[topo.vip4(1)] == ADDRESS_PROTO
    assert tags[untagged] == 0
    detail = topo.exec("dir1", ["ip", "-d", "addr", "show", "dev", "kubelvs0"]).stdout
    print(detail)
    rules = director.rules()

    (director.state_dir / "owned.json").unlink()
    adopted = director.kubelvs("adopt").stdout
    assert f"adopted VIP {topo.vip4(0)}" in adopted and f"adopted VIP {topo.vip4(1)}" in adopted
    assert f"adopted TCP {topo.vip4(0)}:80" in adopted
    assert f"not adopted: VIP {untagged}" in adopted and foreign_vip not in adopted
    output = director.apply(a, b)
    assert output.startswith("0 operations (no changes)"), output
    assert "removed" not in output
    assert director.rules() == rules
    # The next apply with fewer objects removes what kubelvs made, and nothing foreign.
    director.apply(a)
    assert f"-A -t {foreign_vip}:80 -s wlc" in director.rules()
    assert untagged in director.addresses() and topo.vip4(1) not in director.addresses()


def test_a_second_kubelvs_on_the_state_directory_is_refused(topo: Topology, director: Director) -> None:
    import fcntl

    director.state_dir.mkdir(parents=True, exist_ok=True)
    with open(director.state_dir / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = director.kubelvs(
            "apply",
            "-f",
            director.write(virtual_server("a", topo.vip4(0), backends=addresses(*rs_ips(topo)))),
            check=False,
        )
    assert result.returncode == 3 and "another kubelvs" in result.stderr
    assert director.rules() == []


# --- real traffic ---------------------------------------------------------------------------


def test_dr_round_robin_and_weighted(topo: Topology, director: Director) -> None:
    vip = topo.vip4(0)
    receive_dr(topo, vip)
    director.apply(virtual_server("web", vip, backends=addresses(*rs_ips(topo))))
    names = topo.client_get(vip, 80, 9)
    assert alternates(names, topo.real_servers), names

    rs = rs_ips(topo)
    weighted = {"addresses": [{"ip": rs[0], "weight": 1}, {"ip": rs[1], "weight": 1}, {"ip": rs[2], "weight": 2}]}
    director.apply(virtual_server("web", vip, scheduler="wrr", backends=weighted))
    counts = Counter(topo.client_get(vip, 80, 12))
    assert counts == {"rs1": 3, "rs2": 3, "rs3": 6}, counts


def test_tun_ipip_round_robin(topo: Topology, director: Director) -> None:
    vip = topo.vip4(5)
    for rs in topo.real_servers:
        topo.real_server_tun(rs, vip)
    director.apply(virtual_server("tun", vip, forwarding={"method": "TUN"}, backends=addresses(*rs_ips(topo))))
    names = topo.client_get(vip, 80, 6)
    assert alternates(names, topo.real_servers), names


def test_nat_tcp_remaps_port_and_udp(topo: Topology, director: Director) -> None:
    vip = topo.vip4(6)
    for rs in topo.real_servers:
        topo.real_server_nat(rs, "dir1")
    try:
        director.apply(
            virtual_server(
                "nat",
                vip,
                ports=[{"port": 80, "targetPort": 8080}, {"port": 53, "protocol": "UDP", "targetPort": 5353}],
                forwarding={"method": "NAT"},
                backends=addresses(*rs_ips(topo)[:2]),
            )
        )
        assert alternates(topo.client_get(vip, 80, 4), ["rs1", "rs2"])
        assert alternates(topo.client_udp(vip, 53, 4), ["rs1", "rs2"])
    finally:
        for rs in topo.real_servers:  # back to on-link routing for the other tests
            topo.exec(rs, f"ip route del default; ip route add {topo.subnet4} dev eth0", check=False)
            topo.exec(rs, f"ip -6 route del default; ip -6 route add {topo.subnet6} dev eth0", check=False)


def test_udp_dr(topo: Topology, director: Director) -> None:
    vip = topo.vip4(7)
    receive_dr(topo, vip)
    director.apply(
        virtual_server("dns", vip, ports=[{"port": 53, "protocol": "UDP"}], backends=addresses(*rs_ips(topo)))
    )
    assert alternates(topo.client_udp(vip, 53, 6), topo.real_servers)


@pytest.mark.parametrize(("scheduler", "flags"), [("sh", ["sh-fallback"]), ("mh", ["mh-fallback"])])
def test_hashing_schedulers_keep_a_client_on_one_server(
    topo: Topology, director: Director, clients: list[str], scheduler: str, flags: list[str]
) -> None:
    vip = topo.vip4(8)
    receive_dr(topo, vip)
    director.apply(
        virtual_server("hash", vip, scheduler=scheduler, schedulerFlags=flags, backends=addresses(*rs_ips(topo)))
    )
    chosen = {}
    for source in clients:
        names = topo.client_get(vip, 80, 3, src=source)
        assert len(set(names)) == 1, (source, names)  # the same client always lands on one server
        chosen[source] = names[0]
    assert len(set(chosen.values())) >= 2, chosen  # and different clients spread


def _real_server_order(topo: Topology, node: str, vip: str, port: int) -> list[str]:
    """The real servers of ``vip:port`` in the kernel's list order (``ipvsadm -Ln`` walks it)."""
    listing = topo.ipvsadm(node, "-Ln", "-t", f"{vip}:{port}").stdout
    return re.findall(r"->\s+(\S+)\s+\w+\s+\d+", listing)


def test_hashing_scheduler_keeps_one_real_server_order_and_the_connections(topo: Topology, tmp_path: Path) -> None:
    """mh builds its table from the kernel's real-server list in the order of the adds, so two
    directors map a flow alike only with the same order. dir1 had rs2 and rs3 first, then rs1
    came (it sorts first): kubelvs deletes rs2 and rs3 and adds them again after it, and the
    live connections to them go on. dir2, programmed afresh, holds the same order."""
    vip, port = topo.vip4(12), 7
    receive_dr(topo, vip)
    rs = rs_ips(topo)
    spec = {"scheduler": "mh", "schedulerFlags": ["mh-port"], "ports": [{"name": "echo", "port": port}]}
    dir1, dir2 = Director(topo, "dir1", tmp_path), Director(topo, "dir2", tmp_path)
    try:
        dir1.apply(virtual_server("hash", vip, backends=addresses(*rs[1:]), **spec))
        with EchoServers(topo, port), Flows(topo.ns("client"), vip, port, 8) as flows:
            before = flows.servers()
            reordered = time.monotonic()
            out = dir1.apply(virtual_server("hash", vip, backends=addresses(*rs), **spec))
            wait_for("every flow to echo after the reorder", lambda: flows.all_echoed_since(reordered), 20, 0.2)
            assert not flows.failed() and flows.servers() == before, f"{out}\n{flows.describe()}"
        assert _real_server_order(topo, "dir1", vip, port) == [f"{a}:{port}" for a in rs], out
        dir2.apply(virtual_server("hash", vip, backends=addresses(*rs), **spec))
        assert _real_server_order(topo, "dir2", vip, port) == _real_server_order(topo, "dir1", vip, port)
    finally:
        for node in ("dir1", "dir2"):
            topo.ipvsadm(node, "-C", check=False)
            topo.exec(node, ["ip", "link", "del", "kubelvs0"], check=False)


def test_persistence_keeps_a_client_on_one_server(topo: Topology, director: Director) -> None:
    vip = topo.vip4(10)
    receive_dr(topo, vip)
    director.apply(
        virtual_server("sticky", vip, persistence={"timeoutSeconds": 300}, backends=addresses(*rs_ips(topo)))
    )
    names = topo.client_get(vip, 80, 6)
    assert len(set(names)) == 1, names  # rr alone would alternate; persistence pins the client


def test_ipv6_direct_routing(topo: Topology, director: Director) -> None:
    vip = topo.vip6(1)
    receive_dr(topo, vip)
    director.apply(virtual_server("v6", vip, backends=addresses(*rs_ips(topo, 6))))
    # IPv6 answers neighbour solicitations only for addresses of the receiving interface, so
    # the VIP (on kubelvs0) is reached as a routed address, as BGP or a static route would do.
    topo.exec("client", ["ip", "-6", "route", "replace", f"{vip}/128", "via", topo.ip6("dir1")])
    names = topo.client_get(vip, 80, 6)
    assert alternates(names, topo.real_servers), names
