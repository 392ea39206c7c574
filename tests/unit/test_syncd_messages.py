"""The sync-daemon messages (pyroute2's IPVS message class with the daemon attribute added,
kubelvs.kernel.messages) against the kernel's layout, built here from include/uapi/linux/ip_vs.h
with struct; and OwnedSysctls (record before write, restore what we changed) in a namespace."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubelvs.core.syncd import DaemonState, SyncDaemon
from kubelvs.kernel import syncdaemon
from kubelvs.kernel.syncdaemon import CMD_DEL_DAEMON, CMD_GET_DAEMON, CMD_NEW_DAEMON, daemon_request, decode_daemon
from kubelvs.kernel.sysctls import OwnedSysctls, normalise

FAMILY_ID = 0x1F
# uapi: IPVS_CMD_ATTR_DAEMON 3; IPVS_DAEMON_ATTR_STATE 1, MCAST_IFN 2, SYNC_ID 3, SYNC_MAXLEN 4,
# MCAST_GROUP 5, MCAST_GROUP6 6, MCAST_PORT 7, MCAST_TTL 8.
CMD_ATTR_DAEMON = 3
STATE, IFN, SYNC_ID, MAXLEN, GROUP, GROUP6, PORT, TTL = range(1, 9)


def _nla(kind: int, payload: bytes) -> bytes:
    pad = (-len(payload)) % 4
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * pad


def _message(cmd: int, attrs: bytes, seq: int, flags: int) -> bytes:
    body = struct.pack("=BBH", cmd, 1, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), FAMILY_ID, flags, seq, 0) + body


def test_new_daemon_has_the_kernels_layout() -> None:
    daemon = SyncDaemon(DaemonState.MASTER, "eth0", 7)
    inner = _nla(STATE, struct.pack("=I", 1)) + _nla(IFN, b"eth0\0") + _nla(SYNC_ID, struct.pack("=I", 7))
    assert daemon_request(FAMILY_ID, CMD_NEW_DAEMON, daemon, 5) == _message(
        CMD_NEW_DAEMON, _nla(CMD_ATTR_DAEMON, inner), 5, 0x1 | 0x4
    )


def test_new_daemon_with_every_optional_attribute() -> None:
    daemon = SyncDaemon(DaemonState.BACKUP, "eth1", 255, max_len=1400, group="239.1.2.3", port=9000, ttl=3)
    inner = (
        _nla(STATE, struct.pack("=I", 2))
        + _nla(IFN, b"eth1\0")
        + _nla(SYNC_ID, struct.pack("=I", 255))
        + _nla(MAXLEN, struct.pack("=H", 1400))
        + _nla(PORT, struct.pack("=H", 9000))  # host order: the kernel does the htons
        + _nla(TTL, struct.pack("=B", 3))
        + _nla(GROUP, socket.inet_pton(socket.AF_INET, "239.1.2.3"))  # network order (nla_get_in_addr)
    )
    assert daemon_request(FAMILY_ID, CMD_NEW_DAEMON, daemon, 9) == _message(
        CMD_NEW_DAEMON, _nla(CMD_ATTR_DAEMON, inner), 9, 0x5
    )
    six = SyncDaemon(DaemonState.MASTER, "eth1", 1, group="ff02::8848")
    encoded = daemon_request(FAMILY_ID, CMD_NEW_DAEMON, six, 9)
    assert _nla(GROUP6, socket.inet_pton(socket.AF_INET6, "ff02::8848")) in encoded


def test_del_and_get_daemon() -> None:
    inner = _nla(STATE, struct.pack("=I", 2))
    assert daemon_request(FAMILY_ID, CMD_DEL_DAEMON, DaemonState.BACKUP, 3) == _message(
        CMD_DEL_DAEMON, _nla(CMD_ATTR_DAEMON, inner), 3, 0x5
    )
    assert daemon_request(FAMILY_ID, CMD_GET_DAEMON, None, 4) == _message(CMD_GET_DAEMON, b"", 4, 0x5 | 0x300)


def test_a_dump_answer_decodes() -> None:
    # As ip_vs_genl_fill_daemon writes it (Linux 6.1): state, ifname, sync id, maxlen, port, TTL, group.
    inner = (
        _nla(STATE, struct.pack("=I", 1))
        + _nla(IFN, b"eth0\0")
        + _nla(SYNC_ID, struct.pack("=I", 7))
        + _nla(MAXLEN, struct.pack("=H", 1472))
        + _nla(PORT, struct.pack("=H", 8848))
        + _nla(TTL, struct.pack("=B", 1))
        + _nla(GROUP, socket.inet_pton(socket.AF_INET, "224.0.0.81"))
    )
    answer = _message(CMD_NEW_DAEMON, _nla(CMD_ATTR_DAEMON | 0x8000, inner), 4, 0x2)
    assert decode_daemon(answer) == SyncDaemon(DaemonState.MASTER, "eth0", 7, 1472, "224.0.0.81", 8848, 1)
    assert decode_daemon(_message(CMD_NEW_DAEMON, b"", 4, 0x2)) is None


def test_the_record_of_started_daemons(tmp_path: Path) -> None:
    daemons = syncdaemon.SyncDaemons(tmp_path)
    assert daemons.owned() == []
    started = [SyncDaemon(DaemonState.MASTER, "eth0", 7), SyncDaemon(DaemonState.BACKUP, "eth0", 7, group="ff02::1")]
    daemons._save(started)
    assert json.loads((tmp_path / "syncd.json").read_text())["daemons"][0]["state"] == "master"
    assert daemons.owned() == started
    daemons._save([])
    assert not (tmp_path / "syncd.json").exists()


def test_normalise() -> None:
    assert normalise("3\t50\n") == "3 50"
    assert normalise("1\n") == 1
    assert normalise(2) == 2


# --- OwnedSysctls in a network namespace (per-namespace sysctls; IPVS's own are in the VM) --------


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    name = f"kubelvs-ut-{uuid.uuid4().hex[:8]}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("no network namespace support")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _read(netns: str, path: str) -> str:
    done = subprocess.run(["ip", "netns", "exec", netns, "cat", f"/proc/sys/{path}"], capture_output=True, text=True)
    return " ".join(done.stdout.split())


def _write(netns: str, path: str, value: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "sh", "-c", f"echo '{value}' > /proc/sys/{path}"], check=True)


PORTS = "net/ipv4/ip_local_port_range"  # a vector sysctl, per namespace
PING = "net/ipv4/ping_group_range"


def test_owned_sysctls_record_before_write_and_restore_what_they_changed(netns: str, tmp_path: Path) -> None:
    before = _read(netns, PORTS)
    owned = OwnedSysctls(tmp_path, netns)
    assert owned.ensure({PORTS: before}) == {}  # already right: not written, not recorded
    assert not (tmp_path / "sysctls.json").exists()
    assert owned.ensure({PORTS: "40000 50000", "net/ipv4/tcp_syncookies": 1}) in (
        {PORTS: "40000 50000"},
        {PORTS: "40000 50000", "net/ipv4/tcp_syncookies": 1},
    )
    assert _read(netns, PORTS) == "40000 50000"
    assert owned.recorded()[PORTS] == {"previous": before, "set": "40000 50000"}
    # A restart with another value keeps the original as the one to restore.
    OwnedSysctls(tmp_path, netns).ensure({PORTS: "41000 51000"})
    assert owned.recorded()[PORTS] == {"previous": before, "set": "41000 51000"}
    restored = OwnedSysctls(tmp_path, netns).restore(lambda path: path == PORTS)
    assert restored == {PORTS: before} and _read(netns, PORTS) == before
    assert PORTS not in owned.recorded()
    owned.restore()
    assert not (tmp_path / "sysctls.json").exists()


def test_owned_sysctls_leave_what_somebody_changed_since(netns: str, tmp_path: Path) -> None:
    owned = OwnedSysctls(tmp_path, netns)
    owned.ensure({PING: "1 0"})
    _write(netns, PING, "0 0")  # an administrator's choice since
    assert owned.restore() == {}
    assert _read(netns, PING) == "0 0" and not (tmp_path / "sysctls.json").exists()


def test_owned_sysctls_refuse_a_missing_one_and_change_nothing(netns: str, tmp_path: Path) -> None:
    before = _read(netns, PORTS)
    with pytest.raises(FileNotFoundError, match="net/ipv4/vs/sloppy_tcp"):
        OwnedSysctls(tmp_path, netns).ensure({PORTS: "40000 50000", "net/ipv4/vs/sloppy_tcp": 1})
    assert _read(netns, PORTS) == before and not (tmp_path / "sysctls.json").exists()


def test_only_uplink_and_default_route(netns: str) -> None:
    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", netns, *args], check=True)

    assert syncdaemon.default_route_interface(netns) == ""
    assert syncdaemon.only_uplink(netns) == ""
    ip("link", "add", "eth7", "type", "veth", "peer", "name", "eth7p")
    ip("link", "add", "kubelvs0", "type", "veth", "peer", "name", "kubelvs0p")  # (no dummy on the host)
    ip("addr", "add", "10.61.0.1/24", "dev", "eth7")
    ip("addr", "add", "10.62.0.1/32", "dev", "kubelvs0")
    ip("link", "set", "eth7", "up")
    assert syncdaemon.only_uplink(netns, exclude=["kubelvs0"]) == "eth7"
    assert syncdaemon.only_uplink(netns) == ""  # two candidates: none chosen
    ip("route", "add", "default", "via", "10.61.0.254", "dev", "eth7")
    assert syncdaemon.default_route_interface(netns) == "eth7"
