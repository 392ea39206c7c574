"""Sysctls kubelvs sets, recorded so that they can be put back: record before write, restore
what we changed.

What kubelvs changes is written to ``<state_dir>/sysctls.json`` (path -> the value found and the
value set) *before* the write, so a crash between the two still finds the old value. A value
that is already acceptable is neither written nor recorded: it is not ours. :meth:`restore`
puts back a recorded value only where the sysctl still holds what kubelvs set (somebody who
changed it since decided otherwise), and drops the record either way.

Values are whole numbers, or the text of a vector sysctl (``"3 50"``, normalised to single
spaces). Paths are relative to ``/proc/sys`` (``net/ipv4/vs/sloppy_tcp``), read and written in
the given network namespace (every ``net/`` sysctl used here is per namespace).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from kubelvs.kernel.netns import call_in
from kubelvs.kernel.records import save_record

SysctlValue = int | str
# (current, wanted) -> the current value will do (default: only the wanted value will)
Acceptable = Callable[[SysctlValue, SysctlValue], bool]
RECORD_NAME = "sysctls.json"


def normalise(value: SysctlValue | str) -> SysctlValue:
    """An int for a single number, else the numbers joined by single spaces ("3\\t50\\n" -> "3 50")."""
    if isinstance(value, int):
        return value
    words = value.split()
    if len(words) == 1:
        with contextlib.suppress(ValueError):
            return int(words[0])
    return " ".join(words)


def sysctl_file(path: str) -> str:
    """Where ``path`` (``net/...``) is read and written. In a pod, the container's own /proc/sys
    is read-only and runc refuses a mount inside /proc, so the chart mounts the node's
    /proc/sys/net elsewhere and names it in ``$KUBELVS_PROC_SYS_NET``. Either way the file shows
    the namespace of the thread that opens it (the director has the node's: host network)."""
    mounted = os.environ.get("KUBELVS_PROC_SYS_NET")
    if mounted and path.startswith("net/"):
        return f"{mounted.rstrip('/')}/{path[len('net/') :]}"
    return f"/proc/sys/{path}"


def read_sysctl(path: str) -> SysctlValue:
    """``path`` under /proc/sys in this thread's namespace (FileNotFoundError if there is none)."""
    with open(sysctl_file(path)) as file:
        return normalise(file.read())


def write_sysctl(path: str, value: SysctlValue) -> None:
    with open(sysctl_file(path), "w") as file:
        file.write(f"{value}\n")


class OwnedSysctls:
    """The sysctls kubelvs set in one namespace, recorded in ``state_dir/sysctls.json``."""

    def __init__(self, state_dir: Path, netns: str | None = None, name: str = RECORD_NAME) -> None:
        self.path = Path(state_dir) / name
        self.netns = netns

    def recorded(self) -> dict[str, dict[str, SysctlValue]]:
        """path -> {"previous": value found, "set": value written}."""
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return {
            key: {"previous": normalise(v["previous"]), "set": normalise(v["set"])}
            for key, v in data["sysctls"].items()
        }

    def _save(self, records: Mapping[str, Mapping[str, SysctlValue]]) -> None:
        save_record(self.path, {"version": 1, "sysctls": records} if records else None)

    def read(self, paths: Iterable[str]) -> dict[str, SysctlValue | None]:
        """The current values (None: no such sysctl)."""
        paths = list(paths)

        def read_all() -> dict[str, SysctlValue | None]:
            found: dict[str, SysctlValue | None] = {}
            for path in paths:
                try:
                    found[path] = read_sysctl(path)
                except FileNotFoundError:
                    found[path] = None
            return found

        return call_in(self.netns, read_all)

    def ensure(self, wanted: Mapping[str, SysctlValue], acceptable: Acceptable | None = None) -> dict[str, SysctlValue]:
        """Set each sysctl whose current value is not ``acceptable`` to the wanted one, recording
        the old value first; the changes made (path -> value set). FileNotFoundError names a
        sysctl this kernel does not have (nothing is changed then)."""
        fits = acceptable or (lambda current, value: current == value)
        wanted = {path: normalise(value) for path, value in wanted.items()}
        found = self.read(wanted)
        missing = sorted(path for path, value in found.items() if value is None)
        if missing:
            raise FileNotFoundError(f"no such sysctl in this kernel: /proc/sys/{', /proc/sys/'.join(missing)}")
        current = {path: value for path, value in found.items() if value is not None}
        changes = {path: value for path, value in wanted.items() if not fits(current[path], value)}
        if not changes:
            return {}
        records = self.recorded()
        for path, value in changes.items():
            earlier = records.get(path)
            # A value kubelvs set before (a restart with other settings): the original stays recorded.
            previous = earlier["previous"] if earlier is not None and earlier["set"] == current[path] else current[path]
            records[path] = {"previous": previous, "set": value}
        self._save(records)  # first: a crash after the write must still find the old value

        def write() -> None:
            for path, value in changes.items():
                write_sysctl(path, value)

        call_in(self.netns, write)
        return changes

    def restore(self, selected: Callable[[str], bool] | None = None) -> dict[str, SysctlValue]:
        """Put back the recorded sysctls (those ``selected``, default all) that still hold what
        kubelvs set; their records are dropped either way. The values put back."""
        records = self.recorded()
        chosen = {path: record for path, record in records.items() if selected is None or selected(path)}
        if not chosen:
            return {}
        restored: dict[str, SysctlValue] = {}

        def put_back() -> None:
            for path, record in chosen.items():
                try:
                    if read_sysctl(path) == record["set"]:
                        write_sysctl(path, record["previous"])
                        restored[path] = record["previous"]
                except FileNotFoundError:
                    pass  # the interface (or the module) is gone, and its settings with it

        call_in(self.netns, put_back)
        self._save({path: record for path, record in records.items() if path not in chosen})
        return restored
