"""The job configuration: one typed, validated object that flows from the CLI to the workers.

A config is loaded from YAML (`load_config`), optionally patched with `--set dotted.key=value`
overrides, and validated by pydantic with `extra="forbid"` so that a typo in a key is an error
naming the key's path rather than a silently ignored setting.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.core.errors import ConfigError
from pipeline.core.uris import weights_source_problem

ImageFormat = Literal["png", "jpeg", "webp"]
Layout = Literal["files", "webdataset"]
DType = Literal["auto", "float32", "float16", "bfloat16"]
Device = Literal["auto", "cpu", "cuda"]
OnBadRow = Literal["fail", "skip"]
Attention = Literal["sdpa", "flash", "eager"]
ManifestFormat = Literal["auto", "parquet", "csv", "tsv", "jsonl", "json", "text", "arrow"]
MAX_IMAGES_PER_PROMPT = 10_000


def _weights_source(value: str) -> str:
    """Weights come from the hub, local disk or s3:// only: other URL schemes are refused here,
    before anything starts (and again where weights are resolved)."""
    problem = weights_source_problem(value)
    if problem:
        raise ValueError(problem)
    return value


WeightsSource = Annotated[str, AfterValidator(_weights_source)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraConfig(_Section):
    path: WeightsSource = Field(
        description="LoRA weights: `hf://ORG/REPO/FILE`, a local .safetensors file or an s3:// URI."
    )
    weight: float = Field(default=1.0, ge=-4.0, le=4.0, description="Adapter weight (scale) of this LoRA.")


class ModelConfig(_Section):
    preset: str = Field(
        default="tiny",
        description="Model preset (see `sdxl-batch models`): pins weights, scheduler, defaults and limits.",
    )
    path: WeightsSource | None = Field(
        default=None,
        description=(
            "Base pipeline: a Hugging Face hub id, a local diffusers-format folder, or an object-store "
            "URI of one (copied once per node into the local cache). Defaults to the preset's own."
        ),
    )
    unet: WeightsSource | None = Field(
        default=None,
        description=(
            "UNet weights replacing the base pipeline's: `hf://ORG/REPO/FILE.safetensors`, a local "
            ".safetensors file or an object-store URI. Defaults to the preset's own (if any)."
        ),
    )
    lora: WeightsSource | None = Field(
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
    vae: WeightsSource | None = Field(
        default=None,
        description="VAE replacing the pipeline's: hub id, local folder or object-store URI of an AutoencoderKL.",
    )
    fp16_fix_vae: bool = Field(
        default=True,
        description=(
            "In float16, use `madebyollin/sdxl-vae-fp16-fix` (SDXL's VAE overflows in fp16) unless `vae` is set "
            "(the tiny preset keeps its own VAE)."
        ),
    )
    watermark: bool = Field(
        default=False,
        description=(
            "Apply SDXL's invisible watermark (needs `invisible-watermark`). Off by default: diffusers turns it on "
            "whenever the package is installed, and it runs on the CPU, one image at a time, after every decode."
        ),
    )
    variant: str | None = Field(
        default=None,
        description=(
            "Weights variant of the base pipeline. Unset: `fp16` for a 16-bit dtype where the source (hub, folder, "
            "object-store mirror) has it (half the bytes of the float32 files), else the default files."
        ),
    )
    dtype: DType = Field(
        default="auto",
        description="Weights precision. `auto`: bfloat16 on GPUs that support it, else float16; float32 on CPU.",
    )
    device: Device = Field(default="auto", description="`auto` uses CUDA when the actor has a GPU.")
    attention: Attention = Field(
        default="sdpa",
        description=(
            "Attention kernels: `sdpa` (PyTorch's scaled_dot_product_attention, which picks flash or "
            "memory-efficient kernels on CUDA), `flash` (SDPA restricted to the flash kernel; CUDA, fp16/bf16), "
            "`eager` (plain matmul-softmax-matmul, the baseline). `flash` applies to the UNet's attention while "
            "denoising only (the kernel takes head widths up to 256, and the VAE's attention is 512 wide) and "
            "needs a 16-bit `dtype`."
        ),
    )
    channels_last: bool = Field(
        default=True, description="UNet weights in channels_last memory format on CUDA (faster convolutions)."
    )
    vae_channels_last: bool = Field(
        default=True,
        description=(
            "VAE weights in channels_last memory format on CUDA; a switch of its own because CUDA's GroupNorm "
            "over NHWC tensors can make the decoder slower (benchmarks/gpu_throughput.py measures both)."
        ),
    )
    fuse_qkv: bool = Field(
        default=True,
        description="Fuse each attention block's q/k/v projections into one matmul on CUDA (after LoRAs are fused).",
    )
    vae_batch_size: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Decode latents in chunks of this many images. Default: chunks of about 4 megapixels (4 images at "
            "1024x1024, 16 at 512x512): decoding is the peak-memory phase, and an out-of-memory error while "
            "decoding halves the chunk without denoising again."
        ),
    )
    pinned_copy: bool = Field(
        default=True,
        description="Copy the uint8 pixels to page-locked host memory asynchronously on CUDA.",
    )
    compile: bool = Field(
        default=False,
        description=(
            "torch.compile the UNet (the denoising loop's cost). The first batch of each actor pays the "
            "compilation (tens of seconds to minutes); `sdxl-batch tune` measures whether it pays off. Every "
            "model call is padded to the batch size so that one compiled shape serves each (size, CFG) pair."
        ),
    )
    cache_dir: str | None = Field(
        default=None,
        description=(
            "Local per-node cache for object-store weights and the tiny model (default: `~/.cache/sdxl-batch`)."
        ),
    )
    allow_partial_lora: bool = Field(
        default=False,
        description=(
            "Load a LoRA of which only some layers exist in the pipeline, rendering without the others "
            "(a warning, and `lora_layers_unmatched` in stats.json). By default such a LoRA, usually one "
            "made for another base model, stops the job."
        ),
    )

    @model_validator(mode="after")
    def _flash_needs_16_bit(self) -> ModelConfig:
        if self.attention == "flash" and self.dtype == "float32":
            raise ValueError(
                "attention: flash needs a 16-bit dtype (PyTorch's flash kernel takes float16 and bfloat16 only); "
                "set model.dtype to bfloat16 or float16, or attention to sdpa"
            )
        return self


class GenerationConfig(_Section):
    batch_size: int = Field(default=4, ge=1, le=1024, description="Images per model call.")
    width: int | None = Field(
        default=None, ge=8, description="Default width (rows may override); preset default when unset."
    )
    height: int | None = Field(
        default=None, ge=8, description="Default height (rows may override); preset default when unset."
    )
    steps: int | None = Field(
        default=None, ge=1, le=1000, description="Denoising steps (rows may override); preset default when unset."
    )
    guidance_scale: float | None = Field(
        default=None,
        ge=0.0,
        le=50.0,
        description="Classifier-free guidance scale (rows may override); preset default when unset.",
    )
    image_format: ImageFormat = Field(default="png", description="Encoding of the written images.")
    image_quality: int = Field(default=95, ge=1, le=100, description="Quality for jpeg and webp.")


class WriteConfig(_Section):
    layout: Layout = Field(
        default="files",
        description=(
            "`files`: `images/<shard>/<key>.<ext>`; `webdataset`: tar shards of `<key>.<ext>` + `<key>.json` "
            "(+ `<key>.txt`) per row (fewer, larger objects on S3). Both write `metadata/part-*.parquet`; "
            "`<key>` is the row's id, or a dot-free hashed name for ids webdataset readers would split "
            "(docs/output.md)."
        ),
    )
    captions: bool = Field(
        default=True,
        description=(
            "webdataset layout: write each row's prompt as `<key>.txt`, the caption that img2dataset-style "
            "loaders (open_clip's) require. The prompt is in `<key>.json` either way."
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
    lease_expiry_s: float = Field(
        default=300.0,
        ge=1.0,
        le=86_400.0,
        description=(
            "The output's writer lease (`lease.json`, one writer per output): renewed every fifth of this; a "
            "lease whose heartbeat is older is taken over by the next writer on another host (on the same host "
            "a lease whose process is gone is taken over at once). docs/failures.md."
        ),
    )


class ResourcesConfig(_Section):
    actors: int | tuple[int, int] | None = Field(
        default=None,
        description=(
            "Generator actors, each loading the pipeline once: a count, or `[min, max]` for an autoscaling "
            "cluster (Ray Data grows the pool while work is queued). Default: one per GPU of the cluster "
            "(at least 1); 1 on CPU."
        ),
    )
    gpus_per_actor: float | None = Field(
        default=None,
        ge=0.0,
        description=(
            "GPUs per actor (fractions share a GPU, e.g. 0.5 = two actors per GPU); 0 runs on CPU. "
            "Default: 1 when the cluster has GPUs, else 0."
        ),
    )
    cpus_per_actor: float = Field(
        default=1.0,
        gt=0.0,
        description=(
            "CPUs reserved per generator actor. The default is lowered where the actors would leave less than "
            "1 CPU beside them, what one read, one encode and one write task reserve together (2 actors on a "
            "2-CPU machine: 0.5 each); a value set here that leaves less is an error on a local Ray, a warning "
            "on a cluster."
        ),
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch CPU threads per actor. Default: every core of the node on CPU, Ray's default on GPU.",
    )
    gpu_hour_price: float | None = Field(
        default=None,
        ge=0.0,
        description="Price of one GPU-hour (one node-hour on CPU) for `estimate` and `tune` costs; any currency.",
    )
    max_retries: int = Field(
        default=2,
        ge=0,
        le=100,
        description=(
            "Times a crashed worker is replaced before the job stops: each generator actor is restarted (and "
            "reloads the model) at most this many times over the job, its batches waiting for it, and each "
            "read/encode/write task is retried at most this many times, after its process dies (a lost node, a "
            "one-off crash). Small, because a crash that repeats (a corrupt weight file, a bad GPU driver) would "
            "otherwise reload and crash for ever; a stopped job resumes from its committed parts."
        ),
    )
    in_process: bool | Literal["auto"] = Field(
        default="auto",
        description=(
            "Run the job in this process, without Ray: the same stages, parts, commits and statistics, with one "
            "generator and encoding and writing on a thread beside it. `auto`: a job of at most 1,000 images to "
            "render on one machine (no Ray address, no fleet, no --metrics-port) with one generator (one GPU, or "
            "the CPU), where Ray's start and its workers' would take longer than the rendering. Without Ray a "
            "crashed generator is not restarted (the job stops; the same command resumes) and no Ray metrics are "
            "exported. `true` runs any such job in process; `false` always starts Ray."
        ),
    )
    wait_for_nodes_s: float = Field(
        default=600.0,
        gt=0.0,
        description=(
            "Seconds the job waits while no node of the cluster can run a generator actor (every GPU node lost "
            "or preempted and none added back, or none added yet by an autoscaler) before it stops; the committed "
            "parts are kept and the same command resumes."
        ),
    )

    @field_validator("actors")
    @classmethod
    def _check_actors(cls, value: int | tuple[int, int] | None) -> int | tuple[int, int] | None:
        counts = [value] if isinstance(value, int) else list(value or [])
        if any(count < 1 for count in counts):
            raise ValueError("actor counts must be at least 1")
        if isinstance(value, tuple) and value[0] > value[1]:
            raise ValueError(f"[min, max] needs min <= max, got [{value[0]}, {value[1]}]")
        return value

    @property
    def on_gpu(self) -> bool:
        """Whether actors take GPUs (call on resolved resources: see `runner.resolve_resources`)."""
        return bool(self.gpus_per_actor)

    @property
    def actor_range(self) -> tuple[int, int]:
        """(min, max) actors; a fixed count is both. Unset (auto) counts as 1 before resolution."""
        if isinstance(self.actors, tuple):
            return self.actors
        return (self.actors or 1, self.actors or 1)

    @property
    def max_actors(self) -> int:
        return self.actor_range[1]

    def describe(self) -> str:
        """How the actors will be placed, for summaries."""
        if self.actors is None:
            count = "one actor per GPU (or 1 on CPU)"
        elif isinstance(self.actors, tuple):
            count = f"{self.actors[0]}-{self.actors[1]} actors (autoscaling)"
        else:
            count = f"{self.actors} actor(s)"
        gpus = (
            "1 GPU each if the cluster has GPUs" if self.gpus_per_actor is None else f"{self.gpus_per_actor:g} GPU each"
        )
        return f"{count}, {gpus}"


class FleetTypeConfig(_Section):
    """How the job runs on the GPUs of one accelerator type (`sdxl-batch tune` writes these)."""

    batch_size: int = Field(ge=1, le=1024, description="Images per model call on this type.")
    actors_per_gpu: int = Field(
        default=1, ge=1, le=16, description="Generator actors sharing each GPU of this type (each loads the model)."
    )
    gpus: int | None = Field(
        default=None,
        ge=1,
        description=(
            "GPUs of this type the job uses. Default: every GPU of this type the cluster has when the job starts; "
            "set it on an autoscaling cluster whose nodes of this type are not up yet."
        ),
    )
    vae_batch_size: int | None = Field(
        default=None, ge=1, description="VAE decode chunk on this type (default: `model.vae_batch_size`)."
    )
    channels_last: bool | None = Field(
        default=None, description="UNet in channels_last on this type (default: `model.channels_last`)."
    )
    vae_channels_last: bool | None = Field(
        default=None, description="VAE in channels_last on this type (default: `model.vae_channels_last`)."
    )
    encode_cpus_per_gpu: float | None = Field(
        default=None,
        gt=0.0,
        description=(
            "CPUs the encode stage may use per GPU of this type (caps the encode tasks; default: no cap, Ray Data "
            "sizes the stage to the free CPUs)."
        ),
    )

    def model_overrides(self) -> dict[str, Any]:
        """The `model` keys this type sets (speed switches that never change pixels)."""
        keys = ("vae_batch_size", "channels_last", "vae_channels_last")
        return {key: getattr(self, key) for key in keys if getattr(self, key) is not None}


class StorageConfig(_Section):
    """Object-store options; unset fields fall back to the standard AWS variables and profile."""

    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (else AWS_ENDPOINT_URL).")
    region: str | None = Field(default=None, description="Region (else AWS_REGION / AWS_DEFAULT_REGION).")
    key: SecretStr | None = Field(default=None, description="Access key id (else AWS_ACCESS_KEY_ID or profile).")
    secret: SecretStr | None = Field(default=None, description="Secret key (else AWS_SECRET_ACCESS_KEY or profile).")
    anon: bool = Field(default=False, description="Unsigned requests (public buckets).")


class JobConfig(_Section):
    manifest: str = Field(
        description=(
            "The manifest of prompts: a file, a folder or a glob, local or s3://; Parquet, CSV, TSV, JSON Lines, "
            "a JSON array, plain text (one prompt per line) or a `datasets` save_to_disk folder (docs/manifests.md)."
        )
    )
    manifest_format: ManifestFormat = Field(
        default="auto",
        description=(
            "How the manifest's files are read: `auto` by their extension (`.parquet`, `.csv`, `.tsv`, `.jsonl` or "
            "`.ndjson`, `.json`, `.txt`, `.arrow`; a folder takes its Parquet files, else its Arrow files, else the "
            "others); or one format for every file whatever its name (`parquet`, `csv`, `tsv`, `jsonl`, `json`, "
            "`text`, `arrow`): a `.txt` file that holds CSV, files without an extension. A folder then takes its "
            "files with that format's extension or none. Ids do not depend on it."
        ),
    )
    images_per_prompt: int = Field(
        default=1,
        ge=1,
        le=MAX_IMAGES_PER_PROMPT,
        description=(
            "Images rendered per manifest row. Image 0 keeps the row's id and seed; image k (k >= 1) has the id "
            "`<id>-<k>` and the seed `(seed + k) mod 2**63`, so each image is the same whatever this is set to: "
            "raising it renders only the new images of each row (resume), and 1 renders exactly the manifest's "
            "ids. A real id equal to a derived one is a duplicate id (docs/manifests.md)."
        ),
    )
    output: str = Field(description="Output prefix, local or s3://.")
    on_bad_row: OnBadRow = Field(
        default="fail",
        description=(
            "A manifest row that breaks the contract: `fail` stops the job before any GPU work and "
            "names the first bad rows; `skip` renders the rest and lists the bad rows in `rejects/`."
        ),
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig,
        description="The model: its preset, weights and LoRAs, precision, and the speed switches of the GPU path.",
    )
    generation: GenerationConfig = Field(
        default_factory=GenerationConfig,
        description=(
            "What the model calls render: batch size; default width, height, steps and guidance (a manifest row "
            "may override each of these four); and how images are encoded."
        ),
    )
    write: WriteConfig = Field(
        default_factory=WriteConfig, description="How the output is laid out and committed, part by part."
    )
    resources: ResourcesConfig = Field(
        default_factory=ResourcesConfig,
        description=(
            "Where the generator actors run and how many, how often crashed workers are replaced, how long to "
            "wait for a node that can run them, and the price used for cost estimates."
        ),
    )
    storage: StorageConfig = Field(
        default_factory=StorageConfig,
        description="Object-store options; unset fields fall back to the standard AWS variables and profile.",
    )
    fleet: dict[str, FleetTypeConfig] = Field(
        default_factory=dict,
        description=(
            "A mixed fleet, keyed by Ray accelerator type (`A10G`, `H100`, ...; `sdxl-batch tune` writes this "
            "section): batch size, actors per GPU, VAE chunk and layout switches per type. The job then runs one "
            "actor pool over the GPUs of these types, each actor with its type's settings, and work flows to "
            "whichever actor is free. What changes pixels (`model.dtype`, `attention`, `compile`, `fuse_qkv`) stays "
            "one setting for the whole job. Empty: one setting for every GPU (`generation.batch_size`, `resources`)."
        ),
    )

    @model_validator(mode="after")
    def _fleet_sets_the_actors(self) -> JobConfig:
        if not self.fleet:
            return self
        if not all(name.strip() and name.upper() not in ("CPU", "GPU") for name in self.fleet):
            raise ValueError("fleet keys are Ray accelerator types (A10G, H100, ...), not CPU or GPU")
        clash = [key for key in ("actors", "gpus_per_actor") if key in self.resources.model_fields_set]
        if clash:
            raise ValueError(
                f"the fleet section sets the actors per GPU type; remove resources.{' and resources.'.join(clash)}"
            )
        return self

    @property
    def batch_sizes(self) -> list[int]:
        """Every batch size the job's actors use: the fleet's, else `generation.batch_size`."""
        return sorted({t.batch_size for t in self.fleet.values()}) or [self.generation.batch_size]

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
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:  # the value is not echoed: it may be a secret
        raise ConfigError(f"--set {key.strip()}: the value is not valid YAML: {_yaml_problem(error)}") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _yaml_problem(error: yaml.YAMLError) -> str:
    """pyyaml's message with the line and column but without its quote of the offending line,
    which may hold a credential."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return type(error).__name__
    text = "; ".join(
        part + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else "")
        for part, mark in ((error.context, error.context_mark), (error.problem, error.problem_mark))
        if part
    )
    if isinstance(error, yaml.constructor.ConstructorError):
        text += "; configs are plain YAML: tags that build Python objects (!!python/...) are refused"
    return text


def _is_secret(loc: tuple[int | str, ...]) -> bool:
    """Whether a validation error is about (a part of) a SecretStr field, whose value is never shown."""
    model: Any = JobConfig
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return False
        annotation = fields[part].annotation
        if annotation is SecretStr or SecretStr in get_args(annotation):
            return True
        model = annotation
    return False


def _section_keys(loc: tuple[int | str, ...]) -> list[str]:
    """The keys the config's section at `loc` accepts (its model's fields), [] where unknown."""
    model: Any = JobConfig
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        model = next((a for a in (annotation, *get_args(annotation)) if hasattr(a, "model_fields")), None)
    return list(getattr(model, "model_fields", {}))


def _unknown_key(loc: tuple[int | str, ...]) -> str:
    close = difflib.get_close_matches(str(loc[-1]), _section_keys(loc[:-1]), n=1, cutoff=0.6)
    hint = f"did you mean `{close[0]}`?" if close else "check the spelling"
    return f"unknown key ({hint} docs/configuration.md lists every key)"


def _flag_of(where: str, flags: dict[str, str]) -> str | None:
    """The command-line flag that set the key at `where`, or a key inside or above it."""
    for key, flag in flags.items():
        if key == where or key.startswith(f"{where}.") or where.startswith(f"{key}."):
            return flag
    return None


def _format_validation_error(error: ValidationError, source: str, flags: dict[str, str] | None = None) -> str:
    """One line per problem: where, what, and (for a value given on the command line) which flag."""
    lines = [f"invalid config {source}:"]
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        flag = _flag_of(where, flags or {})
        shown = f"{where} (from {flag})" if flag else where
        if err["type"] == "extra_forbidden":
            lines.append(f"  {shown}: {_unknown_key(err['loc'])}")
        elif err["type"] == "missing":
            lines.append(f"  {shown}: required but missing")
        elif _is_secret(err["loc"]):
            lines.append(f"  {shown}: {err['msg']} (the value is a secret: not shown)")
        elif isinstance(err.get("input"), dict):  # a check across a section's keys: the section may hold secrets
            lines.append(f"  {shown}: {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {shown}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def build_config(data: dict[str, Any], *, source: str = "", flags: dict[str, str] | None = None) -> JobConfig:
    """`flags`: the dotted keys given on the command line, with the flag that set each, so that a
    bad value is reported as the flag's, not the file's."""
    try:
        return JobConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source, flags)) from None


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
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except UnicodeDecodeError as error:
            raise ConfigError(
                f"config {path} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8 YAML"
            ) from None
        except OSError as error:
            raise ConfigError(f"cannot read config {path}: {error.strerror or error}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"config {path} is not valid YAML: {_yaml_problem(error)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path}: expected a mapping of keys at the top level")
        data = loaded or {}
    flags: dict[str, str] = {}
    if manifest is not None:
        data["manifest"], flags["manifest"] = manifest, "--manifest"
    if output is not None:
        data["output"], flags["output"] = output, "--output"
    for item in overrides or []:
        flags[".".join(parse_override(item)[0])] = f"--set {item.split('=', 1)[0]}=..."
    return build_config(apply_overrides(data, overrides or []), source=source, flags=flags)
