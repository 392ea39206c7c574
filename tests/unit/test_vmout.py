"""hack/vm.py's output directory of a checkout: outside /tmp wherever the checkout is, and unique
per checkout (the guest cannot write under /tmp, and a clone under /tmp must still run the
kernel tests)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_vm() -> Any:
    name = "kubelvs_hack_vm"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "hack" / "vm.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


vm = _load_vm()


@pytest.mark.parametrize(
    "environ",
    [
        {"HOME": "/root"},
        {"HOME": "/tmp/home"},  # a HOME under /tmp falls back to /var/tmp
        {"HOME": "/root", "XDG_CACHE_HOME": "/tmp/cache"},
        {"HOME": "/root", "KUBELVS_CACHE": "/tmp/kubelvs"},
        {"HOME": "/home/dev", "KUBELVS_CACHE": "/srv/cache/kubelvs"},
    ],
)
@pytest.mark.parametrize("checkout", ["/tmp/kubelvs-clone", "/work/main", "/tmp"])
def test_vmout_never_under_tmp(environ: dict[str, str], checkout: str) -> None:
    out = vm.vmout_dir(checkout, environ)
    assert not vm.under_tmp(out), out
    assert out.is_absolute()


def test_vmout_in_the_cache_and_unique_per_checkout() -> None:
    env = {"HOME": "/home/dev"}
    a = vm.vmout_dir("/tmp/a/kubelvs", env)
    b = vm.vmout_dir("/tmp/b/kubelvs", env)
    assert a != b
    assert a.parent == Path("/home/dev/.cache/kubelvs/vmout")
    assert a.name.startswith("kubelvs-")
    assert vm.vmout_dir("/tmp/a/kubelvs", env) == a  # stable
    assert vm.vmout_dir("/x", {"HOME": "/h", "KUBELVS_CACHE": "/c"}).parent == Path("/c/vmout")


def test_vmout_override_travels_to_the_guest() -> None:
    assert vm.vmout_dir("/tmp/a", {"HOME": "/h", "KUBELVS_VMOUT": "/srv/out"}) == Path("/srv/out")
    # The guest's HOME is under /tmp: it gets the host's answer, not its own.
    assert vm._guest_env(None)["KUBELVS_VMOUT"] == str(vm.vmout_dir())


def test_under_tmp() -> None:
    assert vm.under_tmp("/tmp")
    assert vm.under_tmp("/tmp/x/y")
    assert not vm.under_tmp("/tmpfoo")
    assert not vm.under_tmp("/var/tmp/x")


def test_ensure_vmout_links_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # tmp_path is under /tmp, like a newcomer's clone; the cache is redirected out of the way.
    cache = tmp_path / "cache"
    monkeypatch.delenv("KUBELVS_VMOUT", raising=False)
    monkeypatch.setattr(vm, "under_tmp", lambda p: Path(p).resolve() == Path("/nonexistent"))
    monkeypatch.setenv("KUBELVS_CACHE", str(cache))
    checkout = tmp_path / "clone"
    checkout.mkdir()
    out = vm.ensure_vmout(checkout)
    assert out.is_dir() and cache in out.parents
    assert os.readlink(checkout / ".vmout") == str(out)
    assert vm.ensure_vmout(checkout) == out  # idempotent
    # An older layout's real .vmout directory is left alone.
    other = tmp_path / "old"
    (other / ".vmout").mkdir(parents=True)
    vm.ensure_vmout(other)
    assert (other / ".vmout").is_dir() and not (other / ".vmout").is_symlink()
