"""The receive side against the host kernel, in throwaway network namespaces: DR (the VIP on lo,
the ARP sysctls), restore on removal, foreign state left alone, and finding a namespace by IP.
Tunnel devices need modules this host lacks: those run in the VM (tests/kernel/test_realserver_datapath.py).
Needs root and network namespaces; skipped otherwise."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from kubelvs.core.model import AF_INET, AF_INET6
from kubelvs.core.receive import Address, Item, MssClamp, Sysctl
from kubelvs.kernel.podnetns import NetnsFinder
from kubelvs.kernel.receive import Record, converge

DR4 = frozenset(
    {
        Address("lo", "192.0.2.10", AF_INET),
        Sysctl("net/ipv4/conf/all/arp_ignore", 1),
        Sysctl("net/ipv4/conf/all/arp_announce", 2),
    }
)
DR6: frozenset[Item] = frozenset({Address("lo", "2001:db8::10", AF_INET6)})


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"
    return done.stdout


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    name = f"kubelvs-rs-{uuid.uuid4().hex[:8]}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("no network namespace support")
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _state(netns: str) -> tuple[str, str, str]:
    sysctls = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            netns,
            "sysctl",
            "-n",
            "net.ipv4.conf.all.arp_ignore",
            "net.ipv4.conf.all.arp_announce",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return (
        _ip("-n", netns, "-4", "addr", "show", "dev", "lo"),
        _ip("-n", netns, "-6", "addr", "show", "dev", "lo"),
        sysctls,
    )


def test_dr_prepares_then_restores_exactly(netns: str) -> None:
    before = _state(netns)
    record: Record = {}
    saved: list[dict[Item, int | None]] = []
    actions, ready = converge(f"/run/netns/{netns}", DR4 | DR6, record, lambda r: saved.append(dict(r)))
    assert ready and len(actions) == 4
    assert "192.0.2.10/32" in _ip("-n", netns, "addr", "show", "dev", "lo")
    assert "2001:db8::10/128" in _ip("-n", netns, "addr", "show", "dev", "lo")
    assert _state(netns)[2].split() == ["1", "2"]
    assert record[Sysctl("net/ipv4/conf/all/arp_ignore", 1)] == 0  # the value found, recorded before the change
    assert saved  # written ahead

    again, ready = converge(f"/run/netns/{netns}", DR4 | DR6, record, lambda r: None)
    assert again == [] and ready  # a restart with the record: zero changes

    actions, _ = converge(f"/run/netns/{netns}", frozenset(), record, lambda r: None)
    assert len(actions) == 4 and record == {}
    assert _state(netns) == before


def test_foreign_address_and_a_sysctl_set_by_hand_stay(netns: str) -> None:
    _ip("-n", netns, "addr", "add", "192.0.2.10/32", "dev", "lo")
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv4.conf.all.arp_announce=2"], check=True)
    record: Record = {}
    actions, ready = converge(f"/run/netns/{netns}", DR4, record, lambda r: None)
    assert ready and [a.item for a in actions] == [Sysctl("net/ipv4/conf/all/arp_ignore", 1)]
    converge(f"/run/netns/{netns}", frozenset(), record, lambda r: None)
    assert "192.0.2.10/32" in _ip("-n", netns, "addr", "show", "dev", "lo")
    assert _state(netns)[2].split() == ["0", "2"]


MSS_PROBE = r"""
import socket, subprocess, sys
vip = sys.argv[1]
server = socket.socket(); server.bind((vip, 8080)); server.listen(1)
client = socket.create_connection((vip, 8080), timeout=5)
peer, _ = server.accept()
print(client.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG))
"""


def _client_mss(netns: str, vip: str) -> int:
    """The MSS a client in ``netns`` uses towards a server on ``vip`` there (what the server's SYN-ACK offered)."""
    done = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", MSS_PROBE, vip], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_the_mss_clamp_lowers_what_the_vip_offers_and_goes_away_exactly(netns: str) -> None:
    if shutil.which("nft") is None:
        pytest.skip("no nft binary")
    vip = "192.0.2.10"
    _ip("-n", netns, "addr", "add", f"{vip}/32", "dev", "lo")
    _ip("-n", netns, "addr", "add", "192.0.2.11/32", "dev", "lo")
    subprocess.run(["ip", "netns", "exec", netns, "nft", "add", "table", "inet", "somebody_else"], check=True)
    assert _client_mss(netns, vip) > 1440  # lo's MTU
    clamp = MssClamp(vip, AF_INET, 1440)
    record: Record = {}
    actions, ready = converge(f"/run/netns/{netns}", frozenset({clamp}), record, lambda r: None)
    assert ready and [a.item for a in actions] == [clamp]
    assert 1440 - 12 <= _client_mss(netns, vip) <= 1440  # less the timestamp option, if used
    assert _client_mss(netns, "192.0.2.11") > 1440  # only the VIP's SYN-ACKs
    assert converge(f"/run/netns/{netns}", frozenset({clamp}), record, lambda r: None) == ([], True)
    converge(f"/run/netns/{netns}", frozenset(), record, lambda r: None)
    tables = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "tables"], capture_output=True, text=True)
    assert tables.stdout.split() == ["table", "inet", "somebody_else"]
    assert _client_mss(netns, vip) > 1440


def test_finds_a_namespace_by_the_address_of_a_process_inside(netns: str) -> None:
    _ip("-n", netns, "addr", "add", "10.99.0.7/32", "dev", "lo")
    sleeper = subprocess.Popen(["ip", "netns", "exec", netns, "sleep", "60"])
    try:
        finder = NetnsFinder()
        found = None
        # The process enters the namespace shortly after it starts: poll with a deadline.
        deadline = time.monotonic() + 10
        while found is None and time.monotonic() < deadline:
            found = finder.find(["10.99.0.7"])
        assert found is not None, "no namespace with 10.99.0.7 among the processes'"
        assert os.stat(found[0]).st_ino == os.stat(f"/run/netns/{netns}").st_ino
        assert finder.find(["10.99.0.8"]) is None
    finally:
        sleeper.kill()
        sleeper.wait()


def _pod_mode(netns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "kubelvs.cli", "realserver", "--pod", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_init_container_mode_prepares_its_own_namespace_once(netns: str) -> None:
    first = _pod_mode(netns, "--method", "DR", "--vip", "192.0.2.10", "--vip", "2001:db8::10")
    assert first.returncode == 0, first.stderr
    assert "192.0.2.10/32" in _ip("-n", netns, "addr", "show", "dev", "lo")
    assert "2001:db8::10/128" in _ip("-n", netns, "addr", "show", "dev", "lo")
    assert _state(netns)[2].split() == ["1", "2"]
    again = _pod_mode(netns, "--method", "DR", "--vip", "192.0.2.10", "--vip", "2001:db8::10")
    assert (again.returncode, again.stdout) == (0, "")  # nothing left to do


def test_init_container_mode_names_a_bad_option(netns: str) -> None:
    done = _pod_mode(netns, "--vip", "192.0.2.300")
    assert done.returncode == 2 and "--vip" in done.stderr, done.stderr
