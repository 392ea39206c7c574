"""Claims (host addresses with a lifetime on the uplink), uplink_for and ArpGuard against the host
kernel, in a throwaway network namespace of each test's own. Needs root and network namespaces;
skipped otherwise."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubelvs.core.model import AF_INET, AF_INET6
from kubelvs.kernel import addresses as address_module
from kubelvs.kernel import claims
from kubelvs.kernel.addresses import ADDRESS_PROTO, VipInterface, supports_address_proto
from kubelvs.kernel.claims import FOREVER, ArpGuard, ClaimAddresses, ForeignAddressError, Uplink, uplink_for

MAC = "02:00:00:00:01:01"


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


def _must(*args: str) -> str:
    done = _ip(*args)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"
    return done.stdout


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a network namespace")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's ip to create a network namespace")
    name = f"kubelvs-ut-{uuid.uuid4().hex[:8]}"
    created = _ip("netns", "add", name)
    if created.returncode != 0:
        pytest.skip(f"no network namespace support: ip netns add: {created.stderr.strip()}")
    try:
        yield name
    finally:
        _ip("netns", "del", name)


@pytest.fixture
def uplink(netns: str) -> str:
    """``eth0`` (a veth whose peer stays in the namespace), up, with 10.60.0.1/24 and fd60::1/64."""
    made = _ip("-n", netns, "link", "add", "eth0", "address", MAC, "type", "veth", "peer", "name", "eth0p")
    if made.returncode != 0:
        pytest.skip(f"no veth interfaces: {made.stderr.strip()}")
    _must("-n", netns, "link", "set", "eth0p", "up")
    _must("-n", netns, "link", "set", "eth0", "up")
    _must("-n", netns, "addr", "add", "10.60.0.1/24", "dev", "eth0")
    _must("-n", netns, "addr", "add", "fd60::1/64", "dev", "eth0", "nodad")
    return "eth0"


def _line(netns: str, address: str) -> str | None:
    """The two lines of ``ip -d addr show dev eth0`` for ``address`` (its entry and lifetimes)."""
    shown = _must("-n", netns, "-d", "addr", "show", "dev", "eth0").splitlines()
    for number, line in enumerate(shown):
        if re.search(rf"\binet6? {re.escape(address)}/", line):
            return line + "\n" + (shown[number + 1] if number + 1 < len(shown) else "")
    return None


def _valid_lft(entry: str) -> int | None:
    """valid_lft in seconds, None for forever."""
    match = re.search(r"valid_lft (\d+)sec|valid_lft forever", entry)
    assert match is not None, entry
    return int(match.group(1)) if match.group(1) else None


def _protos(netns: str) -> dict[str, int | None]:
    """The addresses of the namespace -> IFA_PROTO, read by pyroute2 (iproute2 6.1 does not show
    an address's proto)."""
    from pyroute2 import NetNS

    with NetNS(netns) as ns:
        return {a.get_attr("IFA_ADDRESS"): a.get_attr("IFA_PROTO") for a in ns.get_addr()}


# --- uplink_for ---------------------------------------------------------------------------------


def test_uplink_for_picks_the_interface_by_subnet(netns: str, uplink: str) -> None:
    index = int(_must("-n", netns, "-o", "link", "show", "dev", "eth0").split(":")[0])
    expected = Uplink("eth0", index, MAC, True)
    assert uplink_for("10.60.0.100", netns=netns) == expected
    assert uplink_for("fd60::100", netns=netns) == expected
    assert uplink_for("10.61.0.100", netns=netns) is None  # in no subnet
    assert uplink_for("fd61::100", netns=netns) is None
    assert uplink_for("127.0.0.5", netns=netns) is None  # lo is never an uplink


def test_the_director_matches_vips_to_uplinks_again_only_when_the_links_change(
    netns: str, uplink: str, tmp_path: Path
) -> None:
    from kubelvs.director.vipnet import KernelVipNet

    net = KernelVipNet(tmp_path, netns)
    first = net.uplinks(["10.60.0.100", "10.61.0.100"])
    assert first == {"10.60.0.100": ("eth0", True), "10.61.0.100": None}
    assert net.uplinks(["10.61.0.100", "10.60.0.100"]) is first  # nothing changed: the same answer
    more = net.uplinks(["10.60.0.100", "10.61.0.100", "fd60::7"])  # a new VIP: matched on its own
    assert more == {**first, "fd60::7": ("eth0", True)}
    _must("-n", netns, "link", "set", "eth0", "down")  # (which drops its IPv6 addresses)
    assert net.uplinks(["10.60.0.100", "fd60::7"]) == {"10.60.0.100": ("eth0", False), "fd60::7": None}
    _must("-n", netns, "addr", "add", "10.61.0.1/24", "dev", "eth0")
    assert net.uplinks(["10.61.0.100"]) == {"10.61.0.100": ("eth0", False)}  # a new subnet
    net.close()


def test_uplink_for_ignores_host_routes_the_dummy_and_prefers_the_longest_prefix(netns: str, uplink: str) -> None:
    _must("-n", netns, "addr", "add", "10.62.0.5/32", "dev", "eth0")  # a host address: no subnet
    assert uplink_for("10.62.0.5", netns=netns) is None
    _must("-n", netns, "link", "add", "kubelvs0", "type", "veth", "peer", "name", "kubelvs0p")
    _must("-n", netns, "addr", "add", "10.63.0.1/24", "dev", "kubelvs0")
    assert uplink_for("10.63.0.9", netns=netns) is None  # the VIPs' own dummy is never the uplink
    _must("-n", netns, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p")
    _must("-n", netns, "addr", "add", "10.0.0.1/8", "dev", "eth1")
    assert uplink_for("10.60.0.100", netns=netns).name == "eth0"  # type: ignore[union-attr]  # /24 beats /8
    assert uplink_for("10.64.0.100", netns=netns).name == "eth1"  # type: ignore[union-attr]


def test_uplink_for_honours_a_named_interface_and_reports_a_down_one(netns: str, uplink: str) -> None:
    _must("-n", netns, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p")  # down, no address
    named = uplink_for("10.60.0.100", netns=netns, named="eth1")
    assert named is not None
    assert named.name == "eth1"
    assert named.up is False
    assert uplink_for("10.60.0.100", netns=netns, named="nosuch0") is None
    _must("-n", netns, "link", "set", "eth0p", "down")  # eth0 loses its carrier
    down = uplink_for("10.60.0.100", netns=netns)
    assert down is not None
    assert (down.name, down.up) == ("eth0", False)


def test_uplinks_for_many_vips_at_once(netns: str, uplink: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _must("-n", netns, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p")
    _must("-n", netns, "addr", "add", "10.61.0.1/24", "dev", "eth1")
    opened: list[object] = []
    real = claims._Rtnl

    def counting(netns: str | None) -> object:
        rtnl = real(netns)
        opened.append(rtnl)
        return rtnl

    monkeypatch.setattr(claims, "_Rtnl", counting)
    found = claims.uplinks_for(["10.60.0.100", "fd60::100", "10.61.0.100", "10.99.0.1"], netns=netns)
    assert {vip: link.name if link else None for vip, link in found.items()} == {
        "10.60.0.100": "eth0",
        "fd60::100": "eth0",
        "10.61.0.100": "eth1",
        "10.99.0.1": None,
    }
    assert len(opened) == 1  # one socket, one dump of each kind, for every VIP
    named = claims.uplinks_for(["10.60.0.100", "10.99.0.1"], netns=netns, named="eth1")
    assert {link.name for link in named.values() if link} == {"eth1"}
    assert len(named) == 2


def test_held_claims_finds_every_claim_and_no_other_tagged_address(netns: str, uplink: str) -> None:
    _must("-n", netns, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p")
    _must("-n", netns, "link", "add", "kubelvs0", "type", "veth", "peer", "name", "kubelvs0p")
    ClaimAddresses("eth0", netns=netns).hold("10.60.0.100", AF_INET, 30)
    ClaimAddresses("eth0", netns=netns).hold("fd60::100", AF_INET6, 30)
    ClaimAddresses("eth1", netns=netns).hold("10.61.0.100", AF_INET, 30)
    VipInterface("kubelvs0", netns=netns).add("10.60.0.100", AF_INET)  # the dummy's copy: no claim
    VipInterface("eth1", netns=netns).add("10.61.0.101", AF_INET)  # tagged, but without a lifetime
    _must("-n", netns, "addr", "add", "10.61.0.102/32", "dev", "eth1", "valid_lft", "30", "preferred_lft", "30")
    expected = {"10.60.0.100": "eth0", "fd60::100": "eth0", "10.61.0.100": "eth1"}
    if not supports_address_proto():
        expected = {}
    assert claims.held_claims(netns) == expected


# --- ClaimAddresses ------------------------------------------------------------------------------


def test_hold_adds_the_address_with_its_lifetime_and_mark(netns: str, uplink: str) -> None:
    addresses = ClaimAddresses("eth0", netns=netns)
    assert addresses.hold("10.60.0.100", AF_INET, 30) is True
    assert addresses.hold("fd60::100", AF_INET6, 30) is True
    v4 = _line(netns, "10.60.0.100")
    assert v4 is not None
    assert "10.60.0.100/32" in v4
    assert 28 <= _valid_lft(v4) <= 30  # type: ignore[operator]
    assert "preferred_lft 0sec" not in v4  # IPv4: usable as ever, until it expires
    v6 = _line(netns, "fd60::100")
    assert v6 is not None
    assert "fd60::100/128" in v6
    assert "nodad" in v6
    assert "tentative" not in v6
    assert "preferred_lft 0sec" in v6  # never a source address
    assert 28 <= _valid_lft(v6) <= 30  # type: ignore[operator]
    if supports_address_proto():
        protos = _protos(netns)
        assert protos["10.60.0.100"] == protos["fd60::100"] == ADDRESS_PROTO
        assert not protos["10.60.0.1"]
    held = addresses.held()
    assert set(held) == {"10.60.0.100", "fd60::100"}  # not eth0's own addresses
    assert all(28 <= lifetime <= 30 for lifetime in held.values())


def test_hold_again_refreshes_the_lifetime(netns: str, uplink: str) -> None:
    addresses = ClaimAddresses("eth0", netns=netns)
    assert addresses.hold("10.60.0.100", AF_INET, 5) is True
    assert addresses.hold("fd60:0::100", AF_INET6, 5) is True  # any text: the canonical one is kept
    assert addresses.hold("10.60.0.100", AF_INET, 300) is False
    assert addresses.hold("fd60::100", AF_INET6, 300) is False
    for address in ("10.60.0.100", "fd60::100"):
        entry = _line(netns, address)
        assert entry is not None
        assert 290 <= _valid_lft(entry) <= 300  # type: ignore[operator]
    assert addresses.held().keys() == {"10.60.0.100", "fd60::100"}
    assert addresses.hold("10.60.0.100", AF_INET, 2) is False  # shortened as well as lengthened
    assert addresses.held()["10.60.0.100"] <= 2


@pytest.mark.parametrize(("vip", "family"), [("10.60.0.101", AF_INET), ("fd60::101", AF_INET6)])
def test_an_unrefreshed_claim_disappears_by_itself(netns: str, uplink: str, vip: str, family: int) -> None:
    addresses = ClaimAddresses("eth0", netns=netns)
    assert addresses.hold(vip, family, 1) is True
    start = time.monotonic()
    deadline = start + 5
    while _line(netns, vip) is not None:
        assert time.monotonic() < deadline, f"{vip} still there 5 s after its 1 s lifetime"
        time.sleep(0.1)
    assert time.monotonic() - start < 3.5
    assert addresses.held() == {}
    assert addresses.hold(vip, family, 1) is True  # gone, so added anew


def test_release_removes_only_a_claim(netns: str, uplink: str) -> None:
    addresses = ClaimAddresses("eth0", netns=netns)
    addresses.hold("10.60.0.100", AF_INET, 30)
    addresses.hold("fd60::100", AF_INET6, 30)
    addresses.release("10.60.0.100", AF_INET)
    addresses.release("fd60::100", AF_INET6)
    addresses.release("10.60.0.100", AF_INET)  # gone already: no error
    addresses.release("10.60.0.200", AF_INET)  # never there
    assert _line(netns, "10.60.0.100") is None
    assert _line(netns, "fd60::100") is None
    assert addresses.held() == {}
    _must("-n", netns, "addr", "add", "10.60.0.102/32", "dev", "eth0")
    _must("-n", netns, "addr", "add", "fd60::102/128", "dev", "eth0", "nodad")
    addresses.release("10.60.0.102", AF_INET)  # somebody else's: stays
    addresses.release("fd60::102", AF_INET6)
    addresses.release("10.60.0.1", AF_INET)  # the interface's own address too
    assert _line(netns, "10.60.0.102") is not None
    assert _line(netns, "fd60::102") is not None
    assert _line(netns, "10.60.0.1") is not None


def test_release_many_removes_only_claims_after_one_read(netns: str, uplink: str) -> None:
    addresses = ClaimAddresses("eth0", netns=netns)
    ours = [(f"10.60.0.{n}", AF_INET) for n in range(110, 120)] + [("fd60::110", AF_INET6)]
    with addresses.session():
        for vip, family in ours:
            addresses.hold(vip, family, 30)
    _must("-n", netns, "addr", "add", "10.60.0.120/32", "dev", "eth0")
    assert addresses.release_many([*ours, ("10.60.0.120", AF_INET), ("10.60.0.121", AF_INET)]) == []
    assert addresses.held() == {}
    assert _line(netns, "10.60.0.120") is not None  # not ours: stays


@pytest.mark.parametrize(("vip", "family", "prefix"), [("10.60.0.103", AF_INET, "32"), ("fd60::103", AF_INET6, "128")])
def test_a_foreign_address_is_never_taken_over(netns: str, uplink: str, vip: str, family: int, prefix: str) -> None:
    if not supports_address_proto():
        pytest.skip("this kernel drops IFA_PROTO: kubelvs cannot tell its claims from foreign addresses")
    _must(
        "-n", netns, "addr", "add", f"{vip}/{prefix}", "dev", "eth0", "nodad" if family == AF_INET6 else "noprefixroute"
    )
    addresses = ClaimAddresses("eth0", netns=netns)
    with pytest.raises(ForeignAddressError) as raised:
        addresses.hold(vip, family, 30)
    assert raised.value.errno == errno.EEXIST
    assert vip in str(raised.value)
    assert "eth0" in str(raised.value)
    assert (raised.value.address, raised.value.interface) == (vip, "eth0")
    entry = _line(netns, vip)
    assert entry is not None
    assert _valid_lft(entry) is None  # still forever: untouched
    assert addresses.held() == {}
    with addresses.session(), pytest.raises(ForeignAddressError):  # and with a session's cached view
        addresses.held()
        addresses.hold(vip, family, 30)


def test_a_missing_interface(netns: str) -> None:
    addresses = ClaimAddresses("eth9", netns=netns)
    with pytest.raises(OSError) as raised:
        addresses.hold("10.60.0.100", AF_INET, 5)
    assert raised.value.errno == errno.ENODEV
    addresses.release("10.60.0.100", AF_INET)
    assert addresses.held() == {}
    with pytest.raises(ValueError):
        ClaimAddresses("eth0", netns=netns).hold("10.60.0.100", AF_INET, 0)  # whole seconds >= 1


def test_a_session_serves_a_renewal_with_one_socket(netns: str, uplink: str, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[object] = []
    real = claims._Rtnl

    def counting(netns: str | None) -> object:
        rtnl = real(netns)
        opened.append(rtnl)
        return rtnl

    monkeypatch.setattr(claims, "_Rtnl", counting)
    monkeypatch.setattr(address_module, "_Rtnl", counting)  # the sessions' socket (RtnlSessions)
    addresses = ClaimAddresses("eth0", netns=netns)
    vips = [f"10.60.0.{n}" for n in range(100, 120)]
    with addresses.session():
        assert all(addresses.hold(vip, AF_INET, 30) for vip in vips)
        with addresses.session():  # nested: the same session
            assert not any(addresses.hold(vip, AF_INET, 30) for vip in vips)
        addresses.release(vips[0], AF_INET)
        assert set(addresses.held()) == set(vips[1:])
    assert len(opened) == 1
    addresses.held()
    assert len(opened) == 2  # outside a session: one socket a call
    assert addresses._session is None


def test_the_caller_stays_in_its_namespace_and_nothing_is_forked(
    netns: str, uplink: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_fork() -> int:
        raise AssertionError("forked")

    own = os.stat("/proc/thread-self/ns/net").st_ino
    monkeypatch.setattr(os, "fork", no_fork)
    monkeypatch.setattr(subprocess, "Popen", no_fork)
    addresses = ClaimAddresses("eth0", netns=netns)
    assert addresses.hold("10.60.0.100", AF_INET, 30) is True
    assert uplink_for("10.60.0.100", netns=netns) is not None
    assert os.stat("/proc/thread-self/ns/net").st_ino == own
    monkeypatch.undo()
    assert "10.60.0.100" not in subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True).stdout


def test_held_reads_forever_as_forever(netns: str, uplink: str) -> None:
    # A tagged address without a lifetime (VipInterface's kind, never a claim): FOREVER.
    assert VipInterface("eth0", netns=netns).add("10.60.0.100", AF_INET) is True
    assert ClaimAddresses("eth0", netns=netns).held() == {"10.60.0.100": FOREVER}


def test_a_claim_changed_by_hand_is_no_longer_ours(netns: str, uplink: str) -> None:
    if not supports_address_proto():
        pytest.skip("this kernel drops IFA_PROTO")
    addresses = ClaimAddresses("eth0", netns=netns)
    addresses.hold("10.60.0.100", AF_INET, 30)
    # A replace carries its own IFA_PROTO (none here): the kernel drops kubelvs's mark with it.
    _must("-n", netns, "addr", "change", "10.60.0.100/32", "dev", "eth0", "valid_lft", "forever")
    assert addresses.held() == {}
    with pytest.raises(ForeignAddressError):
        addresses.hold("10.60.0.100", AF_INET, 30)
    addresses.release("10.60.0.100", AF_INET)
    assert _line(netns, "10.60.0.100") is not None


# --- ArpGuard ------------------------------------------------------------------------------------


def _sysctl(netns: str, name: str) -> int:
    done = subprocess.run(
        ["ip", "netns", "exec", netns, "cat", f"/proc/sys/net/ipv4/conf/{name}"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def _set_sysctl(netns: str, name: str, value: int) -> None:
    subprocess.run(
        ["ip", "netns", "exec", netns, "sh", "-c", f"echo {value} > /proc/sys/net/ipv4/conf/{name}"],
        check=True,
        timeout=10,
    )


def test_arp_guard_sets_records_and_restores(netns: str, uplink: str, tmp_path: Path) -> None:
    own = os.stat("/proc/thread-self/ns/net").st_ino
    guard = ArpGuard(tmp_path / "state", netns=netns)
    assert (_sysctl(netns, "eth0/arp_ignore"), _sysctl(netns, "eth0/arp_announce")) == (0, 0)
    guard.ensure("eth0")
    assert (_sysctl(netns, "eth0/arp_ignore"), _sysctl(netns, "eth0/arp_announce")) == (1, 2)
    assert os.stat("/proc/thread-self/ns/net").st_ino == own
    record = json.loads((tmp_path / "state" / "sysctls.json").read_text())
    assert record["sysctls"] == {
        "net/ipv4/conf/eth0/arp_ignore": {"previous": 0, "set": 1},
        "net/ipv4/conf/eth0/arp_announce": {"previous": 0, "set": 2},
    }
    assert os.listdir(tmp_path / "state") == ["sysctls.json"]  # no temporary file left
    ArpGuard(tmp_path / "state", netns=netns).ensure("eth0")  # again (a restart): the record stays
    assert json.loads((tmp_path / "state" / "sysctls.json").read_text()) == record
    ArpGuard(tmp_path / "state", netns=netns).restore()  # a later process restores it
    assert (_sysctl(netns, "eth0/arp_ignore"), _sysctl(netns, "eth0/arp_announce")) == (0, 0)
    assert not (tmp_path / "state" / "sysctls.json").exists()
    guard.restore()  # nothing recorded: nothing to do


def test_arp_guard_changes_only_lower_values(netns: str, uplink: str, tmp_path: Path) -> None:
    _set_sysctl(netns, "eth0/arp_ignore", 2)  # stricter than needed: kept
    guard = ArpGuard(tmp_path, netns=netns)
    guard.ensure("eth0")
    assert (_sysctl(netns, "eth0/arp_ignore"), _sysctl(netns, "eth0/arp_announce")) == (2, 2)
    record = json.loads((tmp_path / "sysctls.json").read_text())
    assert record["sysctls"] == {"net/ipv4/conf/eth0/arp_announce": {"previous": 0, "set": 2}}
    guard.restore()
    assert (_sysctl(netns, "eth0/arp_ignore"), _sysctl(netns, "eth0/arp_announce")) == (2, 0)
    _set_sysctl(netns, "eth0/arp_announce", 2)
    guard.ensure("eth0")  # nothing lower: nothing changed, nothing recorded
    assert not (tmp_path / "sysctls.json").exists()


def test_arp_guard_leaves_a_value_changed_since_by_somebody_else(netns: str, uplink: str, tmp_path: Path) -> None:
    guard = ArpGuard(tmp_path, netns=netns)
    guard.ensure("eth0")
    _set_sysctl(netns, "eth0/arp_ignore", 3)  # an administrator's choice since
    guard.restore()
    assert (_sysctl(netns, "eth0/arp_ignore"), _sysctl(netns, "eth0/arp_announce")) == (3, 0)
    assert not (tmp_path / "sysctls.json").exists()  # the record is dropped all the same


def test_arp_guard_survives_a_vanished_interface(netns: str, uplink: str, tmp_path: Path) -> None:
    guard = ArpGuard(tmp_path, netns=netns)
    guard.ensure("eth0")
    _must("-n", netns, "link", "del", "eth0")
    guard.restore()
    assert not (tmp_path / "sysctls.json").exists()
    with pytest.raises(FileNotFoundError):
        guard.ensure("eth0")


def test_arp_guard_on_all(netns: str, uplink: str, tmp_path: Path) -> None:
    # "all" applies to every interface (the kernel takes the larger of all and the interface's).
    guard = ArpGuard(tmp_path, netns=netns)
    guard.ensure("all")
    assert (_sysctl(netns, "all/arp_ignore"), _sysctl(netns, "all/arp_announce")) == (1, 2)
    assert _sysctl(netns, "eth0/arp_ignore") == 0  # the interface's own value is left alone
    guard.restore()
    assert (_sysctl(netns, "all/arp_ignore"), _sysctl(netns, "all/arp_announce")) == (0, 0)


def test_release_node_removes_claims_and_restores_arp_settings(netns: str, uplink: str, tmp_path: Path) -> None:
    from kubelvs.cli import main

    def sysctl(name: str) -> str:
        return _must("netns", "exec", netns, "cat", f"/proc/sys/net/ipv4/conf/all/{name}").strip()

    before = (sysctl("arp_ignore"), sysctl("arp_announce"))
    ArpGuard(tmp_path, netns).ensure("all")
    assert (sysctl("arp_ignore"), sysctl("arp_announce")) == ("1", "2")
    ClaimAddresses(uplink, netns).hold("10.60.0.77", AF_INET, 30)
    _must("-n", netns, "addr", "add", "10.60.0.78/32", "dev", uplink)  # somebody else's: stays

    assert main(["release-node", "--state-dir", str(tmp_path), "--netns", netns]) == 0

    addresses = _must("-n", netns, "-br", "addr", "show", "dev", uplink)
    assert "10.60.0.77" not in addresses and "10.60.0.78" in addresses
    assert (sysctl("arp_ignore"), sysctl("arp_announce")) == before


def test_release_node_is_refused_while_vips_are_owned(netns: str, tmp_path: Path) -> None:
    from kubelvs.cli import main
    from kubelvs.state.ownership import Ownership, OwnershipStore

    store = OwnershipStore(tmp_path, netns=netns)
    store.save(Ownership(addresses={"10.60.0.5": AF_INET}))
    assert main(["release-node", "--state-dir", str(tmp_path), "--netns", netns]) == 1


def test_net_sysctls_go_through_the_node_proc_mounted_in_a_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubelvs.kernel.sysctls import sysctl_file

    assert sysctl_file("net/ipv4/conf/all/arp_ignore") == "/proc/sys/net/ipv4/conf/all/arp_ignore"
    monkeypatch.setenv("KUBELVS_PROC_SYS_NET", "/host/proc/sys/net/")
    assert sysctl_file("net/ipv4/conf/all/arp_ignore") == "/host/proc/sys/net/ipv4/conf/all/arp_ignore"
    assert sysctl_file("net/ipv4/vs/sloppy_tcp") == "/host/proc/sys/net/ipv4/vs/sloppy_tcp"
    assert sysctl_file("kernel/hostname") == "/proc/sys/kernel/hostname"  # only net/ is mounted


def test_validity_is_asked_right_before_each_request(netns: str, uplink: str) -> None:
    """A refresh is a create exclusive (refused: the claim is there), then a replace. A validity
    that ends between the two (the process frozen there, and continued after another director
    took the VIP) stops the replace: no claim is refreshed, or added again, after it."""
    addresses = ClaimAddresses("eth0", netns=netns)
    assert addresses.hold("10.60.0.100", AF_INET, 30) is True
    answers = iter([True, False])  # valid for the create attempt, not any more for the replace
    with pytest.raises(claims.ValidityEnded):
        addresses.hold("10.60.0.100", AF_INET, 300, lambda: next(answers))
    line = _line(netns, "10.60.0.100")
    assert line is not None and _valid_lft(line) <= 30  # not refreshed to 300
    with pytest.raises(claims.ValidityEnded):
        addresses.hold("10.60.0.101", AF_INET, 30, lambda: False)
    assert _line(netns, "10.60.0.101") is None  # nor added
