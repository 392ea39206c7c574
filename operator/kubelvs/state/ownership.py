"""What kubelvs created in the kernel, so it removes exactly that and nothing else.

IPVS has no place for a comment or an owner tag, so the record is a small JSON file written
atomically next to the state it describes (``/run/kubelvs`` by default: it lives as long as the
kernel state, and a reboot clears both).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kubelvs.core.model import ServiceKey

DEFAULT_STATE_DIR = Path(os.environ.get("KUBELVS_STATE_DIR", "/run/kubelvs"))


@dataclass(slots=True)
class Ownership:
    services: dict[ServiceKey, str] = field(default_factory=dict)  # key -> the VirtualServer it serves
    addresses: dict[str, int] = field(default_factory=dict)  # VIPs kubelvs added -> family
    _by_origin: dict[str, set[ServiceKey]] | None = field(default=None, repr=False, compare=False)

    def keys_of(self, origin: str) -> set[ServiceKey]:
        """The services one VirtualServer owns (an index, so one VirtualServer's sync is O(1))."""
        if self._by_origin is None:
            self._by_origin = {}
            for key, owner in self.services.items():
                self._by_origin.setdefault(owner, set()).add(key)
        return self._by_origin.get(origin, set())

    def own(self, key: ServiceKey, origin: str) -> bool:
        """Record ``key`` as serving ``origin``; True if that changed the record."""
        before = self.services.get(key)
        if before == origin:
            return False
        if before is not None:
            self.keys_of(before).discard(key)
        self.services[key] = origin
        if self._by_origin is not None:
            self._by_origin.setdefault(origin, set()).add(key)
        return True

    def disown(self, key: ServiceKey) -> bool:
        before = self.services.pop(key, None)
        if before is None:
            return False
        if self._by_origin is not None:
            self._by_origin.get(before, set()).discard(key)
        return True

    def to_json(self) -> str:
        return json.dumps(
            {
                "services": sorted([*k, origin] for k, origin in self.services.items()),
                "addresses": sorted([a, f] for a, f in self.addresses.items()),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> Ownership:
        data = json.loads(text)
        return cls(
            {ServiceKey(*k[:5]): str(k[5]) for k in data.get("services", [])},
            {a: int(f) for a, f in data.get("addresses", [])},
        )


class OwnershipStore:
    def __init__(self, state_dir: Path = DEFAULT_STATE_DIR) -> None:
        self.path = Path(state_dir) / "owned.json"

    def load(self) -> Ownership:
        try:
            return Ownership.from_json(self.path.read_text())
        except FileNotFoundError:
            return Ownership()

    def save(self, ownership: Ownership) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".owned-")
        with os.fdopen(fd, "w") as handle:
            handle.write(ownership.to_json())
        os.replace(tmp, self.path)


class CachedStore(OwnershipStore):
    """The ownership record kept in memory between syncs; the file is rewritten only when the
    record changed (it is read once, at start-up, to adopt what a previous run created)."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self._ownership: Ownership | None = None
        self._written = ""

    def load(self) -> Ownership:
        if self._ownership is None:
            self._ownership = super().load()
            self._written = self._ownership.to_json()
        return self._ownership

    def save(self, ownership: Ownership) -> None:
        self._ownership = ownership
        text = ownership.to_json()
        if text != self._written:
            super().save(ownership)
            self._written = text
