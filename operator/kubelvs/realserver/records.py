"""What the agent set in each namespace, on disk: ``state_dir/receive.json``.

One entry per target (a pod's UID, or ``node``): the namespace's inode (a pod whose sandbox was
replaced has a new namespace, and the old one went away with what kubelvs set in it) and each
item kubelvs changed with what it found. Written atomically before every change (see
:func:`kubelvs.kernel.receive.converge`), so a restart finds exactly what is ours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubelvs.core.receive import Address, FouPort, Item, Link, MssClamp, Sysctl
from kubelvs.kernel.records import save_record

RECORD_NAME = "receive.json"
_KINDS: dict[str, type] = {"Link": Link, "Address": Address, "Sysctl": Sysctl, "FouPort": FouPort, "MssClamp": MssClamp}


def item_to_json(item: Item, previous: int | None) -> dict[str, Any]:
    fields = {name: getattr(item, name) for name in item.__slots__}  # type: ignore[union-attr]
    # The item's type under a key no item has as a field (a Link has a "kind", the link kind).
    return {"item": type(item).__name__, **fields, "previous": previous}


def item_from_json(data: dict[str, Any]) -> tuple[Item, int | None]:
    """An item as :func:`item_to_json` wrote it, or as version 1 did: the type under "kind",
    which a Link's own ``kind`` field overwrote (so a "kind" that names no type is a Link's)."""
    data = dict(data)
    previous = data.pop("previous", None)
    if "item" in data:
        return _KINDS[data.pop("item")](**data), previous
    kind = data.pop("kind")
    if kind in _KINDS:
        return _KINDS[kind](**data), previous
    return Link(device=data["device"], kind=kind), previous


@dataclass
class NamespaceRecord:
    inode: int | None  # None: the node's own namespace
    pod: str = ""  # namespace/name, for people reading the file
    items: dict[Item, int | None] = field(default_factory=dict)


class RecordStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / RECORD_NAME

    def load(self) -> dict[str, NamespaceRecord]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        found = {}
        for key, entry in data.get("namespaces", {}).items():
            items = dict(item_from_json(raw) for raw in entry.get("items", []))
            found[key] = NamespaceRecord(entry.get("inode"), entry.get("pod", ""), items)
        return found

    def save(self, records: dict[str, NamespaceRecord]) -> None:
        data = {
            "version": 2,
            "namespaces": {
                key: {
                    "inode": record.inode,
                    "pod": record.pod,
                    "items": sorted(
                        (item_to_json(item, previous) for item, previous in record.items.items()),
                        key=lambda entry: json.dumps(entry, sort_keys=True),
                    ),
                }
                for key, record in sorted(records.items())
                if record.items
            },
        }
        save_record(self.path, data if data["namespaces"] else None)
