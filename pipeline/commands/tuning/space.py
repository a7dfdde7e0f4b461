"""What `tune` searches: settings that change what is loaded, and settings that change only how rows
are batched.

A *load setting* (`LoadSetting`: precision, compilation, attention kernels, fused q/k/v,
channels_last, actors per GPU) decides what each actor loads: a change loads the model again.
A *batch setting* (`BatchSetting`: batch size, VAE decode chunk, encode CPUs per GPU) changes only
how rows are batched, so it is swept on one loaded model. Of the load settings, those that change
pixels (`PIXEL_KEYS`) are one setting for a whole job; the others may differ per GPU type.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pipeline.core.accelerators import supports_bf16
from pipeline.core.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.core.config import ModelConfig

DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DTYPE_NAMES.update({name: name for name in list(DTYPE_NAMES.values())})
SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# The settings that change pixels: one value for every GPU of a job (and a quality gate in `tune`).
PIXEL_KEYS = ("dtype", "attention", "compile", "fuse_qkv")
CPU = "CPU"  # the accelerator type of a machine without GPUs


@dataclass(frozen=True, order=True)
class LoadSetting:
    """What each actor loads: changing any of these loads the model again."""

    dtype: str
    compile: bool = False
    attention: str = "sdpa"
    fuse_qkv: bool = False
    channels_last: bool = False
    actors_per_gpu: int = 1

    @property
    def key(self) -> str:
        """A short, stable name: precision, attention, the switches that are on, actors per GPU
        (`bf16-sdpa-a1`, `fp16-flash-compiled-fuse_qkv-channels_last-a2`)."""
        parts = [SHORT_DTYPE.get(self.dtype, self.dtype), self.attention]
        switches = (("compiled", self.compile), ("fuse_qkv", self.fuse_qkv), ("channels_last", self.channels_last))
        parts += [label for label, on in switches if on]
        return "-".join(parts) + f"-a{self.actors_per_gpu}"

    @property
    def pixels(self) -> tuple[Any, ...]:
        """The part of the setting that changes pixels (`PIXEL_KEYS`)."""
        return tuple(getattr(self, name) for name in PIXEL_KEYS)

    def pixel_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PIXEL_KEYS}

    def complexity(self) -> tuple[int, ...]:
        """Orders equally fast settings: the one with fewer switches on is simpler."""
        return (
            int(self.compile),
            int(self.fuse_qkv),
            int(self.attention != "sdpa"),
            int(self.channels_last),
            self.actors_per_gpu,
            {"float32": 0, "bfloat16": 1, "float16": 2}.get(self.dtype, 3),
        )

    def model_update(self) -> dict[str, Any]:
        """These settings as `model` config keys."""
        return {
            "dtype": self.dtype,
            "compile": self.compile,
            "attention": self.attention,
            "fuse_qkv": self.fuse_qkv,
            "channels_last": self.channels_last,
        }

    def apply(self, model: ModelConfig) -> ModelConfig:
        return model.model_copy(update=self.model_update())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadSetting:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


@dataclass(frozen=True, order=True)
class BatchSetting:
    """How rows are batched on a loaded model: swept without loading again."""

    batch_size: int
    vae_batch_size: int | None = None  # None: the generator's default chunk (about 4 megapixels)
    encode_cpus_per_gpu: float | None = None  # None: every CPU the trial's GPU has beside its actors

    def complexity(self) -> tuple[float, ...]:
        # A smaller batch needs less memory; the default chunk and encode CPUs are the simplest.
        return (self.vae_batch_size or 0, self.encode_cpus_per_gpu or 0.0, self.batch_size)

    @property
    def key(self) -> str:
        vae = f"-vae{self.vae_batch_size}" if self.vae_batch_size else ""
        encode = f"-enc{self.encode_cpus_per_gpu:g}" if self.encode_cpus_per_gpu else ""
        return f"b{self.batch_size}{vae}{encode}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BatchSetting:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


@dataclass(frozen=True)
class BatchCandidates:
    """The batch settings a load measures (`sweep.sweep_batches` picks among them)."""

    batch_sizes: tuple[int, ...]
    vae_batch_sizes: tuple[int | None, ...] = (None,)
    encode_cpus: tuple[float | None, ...] = (None,)

    def narrowed(self, largest: int | None) -> BatchCandidates:
        """Without the batch sizes above `largest` (what an earlier probe found to fit)."""
        if largest is None:
            return self
        kept = tuple(b for b in self.batch_sizes if b <= largest) or (min(self.batch_sizes),)
        return replace(self, batch_sizes=kept)

    def to_dict(self) -> dict[str, Any]:
        return {"batch_sizes": list(self.batch_sizes), "vae_batch_sizes": list(self.vae_batch_sizes),
                "encode_cpus": list(self.encode_cpus)}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BatchCandidates:
        return cls(tuple(data["batch_sizes"]), tuple(data["vae_batch_sizes"]), tuple(data["encode_cpus"]))


def split_list(text: str | None, default: list[Any], convert: Any, flag: str) -> list[Any]:
    """A comma-separated flag value, each item converted; the default when the flag is absent."""
    if text is None:
        return default
    values = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            values.append(convert(item))
        except (ValueError, KeyError):
            shown = ",".join("auto" if v is None else str(v).lower() for v in default) or "1,2"
            raise ConfigError(f"--{flag}: cannot read {item!r} (a comma-separated list, e.g. {shown})") from None
    if not values:
        raise ConfigError(f"--{flag}: no values given")
    return list(dict.fromkeys(values))


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError(text)
    return value


def optional(convert: Any) -> Any:
    """`auto` (the default) as None, anything else converted."""
    return lambda text: None if text.lower() in ("auto", "default") else convert(text)


def switch(text: str) -> bool:
    return {"on": True, "off": False, "true": True, "false": False}[text.lower()]


def dtype_name(text: str) -> str:
    return DTYPE_NAMES[text.lower()]


def attention_name(text: str) -> str:
    if text.lower() not in ("sdpa", "flash", "eager"):
        raise ValueError(text)
    return text.lower()


@dataclass(frozen=True)
class SearchSpace:
    """Every value `tune` may try, per dimension (the CLI's comma-separated lists)."""

    dtypes: tuple[str, ...]
    compile: tuple[bool, ...] = (False,)
    attention: tuple[str, ...] = ("sdpa",)
    fuse_qkv: tuple[bool, ...] = (False,)
    channels_last: tuple[bool, ...] = (False,)
    actors_per_gpu: tuple[int, ...] = (1,)
    batches: BatchCandidates = field(default_factory=lambda: BatchCandidates((1, 2, 4, 8)))
    reference: str | None = None  # the quality gate's reference precision; None: bf16 where the GPU has it, else fp32

    LOAD_DIMS = ("dtype", "compile", "attention", "fuse_qkv", "channels_last", "actors_per_gpu")

    @classmethod
    def parse(cls, *, on_gpu: bool, flags: dict[str, str | None]) -> SearchSpace:
        """The space from the CLI's lists (`flags`: flag name without dashes, with underscores ->
        its text or None); the defaults on a GPU cluster search every speed switch, on CPU
        only what acts there (batch size)."""

        def get(flag: str, default: list[Any], convert: Any) -> tuple[Any, ...]:
            return tuple(split_list(flags.get(flag), default, convert, flag.replace("_", "-")))

        gpu_only = [False, True] if on_gpu else [False]
        space = cls(
            dtypes=get("dtypes", ["bfloat16", "float16"] if on_gpu else ["float32"], dtype_name),
            compile=get("compile", gpu_only, switch),
            attention=get("attention", ["sdpa", "flash"] if on_gpu else ["sdpa"], attention_name),
            fuse_qkv=get("fuse_qkv", gpu_only, switch),
            channels_last=get("channels_last", gpu_only, switch),
            actors_per_gpu=get("actors_per_gpu", [1, 2] if on_gpu else [1], positive),
            batches=BatchCandidates(
                batch_sizes=tuple(sorted(get("batch_sizes", [1, 2, 4, 8, 16] if on_gpu else [1, 2, 4, 8], positive))),
                vae_batch_sizes=get("vae_batch_sizes", [None], optional(positive)),
                encode_cpus=get("encode_cpus", [None], optional(positive_float)),
            ),
            reference=dtype_name(reference) if (reference := flags.get("reference")) else None,
        )
        space.check(on_gpu=on_gpu)
        return space

    def check(self, *, on_gpu: bool) -> None:
        if not on_gpu and "float16" in self.dtypes:
            raise ConfigError("--dtypes: float16 needs a GPU; use fp32 or bf16 on CPU")
        if not on_gpu and "flash" in self.attention:
            raise ConfigError("--attention: flash needs a GPU (PyTorch's flash kernel is CUDA only)")
        if self.reference not in (None, "float32", "bfloat16"):
            raise ConfigError("--reference: fp32 or bf16 (the quality gate compares with float32 or bfloat16 eager)")

    def values(self, name: str) -> tuple[Any, ...]:
        return self.dtypes if name == "dtype" else tuple(getattr(self, name))

    def allows(self, load: LoadSetting, accelerator_type: str) -> bool:
        """Whether `load` can run on this type at all (bfloat16 on a GPU without it cannot; flash
        attention needs 16 bits)."""
        if load.dtype == "bfloat16" and supports_bf16(accelerator_type) is False:
            return False
        return not (load.attention == "flash" and load.dtype == "float32")

    def contains(self, load: LoadSetting) -> bool:
        return all(getattr(load, dim) in self.values(dim) for dim in self.LOAD_DIMS)

    def reference_for(self, accelerator_type: str) -> LoadSetting:
        """The quality gate's reference on this type: float32 or bfloat16, eager, every switch off."""
        dtype = self.reference
        if dtype is None:
            dtype = "float32" if accelerator_type == CPU or supports_bf16(accelerator_type) is False else "bfloat16"
        return LoadSetting(dtype=dtype)

    def start_for(self, accelerator_type: str) -> LoadSetting:
        """Where the quick search starts: the reference where the space holds it, else the first
        value of every dimension."""
        reference = self.reference_for(accelerator_type)
        if self.contains(reference):
            return reference
        first = LoadSetting(*(self.values(dim)[0] for dim in self.LOAD_DIMS))
        return first if self.allows(first, accelerator_type) else next(iter(self.loads_for(accelerator_type)), first)

    def loads_for(self, accelerator_type: str) -> list[LoadSetting]:
        """Every load setting of the space that can run on this type, simplest first."""
        loads = [LoadSetting(*values) for values in itertools.product(*(self.values(d) for d in self.LOAD_DIMS))]
        return sorted((s for s in loads if self.allows(s, accelerator_type)), key=LoadSetting.complexity)

    def neighbours(self, load: LoadSetting, accelerator_type: str) -> list[LoadSetting]:
        """Settings one dimension away from `load`, simplest first."""
        found = []
        for dim in self.LOAD_DIMS:
            for value in self.values(dim):
                if value != getattr(load, dim):
                    other = replace(load, **{dim: value})
                    if self.allows(other, accelerator_type):
                        found.append(other)
        return sorted(found, key=LoadSetting.complexity)

    def to_dict(self) -> dict[str, Any]:
        data = {dim: list(self.values(dim)) for dim in self.LOAD_DIMS}
        return {**data, **self.batches.to_dict(), "reference": self.reference}
