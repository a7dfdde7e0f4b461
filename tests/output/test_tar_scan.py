"""verify's tar reader (`output.checks._scan_tar`) against the standard library's `tarfile`.

The reader parses headers itself (`tarfile` was nearly all of `verify`'s time at 10M rows); the
property: for any tar that `tarfile` writes (ustar, GNU and pax formats, long and non-ASCII names,
folders, links, empty and odd-sized members) it gives the same members, sizes and sha256 as
`tarfile` reading the stream; for a cut-off or corrupted copy, it fails (a `tarfile.TarError`,
which `verify` reports as an unreadable shard) or gives `tarfile`'s answer. It is stricter than
`tarfile`, which ends a stream silently at a bad header after the first member; never laxer.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.output.checks import _scan_tar, _UnusualTar

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
_NAME = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x2FF, exclude_characters="/\\"), min_size=1, max_size=40
)


@st.composite
def tars(draw: st.DrawFn) -> tuple[bytes, dict[str, bool]]:
    """A tar written by `tarfile` in one format, and which of its members to hash."""
    form = draw(st.sampled_from(sorted(FORMATS)))
    members = draw(
        st.lists(
            st.tuples(
                st.lists(_NAME, min_size=1, max_size=5).map("/".join),  # long paths reach past 100 bytes
                st.sampled_from(["file", "file", "file", "dir", "symlink"]),
                st.binary(max_size=1500),
            ),
            max_size=8,
        )
    )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=FORMATS[form]) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "target/" * draw(st.integers(1, 20))
            else:
                info.size = len(data)
            try:
                tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
            except ValueError:  # a name ustar cannot hold: that format's writer refuses it
                continue
    names = [name for name, _, _ in members] + ["not-there"]
    wanted = {name: draw(st.booleans()) for name in names}
    return buffer.getvalue(), wanted


def _reference(data: bytes, wanted: dict[str, bool]) -> dict[str, tuple[str | None, int]]:
    found: dict[str, tuple[str | None, int]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        for info in tar:
            if info.name in wanted and info.isfile():
                member = tar.extractfile(info)
                assert member is not None
                content = member.read()
                found[info.name] = (hashlib.sha256(content).hexdigest() if wanted[info.name] else None, len(content))
    return found


def _ours(data: bytes, wanted: dict[str, bool]) -> dict[str, tuple[str | None, int]]:
    return _scan_tar(io.BytesIO(data), wanted)


def _outcome(read: Callable[[bytes, dict[str, bool]], object], data: bytes, wanted: dict[str, bool]) -> object:
    try:
        return read(data, wanted)
    except tarfile.TarError:
        return "error"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tars(), st.data())
def test_scan_tar_agrees_with_tarfile(tar: tuple[bytes, dict[str, bool]], data: st.DataObject) -> None:
    """Whole: `tarfile`'s answer. Cut off at any byte, or with a byte changed: an error, or
    `tarfile`'s answer."""
    content, wanted = tar
    assert _scan_tar(io.BytesIO(content), wanted) == _reference(content, wanted)
    at = data.draw(st.integers(0, max(0, len(content) - 1)))
    copies = [content[:at]]
    if content:
        copies.append(content[:at] + bytes([data.draw(st.integers(0, 255))]) + content[at + 1 :])
    for copy in copies:
        try:
            ours = _outcome(_ours, copy, wanted)
        except _UnusualTar:  # a changed type byte: left to tarfile, as `_tar_fingerprints` does
            continue
        if ours != "error":
            assert ours == _outcome(_reference, copy, wanted)


def test_sparse_members_are_left_to_tarfile() -> None:
    header = tarfile.TarInfo("sparse")
    header.type = tarfile.GNUTYPE_SPARSE
    content = header.tobuf(format=tarfile.GNU_FORMAT) + bytes(1024)
    with pytest.raises(_UnusualTar):
        _scan_tar(io.BytesIO(content), {"sparse": True})
