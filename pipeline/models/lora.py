"""Checking that a LoRA file fits the pipeline it was loaded into.

diffusers loads a LoRA whose layers only partly exist in the model without raising: the layers it
cannot place are logged as "unexpected keys" and dropped, its kohya converter drops some keys
without a word (sgm-named keys in a file that also has diffusers-named ones), and a file whose
keys carry no component prefix it knows loads nothing at all. Such a LoRA (made for another base
model, or a damaged file) then renders wrong images at full speed. So after each adapter is
loaded, and before it is fused, the LoRA layers in the file are counted against the peft layers
that actually received the adapter in the UNet and both text encoders.

Counting layers, not keys, makes the check independent of the file's layout: one layer is one
down/A matrix in any of them (kohya `lora_unet_*.lora_down.weight`, peft `*.lora_A.weight`,
diffusers' older `*.lora.down.weight` / `*_lora.down.weight` / `*.lora_linear_layer.down.weight`).
The names of the layers that did not land come from diffusers' own key conversion, so they read as
module paths of the pipeline (`unet.down_blocks.1.attentions.0.proj_in`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from pipeline.core.errors import ModelError

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# The key of a layer's first (down / A) matrix, with the layer's name as group 1, in every layout
# diffusers loads; peft's layout may carry the adapter name (`lora_A.default.weight`).
_DOWN_KEY = re.compile(
    r"(.+?)(?:\.lora_down\.weight|\.lora_A(?:\.[^.]+)?\.weight|[._]lora\.down\.weight"
    r"|\.lora_linear_layer\.down\.weight)$"
)
_SHOWN = 5  # unmatched layer names quoted in a message


@dataclass(frozen=True)
class LoraFit:
    """How much of one LoRA file landed in the pipeline."""

    ref: str
    layers: int  # LoRA layers in the file
    loaded: int  # layers of the pipeline that received the adapter
    unmatched_names: tuple[str, ...] = ()  # the pipeline's names for layers that did not land
    dropped: int = 0  # layers that diffusers' key conversion discarded before loading
    examples: tuple[str, ...] = ()  # a few layer names as the file spells them

    @property
    def unmatched(self) -> int:
        return max(0, self.layers - self.loaded)

    def summary(self) -> str:
        details = []
        if self.unmatched_names:
            more = len(self.unmatched_names) - _SHOWN
            details.append(
                "not loaded: " + ", ".join(self.unmatched_names[:_SHOWN]) + (f" and {more} more" if more > 0 else "")
            )
        if self.dropped:
            details.append(f"{self.dropped} discarded by diffusers' conversion of the file's keys")
        return f"{self.loaded} of its {self.layers} layers match the pipeline, {self.unmatched} do not" + (
            f" ({'; '.join(details)})" if details else ""
        )


@contextmanager
def unexpected_key_warnings_held() -> Iterator[None]:
    """Hold back diffusers' warning that lists every key it could not place (one line of
    thousands of keys for a real LoRA, from each actor): `check_fit` reports the same thing with
    counts and a few layer names, as an error or a short warning."""
    peft_utils = logging.getLogger("diffusers.utils.peft_utils")
    level = peft_utils.level
    peft_utils.setLevel(logging.ERROR)
    try:
        yield
    finally:
        peft_utils.setLevel(level)


def file_layer_names(path: str) -> list[str]:
    """Names of the LoRA layers in a weights file, as the file spells them (any layout)."""
    return sorted({m.group(1) for key in _file_keys(path) if (m := _DOWN_KEY.match(key))})


def _file_keys(path: str) -> list[str]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:  # reads the header only
            return list(handle.keys())
    from pipeline.models.weights import load_state_dict_file

    return list(load_state_dict_file(path))


def loaded_layer_names(pipe: Any, adapter: str) -> set[str]:
    """`<component>.<module path>` of every peft layer of the pipeline that holds `adapter`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names: set[str] = set()
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer) and any(
                adapter in getattr(module, attribute, {}) for attribute in module.adapter_layer_names
            ):
                names.add(f"{component}.{name}")
    return names


def converted_layer_names(pipe: Any, path: str) -> set[str]:
    """The file's layers as `<component>.<module path>`, through the key conversions diffusers
    applies when it loads them (kohya → diffusers → peft; a flattened CLIP drops `text_model.`)."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    state, _ = pipe.lora_state_dict(
        os.path.dirname(path), weight_name=os.path.basename(path), unet_config=pipe.unet.config
    )
    names: set[str] = set()
    for component in COMPONENTS:
        part = {k.removeprefix(f"{component}."): v for k, v in state.items() if k.startswith(f"{component}.")}
        if not part:
            continue
        if component == "unet":
            part = part if any("lora_A" in k for k in part) else convert_unet_state_dict_to_peft(part)
        else:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            if not hasattr(getattr(pipe, component, None), "text_model"):
                part = {k.removeprefix("text_model."): v for k, v in part.items()}
        names.update(f"{component}.{k.split('.lora_A')[0]}" for k in part if ".lora_A" in k)
    return names


def measure_fit(pipe: Any, *, adapter: str, ref: str, path: str) -> LoraFit:
    """Count the file's layers against those that received `adapter`; name the missing ones."""
    names = file_layer_names(path)
    loaded = loaded_layer_names(pipe, adapter)
    fit = LoraFit(ref=ref, layers=len(names), loaded=len(loaded), examples=tuple(names[:3]))
    if fit.layers and not fit.unmatched:
        return fit
    try:  # the error path only: reading the file a second time costs seconds on a real LoRA
        converted = converted_layer_names(pipe, path)
    except (ValueError, KeyError, RuntimeError) as error:
        logger.debug("cannot name the unmatched layers of %s: %s", ref, error)
        return fit
    return replace(fit, unmatched_names=tuple(sorted(converted - loaded)), dropped=max(0, fit.layers - len(converted)))


def check_fit(fit: LoraFit, *, allow_partial: bool) -> int:
    """Raise a ModelError for a LoRA that does not (fully) fit; returns the unmatched layers when
    `allow_partial` lets a partial match through, with a warning."""
    if fit.layers == 0 and fit.loaded:
        logger.warning("LoRA %s: its key layout is unknown here, so it is not checked for a partial match", fit.ref)
        return 0
    if fit.layers == 0:
        raise ModelError(
            f"LoRA {fit.ref} holds no LoRA layers diffusers can read (no lora_down/lora_A weights): it is "
            "not a LoRA file, or a kind this pipeline does not load"
        )
    if fit.loaded == 0:
        names = fit.unmatched_names or fit.examples
        raise ModelError(
            f"LoRA {fit.ref} does not fit this pipeline: none of its {fit.layers} layers match it "
            f"(e.g. {', '.join(names[:3])}). It was made for another model architecture (an SD 1.5 LoRA on "
            "SDXL?), or its keys lack the component prefix diffusers expects (`unet.`, `lora_unet_`); use "
            "a LoRA made for SDXL"
        )
    if not fit.unmatched:
        return 0
    if not allow_partial:
        raise ModelError(
            f"LoRA {fit.ref} only partly fits this pipeline: {fit.summary()}. Its unmatched layers would be "
            "dropped and every image rendered without them. Check that the LoRA was made for this base "
            "model (model.path); to render with the matching layers only, set model.allow_partial_lora: true"
        )
    logger.warning(
        "LoRA %s only partly fits this pipeline: %s; rendering without the unmatched layers "
        "(model.allow_partial_lora; stats.json counts them as lora_layers_unmatched)",
        fit.ref,
        fit.summary(),
    )
    return fit.unmatched


_SIZE_MISMATCH = re.compile(r"size mismatch for (.+?)\.lora_[AB]\.[^.]+\.weight")


def _load_error(message: str) -> str:
    """torch's load error for a LoRA made for another architecture lists every layer whose shape
    differs (thousands of lines for SD 1.5 on SDXL): count them and name a few."""
    layers = list(dict.fromkeys(_SIZE_MISMATCH.findall(message)))
    if not layers:
        return message[:500]
    more = f" and {len(layers) - _SHOWN} more" if len(layers) > _SHOWN else ""
    return (
        f"{len(layers)} of its layers have other shapes than the pipeline's ({', '.join(layers[:_SHOWN])}{more}). "
        "It was made for another model architecture (an SD 1.5 LoRA on SDXL?); use a LoRA made for SDXL"
    )


def load_loras(pipe: Any, adapters: list[tuple[str, str, str, float]], *, allow_partial: bool, fuse: bool) -> int:
    """Load LoRAs through peft and, with `fuse`, fold them into the base weights; returns the
    layers that did not land (allowed only with `allow_partial`). `adapters`: (adapter name, local
    file, the reference it was resolved from, weight).

    Unfused, every LoRA-wrapped layer runs two extra small matmuls per call; fusing folds
    W + scale * B @ A into W once at load, and unloading the adapters afterwards removes the
    wrappers, so a LoRA preset then costs exactly what the full model costs per image. The
    pipeline is on its device by then (`ImageGenerator.adopt`): peft merges each layer where its
    weight is. Each file must fit the pipeline layer for layer (`check_fit`): diffusers drops the
    layers it cannot place with a log line only.
    """
    unmatched = 0
    if not adapters:
        return unmatched
    for name, path, ref, _ in adapters:
        try:
            with unexpected_key_warnings_held():
                pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path), adapter_name=name)
        except (ValueError, KeyError, RuntimeError) as error:
            raise ModelError(f"LoRA {ref} does not fit this pipeline: {_load_error(str(error))}") from None
        unmatched += check_fit(measure_fit(pipe, adapter=name, ref=ref, path=path), allow_partial=allow_partial)
    names = [name for name, _, _, _ in adapters]
    pipe.set_adapters(names, adapter_weights=[weight for _, _, _, weight in adapters])
    if fuse:
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
        pipe.unload_lora_weights()
    return unmatched
