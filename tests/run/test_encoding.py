"""Image encoding reads the pixel column in place, whatever its chunks and offsets."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.run.encoding import encode_batch, pixel_rows


@pytest.mark.parametrize("kind", [pa.large_binary(), pa.binary()])
def test_pixel_rows_follow_offsets_of_sliced_and_chunked_columns(kind: pa.DataType) -> None:
    rows = [bytes([i]) * (3 * (i + 1)) for i in range(5)]
    column = pa.chunked_array([pa.array(rows[:2], kind), pa.array(rows[2:], kind).slice(1)])
    assert [r.tobytes() for r in pixel_rows(column)] == rows[:2] + rows[3:]


def test_encode_batch_round_trips_pixels() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 4, 3), dtype=np.uint8)
    batch = pa.table({
        "pixels": pa.array([p.tobytes() for p in pixels], pa.large_binary()),
        "width": [4, 4],
        "height": [8, 8],
    })  # fmt: skip
    out = encode_batch(batch, image_format="png", quality=95)
    assert "pixels" not in out.column_names and out.column("bytes").to_pylist() == [
        len(b) for b in out["image"].to_pylist()
    ]
    for encoded, expected in zip(out.column("image").to_pylist(), pixels, strict=True):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(encoded))), expected)
