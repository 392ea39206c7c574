"""This checkout's VM output directory, for the benchmarks' host halves (shared read-write with
the VM: outside the checkout, which may be under /tmp, where the guest cannot write)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ensure_vmout() -> Path:
    """The directory, created (``ensure_vmout`` in hack/vm.py, which is a script, not a module)."""
    spec = importlib.util.spec_from_file_location("kubelvs_hack_vm", REPO / "hack" / "vm.py")
    assert spec is not None and spec.loader is not None
    vm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vm)
    return Path(vm.ensure_vmout(REPO))
