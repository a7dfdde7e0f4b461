from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import ManifestError
from pipeline.plan.manifest import Fragment, read_fragment
from tests.helpers import pending_ids, pending_mask, plan_manifest, prompt_rows, write_manifest


def _fragment(task: dict[str, Any]) -> Fragment:
    return Fragment(**{name: task[name] for name in Fragment.__dataclass_fields__})


def test_single_file_folder_and_glob(tmp_path: Path) -> None:
    write_manifest(tmp_path / "m" / "a.parquet", prompt_rows(3))
    write_manifest(tmp_path / "m" / "sub" / "b.parquet", prompt_rows(2, start=3))
    (tmp_path / "m" / "notes.txt").write_text("ignored")
    assert plan_manifest(str(tmp_path / "m" / "a.parquet")).total_rows == 3
    folder = plan_manifest(str(tmp_path / "m"))
    assert folder.total_rows == 5 and len(folder.files) == 2
    assert plan_manifest(str(tmp_path / "m" / "*.parquet")).total_rows == 3
    assert plan_manifest(f"file://{tmp_path}/m/**/*.parquet").total_rows == 5


def test_derived_ids_are_stable_and_unique(tmp_path: Path) -> None:
    write_manifest(tmp_path / "m" / "a.parquet", prompt_rows(5, with_ids=False), row_group_size=2)
    write_manifest(tmp_path / "m" / "sub" / "a.parquet", prompt_rows(3, with_ids=False))
    first = plan_manifest(str(tmp_path / "m"))
    second = plan_manifest(str(tmp_path / "m"))
    ids = pending_ids(first)
    assert ids == pending_ids(second)
    assert ids[:5] == [f"a-{i:09d}" for i in range(5)]
    assert ids[5:] == [f"sub__a-{i:09d}" for i in range(3)]
    # Row groups carry their offsets, so every read derives the same ids.
    read = [i for task in first.read_tasks() for i in read_fragment(_fragment(task)).column("id").to_pylist()]
    assert read == ids


def test_read_fragment_normalises_schema_and_keeps_pass_through(tmp_path: Path) -> None:
    rows = [
        {"prompt": "p", "seed": 1, "width": 256, "guidance_scale": 2, "extra": [1, 2], "tag": "x"},
        {"prompt": "q", "seed": 2, "width": None, "guidance_scale": None, "extra": [], "tag": None},
    ]
    plan = plan_manifest(str(write_manifest(tmp_path / "m.parquet", rows)))
    table = read_fragment(_fragment(plan.read_tasks()[0]))
    assert table.column_names[:8] == [
        "id",
        "prompt",
        "negative_prompt",
        "seed",
        "width",
        "height",
        "steps",
        "guidance_scale",
    ]
    assert table.schema.field("seed").type == pa.int64()
    assert table.schema.field("guidance_scale").type == pa.float64()
    assert table.column("extra").to_pylist() == [[1, 2], []]
    assert table.column("height").null_count == 2


def _expect_error(tmp_path: Path, rows: list[dict[str, Any]], *, match: str, schema: pa.Schema | None = None) -> str:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    with pytest.raises(ManifestError, match=match) as info:
        plan_manifest(str(path))
    return str(info.value)


def test_missing_required_column(tmp_path: Path) -> None:
    message = _expect_error(tmp_path, [{"seed": 1}], match="required column is missing")
    assert (
        "bad.parquet" in message
        and "'prompt'" in message
        and "'seed' (integer) and 'id' (string) are optional" in message
    )


def test_mistyped_column(tmp_path: Path) -> None:
    message = _expect_error(tmp_path, [{"prompt": "p", "seed": "12"}], match="expected integer")
    assert "'seed'" in message


@pytest.mark.parametrize(
    ("rows", "column", "row"),
    [
        ([{"prompt": "ok", "seed": 1}, {"prompt": None, "seed": 2}], "prompt", 1),
        ([{"prompt": "ok", "seed": 1}, {"prompt": "", "seed": 2}], "prompt", 1),
        ([{"prompt": "ok", "seed": -1}], "seed", 0),
        ([{"prompt": "ok", "seed": 1}, {"prompt": "ok", "seed": None}], "seed", 1),
        ([{"prompt": "ok", "seed": 1, "id": ""}], "id", 0),
    ],
)
def test_bad_rows_are_reported_with_row_and_column(
    tmp_path: Path, rows: list[dict[str, Any]], column: str, row: int
) -> None:
    plan = _plan(tmp_path, rows)
    assert plan.problem_count == 1 and (~pending_mask(plan)).tolist() == [i == row for i in range(len(rows))]
    assert f"bad.parquet, row {row}, column '{column}'" in plan.problem_lines()[0]


def _plan(tmp_path: Path, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> Any:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return plan_manifest(str(path), keep_problems=True)


def test_seed_above_int63_in_uint64_column(tmp_path: Path) -> None:
    schema = pa.schema([("prompt", pa.string()), ("seed", pa.uint64())])
    plan = _plan(tmp_path, [{"prompt": "p", "seed": 2**63 - 1}, {"prompt": "p", "seed": 2**63}], schema)
    assert (~pending_mask(plan)).tolist() == [False, True] and "2**63" in plan.problem_lines()[0]


def test_duplicate_ids_keep_the_first_occurrence(tmp_path: Path) -> None:
    rows = [{"id": i, "prompt": "p", "seed": 1} for i in ("a", "b", "a", "c", "a")]
    plan = _plan(tmp_path, rows)
    assert (~pending_mask(plan)).tolist() == [False, False, True, False, True]
    assert all("duplicate id (first at file" in line and "row 0)" in line for line in plan.problem_lines())


def test_reserved_column(tmp_path: Path) -> None:
    _expect_error(tmp_path, [{"prompt": "p", "seed": 1, "sha256": "x"}], match="reserved")


def test_empty_manifest(tmp_path: Path) -> None:
    schema = pa.schema([("prompt", pa.string()), ("seed", pa.int64())])
    _expect_error(tmp_path, [], match="no rows", schema=schema)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        plan_manifest(str(tmp_path / "nope.parquet"))
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        plan_manifest(str(tmp_path / "corrupt.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="matches no manifest files"):
        plan_manifest(str(tmp_path / "empty"))


def test_read_tasks_are_the_row_groups_with_pending_rows(tmp_path: Path) -> None:
    rows = prompt_rows(25, with_ids=False)
    for i in range(10):
        rows[i]["prompt"] = ""  # the whole first row group is bad: no read task for it
    write_manifest(tmp_path / "m.parquet", rows, row_group_size=10)
    plan = plan_manifest(str(tmp_path / "m.parquet"), keep_problems=True)
    tasks = plan.read_tasks()
    assert [(t["row_group"], t["row_offset"], t["num_rows"], t["pending"]) for t in tasks] == [
        (1, 10, 10, 10),
        (2, 20, 5, 5),
    ]
    assert pending_ids(plan) == [f"m-{i:09d}" for i in range(10, 25)]


def test_read_stage_reads_each_row_group_once(tmp_path: Path) -> None:
    from pipeline.core.config import JobConfig
    from pipeline.models.presets import get_preset
    from pipeline.plan.manifest import rules_for
    from pipeline.plan.settings import SettingDefaults
    from pipeline.run.stages import ReadManifest

    write_manifest(tmp_path / "m.parquet", prompt_rows(25), row_group_size=10)
    plan = plan_manifest(str(tmp_path / "m.parquet"))
    config = JobConfig.model_validate({"manifest": str(tmp_path / "m.parquet"), "output": str(tmp_path / "o")})
    rules = rules_for(get_preset(config.model.preset))
    stage = ReadManifest(
        storage=config.storage, defaults=SettingDefaults(128, 128, 4, 0.0), rules=rules, masks=plan.masks
    )
    ids = [i for task in plan.read_tasks() for i in stage(pa.Table.from_pylist([task])).column("id").to_pylist()]
    assert ids == pending_ids(plan) == [r["id"] for r in prompt_rows(25)]
