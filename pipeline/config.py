"""The job configuration: one typed, validated object that flows from the CLI to the workers.

A config is loaded from YAML (`load_config`), optionally patched with `--set dotted.key=value`
overrides, and validated by pydantic with `extra="forbid"` so that a typo in a key is an error
naming the key's path rather than a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from pipeline.errors import ConfigError

ImageFormat = Literal["png", "jpeg", "webp"]
Layout = Literal["files", "webdataset"]
DType = Literal["auto", "float32", "float16", "bfloat16"]
Device = Literal["auto", "cpu", "cuda"]
OnBadRow = Literal["fail", "skip"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraConfig(_Section):
    path: str = Field(description="LoRA weights: `hf://ORG/REPO/FILE`, a local .safetensors file or an s3:// URI.")
    weight: float = Field(default=1.0, ge=-4.0, le=4.0, description="Adapter weight (scale) of this LoRA.")


class ModelConfig(_Section):
    preset: str = Field(
        default="tiny",
        description="Model preset (see `sdxl-batch models`): pins weights, scheduler and defaults.",
    )
    path: str | None = Field(
        default=None,
        description=(
            "Base pipeline: a Hugging Face hub id, a local diffusers-format folder, or an object-store "
            "URI of one (copied once per node into the local cache). Defaults to the preset's own."
        ),
    )
    unet: str | None = Field(
        default=None,
        description=(
            "UNet weights replacing the base pipeline's: `hf://ORG/REPO/FILE.safetensors`, a local "
            ".safetensors file or an object-store URI. Defaults to the preset's own (if any)."
        ),
    )
    lora: str | None = Field(
        default=None,
        description="Replaces the preset's acceleration LoRA (e.g. a local or s3:// mirror of the same file).",
    )
    loras: list[LoraConfig] = Field(
        default_factory=list,
        description="Extra (style) LoRAs stacked on top, each with its weight, as in the LCM-LoRA article.",
    )
    fuse_loras: bool = Field(
        default=True,
        description="Fuse LoRAs into the weights at load, so steady-state cost equals the full model's.",
    )
    vae: str | None = Field(
        default=None,
        description="VAE replacing the pipeline's: hub id, local folder or object-store URI of an AutoencoderKL.",
    )
    fp16_fix_vae: bool = Field(
        default=True,
        description="In float16, use madebyollin/sdxl-vae-fp16-fix (SDXL's VAE overflows in fp16) unless `vae` is set.",
    )
    variant: str | None = Field(
        default=None,
        description="Weights variant to fetch from the hub (e.g. `fp16` halves the download of SDXL base).",
    )
    dtype: DType = Field(
        default="auto",
        description="Weights precision. `auto`: bfloat16 on GPUs that support it, else float16; float32 on CPU.",
    )
    device: Device = Field(default="auto", description="`auto` uses CUDA when the actor has a GPU.")
    cache_dir: str | None = Field(
        default=None,
        description="Local per-node cache for object-store models (default: ~/.cache/sdxl-batch).",
    )


class GenerationConfig(_Section):
    batch_size: int = Field(default=4, ge=1, le=1024, description="Images per model call.")
    width: int | None = Field(
        default=None, ge=8, description="Default width (rows may override); preset default when unset."
    )
    height: int | None = Field(
        default=None, ge=8, description="Default height (rows may override); preset default when unset."
    )
    steps: int | None = Field(default=None, ge=1, le=1000, description="Denoising steps; preset default when unset.")
    guidance_scale: float | None = Field(
        default=None, ge=0.0, le=50.0, description="Classifier-free guidance scale; preset default when unset."
    )
    image_format: ImageFormat = Field(default="png", description="Encoding of the written images.")
    image_quality: int = Field(default=95, ge=1, le=100, description="Quality for jpeg and webp.")


class WriteConfig(_Section):
    layout: Layout = Field(
        default="files",
        description=(
            "`files`: images/<shard>/<id>.<ext>; `webdataset`: tar shards of <id>.<ext> + <id>.json "
            "(fewer, larger objects on S3). Both write metadata/part-*.parquet."
        ),
    )
    rows_per_part: int = Field(
        default=64,
        ge=1,
        le=100_000,
        description=(
            "Rows per commit unit (one metadata part, and one tar in the webdataset layout). "
            "Smaller parts commit progress sooner; larger parts make fewer objects."
        ),
    )


class ResourcesConfig(_Section):
    actors: int = Field(default=1, ge=1, description="Generator actors (each loads the pipeline once).")
    gpus_per_actor: float = Field(default=0.0, ge=0.0, description="GPUs per actor; 0 runs on CPU.")
    cpus_per_actor: float = Field(default=1.0, gt=0.0, description="CPUs reserved per generator actor.")
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch CPU threads per actor. Default: every core of the node on CPU, Ray's default on GPU.",
    )


class StorageConfig(_Section):
    """Object-store options; unset fields fall back to the standard AWS variables and profile."""

    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (else AWS_ENDPOINT_URL).")
    region: str | None = Field(default=None, description="Region (else AWS_REGION / AWS_DEFAULT_REGION).")
    key: SecretStr | None = Field(default=None, description="Access key id (else AWS_ACCESS_KEY_ID or profile).")
    secret: SecretStr | None = Field(default=None, description="Secret key (else AWS_SECRET_ACCESS_KEY or profile).")
    anon: bool = Field(default=False, description="Unsigned requests (public buckets).")


class JobConfig(_Section):
    manifest: str = Field(description="Parquet manifest: a file, a folder or a glob, local or s3://.")
    output: str = Field(description="Output prefix, local or s3://.")
    on_bad_row: OnBadRow = Field(
        default="fail",
        description=(
            "A manifest row that breaks the contract: `fail` stops the job before any GPU work and "
            "names the first bad rows; `skip` renders the rest and lists the bad rows in rejects/."
        ),
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    write: WriteConfig = Field(default_factory=WriteConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("manifest", "output")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into its key path and a YAML-typed value (`3` → int, `null` → None)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set generation.batch_size=8")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key (check the spelling; see configs/demo.yaml for every key)")
        elif err["type"] == "missing":
            lines.append(f"  {where}: required but missing")
        else:
            lines.append(f"  {where}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def build_config(data: dict[str, Any], *, source: str = "") -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def load_config(
    path: str | Path | None,
    *,
    manifest: str | None = None,
    output: str | None = None,
    overrides: list[str] | None = None,
) -> JobConfig:
    """Load a YAML config (safe loader), apply CLI overrides and validate it."""
    data: dict[str, Any] = {}
    source = str(path) if path else "(command line)"
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"config {path} is not valid YAML: {error}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path}: expected a mapping of keys at the top level")
        data = loaded or {}
    if manifest is not None:
        data["manifest"] = manifest
    if output is not None:
        data["output"] = output
    return build_config(apply_overrides(data, overrides or []), source=source)
