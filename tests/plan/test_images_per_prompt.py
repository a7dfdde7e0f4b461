"""`images_per_prompt: N`: each manifest row renders N images, planned as rows of their own so that
resume, duplicates, rejects and the read stage work on images. Image 0 is the row itself (its id and
seed); image k has the id `<id>-<k>` and the seed `(seed + k) mod 2**63`, whatever N is."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import build_config, load_config
from pipeline.core.errors import BadRows, ConfigError, ManifestError
from pipeline.plan.job import plan_job, raise_for_bad_rows
from pipeline.plan.ledger import settings_fingerprint
from pipeline.plan.manifest import (
    SEED_LIMIT,
    Fragment,
    derive_ids,
    derive_seeds,
    expand_ids,
    image_ids,
    image_seeds,
    read_fragment,
)
from pipeline.plan.rows import iter_pending
from tests.helpers import pending_mask, write_manifest


def _config(manifest: Path, output: Path, **keys: Any) -> Any:
    return build_config({"manifest": str(manifest), "output": str(output), "on_bad_row": "skip", **keys})


def _read(job: Any) -> pa.Table:
    return pa.concat_tables(iter_pending(job.manifest, None))


def _commit(output: Path, ids: list[str], config: Any, name: str = "x") -> None:
    """As if a run with `config` had committed a part listing `ids`."""
    from pipeline.core.layout import metadata_schema
    from pipeline.plan.schema import conform

    (output / "metadata").mkdir(parents=True, exist_ok=True)
    pq.write_table(
        conform(pa.table({"id": ids}), metadata_schema(pa.schema([]))), output / "metadata" / f"part-{name}.parquet"
    )
    (output / "job.json").write_text(json.dumps({"fingerprint": settings_fingerprint(config)}))


def test_each_row_renders_n_images_with_derived_ids_and_seeds(tmp_path: Path) -> None:
    rows = [{"id": "a", "prompt": "a red car", "seed": 5}, {"id": "b", "prompt": "a fox", "seed": SEED_LIMIT - 2}]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    job = plan_job(_config(manifest, tmp_path / "out", images_per_prompt=3))
    read = _read(job)
    assert read.column("id").to_pylist() == ["a", "a-1", "a-2", "b", "b-1", "b-2"]
    assert read.column("seed").to_pylist() == [5, 6, 7, SEED_LIMIT - 2, SEED_LIMIT - 1, 0]  # mod 2**63
    assert read.column("prompt").to_pylist() == ["a red car"] * 3 + ["a fox"] * 3
    m = job.manifest
    assert (m.manifest_rows, m.total_rows, m.good_rows, job.pending_rows) == (2, 6, 6, 6)
    assert [t["file_rows"] for t in m.read_tasks()] == [6] and len(pending_mask(m)) == 6
    lines = job.summary_lines()
    assert lines[0] == f"manifest   {manifest}: 1 file, 2 rows, 3 images each: 6 images"
    assert "to render  6 images" in lines and any(line.endswith(": 6 images") for line in lines[4:])
    one = plan_job(_config(manifest, tmp_path / "out"))  # N = 1: exactly the manifest's ids and seeds
    assert _read(one).select(["id", "seed"]).to_pylist() == [{"id": r["id"], "seed": r["seed"]} for r in rows]
    assert one.summary_lines()[0] == f"manifest   {manifest}: 1 file, 2 rows"


def test_derived_ids_and_seeds_extend_those_of_a_manifest_without_them(tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text("a lighthouse at dusk\na fox in the snow\n")
    job = plan_job(_config(tmp_path / "prompts.txt", tmp_path / "out", images_per_prompt=2))
    read = _read(job)
    ids = derive_ids("prompts.txt", 0, 2).to_pylist()
    assert read.column("id").to_pylist() == [ids[0], f"{ids[0]}-1", ids[1], f"{ids[1]}-1"]
    base = derive_seeds(pa.array(ids)).to_pylist()
    assert read.column("seed").to_pylist() == [base[0], (base[0] + 1) % SEED_LIMIT, base[1], (base[1] + 1) % SEED_LIMIT]
    again = _read(plan_job(_config(tmp_path / "prompts.txt", tmp_path / "out", images_per_prompt=2)))
    assert again.equals(read)  # the same in every run


def test_the_helpers_agree(tmp_path: Path) -> None:
    ids = pa.chunked_array([["x", "y"], ["z"]])
    assert expand_ids(ids, 1).to_pylist() == ["x", "y", "z"]
    assert expand_ids(ids, 2).to_pylist() == ["x", "x-1", "y", "y-1", "z", "z-1"]
    assert image_ids(pa.array(["p", None]), np.array([3, 1])).to_pylist() == ["p-3", None]
    assert image_seeds(pa.array([1, None, SEED_LIMIT - 1]), np.array([2, 1, 1])).to_pylist() == [3, None, 0]


def test_resume_renders_only_the_missing_images(tmp_path: Path) -> None:
    """A run with N = 3 committed some images: the next renders the rest, and a run with N = 1 on
    that output has nothing left of the rows whose image 0 is done."""
    rows = [{"id": i, "prompt": f"p {i}", "seed": n} for n, i in enumerate("abcd")]
    manifest = write_manifest(tmp_path / "m.parquet", rows, row_group_size=3)
    out = tmp_path / "out"
    config = _config(manifest, out, images_per_prompt=3)
    _commit(out, ["a", "a-2", "b-1", "d", "d-1", "d-2"], config)
    job = plan_job(config)
    assert (job.done_rows, job.pending_rows) == (6, 6)
    assert sum(t["pending"] for t in job.manifest.read_tasks()) == 6
    read = _read(job)
    assert read.column("id").to_pylist() == ["a-1", "b", "b-2", "c", "c-1", "c-2"]
    assert read.column("seed").to_pylist() == [1, 1, 3, 2, 3, 4]
    ones = plan_job(_config(manifest, out))
    assert (ones.done_rows, _read(ones).column("id").to_pylist()) == (2, ["b", "c"])


def test_raising_n_on_an_output_renders_the_new_images_of_every_row(tmp_path: Path) -> None:
    """N is not part of the settings fingerprint: an image's id, seed and pixels do not depend on
    it, so an output made with N = 1 takes N = 4 and renders images 1 to 3 of each row."""
    rows = [{"id": i, "prompt": f"p {i}", "seed": 10 * n} for n, i in enumerate("abc")]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    _commit(out, ["a", "b", "c"], _config(manifest, out))
    assert settings_fingerprint(_config(manifest, out)) == settings_fingerprint(
        _config(manifest, out, images_per_prompt=4)
    )
    config = load_config(None, manifest=str(manifest), output=str(out), overrides=["images_per_prompt=4"])
    assert config.images_per_prompt == 4
    job = plan_job(config)
    assert (job.done_rows, job.pending_rows) == (3, 9)
    read = _read(job)
    assert read.column("id").to_pylist() == [f"{i}-{k}" for i in "abc" for k in (1, 2, 3)]
    assert read.column("seed").to_pylist() == [10 * n + k for n in range(3) for k in (1, 2, 3)]
    assert any(line == "done       3 images already in the output (skipped: resume)" for line in job.summary_lines())


def test_a_bad_row_rejects_all_of_its_images(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [{"id": "a", "prompt": "p", "seed": 1}, {"id": "b", "prompt": "", "seed": 2}]
    rows.append({"id": "c", "prompt": "q"})  # a seed column, and no seed for this row
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    job = plan_job(_config(manifest, tmp_path / "out", images_per_prompt=2))
    m = job.manifest
    assert (m.problem_count, m.rejected_rows, m.good_rows, job.pending_rows) == (2, 4, 2, 2)
    assert pending_mask(m).tolist() == [True, True, False, False, False, False]
    assert m.problem_lines() == [
        f"file {manifest}, row 1, column 'prompt' (id 'b'): prompt is empty",
        f"file {manifest}, row 2, column 'seed' (id 'c'): seed is missing (null)",
    ]


def test_a_manifest_id_equal_to_a_derived_one_is_a_duplicate_and_the_manifest_id_wins(tmp_path: Path) -> None:
    """Rows `cat` and `cat-1` with N = 2: image 1 of `cat` would take the id `cat-1`. The manifest's
    own id keeps it (it renders as with N = 1); the derived image is the duplicate, named as such."""
    rows = [{"id": "cat", "prompt": "a cat", "seed": 1}, {"id": "cat-1", "prompt": "a kitten", "seed": 9}]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    job = plan_job(_config(manifest, tmp_path / "out", images_per_prompt=2))
    read = _read(job)
    assert read.select(["id", "prompt", "seed"]).to_pylist() == [
        {"id": "cat", "prompt": "a cat", "seed": 1},
        {"id": "cat-1", "prompt": "a kitten", "seed": 9},
        {"id": "cat-1-1", "prompt": "a kitten", "seed": 10},
    ]
    (line,) = job.manifest.problem_lines()
    assert line == (
        f"file {manifest}, row 0, column 'id' (id 'cat-1'): duplicate id: image 1 of this row has the id of image 0 "
        f"of file {manifest}, row 1 (images_per_prompt 2: image k of a row has the id <id>-<k>; give no row the id "
        "of another's followed by -<k>)"
    )
    with pytest.raises(BadRows, match="1 bad row"):
        raise_for_bad_rows(plan_job(_config(manifest, tmp_path / "out", images_per_prompt=2, on_bad_row="fail")))
    assert not plan_job(_config(manifest, tmp_path / "out")).manifest.problem_count  # N = 1: no clash


def test_a_repeated_manifest_id_is_a_duplicate_for_each_image(tmp_path: Path) -> None:
    rows = [{"id": "a", "prompt": "p", "seed": 1}, {"id": "a", "prompt": "q", "seed": 2}]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    job = plan_job(_config(manifest, tmp_path / "out", images_per_prompt=2))
    assert job.manifest.problem_lines() == [
        f"file {manifest}, row 1, column 'id' (id 'a'): duplicate id (first at file {manifest}, row 0)",
        f"file {manifest}, row 1, column 'id' (id 'a-1'): duplicate id (first at file {manifest}, row 0, image 1)",
    ]
    assert _read(job).column("prompt").to_pylist() == ["p", "p"] and job.manifest.rejected_rows == 2


def test_a_row_changed_after_planning_is_named_by_its_manifest_row(tmp_path: Path) -> None:
    rows = [{"id": i, "prompt": "p", "seed": 1} for i in "abcd"]
    write_manifest(tmp_path / "m.parquet", rows)
    job = plan_job(_config(tmp_path / "m.parquet", tmp_path / "out", images_per_prompt=3))
    (task,) = job.manifest.read_tasks()
    assert (task["images"], task["file_rows"], task["pending"]) == (3, 12, 12)
    rows[2]["seed"] = -1
    write_manifest(tmp_path / "m.parquet", rows)
    with pytest.raises(ManifestError, match=r"row 2, column 'seed'.*changed after the job was planned"):
        read_fragment(Fragment(**{name: task[name] for name in Fragment.__dataclass_fields__}))


def test_the_read_stage_yields_each_task_s_pending_images(tmp_path: Path) -> None:
    """`ReadManifest`, as Ray Data runs it, over read tasks of several files and row groups: the
    images it yields are the planned ones, with ids, seeds and settings."""
    from pipeline.plan.manifest import rules_for
    from pipeline.run.stages import ReadManifest

    rows = [{"prompt": f"p{i}", "seed": i, "width": 64 if i % 2 else None} for i in range(5)]
    write_manifest(tmp_path / "m" / "a.parquet", rows, row_group_size=2)
    (tmp_path / "m" / "b").mkdir()
    write_manifest(tmp_path / "m" / "b" / "c.parquet", rows[:2])
    config = _config(tmp_path / "m", tmp_path / "out", images_per_prompt=2)
    _commit(tmp_path / "out", ["a-000000001", "a-000000003-1"], config)
    job = plan_job(config)
    stage = ReadManifest(
        storage=config.storage, defaults=job.defaults, rules=rules_for(job.preset), masks=job.manifest.masks
    )
    ids = []
    for task in job.manifest.read_tasks():
        table = stage(pa.Table.from_pylist([task]))
        assert table.num_rows == task["pending"]
        ids += table.column("id").to_pylist()
        for row in table.to_pylist():
            k = int(row["id"].split("-")[2]) if row["id"].count("-") == 2 else 0
            assert row["seed"] == int(row["prompt"][1:]) + k and row["width"] == (
                64 if row["seed"] % 2 != k % 2 else 128
            )
    a = [f"a-{r:09d}" for r in range(5)]
    c = [f"b__c-{r:09d}" for r in range(2)]
    expected = [i for r in a + c for i in (r, f"{r}-1") if i not in ("a-000000001", "a-000000003-1")]
    assert sorted(ids) == sorted(expected) and job.pending_rows == len(expected) == 12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planning_matches_a_reference_model(tmp_path: Path, seed: int) -> None:
    """Random manifests (ids that repeat or clash with derived ones, bad rows, several files, row
    groups) and outputs: the images planned are those a plain Python model of the rules gives."""
    rng = random.Random(seed)
    n = rng.randint(1, 4)
    pool = ["a", "b", "a-1", "b-2", "c", "c-1-1", "d"]
    files = []
    for f in range(rng.randint(1, 3)):
        rows = [
            {"id": rng.choice(pool), "prompt": rng.choice(["p", "q", ""]), "seed": rng.randint(0, 5)}
            for _ in range(rng.randint(1, 6))
        ]
        write_manifest(tmp_path / "m" / f"f{f}.parquet", rows, row_group_size=rng.randint(1, 3))
        files.append(rows)
    # The reference: images in (file, row, k) order, a manifest's own id (k = 0) before derived ones.
    images: list[tuple[Any, ...]] = [
        (r["id"] if k == 0 else f"{r['id']}-{k}", k != 0, f, i, k, r)
        for f, rows in enumerate(files) for i, r in enumerate(rows) if r["prompt"] for k in range(n)
    ]  # fmt: skip
    winners: dict[str, tuple[Any, ...]] = {}
    for image in sorted(images, key=lambda im: (im[1], im[2], im[3], im[4])):
        winners.setdefault(image[0], image)
    done = set(rng.sample(sorted(winners), k=min(len(winners), rng.randint(0, 3))))
    expected = [(im[0], im[5]["seed"] + im[4]) for im in images if winners[im[0]] is im and im[0] not in done]
    config = _config(tmp_path / "m", tmp_path / "out", images_per_prompt=n)
    if done:
        _commit(tmp_path / "out", sorted(done), config)
    job = plan_job(config)
    read = _read(job) if job.pending_rows else pa.table({"id": [], "seed": []})
    assert list(zip(read.column("id").to_pylist(), read.column("seed").to_pylist(), strict=True)) == expected
    bad = sum(1 for rows in files for r in rows if not r["prompt"])
    assert job.manifest.problem_count == bad + len(images) - len(winners)
    assert job.manifest.good_rows == len(winners) and job.done_rows == len(done)


def test_images_per_prompt_is_a_top_level_key_of_at_least_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"images_per_prompt \(from --set images_per_prompt=\.\.\.\): Input should"):
        load_config(None, manifest="m", output="o", overrides=["images_per_prompt=0"])
    with pytest.raises(ConfigError, match=r"generation.images_per_prompt .*unknown key"):
        load_config(None, manifest="m", output="o", overrides=["generation.images_per_prompt=2"])
    assert load_config(None, manifest="m", output="o").images_per_prompt == 1
