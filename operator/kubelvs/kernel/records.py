"""The small JSON records the node-side effects keep beside their state: what kubelvs set
(sysctls, sync daemons, a pod's receive side), so that it can put back exactly that."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def save_record(path: Path, document: Mapping[str, Any] | None) -> None:
    """Write ``document`` to ``path`` atomically and durably (after a crash the old record or
    the new one is there, never half of one); ``None`` removes the record."""
    if document is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as file:
        json.dump(document, file, indent=1, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
