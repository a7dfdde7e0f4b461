from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipeline.core.config import GenerationConfig
from pipeline.core.render import RenderSettings
from pipeline.models.presets import get_preset
from pipeline.plan.settings import SettingDefaults, fill_settings, group_by_settings, order_by_settings


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    schema = pa.schema(
        [
            ("negative_prompt", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("steps", pa.int32()),
            ("guidance_scale", pa.float64()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def test_defaults_come_from_config_then_preset() -> None:
    preset = get_preset("lightning-4step")
    defaults = SettingDefaults.from_config(GenerationConfig(width=512, guidance_scale=0.0), preset)
    assert defaults == SettingDefaults(width=512, height=1024, steps=4, guidance_scale=0.0)


def test_row_values_override_defaults() -> None:
    table = fill_settings(
        _table([{"width": 256}, {"steps": 8, "guidance_scale": 1.5}]), SettingDefaults(128, 128, 4, 0.0)
    )
    assert table.column("width").to_pylist() == [256, 128]
    assert table.column("steps").to_pylist() == [4, 8]
    assert table.column("guidance_scale").to_pylist() == [0.0, 1.5]


def test_rows_batch_only_with_compatible_rows() -> None:
    table = fill_settings(
        _table(
            [
                {},
                {"width": 256},
                {},
                {"negative_prompt": "blurry"},  # no CFG at guidance 0: batches with row 0
                {"guidance_scale": 2.0, "negative_prompt": "blurry"},
                {"guidance_scale": 2.0},
            ]
        ),
        SettingDefaults(128, 128, 4, 0.0),
    )
    groups = group_by_settings(table)
    assert groups == {
        RenderSettings(128, 128, 4, 0.0): [0, 2, 3],
        RenderSettings(256, 128, 4, 0.0): [1],
        RenderSettings(128, 128, 4, 2.0, negative=True): [4],
        RenderSettings(128, 128, 4, 2.0, negative=False): [5],
    }


def test_rows_are_ordered_in_runs_of_equal_settings() -> None:
    """The read stage's order: runs of one settings group each (the key of `group_by_settings`),
    rows in their manifest order within a run; a negative prompt splits rows only under CFG."""
    rows: list[dict[str, Any]] = [
        {"width": 256}, {}, {"guidance_scale": 2.0, "negative_prompt": "blurry"}, {"negative_prompt": "blurry"},
        {"width": 256}, {"guidance_scale": 2.0}, {}, {"guidance_scale": 2.0, "negative_prompt": ""},
    ]  # fmt: skip
    table = fill_settings(_table(rows), SettingDefaults(128, 128, 4, 0.0)).append_column("row", pa.array(range(8)))
    ordered = order_by_settings(table)
    groups = group_by_settings(ordered)
    starts = 0
    for indices in groups.values():  # each group one run, in manifest order
        assert indices == list(range(starts, starts + len(indices)))
        rows_in_run = ordered.column("row").to_pylist()[starts : starts + len(indices)]
        assert rows_in_run == sorted(rows_in_run)
        starts += len(indices)
    assert sorted(ordered.column("row").to_pylist()) == list(range(8))
    assert [len(ix) for ix in groups.values()] == [3, 2, 1, 2]  # 128 no CFG, 128 CFG (none/empty), +neg, 256
    assert order_by_settings(table.slice(0, 1)) == table.slice(0, 1)
