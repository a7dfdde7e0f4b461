"""GPU types as Ray names them, and what each can run.

Ray gives every GPU node a resource `accelerator_type:<T>`, where `<T>` is derived from the
device name (`NvidiaGPUAcceleratorManager`: "NVIDIA A100-SXM4-80GB" -> `A100`, "NVIDIA A10G" ->
`A10G`, "Tesla T4" -> `T4`). A job on a mixed fleet must render every row in one precision
(`model.dtype: auto` picks bfloat16 where the GPU has it, float16 elsewhere, and float16 also
swaps in the fp16-fix VAE), so the driver resolves `auto` once for the whole job from the types it
will run on, before any actor starts. bfloat16 needs compute capability 8.0 (Ampere) or newer.
"""

from __future__ import annotations

RESOURCE_PREFIX = "accelerator_type:"
# Ray's names (ray.util.accelerators) of NVIDIA GPUs with compute capability >= 8.0 (bfloat16)...
BF16_TYPES = frozenset({
    "A100", "A10G", "A10", "A16", "A30", "A40", "A2", "L4", "L40", "L40S", "H100", "H200", "H20", "GH200",
    "B200", "B100", "GB200", "RTX", "RTXA6000", "RTXA5000", "RTXA4000",
})  # fmt: skip
# ... and of those without it (Volta, Turing, Pascal and older).
NO_BF16_TYPES = frozenset({"V100", "T4", "P100", "P40", "P4", "K80", "M60", "M40", "TITAN"})


def supports_bf16(accelerator_type: str) -> bool | None:
    """Whether GPUs of this Ray accelerator type have bfloat16; None when the type is unknown here."""
    name = accelerator_type.upper()
    if name in BF16_TYPES:
        return True
    if name in NO_BF16_TYPES:
        return False
    return None


def type_of_resources(resources: dict[str, float]) -> str | None:
    """The accelerator type named by a node's (or a worker's assigned) resources, if any."""
    for key in sorted(resources):
        if key.startswith(RESOURCE_PREFIX):
            return key[len(RESOURCE_PREFIX) :]
    return None


def resolve_auto_dtype(types: list[str], *, on_gpu: bool) -> tuple[str, str]:
    """`model.dtype: auto` for a job whose actors run on `types`: (dtype, why). The dtype is
    `auto` itself when a type is unknown here: each actor then resolves it on its GPU."""
    if not on_gpu:
        return "float32", "no GPUs: float32 on the CPU"
    support = {name: supports_bf16(name) for name in sorted(set(types))}
    without = [name for name, ok in support.items() if ok is False]
    unknown = [name for name, ok in support.items() if ok is None]
    if without:
        return "float16", f"{', '.join(without)} lack bfloat16, so float16 for every GPU of the job"
    if unknown or not support:
        named = ", ".join(unknown) or "GPUs without an accelerator_type resource"
        return "auto", f"{named}: not a known GPU type, so each actor picks bfloat16 where its GPU has it"
    return "bfloat16", f"every GPU type of the job ({', '.join(support)}) has bfloat16"
