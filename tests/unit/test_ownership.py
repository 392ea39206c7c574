"""The ownership record: schema, migration, identity, typed errors, durability, the lock."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from kubelvs.core.model import AF_INET, ServiceKey
from kubelvs.state.lock import StateLock, StateLockedError
from kubelvs.state.ownership import (
    SCHEMA,
    CachedStore,
    ForeignRecordError,
    FutureSchemaError,
    Identity,
    Ownership,
    OwnershipError,
    OwnershipStore,
)

HERE = Identity((10, 20), "boot-1")
KEY = ServiceKey(AF_INET, 6, "192.0.2.1", 80)
KEY2 = ServiceKey(AF_INET, 17, "192.0.2.1", 53)


def test_round_trip_with_schema_identity_and_intents(tmp_path: Path) -> None:
    owned = Ownership({KEY: "ns/a"}, {"192.0.2.1": AF_INET}, {KEY2: "ns/b"}, {"192.0.2.2": AF_INET})
    store = OwnershipStore(tmp_path, identity=HERE)
    store.save(owned)
    data = json.loads((tmp_path / "owned.json").read_text())
    assert data["schema"] == SCHEMA and data["netns"] == [10, 20] and data["bootId"] == "boot-1"
    assert OwnershipStore(tmp_path, identity=HERE).load() == owned


def test_a_version_1_record_still_loads(tmp_path: Path) -> None:
    (tmp_path / "owned.json").write_text(
        json.dumps({"services": [[2, 6, "192.0.2.1", 80, 0, "ns/a"]], "addresses": [["192.0.2.1", 2]]})
    )
    owned = OwnershipStore(tmp_path, identity=HERE).load()
    assert owned.services == {KEY: "ns/a"} and owned.addresses == {"192.0.2.1": 2}
    assert not owned.has_pending


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"services": [[2, 6]]}', '{"schema": "x"}'])
def test_an_unreadable_record_is_a_typed_error_naming_the_file(tmp_path: Path, text: str) -> None:
    (tmp_path / "owned.json").write_text(text)
    with pytest.raises(OwnershipError) as caught:
        OwnershipStore(tmp_path, identity=HERE).load()
    assert caught.value.path == tmp_path / "owned.json"
    assert str(tmp_path / "owned.json") in str(caught.value)
    assert caught.value.reason == "OwnershipRecordUnreadable"


def test_a_record_from_a_future_schema_is_refused(tmp_path: Path) -> None:
    (tmp_path / "owned.json").write_text(json.dumps({"schema": SCHEMA + 1, "services": []}))
    with pytest.raises(FutureSchemaError, match="newer than this kubelvs"):
        OwnershipStore(tmp_path, identity=HERE).load()


def test_a_record_of_another_namespace_is_refused(tmp_path: Path) -> None:
    OwnershipStore(tmp_path, identity=HERE).save(Ownership({KEY: "ns/a"}))
    with pytest.raises(ForeignRecordError, match="another network namespace"):
        OwnershipStore(tmp_path, identity=Identity((10, 99), "boot-1")).load()


def test_a_record_from_an_earlier_boot_is_discarded(tmp_path: Path) -> None:
    OwnershipStore(tmp_path, identity=HERE).save(Ownership({KEY: "ns/a"}))
    store = OwnershipStore(tmp_path, identity=Identity((10, 99), "boot-2"))
    assert store.load() == Ownership()
    assert store.discarded is not None and "earlier boot" in store.discarded


def test_the_current_identity_is_this_namespace() -> None:
    identity = Identity.current()
    stat = os.stat("/proc/self/ns/net")
    assert identity.netns == (stat.st_dev, stat.st_ino)


def test_a_failed_save_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        OwnershipStore(tmp_path, identity=HERE).save(Ownership({KEY: "ns/a"}))
    assert list(tmp_path.iterdir()) == []


def test_an_unchanged_record_is_not_rewritten(tmp_path: Path) -> None:
    store = CachedStore(tmp_path, identity=HERE)
    owned = store.load()
    owned.own(KEY, "ns/a")
    store.save(owned)
    mtime = (tmp_path / "owned.json").stat().st_mtime_ns
    (tmp_path / "owned.json").write_text("{}")  # would be read back if it were rewritten... it is not
    store.save(owned)
    assert (tmp_path / "owned.json").read_text() == "{}"
    assert mtime


def test_settle_adopts_intents_found_in_the_kernel_and_drops_the_others() -> None:
    owned = Ownership(pending_services={KEY: "ns/a", KEY2: "ns/b"}, pending_addresses={"192.0.2.1": 2, "192.0.2.2": 2})
    assert owned.settle({KEY}, {"192.0.2.2"})
    assert owned.services == {KEY: "ns/a"} and owned.addresses == {"192.0.2.2": 2}
    assert not owned.has_pending
    assert not owned.settle({KEY}, set())


def test_the_origin_index_keeps_no_empty_sets() -> None:
    owned = Ownership({KEY: "ns/a"})
    assert owned.keys_of("ns/a") == {KEY}
    owned.own(KEY, "ns/b")
    assert owned._by_origin == {"ns/b": {KEY}}
    owned.disown(KEY)
    assert owned._by_origin == {}


def test_the_lock_refuses_a_second_holder_naming_the_first(tmp_path: Path) -> None:
    with StateLock(tmp_path):
        with pytest.raises(StateLockedError) as caught:
            StateLock(tmp_path).acquire()
        assert f"pid {os.getpid()}" in str(caught.value)
        assert caught.value.path == tmp_path / "lock"
        assert isinstance(caught.value, OwnershipError)
    with StateLock(tmp_path):  # released
        pass
