"""The director's connection-sync wiring and `kubelvs release-node` on the host (no IPVS here:
the failures must be reported clearly and leave everything else alone; the real daemons are
tested in the VM, tests/kernel/test_syncdaemon.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from kubelvs.cli import build_parser, main
from kubelvs.director.app import start_connection_sync
from kubelvs.director.metrics import Metrics
from kubelvs.director.options import config_from
from prometheus_client import CollectorRegistry


def _config(tmp_path: Path, *flags: str):  # type: ignore[no-untyped-def]
    args = build_parser().parse_args(["director", "--node-name", "n1", "--state-dir", str(tmp_path), *flags])
    return config_from(args)


def test_sync_options() -> None:
    config = _config(Path("/tmp/unused"), "--sync-interface", "eth1", "--sync-id", "7", "--sync-refresh-period", "2")
    assert (config.sync_daemon, config.sync_interface, config.sync_id, config.sync_refresh_period) == (
        True,
        "eth1",
        7,
        2,
    )
    assert not _config(Path("/tmp/unused"), "--no-sync-daemon").sync_daemon


def test_a_bad_sync_id_is_reported_with_its_option(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics(CollectorRegistry())
    with caplog.at_level(logging.ERROR):
        assert not start_connection_sync(_config(tmp_path, "--sync-interface", "eth0", "--sync-id", "300"), metrics)
    assert "--sync-id 300: must be 0..255" in caplog.text
    assert "will not survive a VIP move" in caplog.text


def test_no_ipvs_is_reported_and_nothing_recorded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if Path("/proc/net/ip_vs").exists():
        pytest.skip("this kernel has IPVS")
    with caplog.at_level(logging.ERROR):
        assert not start_connection_sync(_config(tmp_path, "--sync-interface", "eth0"))
    assert "connection sync is not running" in caplog.text
    assert not (tmp_path / "syncd.json").exists() and not (tmp_path / "sysctls.json").exists()


def test_release_node_forgets_daemons_of_a_kernel_without_ipvs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if Path("/proc/net/ip_vs").exists():
        pytest.skip("this kernel has IPVS")
    (tmp_path / "syncd.json").write_text(
        json.dumps(
            {
                "version": 1,
                "daemons": [
                    {
                        "state": "master",
                        "interface": "eth0",
                        "sync_id": 1,
                        "max_len": 0,
                        "group": "",
                        "port": 0,
                        "ttl": 0,
                    }
                ],
            }
        )
    )
    assert main(["release-node", "--state-dir", str(tmp_path)]) == 0
    assert not (tmp_path / "syncd.json").exists()
    assert "sync settings restored" in capsys.readouterr().out
