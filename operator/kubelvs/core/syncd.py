"""Connection synchronisation between directors (the kernel's IPVS sync daemon), decided purely.

Every director runs a *master* daemon (it multicasts its connection table's changes on the
interface the directors share) and a *backup* daemon (it adds what the others multicast to its
own table). Both, on every director: the VIP moves both ways (failover, then failback), and the
director taking a VIP needs the connections of the one that had it. The backup creates a
connection only for a virtual service and real server it has itself: every director programs
the same rules, which kubelvs does.

This module says which daemons and which ``net.ipv4.vs`` sysctls a configuration wants, and
what to change against what the kernel reports (:func:`plan_daemons`). The effects are in
:mod:`kubelvs.kernel.syncdaemon`.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

SYNC_ID_MAX = 255  # the sync messages carry the id in one byte
IFNAME_MAX = 15  # IP_VS_IFNAME_MAXLEN 16, with its NUL
DEFAULT_GROUP4 = "224.0.0.81"  # the kernel's defaults (IP_VS_SYNC_GROUP, IP_VS_SYNC_PORT)
DEFAULT_PORT = 8848
DEFAULT_REFRESH_SECONDS = 1
SYSCTL_DIR = "net/ipv4/vs"


class DaemonState(enum.IntEnum):
    """IP_VS_STATE_*: which way a daemon syncs."""

    MASTER = 1  # sends this director's connections
    BACKUP = 2  # receives the other directors' connections

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class SyncDaemon:
    """One sync daemon. Zero or empty optional fields: the kernel's default (a dump reports them
    filled in: the maximum message length from the interface's MTU, the group 224.0.0.81, port
    8848, TTL 1)."""

    state: DaemonState
    interface: str
    sync_id: int
    max_len: int = 0
    group: str = ""
    port: int = 0
    ttl: int = 0

    def satisfied_by(self, running: SyncDaemon) -> bool:
        """``running`` (as the kernel reports it) is this daemon: the same direction, interface
        and sync id, and the same value for every optional field given here."""
        return (
            running.state == self.state
            and running.interface == self.interface
            and running.sync_id == self.sync_id
            and (not self.max_len or running.max_len == self.max_len)
            and (not self.group or _same_address(running.group, self.group))
            and (not self.port or running.port == self.port)
            and (not self.ttl or running.ttl == self.ttl)
        )

    def __str__(self) -> str:
        extra = "".join(
            f" {name} {value}"
            for name, value in (("maxlen", self.max_len), ("group", self.group), ("port", self.port), ("ttl", self.ttl))
            if value
        )
        return f"{self.state.label} on {self.interface or '?'} syncid {self.sync_id}{extra}"


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


@dataclass(frozen=True, slots=True)
class SyncConfig:
    """The sync part of a director's configuration (``--sync-*`` options)."""

    enabled: bool = True
    interface: str = ""  # resolved by the caller (the option, else the announce or default-route interface)
    sync_id: int = 0
    refresh_seconds: int = DEFAULT_REFRESH_SECONDS
    group: str = ""
    port: int = 0
    ttl: int = 0


class SyncConfigError(ValueError):
    """A sync setting the kernel would refuse, named with the option that sets it."""


def validate(config: SyncConfig) -> None:
    """Raise :class:`SyncConfigError` naming the option of the first bad setting."""
    if not config.enabled:
        return
    if not config.interface:
        raise SyncConfigError("--sync-interface: no interface given and none found (no default route)")
    if len(config.interface.encode()) > IFNAME_MAX or "/" in config.interface or " " in config.interface:
        raise SyncConfigError(f"--sync-interface {config.interface!r}: not an interface name")
    if not 0 <= config.sync_id <= SYNC_ID_MAX:
        raise SyncConfigError(f"--sync-id {config.sync_id}: must be 0..{SYNC_ID_MAX} (one byte in the sync messages)")
    if not 0 <= config.refresh_seconds <= 3600:
        raise SyncConfigError(f"--sync-refresh-period {config.refresh_seconds}: whole seconds, 0..3600")
    if config.group:
        try:
            group = ipaddress.ip_address(config.group)
        except ValueError:
            raise SyncConfigError(f"--sync-group {config.group!r}: not an IP address") from None
        if not group.is_multicast:
            raise SyncConfigError(f"--sync-group {config.group}: not a multicast address")
    if not 0 <= config.port <= 65535:
        raise SyncConfigError(f"--sync-port {config.port}: must be 1..65535 (0: the kernel's {DEFAULT_PORT})")
    if not 0 <= config.ttl <= 255:
        raise SyncConfigError(f"--sync-ttl {config.ttl}: must be 1..255 (0: the kernel's 1)")


def desired_daemons(config: SyncConfig) -> tuple[SyncDaemon, ...]:
    """A master and a backup on the shared interface (none when sync is off)."""
    if not config.enabled:
        return ()
    return tuple(
        SyncDaemon(state, config.interface, config.sync_id, group=config.group, port=config.port, ttl=config.ttl)
        for state in (DaemonState.MASTER, DaemonState.BACKUP)
    )


def desired_sysctls(config: SyncConfig) -> dict[str, int | str]:
    """The ``net.ipv4.vs`` sysctls sync wants (paths under /proc/sys), each for a reason:

    - ``sync_version`` 1: the message format that carries IPv6 connections, persistence
      templates and each connection's timeout (version 0 is IPv4 only). The default since
      Linux 2.6.39; set so that every director speaks it whatever a node's image says.
    - ``sync_threshold`` "3 0" with ``sync_refresh_period`` N: a connection is sent when it is
      established (its 3rd packet), and then again on its first packet after N seconds without
      a sync, whatever its packet rate. With the default "3 50" it is re-sent every 50 packets:
      a slow flow (a request a minute) is never refreshed, and a restarted director, whose
      table is empty and which gets no bulk resync, never learns it. With a refresh, a
      director that (re)starts learns every live connection within N seconds plus the
      master's batching (up to 2 s), and can take a VIP back without resetting them. The cost
      is one sync record (~40 bytes) per live connection every N seconds.
    - ``sloppy_tcp`` 1: a director with no entry for a mid-connection TCP packet (a connection
      younger than its first sync, ~1-3 s, or one whose sync was lost) creates one instead of
      dropping it (its own stack would answer with a reset). With a consistent-hash scheduler
      (``sh``, or ``mh`` with the same real-server order on every director) it picks the same
      real server and the connection survives without any sync; with ``rr`` or ``wlc`` the real
      server it picks is right only by chance (the others reset it, as without the setting).

    Left alone: ``expire_nodest_conn`` (what happens to connections of a removed real server,
    not a director question), ``conntrack`` (only for netfilter NAT on the director), and
    ``sync_ports``/``sync_qlen_max``/``sync_sock_size`` (their defaults suit sync on one segment).
    """
    if not config.enabled:
        return {}
    return {
        f"{SYSCTL_DIR}/sync_version": 1,
        f"{SYSCTL_DIR}/sync_threshold": "3 0" if config.refresh_seconds else "3 50",
        f"{SYSCTL_DIR}/sync_refresh_period": config.refresh_seconds,
        f"{SYSCTL_DIR}/sloppy_tcp": 1,
    }


@dataclass(frozen=True, slots=True)
class DaemonPlan:
    """What to do to the kernel's daemons: stop (by direction) first, then start."""

    stop: tuple[DaemonState, ...] = ()
    start: tuple[SyncDaemon, ...] = ()
    kept: tuple[SyncDaemon, ...] = ()  # running as wanted (adopted when kubelvs had not started them)
    foreign: tuple[SyncDaemon, ...] = field(default=())  # running otherwise, not kubelvs's: left alone

    @property
    def changes(self) -> bool:
        return bool(self.stop or self.start)


def plan_daemons(
    desired: Iterable[SyncDaemon], running: Iterable[SyncDaemon], owned: Iterable[SyncDaemon]
) -> DaemonPlan:
    """The changes that make the kernel's daemons (``running``, one per direction at most) the
    ``desired`` ones. ``owned``: the daemons kubelvs started (its record). A daemon kubelvs did
    not start is never stopped: one running as wanted is kept (and becomes kubelvs's, the record
    is the caller's), one running otherwise is reported as foreign, and its direction is left
    without kubelvs's daemon. A daemon of kubelvs's that is no longer wanted, or not as it runs,
    is stopped (and started again with the new settings)."""
    wanted: Mapping[DaemonState, SyncDaemon] = {daemon.state: daemon for daemon in desired}
    now: Mapping[DaemonState, SyncDaemon] = {daemon.state: daemon for daemon in running}
    ours = list(owned)
    stop: list[DaemonState] = []
    start: list[SyncDaemon] = []
    kept: list[SyncDaemon] = []
    foreign: list[SyncDaemon] = []
    for state in DaemonState:
        want, have = wanted.get(state), now.get(state)
        if have is None:
            if want is not None:
                start.append(want)
            continue
        if want is not None and want.satisfied_by(have):
            kept.append(have)
            continue
        if not any(record.satisfied_by(have) for record in ours):
            foreign.append(have)
            continue
        stop.append(state)
        if want is not None:
            start.append(want)
    return DaemonPlan(tuple(stop), tuple(start), tuple(kept), tuple(foreign))
