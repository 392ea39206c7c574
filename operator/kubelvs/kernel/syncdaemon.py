"""The kernel's IPVS connection-sync daemons, managed through generic netlink (no ``ipvsadm``).

``IPVS_CMD_NEW_DAEMON`` starts a daemon, ``IPVS_CMD_DEL_DAEMON`` stops the one of a direction,
``IPVS_CMD_GET_DAEMON`` (a dump) lists them; the messages are pyroute2's, with the nested daemon
attribute it lacks (:class:`kubelvs.kernel.messages.IPVSMessage`). They are sent on a socket of
:class:`~kubelvs.kernel.ipvs.IPVSClient` (made in the director's namespace without forking).

:class:`SyncDaemons` makes a node's daemons and sync sysctls what
:mod:`kubelvs.core.syncd` wants: it records the daemons it started in ``state_dir/syncd.json``
and the sysctls it changed in ``state_dir/sysctls.json`` (:class:`~kubelvs.kernel.sysctls.OwnedSysctls`),
and :meth:`SyncDaemons.release` (``kubelvs release-node``) stops only those daemons and puts
back only those sysctls.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import fcntl
import json
import os
import select
import socket
import struct
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubelvs.core.syncd import (
    SYSCTL_DIR,
    DaemonPlan,
    DaemonState,
    SyncConfig,
    SyncDaemon,
    desired_daemons,
    desired_sysctls,
    plan_daemons,
)
from kubelvs.kernel import codec
from kubelvs.kernel.ipvs import IPVSClient
from kubelvs.kernel.messages import IPVSMessage
from kubelvs.kernel.netns import call_in
from kubelvs.kernel.records import save_record
from kubelvs.kernel.sysctls import OwnedSysctls

CMD_NEW_DAEMON, CMD_DEL_DAEMON, CMD_GET_DAEMON = 9, 10, 11
RECORD_NAME = "syncd.json"
ANSWER_TIMEOUT = 10.0
_OPTIONAL = (
    ("IPVS_DAEMON_ATTR_SYNC_MAXLEN", "max_len"),
    ("IPVS_DAEMON_ATTR_MCAST_PORT", "port"),
    ("IPVS_DAEMON_ATTR_MCAST_TTL", "ttl"),
)


def _is_sync_sysctl(path: str) -> bool:
    return path.startswith(f"{SYSCTL_DIR}/")


class SyncDaemonError(OSError):
    """The kernel refused a daemon request; says which daemon and why."""


def daemon_request(family_id: int, cmd: int, daemon: SyncDaemon | DaemonState | None, seq: int) -> bytes:
    """The netlink request of one daemon command: NEW with the whole daemon, DEL with its
    direction only, GET (a dump) with nothing."""
    msg = IPVSMessage()
    msg["cmd"] = cmd
    msg["version"] = codec.GENL_VERSION
    msg["header"]["type"] = family_id
    msg["header"]["sequence_number"] = seq
    flags = codec.NLM_F_REQUEST | codec.NLM_F_ACK
    attrs: list[tuple[str, Any]] = []
    if isinstance(daemon, SyncDaemon):
        attrs = [
            ("IPVS_DAEMON_ATTR_STATE", int(daemon.state)),
            ("IPVS_DAEMON_ATTR_MCAST_IFN", daemon.interface),
            ("IPVS_DAEMON_ATTR_SYNC_ID", daemon.sync_id),
        ]
        attrs += [(name, getattr(daemon, key)) for name, key in _OPTIONAL if getattr(daemon, key)]
        if daemon.group:
            six = ":" in daemon.group
            attrs.append(("IPVS_DAEMON_ATTR_MCAST_GROUP6" if six else "IPVS_DAEMON_ATTR_MCAST_GROUP", daemon.group))
    elif isinstance(daemon, DaemonState):
        attrs = [("IPVS_DAEMON_ATTR_STATE", int(daemon))]
    if cmd == CMD_GET_DAEMON:
        flags |= codec.NLM_F_DUMP
    msg["header"]["flags"] = flags
    msg["attrs"] = [("IPVS_CMD_ATTR_DAEMON", {"attrs": attrs})] if attrs else []
    msg.encode()
    return bytes(msg.data)


def decode_daemon(message: bytes) -> SyncDaemon | None:
    """The daemon of one GET_DAEMON answer (a whole netlink message), None if it has none."""
    msg = IPVSMessage(message)
    msg.decode()
    nested = msg.get_attr("IPVS_CMD_ATTR_DAEMON")
    if nested is None:
        return None
    state = nested.get_attr("IPVS_DAEMON_ATTR_STATE")
    if state not in (DaemonState.MASTER, DaemonState.BACKUP):
        return None
    group = nested.get_attr("IPVS_DAEMON_ATTR_MCAST_GROUP6") or nested.get_attr("IPVS_DAEMON_ATTR_MCAST_GROUP") or ""
    return SyncDaemon(
        DaemonState(state),
        nested.get_attr("IPVS_DAEMON_ATTR_MCAST_IFN") or "",
        nested.get_attr("IPVS_DAEMON_ATTR_SYNC_ID") or 0,
        max_len=nested.get_attr("IPVS_DAEMON_ATTR_SYNC_MAXLEN") or 0,
        group=str(group),
        port=nested.get_attr("IPVS_DAEMON_ATTR_MCAST_PORT") or 0,
        ttl=nested.get_attr("IPVS_DAEMON_ATTR_MCAST_TTL") or 0,
    )


class SyncDaemonClient:
    """Start, stop and list the sync daemons of one network namespace."""

    def __init__(self, netns: str | None = None) -> None:
        self.ipvs = IPVSClient(netns=netns, batch_size=1)  # OSError: no IPVS in this kernel
        self.sock = self.ipvs.sock
        self.family_id = self.ipvs.family_id
        self._seq = 0

    def close(self) -> None:
        self.ipvs.close()

    def __enter__(self) -> SyncDaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, cmd: int, daemon: SyncDaemon | DaemonState | None, what: str) -> list[bytes]:
        """Send one request; the answer's messages (whole, for decoding) until its ack or DONE."""
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        seq = self._seq
        self.sock.send(daemon_request(self.family_id, cmd, daemon, seq))
        answers: list[bytes] = []
        while True:
            if not select.select([self.sock], [], [], ANSWER_TIMEOUT)[0]:
                raise SyncDaemonError(errno_codes.ETIMEDOUT, f"{what}: no answer from the kernel's IPVS")
            data = self.sock.recv(1 << 16)
            offset = 0
            for kind, flags, msg_seq, payload in codec.iter_messages(data):
                length = len(payload) + 16
                whole = data[offset : offset + length]
                offset += (length + 3) & ~3
                if msg_seq != seq:
                    continue
                if kind == codec.NLMSG_DONE:
                    return answers
                if kind == codec.NLMSG_ERROR:
                    err, message = codec.parse_error(payload, flags)
                    if err:
                        detail = f" ({message})" if message else ""
                        raise SyncDaemonError(err, f"{what}: {os.strerror(err)}{detail}")
                    return answers
                answers.append(bytes(whole))

    def running(self) -> list[SyncDaemon]:
        """The daemons running now (at most one per direction)."""
        found = (decode_daemon(message) for message in self._request(CMD_GET_DAEMON, None, "listing the sync daemons"))
        return [daemon for daemon in found if daemon is not None]

    def start(self, daemon: SyncDaemon) -> None:
        """Start ``daemon`` (EEXIST: one of its direction runs already)."""
        self._request(CMD_NEW_DAEMON, daemon, f"starting the sync daemon ({daemon})")

    def stop(self, state: DaemonState) -> bool:
        """Stop the daemon of direction ``state``; False if none ran."""
        try:
            self._request(CMD_DEL_DAEMON, state, f"stopping the {state.label} sync daemon")
        except SyncDaemonError as error:
            if error.errno == errno_codes.ESRCH:
                return False
            raise
        return True


def default_route_interface(netns: str | None = None) -> str:
    """The interface of the namespace's IPv4 default route ("" if none; the first of several)."""

    def read() -> str:
        # thread-self: /proc/net shows the main thread's namespace, not this thread's.
        with contextlib.suppress(FileNotFoundError), open("/proc/thread-self/net/route") as routes:
            next(routes, None)  # the header
            for line in routes:
                fields = line.split()
                if len(fields) > 7 and fields[1] == "00000000" and fields[7] == "00000000":
                    return fields[0]
        return ""

    return call_in(netns, read)


def only_uplink(netns: str | None = None, exclude: Iterable[str] = ()) -> str:
    """The one interface with an IPv4 address besides loopback and ``exclude`` ("" if none or
    several): the shared segment of a node with no default route."""
    skip = {"lo", *exclude}

    def read() -> str:
        names = {name for _index, name in socket.if_nameindex() if name not in skip}
        with_address = {name for name in names if _has_ipv4(name)}
        return next(iter(with_address)) if len(with_address) == 1 else ""

    return call_in(netns, read)


def resolve_interface(netns: str | None, named: str = "", announce: str = "", exclude: Iterable[str] = ()) -> str:
    """The sync interface: ``named``, else ``announce`` (the directors' segment), else the
    default route's, else the only interface with an IPv4 address ("" if none of these)."""
    return named or announce or default_route_interface(netns) or only_uplink(netns, exclude)


SIOCGIFADDR = 0x8915


def _has_ipv4(interface: str) -> bool:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", interface.encode()[:15]))
    except OSError:
        return False
    finally:
        probe.close()
    return True


@dataclass
class SyncReport:
    plan: DaemonPlan
    sysctls_changed: dict[str, int | str] = field(default_factory=dict)
    running: list[SyncDaemon] = field(default_factory=list)  # after the changes


class SyncDaemons:
    """A node's sync daemons and sync sysctls, as kubelvs wants them and recorded as its own."""

    def __init__(self, state_dir: Path, netns: str | None = None) -> None:
        self.path = Path(state_dir) / RECORD_NAME
        self.netns = netns
        self.sysctls = OwnedSysctls(state_dir, netns)

    # --- the record of the daemons kubelvs started ----------------------------------------

    def owned(self) -> list[SyncDaemon]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        return [
            SyncDaemon(**{**entry, "state": DaemonState[entry["state"].upper()]}) for entry in data.get("daemons", [])
        ]

    def _save(self, daemons: Iterable[SyncDaemon]) -> None:
        entries = [{**asdict(daemon), "state": daemon.state.label} for daemon in daemons]
        save_record(self.path, {"version": 1, "daemons": entries} if entries else None)

    # --- effects --------------------------------------------------------------------------

    def ensure(self, config: SyncConfig) -> SyncReport:
        """Set the sync sysctls (recorded), then start, adopt or replace the daemons.

        The sysctls come first: a daemon syncs with the settings of the moment. Raises
        SyncDaemonError (or OSError) on the first failure; what was done before stays done and
        recorded."""
        with SyncDaemonClient(self.netns) as client:  # loads ip_vs: the sysctls exist after this
            if config.enabled:
                changed = self.sysctls.ensure(desired_sysctls(config))
            else:  # sync turned off: what kubelvs set for it is put back
                self.sysctls.restore(_is_sync_sysctl)
                changed = {}
            running = client.running()
            owned = self.owned()
            plan = plan_daemons(desired_daemons(config), running, owned)
            # The record: what kubelvs started before and still runs as it was, plus what it starts.
            kept = [record for record in owned if any(record.satisfied_by(have) for have in plan.kept)]
            for state in plan.stop:
                client.stop(state)
            self._save(kept)
            for daemon in plan.start:
                self._save([*kept, daemon])  # first: a crash after the start still knows it is ours
                try:
                    client.start(daemon)
                except OSError:
                    self._save(kept)
                    raise
                kept.append(daemon)
            return SyncReport(plan, changed, client.running() if plan.changes else running)

    def release(self) -> tuple[list[DaemonState], dict[str, int | str]]:
        """Stop the daemons kubelvs started (if they still run as it started them) and put back
        the sync sysctls it changed; (the directions stopped, the sysctls restored)."""
        stopped: list[DaemonState] = []
        owned = self.owned()
        if owned:
            try:
                client = SyncDaemonClient(self.netns)
            except OSError:
                client = None  # no IPVS here any more: no daemon either
            if client is not None:
                with client:
                    running = {daemon.state: daemon for daemon in client.running()}
                    for record in owned:
                        have = running.get(record.state)
                        if have is not None and record.satisfied_by(have) and client.stop(record.state):
                            stopped.append(record.state)
            self._save([])
        restored = self.sysctls.restore(_is_sync_sysctl)
        return stopped, restored
