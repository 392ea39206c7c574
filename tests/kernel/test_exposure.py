"""A VIP answers only on its configured ports (kubernetes#72236), with real traffic.

kubelvs makes every VIP local on its director, so a host listener bound to the wildcard address
(here: an HTTP server on TCP 2222 and a UDP echo on 5353 in the director's namespace, standing in
for sshd, the kubelet or the metrics port) answers on the VIP too. ``VipPortFilter`` (an
nftables table ``inet kubelvs``) drops TCP/UDP/SCTP to a VIP unless a virtual service covers the
port; the service ports still reach IPVS and are load-balanced to the real servers.

Runs inside the VM. The test calls ``VipPortFilter`` itself after ``kubelvs apply`` and starts
from the table removed, so it holds whether or not ``apply`` installs the filter too.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubelvs.kernel.vipfilter import VipPortFilter
from topology import Topology, alternates

KUBELVS = str(Path(sys.executable).with_name("kubelvs"))
TCP, UDP = 6, 17
HOST_TCP, HOST_UDP = 2222, 5353  # host listeners in the director's namespace, on no VIP's service

FOREIGN = """\
table ip foreign {
\tset blocked {
\t\ttype ipv4_addr
\t\telements = { 192.0.2.99 }
\t}
\tchain input {
\t\ttype filter hook input priority 10; policy accept;
\t\tip saddr @blocked drop
\t}
}
table inet kubelvsx {
\tchain output {
\t\ttype filter hook output priority 0; policy accept;
\t}
}
"""


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    with Topology(real_servers=2, directors=1, ports=(80,), udp_ports=(53,)) as topology:
        topology.start_servers([HOST_TCP], [HOST_UDP], nodes=["dir1"])
        yield topology


def nft(topo: Topology, *args: str, input: str | None = None) -> str:
    return topo.exec("dir1", ["nft", *args], input=input).stdout


def foreign_tables(topo: Topology) -> str:
    """The tables kubelvs does not own, as nft lists them."""
    return nft(topo, "list", "table", "ip", "foreign") + nft(topo, "list", "table", "inet", "kubelvsx")


def apply(topo: Topology, workdir: Path, vip: str, backends: list[str]) -> Path:
    vs = {
        "apiVersion": "kubelvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": "web", "namespace": "kt"},
        "spec": {
            "vip": vip,
            "ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}],
            "scheduler": "rr",
            "backends": {"addresses": [{"ip": ip} for ip in backends]},
        },
    }
    manifest = workdir / "web.yaml"
    manifest.write_text(yaml.safe_dump(vs))
    result = topo.exec(
        "dir1",
        [KUBELVS, "apply", "-f", str(manifest), "--state-dir", str(workdir / "state")],
        check=False,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return manifest


def blocked(answers: list[str]) -> bool:
    return all(a.startswith("ERR") for a in answers)


def ping(topo: Topology, address: str) -> bool:
    cmd = ["busybox", "ping", "-c", "1", "-W", "3", address]
    return topo.exec("client", cmd, check=False, timeout=30).returncode == 0


@pytest.mark.parametrize("family", [4, 6])
def test_vip_answers_only_on_its_service_ports(topo: Topology, tmp_path: Path, family: int) -> None:
    vip = topo.vip(0 if family == 4 else 1, family)
    for rs in topo.real_servers:
        topo.real_server_dr(rs, vip)
    if family == 6:  # no NDP for an address on the dummy: routed, as BGP or a static route would
        topo.exec("client", ["ip", "-6", "route", "replace", f"{vip}/128", "via", topo.ip6("dir1")])
    manifest = apply(topo, tmp_path, vip, [topo.ip(rs, family) for rs in topo.real_servers])
    vipfilter = VipPortFilter(topo.ns("dir1"))
    vipfilter.remove()  # the unfiltered state, whether or not `kubelvs apply` installed a filter
    nft(topo, "-f", "-", input=FOREIGN)
    foreign = foreign_tables(topo)

    # Without the filter: the host listeners answer on the VIP (the exposure).
    assert topo.client_get(vip, HOST_TCP) == ["dir1"]
    assert topo.client_udp(vip, HOST_UDP) == ["dir1"]
    assert alternates(topo.client_get(vip, 80, 4), topo.real_servers)

    try:
        vipfilter.sync({vip: {(TCP, 80), (UDP, 53)}})
        table = nft(topo, "list", "table", "inet", "kubelvs")
        assert vip in table and "drop" in table, table

        # The VIP's other ports are closed (no answer: dropped before any socket) ...
        assert blocked(topo.client_get(vip, HOST_TCP, timeout=2))
        assert blocked(topo.client_udp(vip, HOST_UDP, timeout=2))
        # ... its service ports still reach IPVS, and go to the real servers ...
        assert alternates(topo.client_get(vip, 80, 4), topo.real_servers)
        assert sorted(topo.client_udp(vip, 53, 2)) == sorted(topo.real_servers)
        # ... ICMP stays (ping, PMTU discovery), and the director's own address is not filtered.
        assert ping(topo, vip)
        assert topo.client_get(topo.ip("dir1", family), HOST_TCP) == ["dir1"]
        counted = nft(topo, "list", "table", "inet", "kubelvs")
        assert re.search(r"counter packets [1-9]", counted), counted  # the drops, for an operator

        if family == 4:  # the table's life cycle does not depend on the family: checked once
            # Unchanged: nothing applied (the ruleset's generation stays); another table untouched.
            generation = vipfilter._generation()
            vipfilter.sync({vip: [(UDP, 53), (TCP, 80)]})
            assert vipfilter._generation() == generation
            assert foreign_tables(topo) == foreign

            # Begun in the background (a full sync starts it before programming IPVS): a sync
            # with the same mapping then applies nothing more; with another, that one.
            begun = {vip: {(TCP, 80), (UDP, 53), (TCP, 81)}}
            vipfilter.begin(begun)
            vipfilter.sync(begun)
            assert vipfilter._generation() == generation + 1
            vipfilter.begin({vip: {(TCP, 82)}})
            vipfilter.sync({vip: {(TCP, 80), (UDP, 53)}})
            assert vipfilter._generation() == generation + 3
            assert blocked(topo.client_get(vip, HOST_TCP, timeout=2))
            assert alternates(topo.client_get(vip, 80, 4), topo.real_servers)

            # A firewall reload wipes every table: the next sync puts the filter back.
            nft(topo, "flush", "ruleset")
            vipfilter.sync({vip: {(TCP, 80), (UDP, 53)}})
            assert blocked(topo.client_get(vip, HOST_TCP, timeout=2))
            nft(topo, "-f", "-", input=FOREIGN)

        # Removing the filter restores reachability, and leaves the other tables as they were.
        vipfilter.remove()
        assert topo.client_get(vip, HOST_TCP) == ["dir1"]
        assert "table inet kubelvs\n" not in nft(topo, "list", "tables")
        assert foreign_tables(topo) == foreign

        if family == 4:  # an empty mapping removes the table as well
            vipfilter.sync({vip: {(TCP, 80)}})
            assert "table inet kubelvs\n" in nft(topo, "list", "tables")
            vipfilter.sync({})
            assert "table inet kubelvs\n" not in nft(topo, "list", "tables")
    finally:
        _cleanup(topo, manifest, vipfilter)


def _cleanup(topo: Topology, manifest: Path, vipfilter: VipPortFilter) -> None:
    vipfilter.remove()
    for table in ("ip foreign", "inet kubelvsx"):
        topo.exec("dir1", ["nft", "delete", "table", *table.split()], check=False)
    state = str(manifest.parent / "state")
    topo.exec("dir1", [KUBELVS, "delete", "-f", str(manifest), "--state-dir", state], check=False, timeout=240)
    topo.ipvsadm("dir1", "-C", check=False)
    topo.exec("dir1", ["ip", "link", "del", "kubelvs0"], check=False)
