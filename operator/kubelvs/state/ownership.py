"""What kubelvs created in the kernel, so it removes exactly that and nothing else.

IPVS has no place for a comment or an owner tag, so the record is a small JSON file written
atomically (and durably: fsync) next to the state it describes (``/run/kubelvs`` by default: it
lives as long as the kernel state, and a reboot clears both).

The record is crash-consistent by write-ahead: before kubelvs creates a service or adds an
address it records the intent (a *pending* entry) and saves; after the kernel answered, the entry
is confirmed, or dropped when the kernel refused (EEXIST: somebody else's). A pending entry that
survives (a kill, an exception with an unknown outcome) is settled at the next sync against the
kernel (:meth:`Ownership.settle`). Removals go the other way: kernel first, record after.

The file says which kernel state it describes: a schema version, the network namespace (device
and inode of its nsfs file) and the boot id. A record of another namespace is refused
(:class:`ForeignRecordError`); a record of an earlier boot describes state that is gone, and is
discarded. Files without a schema are version 1 (``{"services": [...], "addresses": [...]}``)
and load as they are.

Errors a caller must handle are :class:`OwnershipError` and its subclasses (never a bare
``JSONDecodeError``): each names the file and the cause, and has a short ``reason`` for a status
condition or a metric label.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubelvs.core.model import ServiceKey

DEFAULT_STATE_DIR = Path(os.environ.get("KUBELVS_STATE_DIR", "/run/kubelvs"))
SCHEMA = 2
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class OwnershipError(Exception):
    """The ownership record cannot be used. ``path``: the file; ``reason``: a short CamelCase
    word for a status condition or metric (``OwnershipRecordUnreadable``,
    ``OwnershipRecordFromFuture``, ``OwnershipRecordOfOtherNamespace``, ``StateDirectoryLocked``);
    ``str()`` is the message for a human. None of them goes away by retrying."""

    reason = "OwnershipRecordUnreadable"

    def __init__(self, path: Path, cause: str) -> None:
        super().__init__(f"{path}: {cause}")
        self.path = path
        self.cause = cause


class FutureSchemaError(OwnershipError):
    reason = "OwnershipRecordFromFuture"


class ForeignRecordError(OwnershipError):
    reason = "OwnershipRecordOfOtherNamespace"


@dataclass(frozen=True, slots=True)
class Identity:
    """Which kernel state a record describes: a network namespace in one boot."""

    netns: tuple[int, int]  # (st_dev, st_ino) of the namespace's nsfs file
    boot_id: str

    @classmethod
    def current(cls, netns: str | None = None) -> Identity:
        """This thread's namespace, or the named one (a name under /run/netns, or a path)."""
        if netns is None:
            path = "/proc/thread-self/ns/net"
        else:
            path = netns if netns.startswith("/") else f"/run/netns/{netns}"
        stat = os.stat(path)
        try:
            boot_id = BOOT_ID.read_text().strip()
        except OSError:
            boot_id = ""
        return cls((stat.st_dev, stat.st_ino), boot_id)


@dataclass(slots=True)
class Ownership:
    services: dict[ServiceKey, str] = field(default_factory=dict)  # key -> the VirtualServer it serves
    addresses: dict[str, int] = field(default_factory=dict)  # VIPs kubelvs added -> family
    # Write-ahead intents: about to be created (the same shapes); settled against the kernel.
    pending_services: dict[ServiceKey, str] = field(default_factory=dict)
    pending_addresses: dict[str, int] = field(default_factory=dict)
    _by_origin: dict[str, set[ServiceKey]] | None = field(default=None, repr=False, compare=False)

    def keys_of(self, origin: str) -> set[ServiceKey]:
        """The services one VirtualServer owns (an index, so one VirtualServer's sync is O(1))."""
        if self._by_origin is None:
            self._by_origin = {}
            for key, owner in self.services.items():
                self._by_origin.setdefault(owner, set()).add(key)
        return self._by_origin.get(origin, set())

    def _unindex(self, origin: str, key: ServiceKey) -> None:
        if self._by_origin is None:
            return
        keys = self._by_origin.get(origin)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_origin[origin]  # no empty sets left behind

    def own(self, key: ServiceKey, origin: str) -> bool:
        """Record ``key`` as serving ``origin``; True if that changed the record."""
        self.pending_services.pop(key, None)
        before = self.services.get(key)
        if before == origin:
            return False
        if before is not None:
            self._unindex(before, key)
        self.services[key] = origin
        if self._by_origin is not None:
            self._by_origin.setdefault(origin, set()).add(key)
        return True

    def disown(self, key: ServiceKey) -> bool:
        before = self.services.pop(key, None)
        if before is None:
            return False
        self._unindex(before, key)
        return True

    @property
    def has_pending(self) -> bool:
        return bool(self.pending_services or self.pending_addresses)

    def settle(self, services_present: Container[ServiceKey], addresses_present: Container[str]) -> bool:
        """Resolve write-ahead intents against the kernel; True if the record changed.

        An intent is written just before kubelvs's own create, for an object that was absent
        then: if the object exists now, the create happened (it is ours); if not, it never did.
        """
        changed = self.has_pending
        for key, origin in list(self.pending_services.items()):
            if key in services_present:
                self.own(key, origin)
        self.pending_services.clear()
        for address, family in self.pending_addresses.items():
            if address in addresses_present:
                self.addresses[address] = family
        self.pending_addresses.clear()
        return changed

    def to_data(self) -> dict[str, Any]:
        return {
            "services": sorted([*k, origin] for k, origin in self.services.items()),
            "addresses": sorted([a, f] for a, f in self.addresses.items()),
            "pendingServices": sorted([*k, origin] for k, origin in self.pending_services.items()),
            "pendingAddresses": sorted([a, f] for a, f in self.pending_addresses.items()),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_data(), separators=(",", ":"))

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Ownership:
        """From a version-1 or version-2 document (a version-1 file has the first two keys only)."""

        def services(rows: list[list[Any]]) -> dict[ServiceKey, str]:
            return {ServiceKey(int(k[0]), int(k[1]), str(k[2]), int(k[3]), int(k[4])): str(k[5]) for k in rows}

        return cls(
            services(data.get("services", [])),
            {str(a): int(f) for a, f in data.get("addresses", [])},
            services(data.get("pendingServices", [])),
            {str(a): int(f) for a, f in data.get("pendingAddresses", [])},
        )

    @classmethod
    def from_json(cls, text: str) -> Ownership:
        return cls.from_data(json.loads(text))


class OwnershipStore:
    """The record on disk, for one kernel state (``netns``: a named namespace, or this one).

    ``identity``: the namespace and boot the record must belong to (computed when None; tests
    pass one)."""

    def __init__(
        self, state_dir: Path = DEFAULT_STATE_DIR, netns: str | None = None, identity: Identity | None = None
    ) -> None:
        self.path = Path(state_dir) / "owned.json"
        self.netns = netns
        self._identity = identity
        self.discarded: str | None = None  # why a stale record was discarded at the last load
        # The record as last read or written, as Ownership.to_json (to skip rewrites): the text,
        # not the data, which at 50,000 services holds 6.4 MB of lists against 2.1 MB.
        self._written: str | None = None

    @property
    def identity(self) -> Identity:
        if self._identity is None:
            self._identity = Identity.current(self.netns)
        return self._identity

    def load(self) -> Ownership:
        """The record; an empty one if there is none or it is from an earlier boot.

        Raises :class:`OwnershipError` (unreadable), :class:`FutureSchemaError`,
        :class:`ForeignRecordError` (another network namespace)."""
        ownership = self._read()
        self._written = ownership.to_json()
        return ownership

    def _read(self) -> Ownership:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return Ownership()
        except OSError as error:
            raise OwnershipError(self.path, f"cannot read the ownership record: {error}") from error
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            schema = int(data.get("schema", 1))
        except (ValueError, TypeError) as error:
            raise OwnershipError(
                self.path,
                f"the ownership record is not valid ({error}); move it away and run `kubelvs adopt` to rebuild it",
            ) from error
        if schema > SCHEMA:
            raise FutureSchemaError(
                self.path, f"the ownership record has schema {schema}, newer than this kubelvs ({SCHEMA}); upgrade"
            )
        if schema >= 2:
            mine = self.identity
            boot_id = str(data.get("bootId", ""))
            if boot_id and mine.boot_id and boot_id != mine.boot_id:
                # Kernel state does not survive a reboot: what the record describes is gone.
                self.discarded = f"{self.path}: from an earlier boot ({boot_id}); discarded"
                return Ownership()
            netns = tuple(data.get("netns") or ())
            if netns and netns != mine.netns:
                raise ForeignRecordError(
                    self.path,
                    f"the ownership record belongs to another network namespace (dev, inode {netns}, this one "
                    f"{mine.netns}); use a state directory per namespace (--state-dir)",
                )
        try:
            return Ownership.from_data(data)
        except (ValueError, TypeError, IndexError, KeyError) as error:
            raise OwnershipError(
                self.path,
                f"the ownership record is not valid ({error!r}); move it away and run `kubelvs adopt` to rebuild it",
            ) from error

    def document(self, record: str) -> str:
        """The file's text around ``record`` (Ownership.to_json). Compact: the C encoder takes a
        fifth of the time of an indented rendering, which at 50,000 services was 0.25 s natively
        (twice per sync that adds a service: the intent, then the outcome), several seconds
        under emulation. The record is encoded once, for the comparison and the file."""
        mine = self.identity
        header = json.dumps({"schema": SCHEMA, "netns": list(mine.netns), "bootId": mine.boot_id})
        return header[:-1] + "," + record[1:]  # both are JSON objects: one object with all the keys

    def save(self, ownership: Ownership) -> None:
        """Replace the record atomically and durably (the write-ahead intents depend on it); a
        record equal to the one last read or written is not written again."""
        record = ownership.to_json()
        if record != self._written:
            self._write(self.document(record))
            self._written = record

    def _write(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".owned-")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)


class CachedStore(OwnershipStore):
    """The ownership record kept in memory between syncs (it is read once, at start-up, to adopt
    what a previous run created)."""

    def __init__(
        self, state_dir: Path = DEFAULT_STATE_DIR, netns: str | None = None, identity: Identity | None = None
    ) -> None:
        super().__init__(state_dir, netns, identity)
        self._ownership: Ownership | None = None

    def load(self) -> Ownership:
        if self._ownership is None:
            self._ownership = super().load()
        return self._ownership

    def save(self, ownership: Ownership) -> None:
        self._ownership = ownership
        super().save(ownership)
