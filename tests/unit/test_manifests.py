"""Reading manifests: the lean YAML constructor gives what PyYAML's safe loader gives, for any
document (plain data by its own path, everything else by PyYAML's), and the same errors."""

from __future__ import annotations

import math
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from kubelvs.manifests import _LOADER, _PlainDataLoader


def both(text: str) -> tuple[list[Any], list[Any]]:
    return list(yaml.load_all(text, Loader=_LOADER)), list(yaml.load_all(text, Loader=_PlainDataLoader))


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN (.nan loads as a float that equals nothing)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    # Texts a resolver reads as something else when they are not quoted.
    st.sampled_from(["yes", "No", "on", "~", "0x1f", "0o17", "017", "1_000", "1:30", "-0", "+5", ".inf", "2026-12-04"]),
)
plain_data = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(documents=st.lists(plain_data, min_size=1, max_size=3), flow=st.sampled_from([None, True, False]))
def test_plain_documents_load_as_the_safe_loader_loads_them(documents: list[Any], flow: bool | None) -> None:
    text = yaml.safe_dump_all(documents, default_flow_style=flow, sort_keys=False)
    reference, lean = both(text)
    assert same(reference, lean)


@settings(max_examples=300, deadline=None)
@given(words=st.lists(st.sampled_from(["yes", "0x10", "010", "1_0", "1:2:3", "-12", "3.5e3", "null", "x"]), max_size=6))
def test_unquoted_scalars_resolve_as_the_safe_loader_resolves_them(words: list[str]) -> None:
    text = "".join(f"k{i}: {word}\n" for i, word in enumerate(words)) + "list: [" + ", ".join(words) + "]\n"
    reference, lean = both(text)
    assert same(reference, lean)


@pytest.mark.parametrize(
    "text",
    [
        "base: &b {a: 1, b: 2}\nderived:\n  <<: *b\n  b: 3\n",  # a merge key
        "a: &x [1, 2]\nb: *x\n",  # an alias: a copy here, the same object there; equal data
        "!!set {a, b}\n",
        "!!omap [a: 1, b: 2]\n",
        "1: int key\nnull: null key\n",
        "t: 2001-12-14t21:59:43.10-05:00\nd: 2002-12-14\n",
        "b: !!binary aGVsbG8=\n",
        "s: !!str 123\ni: !!int '42'\nf: !!float '1'\n",
        "inf: .inf\nninf: -.Inf\nnan: .NaN\n",
        "deep: " + "[" * 100 + "]" * 100 + "\n",
        "---\na: 1\n---\n---\n- x\n",  # an empty document among others
        "a: 1\na: 2\n",  # a duplicate key: the last wins in both
    ],
)
def test_other_documents_load_as_the_safe_loader_loads_them(text: str) -> None:
    reference, lean = both(text)
    assert same(reference, lean)


@pytest.mark.parametrize(
    "text",
    [
        "a: !custom 1\n",  # an unknown tag
        "a: &x [*x]\n",  # a recursive alias: a safe loader builds it, then nothing compares equal
        "a: [1, 2\n",  # not YAML
        "? [1, 2]\n: x\nb: {[1]: 2}\n",  # a list as a mapping key: unhashable
        # A tag on a node of another kind: the safe loader refuses each.
        "a: !!str {b: 1}\n",
        "a: !!int [1]\n",
        "a: !!map text\n",
        "a: !!seq text\n",
        "a: !!null {b: 1}\n",
        "? !!str [1]\n: x\n",
    ],
)
def test_errors_and_oddities_are_the_safe_loaders(text: str) -> None:
    try:
        reference: Any = list(yaml.load_all(text, Loader=_LOADER))
    except yaml.YAMLError as error:
        with pytest.raises(type(error)):
            list(yaml.load_all(text, Loader=_PlainDataLoader))
        return
    lean = list(yaml.load_all(text, Loader=_PlainDataLoader))
    assert repr(lean) == repr(reference)
