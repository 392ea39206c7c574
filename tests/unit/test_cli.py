"""The CLI with the in-memory kernel injected (``main(argv, kernel=...)``): apply, delete, adopt,
show, manifests, and its errors."""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakes import FakeIPVS, FakeVips
from kubelvs.cli import main
from kubelvs.core.model import AF_INET, ServiceKey, VirtualService
from kubelvs.state.lock import StateLock

FOREIGN = ServiceKey(AF_INET, 6, "198.51.100.7", 443)


class PortFilter:
    def __init__(self) -> None:
        self.allowed: dict[str, set[tuple[int, int]]] | None = None

    def sync(self, allowed: Any) -> None:
        self.allowed = {vip: set(ports) for vip, ports in allowed.items()}

    def begin(self, allowed: Any) -> None:
        pass


class Kernel:
    """The same shape as cli.real_kernel: (IPVS client, VIP interface, VIP port filter)."""

    def __init__(self) -> None:
        self.ipvs = FakeIPVS(services={FOREIGN: VirtualService(FOREIGN, "wlc")})
        self.vips = FakeVips(present={"198.51.100.7": 0})
        self.port_filter = PortFilter()
        self.calls: list[argparse.Namespace] = []

    def __call__(self, args: argparse.Namespace) -> tuple[Any, Any, Any]:
        self.calls.append(args)
        return self.ipvs, self.vips, self.port_filter


def vs(name: str, vip: str, port: int = 80, scheduler: str = "rr") -> dict[str, Any]:
    return {
        "apiVersion": "kubelvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {
            "vip": vip,
            "ports": [{"port": port}],
            "scheduler": scheduler,
            "backends": {"addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}]},
        },
    }


@pytest.fixture
def run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Any:
    kernel = Kernel()
    files = iter(range(1000))

    def run(command: str, *objects: dict[str, Any], extra: tuple[str, ...] = ()) -> tuple[int, str, str]:
        argv = [command]
        if objects or command in ("apply", "delete", "plan"):
            path = tmp_path / f"m{next(files)}.yaml"
            path.write_text(yaml.safe_dump_all(objects))
            argv += ["-f", str(path)]
        if command != "plan":
            argv += ["--state-dir", str(tmp_path / "state")]
        code = main([*argv, *extra], kernel=kernel)
        out = capsys.readouterr()
        return code, out.out, out.err

    run.kernel = kernel  # type: ignore[attr-defined]
    run.state = tmp_path / "state"  # type: ignore[attr-defined]
    return run


def test_apply_then_a_smaller_apply_then_delete(run: Any) -> None:
    kernel = run.kernel
    code, out, _ = run("apply", vs("a", "192.0.2.1"), vs("b", "192.0.2.2"))
    assert code == 0 and "6 operations" in out and "VIP 192.0.2.1 made local" in out
    assert kernel.port_filter.allowed == {"192.0.2.1": {(6, 80)}, "192.0.2.2": {(6, 80)}}
    assert len(kernel.ipvs.services) == 3
    code, out, _ = run("apply", vs("a", "192.0.2.1"), vs("b", "192.0.2.2"))
    assert code == 0 and "0 operations (no changes)" in out
    code, out, _ = run("apply", vs("a", "192.0.2.1"))
    assert code == 0 and "VIP 192.0.2.2 removed" in out
    code, out, _ = run("delete", vs("a", "192.0.2.1"))
    assert code == 0
    assert kernel.ipvs.services == {FOREIGN: VirtualService(FOREIGN, "wlc")}
    assert set(kernel.vips.present) == {"198.51.100.7"}


def test_an_invalid_virtual_server_keeps_what_it_had_and_fails(run: Any) -> None:
    run("apply", vs("a", "192.0.2.1"))
    before = dict(run.kernel.ipvs.services)
    code, out, err = run("apply", vs("a", "192.0.2.1", scheduler="nope"))
    assert code == 1 and "spec.scheduler" in err and "0 operations" in out
    assert run.kernel.ipvs.services == before


def test_adopt_rebuilds_the_record(run: Any) -> None:
    run("apply", vs("a", "192.0.2.1"), vs("b", "192.0.2.2"))
    (run.state / "owned.json").unlink()
    code, out, _ = run("adopt")
    assert code == 0
    assert "adopted VIP 192.0.2.1" in out and "adopted TCP 192.0.2.2:80" in out
    assert "198.51.100.7" not in out.replace("not adopted: VIP 198.51.100.7", "")
    code, out, _ = run("apply", vs("a", "192.0.2.1"), vs("b", "192.0.2.2"))
    assert code == 0 and "0 operations (no changes)" in out and "removed" not in out
    assert FOREIGN in run.kernel.ipvs.services


def test_a_corrupt_record_is_a_clear_error(run: Any) -> None:
    run.state.mkdir()
    (run.state / "owned.json").write_text("{not json")
    code, _, err = run("apply", vs("a", "192.0.2.1"))
    assert code == 3
    assert f"error: {run.state / 'owned.json'}: the ownership record is not valid" in err
    assert "Traceback" not in err and run.kernel.ipvs.services.keys() == {FOREIGN}


def test_a_second_kubelvs_on_the_state_directory_is_refused(run: Any) -> None:
    with StateLock(run.state):
        code, _, err = run("apply", vs("a", "192.0.2.1"))
    assert code == 3 and "another kubelvs (pid" in err and str(run.state / "lock") in err
    assert run.kernel.ipvs.services.keys() == {FOREIGN}


def test_netns_gets_its_own_default_state_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kubelvs.cli as cli
    import kubelvs.state.ownership as ownership

    monkeypatch.setattr(ownership, "DEFAULT_STATE_DIR", tmp_path / "run")
    args = argparse.Namespace(state_dir=str(tmp_path / "run"), netns="dir1")
    assert cli._state_dir(args) == tmp_path / "run" / "netns-dir1"
    args = argparse.Namespace(state_dir=str(tmp_path / "mine"), netns="dir1")
    assert cli._state_dir(args) == tmp_path / "mine"


def test_show_lists_what_kubelvs_owns(run: Any) -> None:
    run("apply", vs("a", "192.0.2.1"))
    code, out, _ = run("show")
    assert code == 0 and "192.0.2.1:80" in out and "(ns/a)" in out and "198.51.100.7" not in out


def test_plan_needs_no_kernel(run: Any) -> None:
    code, out, _ = run("plan", vs("a", "192.0.2.1"))
    assert code == 0 and "-A -t 192.0.2.1:80 -s rr" in out
    assert run.kernel.calls == []


def test_manifests_from_a_directory_and_a_bad_file(run: Any, tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    directory.mkdir()
    (directory / "one.yaml").write_text(yaml.safe_dump(vs("a", "192.0.2.1")))
    (directory / "two.yml").write_text(yaml.safe_dump(vs("b", "192.0.2.2")))
    (directory / "notes.txt").write_text("ignored")
    code = main(["apply", "-f", str(directory), "--state-dir", str(run.state)], kernel=run.kernel)
    assert code == 0 and len(run.kernel.ipvs.services) == 3
    (directory / "bad.yaml").write_text("kind: [unclosed")
    assert main(["apply", "-f", str(directory), "--state-dir", str(run.state)], kernel=run.kernel) == 2


def test_a_command_runs_with_the_cyclic_collector_paused_and_restores_it(run: Any) -> None:
    """One-shot commands pause the cyclic GC (their state is kept to the end and acyclic); the
    caller's setting comes back, also after an error."""
    seen: list[bool] = []
    kernel = run.kernel

    def recording(args: argparse.Namespace) -> tuple[Any, Any, Any]:
        seen.append(gc.isenabled())
        return kernel(args)

    assert gc.isenabled()
    code = main(
        ["apply", "-f", str(_manifest(run, vs("a", "192.0.2.1"))), "--state-dir", str(run.state)], kernel=recording
    )
    assert code == 0 and seen == [False] and gc.isenabled()
    assert main(["apply", "-f", "/nonexistent.yaml", "--state-dir", str(run.state)], kernel=recording) == 2
    assert gc.isenabled()


def _manifest(run: Any, *objects: dict[str, Any]) -> Path:
    path = Path(run.state).parent / "gc.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    return path
