"""The kernel test bed itself, proven with plain ipvsadm (no kubelvs code): DR, TUN and NAT
forwarding through a real IPVS director between network namespaces inside the VM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from topology import Topology, alternates

NETNS = Path("/run/netns")
N = 6  # requests per check: three full round-robin cycles over two real servers


def _service(
    topo: Topology,
    vip: str,
    method: str,
    port: int = 80,
    proto: str = "-t",
    scheduler: str = "rr",
    director: str = "dir1",
) -> None:
    """VIP on the director and an IPVS service VIP:port with rs1, rs2 (-g DR, -i TUN, -m NAT)."""
    family = 6 if ":" in vip else 4
    vaddr = f"[{vip}]:{port}" if family == 6 else f"{vip}:{port}"
    topo.director_vip(director, vip)
    topo.ipvsadm(director, "-A", proto, vaddr, "-s", scheduler)
    for rs in topo.real_servers:
        rip = topo.ip(rs, family)
        raddr = f"[{rip}]:{port}" if family == 6 else f"{rip}:{port}"
        topo.ipvsadm(director, "-a", proto, vaddr, "-r", raddr, method)


def _check_alternation(topo: Topology, names: list[str]) -> None:
    assert alternates(names, topo.real_servers), (
        f"expected rs1/rs2 to alternate, got {names}\n"
        + topo.ipvsadm("dir1", "-Ln", "--stats").stdout
        + topo.describe()
    )


def test_dr_rr(topology: Topology) -> None:
    vip = topology.vip4()
    for rs in topology.real_servers:
        topology.real_server_dr(rs, vip)
    _service(topology, vip, "-g")
    _check_alternation(topology, topology.client_get(vip, 80, N))


def test_dr_rr_udp(topology: Topology) -> None:
    vip = topology.vip4()
    for rs in topology.real_servers:
        topology.real_server_dr(rs, vip)
    _service(topology, vip, "-g", proto="-u")
    _check_alternation(topology, topology.client_udp(vip, 80, N))


def test_tun_rr(topology: Topology) -> None:
    vip = topology.vip4()
    for rs in topology.real_servers:
        topology.real_server_tun(rs, vip)
    _service(topology, vip, "-i")
    _check_alternation(topology, topology.client_get(vip, 80, N))


def test_nat_rr(topology: Topology) -> None:
    vip = topology.vip4()
    for rs in topology.real_servers:
        topology.real_server_nat(rs, "dir1")
    _service(topology, vip, "-m")
    _check_alternation(topology, topology.client_get(vip, 80, N))
    # NAT keeps the client's address: the real server sees the client, the client sees the VIP.
    info = topology.client_http(vip, 80, 1, path="/info")[0].split()
    assert info[1] == topology.ip4("client"), info


def test_dr_rr_ipv6(topology: Topology) -> None:
    vip = topology.vip6()
    for rs in topology.real_servers:
        topology.real_server_dr(rs, vip)
    _service(topology, vip, "-g")
    _check_alternation(topology, topology.client_get(vip, 80, N))


def test_tun_rr_ipv6(topology: Topology) -> None:
    vip = topology.vip6()
    for rs in topology.real_servers:
        topology.real_server_tun(rs, vip)
    _service(topology, vip, "-i")
    _check_alternation(topology, topology.client_get(vip, 80, N))


@pytest.mark.topology(real_servers=3)
def test_sh_source_addresses(topology: Topology) -> None:
    """Source hashing: each simulated client (own source address) sticks to one real server."""
    vip = topology.vip4()
    for rs in topology.real_servers:
        topology.real_server_dr(rs, vip)
    _service(topology, vip, "-g", scheduler="sh")
    seen = set()
    for src in topology.add_client_addrs(6):
        names = topology.client_get(vip, 80, 3, src=src)
        assert len(set(names)) == 1 and names[0] in topology.real_servers, (src, names)
        seen.add(names[0])
    assert len(seen) >= 2, f"6 client addresses all hashed to {seen}"


def test_topology_cleanup(make_topology: Any) -> None:
    """close() kills the servers and deletes every namespace it made (and is idempotent)."""
    topo = make_topology(real_servers=1, directors=1)
    names = [topo.ns(node) for node in ["sw", *topo.nodes]]
    assert all((NETNS / name).exists() for name in names)
    server = topo._procs["rs1"]
    topo.close()
    assert server.poll() is not None
    assert not [name for name in names if (NETNS / name).exists()]
    topo.close()
