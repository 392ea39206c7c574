"""Addresses: the fast path for dotted quads gives what ipaddress (and the full checks) give;
value classes are frozen to the type checker and built fast."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubelvs.core.cluster import _endpoint_address, endpoint_address
from kubelvs.core.model import (
    AF_INET,
    AF_INET6,
    Destination,
    Method,
    ServiceKey,
    TunnelChecksum,
    TunnelType,
    VirtualService,
    address_order,
    make_sorted_service,
    normalize_address,
)
from mypy import api as mypy_api


def _reference(text: str) -> tuple[int, str] | None:
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    return (AF_INET if addr.version == 4 else AF_INET6), str(addr)


def _normalized(text: str) -> tuple[int, str] | None:
    try:
        return normalize_address(text)
    except ValueError:
        return None


octets = st.one_of(
    st.integers(0, 300).map(str),
    st.sampled_from(["00", "01", "007", "0x1", "", " 1", "1 ", "+1", "-1", "1_0", "2555"]),
    st.sampled_from(["\uff11", "\u0663", "\u00b2"]),  # digits to str.isdigit(), not to ipaddress
)
quads = st.lists(octets, min_size=3, max_size=5).map(".".join)


@settings(max_examples=2000, deadline=None)
@given(text=st.one_of(quads, st.text(alphabet="0123456789.:abcdef ", max_size=20), st.ip_addresses().map(str)))
def test_normalize_address_matches_ipaddress(text: str) -> None:
    assert _normalized(text) == _reference(text)


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@settings(max_examples=1000)
@given(a=st.ip_addresses(), b=st.ip_addresses())
def test_sort_key_orders_as_the_address_values(a: Address, b: Address) -> None:
    """IPv4 before IPv6, each by value: the order of a service's real servers."""
    value_a, value_b = (a.version, int(a)), (b.version, int(b))
    key_a, key_b = address_order(str(a)), address_order(str(b))
    assert (key_a < key_b) == (value_a < value_b) and (key_a == key_b) == (value_a == value_b)


@settings(max_examples=1000, deadline=None)
@given(text=st.one_of(quads, st.ip_addresses().map(str)))
def test_endpoint_address_fast_path_matches_the_full_check(text: str) -> None:
    assert endpoint_address(text) == _endpoint_address(text)


def test_leading_zeros_are_refused_as_ipaddress_does() -> None:
    assert _normalized("010.0.0.1") is None
    assert normalize_address(" 10.0.0.1\n") == (AF_INET, "10.0.0.1")


def test_a_service_built_from_sorted_real_servers_is_the_one_the_constructor_builds() -> None:
    key = ServiceKey(AF_INET, 6, "192.0.2.1", 80)
    dests = tuple(Destination(f"10.0.0.{i}", 80) for i in (1, 2, 10))
    service = make_sorted_service(key, "mh", 0, 0, 0, dests)
    assert type(service) is VirtualService and service == VirtualService(key, "mh", destinations=dests[::-1])
    assert hash(service) == hash(VirtualService(key, "mh", destinations=dests))
    # The caller's order is kept as given: it must be the canonical one already.
    assert make_sorted_service(key, "mh", 0, 0, 0, dests[::-1]).destinations == dests[::-1]


def test_value_classes_are_equal_and_hashed_by_value() -> None:
    args = ("10.0.0.1", 80, 5, Method.TUN, 1, 2, TunnelType.GUE, 6080, TunnelChecksum.CSUM, AF_INET6)
    assert Destination(*args) == Destination(*args) and hash(Destination(*args)) == hash(Destination(*args))
    assert Destination(*args) != Destination("10.0.0.2", *args[1:])
    assert Destination(*args).__slots__ == tuple(f.name for f in dataclasses.fields(Destination))


def test_value_classes_are_frozen_to_the_type_checker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Destination and Operation are not frozen at run time (see value_class): mypy must refuse
    every assignment to their fields, and accept reading them."""
    snippet = tmp_path / "assigns.py"
    snippet.write_text(
        "from kubelvs.core.model import Destination\n"
        "from kubelvs.core.plan import Operation, Verb\n"
        "d = Destination('10.0.0.1', 80)\n"
        "d.weight = 2\n"
        "op = Operation(Verb.ADD_DEST, None, d)  # type: ignore[arg-type]\n"
        "op.dest = None\n"
        "weight: int = d.weight\n"
    )
    monkeypatch.setenv("MYPYPATH", str(Path(__file__).parents[2] / "operator"))
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\n")
    out, _, status = mypy_api.run(
        ["--no-incremental", "--config-file", str(config), "--follow-imports", "silent", str(snippet)]
    )
    assert status == 1, out
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert [line.split(":")[1] for line in errors] == ["4", "6"], out
    assert all("read-only" in line for line in errors), out
