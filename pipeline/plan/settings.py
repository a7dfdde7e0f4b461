"""Per-row render settings: a row's own value, else the config's, else the preset's default.

Resolving them in the read stage means the metadata records the values actually used, and the
generator can batch rows by exact settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.render import RenderSettings

if TYPE_CHECKING:
    from pipeline.core.config import GenerationConfig
    from pipeline.models.presets import Preset


@dataclass(frozen=True)
class SettingDefaults:
    width: int
    height: int
    steps: int
    guidance_scale: float

    @classmethod
    def from_config(cls, generation: GenerationConfig, preset: Preset) -> SettingDefaults:
        return cls(
            width=generation.width or preset.width,
            height=generation.height or preset.height,
            steps=generation.steps or preset.steps,
            guidance_scale=preset.guidance_scale if generation.guidance_scale is None else generation.guidance_scale,
        )


def fill_settings(table: pa.Table, defaults: SettingDefaults) -> pa.Table:
    """Replace null per-row settings with the job's defaults."""
    for name in ("width", "height", "steps", "guidance_scale"):
        index = table.schema.get_field_index(name)
        column = table.column(index)
        filled = pc.fill_null(column, pa.scalar(getattr(defaults, name), column.type))
        table = table.set_column(index, name, filled)
    return table


def order_by_settings(table: pa.Table) -> pa.Table:
    """The rows in runs of equal render settings (the key of `group_by_settings`), in their order
    within each run (a stable sort). The read stage orders each row group so: the generators take
    it in slices, and a slice of one settings group is one full model call, where rows in file
    order (a real manifest mixes sizes, steps and negative prompts) make as many small calls as
    the slice holds groups (benchmarks/results/settings_mix.md)."""
    if table.num_rows < 2:
        return table
    guidance = table.column("guidance_scale")
    negatives = pc.cast(table.column("negative_prompt"), pa.string())
    negative = pc.fill_null(pc.not_equal(pc.utf8_length(negatives), 0), False)
    cfg_negative = pc.and_(pc.greater(pc.cast(guidance, pa.float64()), 1.0), negative)
    keys = pa.table({
        "width": table.column("width"), "height": table.column("height"), "steps": table.column("steps"),
        "guidance_scale": guidance, "negative": cfg_negative,
    })  # fmt: skip
    order = pc.sort_indices(keys, sort_keys=[(name, "ascending") for name in keys.column_names])
    if order.equals(pa.array(range(table.num_rows), pa.uint64())):
        return table
    return table.take(order)


def group_by_settings(table: pa.Table) -> dict[RenderSettings, list[int]]:
    """Row indices of `table` grouped by identical render settings, in first-seen order.

    A negative prompt only matters when classifier-free guidance runs (guidance > 1), so rows
    with and without one batch together otherwise.
    """
    columns = {
        name: table.column(name).to_pylist()
        for name in ("width", "height", "steps", "guidance_scale", "negative_prompt")
    }
    groups: dict[RenderSettings, list[int]] = {}
    for i in range(table.num_rows):
        guidance = float(columns["guidance_scale"][i])
        settings = RenderSettings(
            width=int(columns["width"][i]),
            height=int(columns["height"][i]),
            steps=int(columns["steps"][i]),
            guidance_scale=guidance,
            negative=guidance > 1.0 and bool(columns["negative_prompt"][i]),
        )
        groups.setdefault(settings, []).append(i)
    return groups
