"""The receive side in a real server's network namespace: read it, and apply the core's plan.

Everything runs in one short-lived thread that has entered the namespace
(:func:`kubelvs.kernel.netns.call_in`): the rtnetlink and generic netlink sockets are made there,
and ``/proc/sys/net`` shows the sysctls of the namespace of the task that opens the file, so the
sysctls written there are the pod's own (it needs ``CAP_NET_ADMIN`` over that namespace). Low
volume (a handful of operations per pod), so pyroute2 serves it as it is; fou (GUE) has no
pyroute2 module, so a small generic netlink message class is defined here.

What kubelvs changes is recorded before the change (``save(record)``, the record being
``item -> what was there``): a kill between the two leaves a record that claims a change that was
not made, which the next round undoes harmlessly, never an unrecorded change.
"""

from __future__ import annotations

import errno
import socket
import subprocess
from collections.abc import Callable, Iterable
from typing import Any

from pyroute2.iproute import IPRoute
from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, genlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket

from kubelvs.core.model import AF_INET
from kubelvs.core.receive import (
    Action,
    Address,
    FouPort,
    Item,
    Link,
    MssClamp,
    Observed,
    Sysctl,
    plan,
    prepared,
    previous_value,
    restored_sysctl,
)
from kubelvs.kernel.netns import call_in
from kubelvs.kernel.vipfilter import nft_binary

IFF_UP = 0x1
IFA_F_NODAD = 0x02
FOU_CMD_ADD, FOU_CMD_DEL, FOU_CMD_GET = 1, 2, 3
FOU_ENCAP_GUE = 2

Record = dict[Item, int | None]


class fou_msg(genlmsg):
    """The fou generic netlink family (include/uapi/linux/fou.h)."""

    prefix = "FOU_ATTR_"
    nla_map = (
        ("FOU_ATTR_UNSPEC", "none"),
        ("FOU_ATTR_PORT", "be16"),
        ("FOU_ATTR_AF", "uint8"),
        ("FOU_ATTR_IPPROTO", "uint8"),
        ("FOU_ATTR_TYPE", "uint8"),
    )


def _fou_request(cmd: int, flags: int, attrs: list[tuple[str, Any]]) -> list[Any]:
    sock = GenericNetlinkSocket()
    try:
        sock.bind("fou", fou_msg)
        msg = fou_msg()
        msg["cmd"] = cmd
        msg["version"] = 1
        msg["attrs"] = attrs
        return list(sock.nlm_request(msg, msg_type=sock.prid, msg_flags=flags))
    finally:
        sock.close()


def _fou_ports() -> set[tuple[int, int]]:
    try:
        answers = _fou_request(FOU_CMD_GET, NLM_F_REQUEST | NLM_F_DUMP, [])
    except Exception:  # no fou family (module absent): no port
        return set()
    return {(int(m.get_attr("FOU_ATTR_PORT")), int(m.get_attr("FOU_ATTR_AF"))) for m in answers}


def _nft(script: str | None, *args: str) -> str:
    """``nft`` in the calling thread's network namespace (a child process inherits the namespace
    of the thread that forks it). The ``nft`` binary rather than netlink for the same reason as
    :mod:`kubelvs.kernel.vipfilter`: nftables' netlink messages are a bytecode nobody should write by hand."""
    nft = nft_binary()
    if nft is None:
        raise OSError(errno.ENOENT, "nft not found: install the nftables package (TUN's MSS clamp needs it)")
    done = subprocess.run([nft, *args], input=script, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise OSError(errno.EIO, f"nft {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _nft_tables() -> set[str]:
    """The names of the inet tables in the namespace."""
    return {line.split()[2] for line in _nft(None, "list", "tables", "inet").splitlines() if line.startswith("table ")}


def _mss_table(item: MssClamp) -> str:
    """One table per clamp, owned by kubelvs: SYN-ACKs from the VIP offering more are lowered."""
    match = "ip saddr" if item.family == AF_INET else "ip6 saddr"
    return (
        f"add table inet {item.table}\ndelete table inet {item.table}\n"
        f"table inet {item.table} {{\n"
        "  chain output {\n"
        "    type filter hook output priority 0; policy accept;\n"
        f"    {match} {item.address} tcp flags & (syn | rst) == syn "
        f"tcp option maxseg size > {item.mss} tcp option maxseg size set {item.mss}\n"
        "  }\n"
        "}\n"
    )


def _read_sysctl(path: str, proc: str) -> int | None:
    try:
        with open(f"{proc}/sys/{path}") as file:
            return int(file.read().split()[0])
    except FileNotFoundError:
        return None


def _write_sysctl(path: str, value: int, proc: str) -> None:
    with open(f"{proc}/sys/{path}", "w") as file:
        file.write(f"{value}\n")


def _index(ipr: IPRoute, device: str) -> int | None:
    found = ipr.link_lookup(ifname=device)
    return found[0] if found else None


def observe(ipr: IPRoute, items: Iterable[Item], proc: str = "/proc") -> Observed:
    """The state of ``items`` (whoever set it) in the calling thread's namespace."""
    items = list(items)
    devices = {item.device for item in items if isinstance(item, Link | Address)}
    links: dict[str, bool] = {}
    addresses: set[tuple[str, str]] = set()
    for device in devices:
        index = _index(ipr, device)
        if index is None:
            continue
        (link,) = ipr.get_links(index)
        links[device] = bool(link["flags"] & IFF_UP)
        for entry in ipr.get_addr(index=index):
            address = entry.get_attr("IFA_LOCAL") or entry.get_attr("IFA_ADDRESS")
            if address:
                addresses.add((device, address))
    sysctls = {}
    for item in items:
        if isinstance(item, Sysctl):
            value = _read_sysctl(item.path, proc)
            if value is not None:
                sysctls[item.path] = value
    fou = _fou_ports() if any(isinstance(item, FouPort) for item in items) else set()
    tables = _nft_tables() if any(isinstance(item, MssClamp) for item in items) else set()
    return Observed(links, frozenset(addresses), sysctls, frozenset(fou), frozenset(tables))


def _ignore(codes: tuple[int, ...], call: Callable[[], Any]) -> None:
    try:
        call()
    except NetlinkError as error:
        if error.code not in codes:
            raise


def _add(ipr: IPRoute, item: Item, proc: str) -> None:
    if isinstance(item, Link):
        if _index(ipr, item.device) is None:
            # Creating a link of the kind loads its module, which makes the fallback device in
            # every namespace (then EEXIST); where fallback devices are off
            # (net.core.fb_tunnels_only_for_init_net), this creates a catch-all tunnel of that name.
            _ignore((errno.EEXIST,), lambda: ipr.link("add", ifname=item.device, kind=item.kind))
        index = _index(ipr, item.device)
        ipr.link("set", index=index, state="up")
    elif isinstance(item, Address):
        index = _index(ipr, item.device)
        if index is None:
            raise OSError(errno.ENODEV, f"{item.device}: no such device for {item.address}")
        prefix = 32 if item.family == AF_INET else 128
        flags = 0 if item.family == AF_INET else IFA_F_NODAD
        _ignore(
            (errno.EEXIST,),
            lambda: ipr.addr("add", index=index, address=item.address, prefixlen=prefix, flags=flags),
        )
    elif isinstance(item, Sysctl):
        _write_sysctl(item.path, item.value, proc)
    elif isinstance(item, FouPort):
        family = socket.AF_INET if item.family == AF_INET else socket.AF_INET6
        attrs = [("FOU_ATTR_PORT", item.port), ("FOU_ATTR_AF", family), ("FOU_ATTR_TYPE", FOU_ENCAP_GUE)]
        try:
            _fou_request(FOU_CMD_ADD, NLM_F_REQUEST | NLM_F_ACK, attrs)
        except NetlinkError as error:
            if error.code != errno.EEXIST:
                raise
    elif isinstance(item, MssClamp):
        _nft(_mss_table(item), "-f", "-")


def _remove(ipr: IPRoute, item: Item, previous: int | None, proc: str) -> None:
    if isinstance(item, Link):
        index = _index(ipr, item.device)
        if index is None:
            return
        ipr.link("set", index=index, state="down")
        if previous is None:  # kubelvs made it; a fallback device cannot be deleted and stays down
            _ignore((errno.ENODEV, errno.EOPNOTSUPP, errno.EINVAL), lambda: ipr.link("del", index=index))
    elif isinstance(item, Address):
        index = _index(ipr, item.device)
        if index is None:
            return
        prefix = 32 if item.family == AF_INET else 128
        _ignore(
            (errno.EADDRNOTAVAIL, errno.ENODEV),
            lambda: ipr.addr("del", index=index, address=item.address, prefixlen=prefix),
        )
    elif isinstance(item, Sysctl):
        value = restored_sysctl(item, previous, _read_sysctl(item.path, proc))
        if value is not None:
            _write_sysctl(item.path, value, proc)
    elif isinstance(item, FouPort):
        family = socket.AF_INET if item.family == AF_INET else socket.AF_INET6
        try:
            _fou_request(
                FOU_CMD_DEL, NLM_F_REQUEST | NLM_F_ACK, [("FOU_ATTR_PORT", item.port), ("FOU_ATTR_AF", family)]
            )
        except NetlinkError as error:
            if error.code not in (errno.ENOENT, errno.ESRCH):
                raise
    elif isinstance(item, MssClamp) and item.table in _nft_tables():  # gone already: nothing to undo
        _nft(None, "delete", "table", "inet", item.table)


def converge(
    netns: str | None,
    desired: frozenset[Item],
    record: Record,
    save: Callable[[Record], None],
    proc: str = "/proc",
) -> tuple[list[Action], bool]:
    """Make ``desired`` hold in ``netns`` (a path such as /proc/PID/ns/net, None: the caller's own)
    and undo what ``record`` holds that is no longer desired. ``record`` is updated in place and
    handed to ``save`` before every change (adds) or after it (removals). Returns the actions
    taken and whether everything desired holds afterwards.

    Sysctls are read and written under ``proc``/sys from the thread in ``netns``: in a container
    whose own /proc/sys is read-only (every runtime's default), the host's procfs mounted
    elsewhere (``/host/proc``) is writable and shows the same per-namespace values."""

    def run() -> tuple[list[Action], bool]:
        with IPRoute() as ipr:
            observed = observe(ipr, desired | record.keys(), proc)
            actions = plan(desired, record, observed)
            for action in actions:
                if action.op == "add":
                    if action.item not in record:
                        current = observe(ipr, [action.item], proc)  # after the devices it depends on
                        record[action.item] = previous_value(action.item, current)
                        save(record)
                    _add(ipr, action.item, proc)
                else:
                    _remove(ipr, action.item, action.previous, proc)
                    record.pop(action.item, None)
                    save(record)
            return actions, prepared(desired, observe(ipr, desired, proc) if actions else observed)

    return call_in(netns, run)


def addresses_in(netns: str | None) -> set[str]:
    """Every address in ``netns`` (to find a pod's namespace by its IP)."""

    def run() -> set[str]:
        with IPRoute() as ipr:
            found = set()
            for entry in ipr.get_addr():
                address = entry.get_attr("IFA_LOCAL") or entry.get_attr("IFA_ADDRESS")
                if address:
                    found.add(address)
            return found

    return call_in(netns, run)
