"""The VIP port filter's pure parts: the nft script built from the allowed (VIP, protocol, port)
mapping, its checks, and the generation-id reply parser. The kernel side is in
tests/kernel/test_exposure.py."""

from __future__ import annotations

import re
import struct
from socket import AF_INET, AF_INET6

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kubelvs.kernel import vipfilter
from kubelvs.kernel.vipfilter import (
    NFNL_SUBSYS_NFTABLES,
    NFT_MSG_NEWGEN,
    normalize_allowed,
    parse_genid,
    render_remove,
    render_sync,
    render_table,
)

TCP, UDP, SCTP = 6, 17, 132


def _elements(script: str, name: str) -> list[str]:
    block = re.search(rf"set {name} \{{(.*?)\n\t\}}", script, re.S)
    assert block is not None, name
    found = re.search(r"elements = \{ (.*) \}", block.group(1), re.S)
    if found is None:
        return []
    return [e.strip() for e in found.group(1).split(",")]


def test_ipv4_script() -> None:
    script = render_sync({"192.0.2.10": {(TCP, 80), (UDP, 53)}, "192.0.2.9": [(TCP, 443)]})
    assert script.startswith("add table inet kubelvs\ndelete table inet kubelvs\ntable inet kubelvs {\n")
    assert _elements(script, "vips4") == ["192.0.2.9", "192.0.2.10"]  # numeric order
    assert _elements(script, "allowed4") == ["192.0.2.9 . 6 . 443", "192.0.2.10 . 6 . 80", "192.0.2.10 . 17 . 53"]
    assert "type filter hook input priority 0; policy accept;" in script
    assert (
        'iif != "lo" meta l4proto { 6, 17, 132 } ip daddr @vips4 '
        "ip daddr . meta l4proto . th dport != @allowed4 counter drop" in script
    )
    assert "vips6" not in script and "ip6" not in script


def test_ipv6_and_mixed() -> None:
    script = render_table({"2001:db8::1": {(SCTP, 9)}, "192.0.2.1": {(TCP, 80)}})
    assert _elements(script, "vips6") == ["2001:db8::1"]
    assert _elements(script, "allowed6") == ["2001:db8::1 . 132 . 9"]
    assert "type ipv6_addr . inet_proto . inet_service" in script
    assert "ip6 daddr @vips6 ip6 daddr . meta l4proto . th dport != @allowed6 counter drop" in script
    assert script.count(" drop ") == 2  # one rule per family
    assert script.index("vips4") < script.index("vips6")


def test_rule_count_does_not_grow_with_vips() -> None:
    many = {f"10.{i // 250}.{i % 250}.1": {(TCP, 80), (TCP, 443)} for i in range(2000)}
    script = render_table(many)
    assert script.count("drop") == 1
    assert len(_elements(script, "vips4")) == 2000
    assert len(_elements(script, "allowed4")) == 4000


def test_vip_without_ports_drops_all_its_tcp_udp_sctp() -> None:
    script = render_table({"192.0.2.1": set()})
    assert _elements(script, "vips4") == ["192.0.2.1"]
    assert _elements(script, "allowed4") == []  # an empty set: every (protocol, port) is dropped
    assert "set allowed4 {\n\t\ttype ipv4_addr . inet_proto . inet_service\n\t}" in script


def test_empty_mapping_removes_the_table() -> None:
    assert render_table({}) == ""
    assert render_sync({}) == render_remove() == "add table inet kubelvs\ndelete table inet kubelvs\n"


def test_only_its_own_table_is_named() -> None:
    script = render_sync({"192.0.2.1": {(TCP, 80)}, "2001:db8::5": {(UDP, 53)}})
    named = re.findall(r"\btable (\S+ \S+)", script)
    assert named and set(named) == {"inet kubelvs"}
    assert "flush ruleset" not in script


def test_normalize_canonicalizes_and_merges() -> None:
    out = normalize_allowed({"2001:DB8:0::1": {(TCP, 80)}, "2001:db8::1": [(TCP, 80), (UDP, 53)], " 10.0.0.1": []})
    assert out == {AF_INET: {"10.0.0.1": ()}, AF_INET6: {"2001:db8::1": ((TCP, 80), (UDP, 53))}}


@pytest.mark.parametrize(
    ("allowed", "match"),
    [
        ({"not-an-ip": {(TCP, 80)}}, "does not appear to be an IPv4 or IPv6 address"),
        ({"10.0.0.1; flush ruleset": {(TCP, 80)}}, "address"),
        ({"10.0.0.1": {(1, 80)}}, "protocol 1"),
        ({"10.0.0.1": {(TCP, 0)}}, "port 0"),
        ({"10.0.0.1": {(TCP, 65536)}}, "port 65536"),
        ({"10.0.0.1": {(TCP, "80")}}, "port '80'"),
        ({"10.0.0.1": {(TCP, True)}}, "port True"),
    ],
)
def test_bad_input_is_refused(allowed: dict[str, set[tuple[int, object]]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render_sync(allowed)  # type: ignore[arg-type]


@given(
    st.dictionaries(
        st.ip_addresses().map(str),
        st.sets(st.tuples(st.sampled_from([TCP, UDP, SCTP]), st.integers(1, 65535)), max_size=4),
        max_size=12,
    )
)
def test_every_allowed_triple_and_vip_is_in_the_script(allowed: dict[str, set[tuple[int, int]]]) -> None:
    script = render_sync(allowed)
    if not allowed:
        assert "table inet kubelvs {" not in script
        return
    vips = _elements(script, "vips4") if "vips4" in script else []
    vips += _elements(script, "vips6") if "vips6" in script else []
    triples = _elements(script, "allowed4") if "allowed4" in script else []
    triples += _elements(script, "allowed6") if "allowed6" in script else []
    assert sorted(vips) == sorted(allowed)
    expected = {f"{vip} . {proto} . {port}" for vip, ports in allowed.items() for proto, port in ports}
    assert sorted(triples) == sorted(expected)
    assert render_sync(dict(reversed(list(allowed.items())))) == script  # deterministic


def _newgen(genid: int) -> bytes:
    attrs = struct.pack("=HH", 8, 1) + struct.pack(">I", genid)
    attrs += struct.pack("=HH", 8, 2) + struct.pack(">I", 1234)  # NFTA_GEN_PROC_PID
    body = struct.pack("=BBH", 0, 0, 0) + attrs
    header = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN, 0, 1, 0)
    return header + body


def test_parse_genid() -> None:
    assert parse_genid(_newgen(42)) == 42
    assert parse_genid(_newgen(0xFFFFFFFE)) == 0xFFFFFFFE
    error = struct.pack("=IHHII", 36, vipfilter.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -1) + bytes(16)
    assert parse_genid(error) is None
    assert parse_genid(b"") is None
    assert parse_genid(_newgen(7)[:10]) is None


def test_begin_renders_and_runs_in_its_thread_and_the_sync_raises_a_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """No nft here: ``_run`` records the script and the thread it came in. The caller's thread
    renders nothing (10,000 VIPs: 1.2 s under emulation, now beside the applier)."""
    import threading

    ran: list[tuple[str, str]] = []
    port_filter = vipfilter.VipPortFilter()
    monkeypatch.setattr(port_filter, "_run", lambda script: ran.append((threading.current_thread().name, script)))
    monkeypatch.setattr(port_filter, "_generation", lambda: 7)
    caller = threading.current_thread().name
    rendered_in: list[str] = []
    real_render = vipfilter.render_sync

    def render(allowed: object) -> str:
        rendered_in.append(threading.current_thread().name)
        return real_render(allowed)  # type: ignore[arg-type]

    monkeypatch.setattr(vipfilter, "render_sync", render)
    port_filter.begin({"192.0.2.1": {(6, 80)}})
    port_filter.sync({"192.0.2.1": {(6, 80)}})  # begun with this very mapping: nothing more to run
    assert len(ran) == 1 and ran[0][0] != caller and "192.0.2.1 . 6 . 80" in ran[0][1]
    assert rendered_in and caller not in rendered_in
    port_filter.begin({"192.0.2.1": {(6, 0)}})  # port 0: refused when rendered, in the thread
    with pytest.raises(ValueError, match="port 0"):
        port_filter.sync({"192.0.2.1": {(6, 0)}})
    assert len(ran) == 1
