"""Security properties, end to end through the real CLI.

- Hostile ids never name a file outside the output prefix, and distinct ids never share a name
  (local disk and S3, both layouts), with `sdxl-batch verify` passing afterwards.
- Configs (files and `--set` values) load with YAML's safe loader: Python tags are refused.
- No remote code: `trust_remote_code`/`custom_pipeline` are never used, and weights can only come
  from the hub, local paths or s3://; other URL schemes are refused before anything starts.
- Credentials never leak: recognisable fake keys, given both in the environment and in the config,
  appear in no console output, no output file or object, and no file of Ray's session logs, for
  successful and failing runs alike.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow.parquet as pq
import pytest
import s3fs
import yaml

from pipeline.core.config import build_config
from pipeline.core.errors import ConfigError, ModelError
from pipeline.models.weights import resolve_folder, resolve_pipeline_source, resolve_weights_file
from tests.helpers import CLI, REPO, prompt_rows, read_metadata, run_cli, write_config, write_manifest
from tests.integration.faults import FaultyS3Proxy

pytestmark = pytest.mark.integration

KEY = "AKIAFAKELEAKCANARY01"
SECRET = "fake/secret/LEAKCANARY+abcdefghijklmno"
# Every form in which a credential could be written out: as is, URL-encoded, base64; and the
# marker both share, which also catches a truncated or partly masked copy.
NEEDLES = {
    "access key": KEY.encode(),
    "secret": SECRET.encode(),
    "secret, URL-encoded": quote(SECRET, safe="").encode(),
    "secret, base64": base64.b64encode(SECRET.encode()),
    "secret, base64url": base64.urlsafe_b64encode(SECRET.encode()),
    "access key, base64": base64.b64encode(KEY.encode()),
    "canary marker": b"LEAKCANARY",
}
UNSAFE_LOADERS = r"yaml\.(unsafe_)?load\(|yaml\.(Unsafe|Full)?Loader|\bpickle\.loads?\(|(?<![.\w])(eval|exec)\("
OTHER_SCHEMES = ["http://example.com/w", "https://example.com/w", "ftp://example.com/w", "gs://bucket/w"]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _lookalike_pair(stem: str) -> tuple[str, str]:
    """An unsafe id, and a readable id spelled like a sanitised name plus 16 hex digits of the
    unsafe id's sha256, both in the same image shard (docs/output.md: first 2 hex digits of
    sha256(id)). A naming scheme that keeps readable ids as they are must still not give the two
    the same file."""
    for i in range(100_000):
        unsafe = f"{stem}/{i}"
        readable = f"{stem}_{i}-{_sha(unsafe)[:16]}"
        if _sha(unsafe)[:2] == _sha(readable)[:2]:
            return unsafe, readable
    raise AssertionError("no pair found")


ABSOLUTE_ID = f"/tmp/sdxl-batch-abs-{uuid.uuid4().hex[:8]}/x"


def hostile_ids() -> list[str]:
    ids = [
        "../escape",
        "../../etc/passwd",
        "../../../../../../../../sdxl-batch-escape",
        "/abs/path",
        ABSOLUTE_ID,
        "a/../../b",
        "..%2F..%2Fx",
        "%2e%2e%2fy",
        "a\u2215b",  # division slash
        "a\u2044b",  # fraction slash
        "a\uff0fb",  # fullwidth solidus
        "a\u29f8b",  # big solidus
        "..\\..\\w",
        "C:\\windows\\x",
        "x" * 5000,
        "a/b",
        "a_b",
        "a:b",
        "A_B",
        "Case-Only",
        "case-only",
        "nul\x00byte",
        "ctrl\x01\x1f\x7fchars",
        "new\nline\ttab",
        "rtl\u202eoverride",
        ".",
        "..",
        "...",
        ".hidden",
        "~",
        "CON",
        " spaced ",
        # Readable ids shaped like the names unsafe ids get: must not take another id's file.
        _sha(".")[:16],
        _sha("..")[:16],
        *_lookalike_pair("dup"),
    ]
    assert len(set(ids)) == len(ids)
    return ids


def _manifest_rows(ids: list[str]) -> list[dict[str, Any]]:
    rows = [{"id": row_id, "prompt": f"a red dog {i}", "seed": i} for i, row_id in enumerate(ids)]
    rows.append({"id": "", "prompt": "an empty id", "seed": 99})  # a bad row: rejected, listed in rejects/
    return rows


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """RAY_TMPDIR for the CLI's embedded Ray: its session logs land here (a short path, since Ray
    puts unix sockets under it)."""
    folder = Path(tempfile.mkdtemp(prefix="sdxl-sec-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _files(root: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            stat = path.lstat()
            found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


def _check_names(table: Any) -> None:
    """Every non-empty id exactly once; distinct ids got distinct image names; names are plain."""
    ids = table.column("id").to_pylist()
    expected = hostile_ids()
    assert sorted(ids) == sorted(expected)  # each once; the empty id was rejected
    rows = table.to_pylist()
    paths = [row["image_path"] for row in rows]
    members = [row["tar_member"] for row in rows]
    if all(member is None for member in members):
        assert len(set(paths)) == len(paths), "two ids share an image file"
        names = paths
    else:
        assert len(set(members)) == len(members), "two ids share a tar member name"
        names = members
    for name in names:
        assert not name.startswith("/") and "\\" not in name and "\x00" not in name
        assert ".." not in name.split("/") and not name.split("/")[-1].startswith(".")
        assert len(name.split("/")[-1]) <= 130


def test_hostile_ids_stay_inside_the_local_output(tmp_path: Path, model_cache: Path, ray_tmp: Path) -> None:
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "passwd").write_text("canary")
    (tmp_path / "etc").mkdir()
    # Deep enough that a `../` too many would land inside tmp_path, where the walk sees it.
    output = tmp_path / "work" / "jobs" / "run" / "out"
    manifest = write_manifest(tmp_path / "m.parquet", _manifest_rows(hostile_ids()))
    config = write_config(
        tmp_path / "job.yaml",
        manifest=str(manifest),
        output=str(output),
        on_bad_row="skip",
        model={"preset": "tiny", "cache_dir": str(model_cache)},
        generation={"batch_size": 4, "width": 64, "height": 64},
    )
    before = _files(tmp_path)
    result = run_cli("run", str(config), "--no-progress", env={"RAY_TMPDIR": str(ray_tmp)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Skipped 1 bad rows" in result.stdout

    after = _files(tmp_path)
    outside = {path for path in after if not Path(tmp_path, path).is_relative_to(output)}
    changed = {p for p in outside if before.get(p) != after[p]} | (set(before) - set(after))
    assert not changed, f"files created, changed or removed outside the output: {changed}"
    for absolute in ("/abs", "/abs/path.png", "/etc/passwd.png", "/sdxl-batch-escape.png"):
        assert not os.path.exists(absolute)
    assert not os.path.exists(os.path.dirname(ABSOLUTE_ID))
    for path in after:
        assert os.path.realpath(tmp_path / path).startswith(str(tmp_path) + os.sep)

    verify = run_cli("verify", str(output), "--manifest", str(manifest))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    _check_names(read_metadata(str(output)))
    assert len(list((output / "rejects").iterdir())) == 1


@dataclass
class S3Job:
    """One successful job on S3 (moto) with hostile ids, the webdataset layout and the fake
    credentials in both the environment and the config; shared by the tests below."""

    fs: s3fs.S3FileSystem
    bucket: str
    config: Path
    manifest: str
    output: str
    env: dict[str, str]
    ray_tmp: Path
    keys: list[str]  # every object in the bucket right after the run
    result: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def s3_job(tmp_path_factory: pytest.TempPathFactory, model_cache: Path, s3_server: str) -> Iterator[S3Job]:
    folder = tmp_path_factory.mktemp("s3-job")
    ray_tmp = Path(tempfile.mkdtemp(prefix="sdxl-sec-", dir="/tmp"))  # short: Ray puts sockets under it
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, key=KEY, secret=SECRET)
    bucket = f"sec-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    buffer = io.BytesIO()
    pq.write_table(pq.read_table(write_manifest(folder / "m.parquet", _manifest_rows(hostile_ids()))), buffer)
    fs.pipe(f"{bucket}/manifests/m.parquet", buffer.getvalue())
    fs.pipe(f"{bucket}/broken/m.parquet", b"PAR1 this is not a parquet file")
    manifest, output = f"s3://{bucket}/manifests/", f"s3://{bucket}/out"
    config = write_config(
        folder / "job.yaml",
        manifest=manifest,
        output=output,
        on_bad_row="skip",
        model={"preset": "tiny", "cache_dir": str(model_cache)},
        generation={"batch_size": 4, "width": 64, "height": 64},
        write={"layout": "webdataset", "rows_per_part": 16},
        storage={"key": KEY, "secret": SECRET},
        resources={"in_process": False},  # on Ray: its session logs are searched for the secrets too
    )
    env = {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "RAY_TMPDIR": str(ray_tmp),
    }
    result = run_cli("-v", "run", str(config), env=env)  # logging at INFO
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Skipped 1 bad rows" in result.stdout
    fs.invalidate_cache()
    yield S3Job(fs, bucket, config, manifest, output, env, ray_tmp, fs.find(bucket), result)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_hostile_ids_stay_inside_the_s3_output(s3_job: S3Job) -> None:
    fs, bucket = s3_job.fs, s3_job.bucket
    inputs = {f"{bucket}/manifests/m.parquet", f"{bucket}/broken/m.parquet"}
    assert inputs <= set(s3_job.keys)
    stray = [key for key in s3_job.keys if key not in inputs and not key.startswith(f"{bucket}/out/")]
    assert not stray, f"objects written outside the output prefix: {stray}"
    for key in s3_job.keys:
        assert ".." not in key.split("/") and "//" not in key and "\\" not in key

    verify = run_cli("verify", s3_job.output, "--manifest", s3_job.manifest, env=s3_job.env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    table = read_metadata(f"{bucket}/out", filesystem=fs)
    _check_names(table)
    # A consumer untarring a shard must not be able to write outside its folder either.
    for shard in {row["image_path"] for row in table.to_pylist()}:
        with tarfile.open(fileobj=io.BytesIO(fs.cat(f"{bucket}/out/{shard}"))) as tar:
            for member in tar.getmembers():
                assert member.isfile() and "/" not in member.name and not member.name.startswith(".")


# --- YAML is loaded safely -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "tagged",
    [
        'storage: !!python/object/apply:os.system ["touch {marker}"]',
        "output: !!python/name:os.system",
        'output: !!python/object/new:subprocess.check_output [["touch", "{marker}"]]',
    ],
)
def test_yaml_python_tags_are_refused(tmp_path: Path, tagged: str) -> None:
    marker = tmp_path / "PWNED"
    config = tmp_path / "evil.yaml"
    lines = {"manifest": "manifest: m.parquet", "output": f"output: {tmp_path / 'out'}"}
    lines[tagged.split(":")[0]] = tagged.format(marker=marker)
    config.write_text("\n".join(lines.values()) + "\n")
    for command in (["run", str(config)], ["validate", str(config)]):
        result = run_cli(*command)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "not valid YAML" in result.stderr and "python/" in result.stderr
        assert "Traceback" not in result.stderr
    assert not marker.exists() and not (REPO / "PWNED").exists()


def test_yaml_python_tags_in_overrides_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    config = write_config(tmp_path / "job.yaml", manifest="m.parquet", output=str(tmp_path / "out"))
    result = run_cli("validate", str(config), "--set", f'model.path=!!python/object/apply:os.system ["touch {marker}"]')
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--set" in result.stderr and "python/" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


# --- No remote code, no unknown weight sources ---------------------------------------------------


def test_no_remote_code_in_the_source() -> None:
    offenders = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.relative_to(REPO)}:{number}: {line.strip()}"
            if re.search(r"trust_remote_code|custom_pipeline", line) and not line.strip().startswith("#"):
                offenders.append(where)
            if re.search(UNSAFE_LOADERS, line):
                offenders.append(where)
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(where)
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("scheme", OTHER_SCHEMES)
def test_other_weight_schemes_are_refused_by_the_config(scheme: str) -> None:
    base = {"manifest": "m.parquet", "output": "out"}
    for model in (
        {"path": scheme},
        {"unet": scheme + "/unet.safetensors"},
        {"lora": scheme + "/lora.safetensors"},
        {"vae": scheme},
        {"loras": [{"path": scheme + "/style.safetensors", "weight": 0.5}]},
    ):
        with pytest.raises(ConfigError, match=r"(?s)model\..*accepted.*s3://"):
            build_config({**base, "model": model})
    for accepted in ("org/repo", "hf://org/repo", "/local/folder", "relative/folder", "s3://bucket/model", "file:///x"):
        build_config({**base, "model": {"path": accepted}})
    build_config({**base, "model": {"unet": "hf://org/repo/unet.safetensors", "lora": "s3://b/l.safetensors"}})


@pytest.mark.parametrize("scheme", OTHER_SCHEMES)
def test_other_weight_schemes_are_refused_when_resolving(scheme: str, tmp_path: Path) -> None:
    """Defence in depth: refs that bypass the config (presets, library use) are checked too,
    before anything is fetched."""
    for resolve in (
        lambda: resolve_pipeline_source(scheme, storage=None, cache_dir=tmp_path),
        lambda: resolve_folder(scheme, storage=None, cache_dir=tmp_path, marker="config.json"),
        lambda: resolve_weights_file(scheme + "/x.safetensors", storage=None, cache_dir=tmp_path),
    ):
        with pytest.raises(ModelError, match="accepted"):
            resolve()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("key", "scheme"),
    [("model.path", "https://example.com/m"), ("model.unet", "http://127.0.0.1:9/u.safetensors"),
     ("model.lora", "ftp://127.0.0.1:9/l.safetensors"), ("model.path", "gs://bucket/m")],
)  # fmt: skip
def test_other_weight_schemes_stop_the_cli_before_ray(
    tmp_path: Path, model_cache: Path, ray_tmp: Path, key: str, scheme: str
) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", prompt_rows(2))
    config = write_config(
        tmp_path / "job.yaml",
        manifest=str(manifest),
        output=str(tmp_path / "out"),
        model={"preset": "tiny", "cache_dir": str(model_cache)},
    )
    result = run_cli("run", str(config), "--set", f"{key}={scheme}", env={"RAY_TMPDIR": str(ray_tmp)})
    assert result.returncode == 2, result.stdout + result.stderr
    assert key in result.stderr and "accepted" in result.stderr and "Traceback" not in result.stderr
    assert not list(ray_tmp.iterdir()), "Ray was started"
    assert not (tmp_path / "out").exists()


# --- Secrets never leak --------------------------------------------------------------------------


def _leaks(data: bytes, where: str) -> list[str]:
    texts = [data]
    if where.endswith(".parquet"):
        try:
            table = pq.read_table(io.BytesIO(data))
            texts.append(repr((table.to_pylist(), table.schema.metadata)).encode())
        except Exception:  # a parquet that does not parse is searched as raw bytes only
            pass
    return [f"{name} in {where}" for name, needle in NEEDLES.items() if any(needle in text for text in texts)]


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env
    return subprocess.Popen(
        [*CLI, *args], cwd=REPO, env=full_env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip


def test_secrets_never_leak(tmp_path: Path, s3_job: S3Job) -> None:
    fs, bucket, config, env = s3_job.fs, s3_job.bucket, str(s3_job.config), s3_job.env
    manifest, output = s3_job.manifest, s3_job.output
    results = {"run -v": s3_job.result}

    def run(name: str, *args: str, expect: int | None) -> None:
        """Run the CLI; `expect`: its exit status, None for any failure."""
        result = results[name] = run_cli(*args, env=env)
        failed = result.returncode == 0 if expect is None else result.returncode != expect
        assert not failed, f"{name}: {result.stdout[-2000:]}{result.stderr[-3000:]}"

    # (a) the successful job (s3_job, with -v); (b) validate, (c) verify.
    run("validate", "validate", config, expect=0)
    run("verify", "verify", output, "--manifest", manifest, "--config", config, expect=0)
    # (d) failing runs: a missing manifest bucket, a missing output bucket, an unreadable manifest,
    # model weights from a missing bucket (fails in the actors), writes denied while running.
    run("no manifest bucket", "run", config, "--manifest", "s3://no-such-bucket-sdxl/m/", expect=2)
    run("no output bucket", "run", config, "--output", "s3://no-such-bucket-sdxl/out", expect=2)
    run("unreadable manifest", "run", config, "--manifest", f"s3://{bucket}/broken/", expect=2)
    run(
        "no model bucket",
        "run", config, "--output", f"{output}-model", "--set", "model.path=s3://no-such-bucket-sdxl/tiny",
        expect=None,  # a ModelError in the actors' constructor: exit 1 with Ray's traceback for now
    )  # fmt: skip
    with FaultyS3Proxy(env["AWS_ENDPOINT_URL"]) as proxy:
        process = _start(["run", config, "--output", f"{output}-denied"], env | {"AWS_ENDPOINT_URL": proxy.url})
        deadline = time.monotonic() + 120
        while not fs.exists(f"{bucket}/out-denied/job.json"):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
            time.sleep(0.1)
            fs.invalidate_cache()
        proxy.mode = "deny_writes"  # from here on, before any part commits
        stdout, stderr = process.communicate(timeout=240)
    results["writes denied"] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert process.returncode == 2 and "cannot write to the output" in stderr, stderr[-3000:]
    # (e) config mistakes next to the secrets.
    head = f"manifest: {manifest}\noutput: {output}\n"
    bad_configs = {
        "unknown key": head + f"storage:\n  key: {KEY}\n  secret: {SECRET}\n  kye: 1\n",
        "YAML syntax error": head + f'storage:\n  key: {KEY}\n  secret: "{SECRET}\n',
        "YAML error on the secret's line": head + f"storage:\n  key: {KEY}\n  secret: {SECRET}: x\n",
        "secrets of the wrong type": head + f"storage:\n  key: [{KEY}]\n  secret: {{value: {SECRET}}}\n",
    }
    for index, (name, text) in enumerate(bad_configs.items()):
        path = tmp_path / f"bad-{index}.yaml"
        path.write_text(text)
        run(name, "run", str(path), expect=2)
    assert "storage.kye: unknown key" in results["unknown key"].stderr
    assert "line 5" in results["YAML error on the secret's line"].stderr
    assert "storage.key" in results["secrets of the wrong type"].stderr
    run("--set a secret", "validate", config, "--set", f"storage.secret=[{SECRET}", expect=2)

    leaks = []
    for name, result in results.items():
        leaks += _leaks(result.stdout.encode(), f"stdout of {name}")
        leaks += _leaks(result.stderr.encode(), f"stderr of {name}")
    fs.invalidate_cache()
    objects = fs.find(bucket)
    assert {f"{bucket}/out/job.json", f"{bucket}/out/stats.json", f"{bucket}/out-denied/job.json"} <= set(objects)
    assert any("/out/rejects/" in key for key in objects) and any("/out/shards/" in key for key in objects)
    for key in objects:
        leaks += _leaks(fs.cat(key), f"s3://{key}")
    ray_tmp = s3_job.ray_tmp
    logs = [Path(folder, name) for folder, _, names in os.walk(ray_tmp) for name in names]
    logs = [path for path in logs if path.is_file() and not path.is_symlink()]
    sessions = {path.relative_to(ray_tmp).parts[1] for path in logs if path.relative_to(ray_tmp).parts[0] == "ray"}
    assert len(sessions) >= 3 and len(logs) > 20, f"Ray's session logs not found under {ray_tmp}: {sessions}"
    for path in logs:
        leaks += _leaks(path.read_bytes(), str(path))
    assert not leaks, "credentials leaked:\n" + "\n".join(leaks)
    # The credentials were given (and used: the bucket was read and written), and job.json masks them.
    assert yaml.safe_load(fs.cat(f"{bucket}/out/job.json"))["config"]["storage"]["secret"] == "**********"
