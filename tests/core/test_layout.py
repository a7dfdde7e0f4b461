from __future__ import annotations

import posixpath

import pytest

from pipeline.core.layout import image_relpath, safe_name, shard_of

HOSTILE_IDS = [
    "../../etc/passwd",
    "/absolute/path",
    "..",
    ".",
    "",
    "a/../../b",
    "%2e%2e%2fescape",
    "..%2F..%2Fescape",
    "a\u2215b",  # division slash, looks like '/'
    "a\uff0fb",  # fullwidth solidus
    "a\\..\\b",
    "x" * 5000,
    "null\x00byte",
    "new\nline",
    ".hidden",
    "CON",
]


@pytest.mark.parametrize("row_id", HOSTILE_IDS)
def test_hostile_ids_stay_inside_the_output(row_id: str) -> None:
    rel = image_relpath(row_id, "png")
    assert not rel.startswith("/")
    normalized = posixpath.normpath(rel)
    assert normalized == rel and normalized.startswith("images/")
    name = rel.split("/")[-1]
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert len(name) <= 130
    assert not name.startswith(".")
    assert rel.count("/") == 2


def test_readable_ids_are_kept() -> None:
    assert safe_name("food-78934567") == "food-78934567"
    assert safe_name("a.b_c-D") == "a.b_c-D"


def test_distinct_ids_never_collide() -> None:
    ids = ["a/b", "a_b", "a b", "a\u2215b", "a\uff0fb", "a%2Fb", "", "..", "x" * 200, "x" * 201]
    names = {safe_name(i) for i in ids}
    assert len(names) == len(ids)


def test_shard_is_a_fixed_width_hex_prefix() -> None:
    shards = {shard_of(f"id-{i}") for i in range(2000)}
    assert all(len(s) == 2 and int(s, 16) >= 0 for s in shards)
    assert len(shards) == 256
