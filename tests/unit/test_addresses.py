"""VipInterface (rtnetlink over a socket opened with setns) against the host kernel, in a throwaway
network namespace of each test's own. Needs root and network namespaces; skipped otherwise."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator

import pytest
from kubelvs.core.model import AF_INET, AF_INET6
from kubelvs.kernel.addresses import ADDRESS_PROTO, IFA_F_NODAD, VipInterface, supports_address_proto


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


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


def _dummy_supported(netns: str) -> bool:
    probe = _ip("-n", netns, "link", "add", "probe0", "type", "dummy")
    if probe.returncode != 0:
        return False
    _ip("-n", netns, "link", "del", "probe0")
    return True


@pytest.fixture
def vips(netns: str) -> VipInterface:
    """A VipInterface whose interface exists: created by kubelvs where the kernel has dummy
    interfaces, else a veth made up front (same name; kubelvs only creates a missing one)."""
    vips = VipInterface("kubelvs0", netns=netns)
    if not _dummy_supported(netns):
        made = _ip("-n", netns, "link", "add", "kubelvs0", "type", "veth", "peer", "name", "kubelvs0p")
        if made.returncode != 0:
            pytest.skip(f"neither dummy nor veth interfaces: {made.stderr.strip()}")
    return vips


def _shown(netns: str) -> str:
    return _ip("-n", netns, "-d", "addr", "show", "dev", "kubelvs0").stdout


def test_creates_the_dummy_interface_up(netns: str) -> None:
    if not _dummy_supported(netns):
        pytest.skip("this kernel has no dummy interfaces (CONFIG_DUMMY)")
    vips = VipInterface("kubelvs0", netns=netns)
    assert vips.addresses() == set()  # no interface: nothing, and nothing created
    assert _ip("-n", netns, "link", "show", "kubelvs0").returncode != 0
    assert vips.add("10.0.0.1", AF_INET) is True
    link = _ip("-n", netns, "-d", "link", "show", "kubelvs0").stdout
    assert "dummy" in link
    assert ",UP" in link or "<UP" in link
    assert vips.addresses() == {"10.0.0.1"}


def test_add_remove_and_idempotence(vips: VipInterface, netns: str) -> None:
    assert vips.addresses() == set()
    assert vips.add("10.0.0.1", AF_INET) is True
    assert vips.add("10.0.0.1", AF_INET) is False  # already there
    assert vips.add("fd00::1", AF_INET6) is True
    assert vips.addresses() == {"10.0.0.1", "fd00::1"}
    assert "10.0.0.1/32" in _shown(netns)
    assert "fd00::1/128" in _shown(netns)
    vips.remove("10.0.0.1", AF_INET)
    vips.remove("10.0.0.1", AF_INET)  # gone already: no error
    vips.remove("fd00::1", AF_INET6)
    vips.remove("10.9.9.9", AF_INET)  # never there
    assert vips.addresses() == set()
    assert "inet" not in _shown(netns)


def test_every_added_address_is_tagged(vips: VipInterface, netns: str) -> None:
    vips.add("10.0.0.1", AF_INET)
    vips.add("fd00::1", AF_INET6)
    assert _ip("-n", netns, "addr", "add", "10.0.0.2/32", "dev", "kubelvs0").returncode == 0
    tagged = vips.tagged()
    assert set(tagged) == {"10.0.0.1", "fd00::1", "10.0.0.2"}
    assert tagged["10.0.0.2"] == 0  # not kubelvs's
    if supports_address_proto():
        assert tagged["10.0.0.1"] == tagged["fd00::1"] == ADDRESS_PROTO


def test_ipv6_without_duplicate_address_detection(vips: VipInterface, netns: str) -> None:
    _ip("-n", netns, "link", "set", "kubelvs0", "up")
    vips.add("fd00::2", AF_INET6)
    shown = _shown(netns)
    line = next(line for line in shown.splitlines() if "fd00::2/128" in line)
    assert "nodad" in line
    assert "tentative" not in line
    assert IFA_F_NODAD == 0x02


def test_mapped_ipv6_text_is_canonical(vips: VipInterface) -> None:
    assert vips.add("::ffff:a00:1", AF_INET6) is True  # normalize_address's text of ::ffff:10.0.0.1
    assert vips.addresses() == {"::ffff:a00:1"}
    assert vips.add("::ffff:a00:1", AF_INET6) is False
    vips.remove("::ffff:a00:1", AF_INET6)
    assert vips.addresses() == set()


def test_a_foreign_address_added_meanwhile_is_not_ours(vips: VipInterface, netns: str) -> None:
    with vips.session():
        assert vips.addresses() == set()  # read once for the session
        assert _ip("-n", netns, "addr", "add", "10.0.0.3/32", "dev", "kubelvs0").returncode == 0
        assert vips.add("10.0.0.3", AF_INET) is False  # EEXIST: somebody else's
        assert vips.tagged() == {"10.0.0.3": 0}
    assert vips.tagged() == {"10.0.0.3": 0}


def test_a_session_serves_every_call_with_one_socket(vips: VipInterface, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubelvs.kernel import addresses

    opened: list[object] = []
    real = addresses._Rtnl

    def counting(netns: str | None) -> object:
        rtnl = real(netns)
        opened.append(rtnl)
        return rtnl

    monkeypatch.setattr(addresses, "_Rtnl", counting)
    with vips.session():
        with vips.session():  # nested: the same session
            assert vips.addresses() == set()
        assert vips.add("10.0.0.1", AF_INET) is True
        assert vips.add("fd00::1", AF_INET6) is True
        assert vips.tagged().keys() == {"10.0.0.1", "fd00::1"}
        vips.remove("10.0.0.1", AF_INET)
        assert vips.addresses() == {"fd00::1"}
    assert len(opened) == 1
    vips.addresses()
    vips.addresses()
    assert len(opened) == 3  # outside a session: one socket a call
    assert vips._session is None


def test_the_socket_is_in_the_namespace_and_the_thread_is_not_left_there(vips: VipInterface, netns: str) -> None:
    own = os.stat("/proc/thread-self/ns/net").st_ino
    vips.add("10.0.0.7", AF_INET)
    assert os.stat("/proc/thread-self/ns/net").st_ino == own
    assert "10.0.0.7" in _shown(netns)  # in the namespace, not the caller's
    host = subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True, timeout=10).stdout
    assert "10.0.0.7" not in host


def test_from_another_thread(vips: VipInterface) -> None:
    """The director syncs in executor threads: a session made and used in one works."""
    errors: list[BaseException] = []

    def sync() -> None:
        try:
            with vips.session():
                vips.add("10.0.0.8", AF_INET)
                vips.remove("10.0.0.8", AF_INET)
                vips.add("10.0.0.9", AF_INET)
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=sync)
    thread.start()
    thread.join(30)
    assert not errors
    assert vips.addresses() == {"10.0.0.9"}


def test_kernel_errors_are_oserrors_with_their_errno(netns: str) -> None:
    vips = VipInterface("kubelvs0", netns="kubelvs-no-such-namespace")
    with pytest.raises(OSError):
        vips.addresses()
    vips = VipInterface("kubelvs0", netns=netns)
    assert _ip("-n", netns, "link", "add", "kubelvs0", "type", "veth", "peer", "name", "kubelvs0p").returncode == 0
    with pytest.raises(OSError) as raised:
        vips.add("224.0.0.1", 99)  # no such address family
    assert raised.value.errno in (errno.EAFNOSUPPORT, errno.EINVAL, errno.EOPNOTSUPP)


def test_no_process_is_forked_for_the_namespace(vips: VipInterface, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyroute2's own netns support forks a helper (whose SIGTERM once stopped the director)."""

    def no_fork() -> int:
        raise AssertionError("forked")

    monkeypatch.setattr(os, "fork", no_fork)
    monkeypatch.setattr(subprocess, "Popen", no_fork)
    with vips.session():
        assert vips.add("10.0.0.1", AF_INET) is True
        assert vips.addresses() == {"10.0.0.1"}


def test_many_addresses_are_added_side_by_side_with_each_outcome(vips: VipInterface, netns: str) -> None:
    """add_many pipelines the requests in batches (the receive buffer bounds a batch: every
    request of it may fail); each outcome is the one add would give, in order."""
    wanted = [(f"10.1.{i // 250}.{i % 250 + 1}", AF_INET) for i in range(1200)]  # several batches
    wanted += [("fd00::7", AF_INET6), ("10.1.0.1", AF_INET)]  # the second 10.1.0.1: there already
    with vips.session():
        assert _ip("-n", netns, "addr", "add", "10.1.0.5/32", "dev", "kubelvs0").returncode == 0  # foreign
        outcomes = vips.add_many(wanted)
    assert outcomes[4] is False  # 10.1.0.5: somebody else's (EEXIST), not kubelvs's
    assert outcomes[-1] is False
    assert all(outcome is True for i, outcome in enumerate(outcomes[:-1]) if i != 4)
    tagged = vips.tagged()
    assert len(tagged) == 1201
    assert tagged["10.1.0.5"] == 0 or not supports_address_proto()
    assert tagged["fd00::7"] == ADDRESS_PROTO or not supports_address_proto()
    assert vips.add_many([("10.1.0.1", AF_INET)]) == [False]


def test_adding_nothing_reads_nothing(vips: VipInterface, monkeypatch: pytest.MonkeyPatch) -> None:
    """An incremental sync has no VIP to add: no socket, no dump of every address."""
    from kubelvs.kernel import addresses

    monkeypatch.setattr(addresses, "_Rtnl", lambda netns: pytest.fail("a socket was opened"))
    assert vips.add_many([]) == []


def test_a_failed_add_among_many_is_its_own_outcome(vips: VipInterface, netns: str) -> None:
    vips.addresses()  # the interface exists (the dummy is created at the first add otherwise)
    vips.add("10.2.0.9", AF_INET)
    disabled = _ip("netns", "exec", netns, "sysctl", "-qw", "net.ipv6.conf.kubelvs0.disable_ipv6=1")
    if disabled.returncode != 0:
        pytest.skip(f"cannot disable IPv6 on the interface: {disabled.stderr.strip()}")
    outcomes = vips.add_many([("10.2.0.1", AF_INET), ("fd00::9", AF_INET6), ("10.2.0.2", AF_INET)])
    assert outcomes[0] is True and outcomes[2] is True  # the requests after the failed one went through
    assert isinstance(outcomes[1], OSError)  # the kernel refused it: IPv6 is off on the interface
    assert outcomes[1].errno in (errno.EACCES, errno.EPERM, errno.EADDRNOTAVAIL)
    assert vips.addresses() == {"10.2.0.9", "10.2.0.1", "10.2.0.2"}
