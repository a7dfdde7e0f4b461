"""Model presets: each pins the weights, the scheduler and its config, the defaults, and the limits
that make the model work as its authors intended.

Why the settings differ (source articles in `shared/seeds/` and the model cards):
- Base SDXL keeps its stored scheduler: 30 steps, CFG 5.0.
- SDXL-Lightning was distilled progressively and adversarially for one step count per checkpoint,
  sampled with plain Euler on *trailing* timesteps (the first step starts at the last training
  timestep). Guidance was baked in at distillation, so CFG > 1 over-saturates; running a
  checkpoint at another step count than its own is outside what it learned. The 1-step
  checkpoint predicts x0 directly (`prediction_type="sample"`), and there is no 1-step LoRA.
- LCM is a consistency model with its own multi-step solver (`LCMScheduler`); the full LCM UNet
  takes the guidance scale as an embedding (`time_cond_proj_dim`), not as CFG. LCM-LoRA has
  guidance frozen at distillation: guidance 1 (no CFG) by default, up to 2 so that a negative
  prompt takes effect.
- SDXL-Turbo (adversarial diffusion distillation) works at 512x512, 1 to 4 steps, no CFG.
- Hyper-SD N-step LoRAs use DDIM with trailing spacing; its 1-step *unified* LoRA uses TCD (1 to 8
  steps, eta controls the stochasticity). DMD2 uses the LCM solver on the exact timesteps it was
  trained on (999/749/499/249). TCD-LoRA uses the TCD solver with eta 0.3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from pipeline.core.config import ModelConfig

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_TURBO = "stabilityai/sdxl-turbo"
FP16_FIX_VAE = "madebyollin/sdxl-vae-fp16-fix"
TINY = "tiny"
LIGHTNING = "hf://ByteDance/SDXL-Lightning"
HYPER_SD = "hf://ByteDance/Hyper-SD"
TRAILING = {"timestep_spacing": "trailing"}
NO_CFG = (0.0, 1.0)


@dataclass(frozen=True)
class Preset:
    """Everything that defines how a model is loaded and sampled."""

    name: str
    description: str
    base: str
    scheduler: str
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    unet: str | None = None
    lora: str | None = None
    steps: int = 4
    guidance_scale: float = 0.0
    width: int = 1024
    height: int = 1024
    steps_range: tuple[int, int] = (1, 150)
    guidance_range: tuple[float, float] = (0.0, 30.0)
    # SDXL was trained on aspect-ratio buckets from 512x2048 to 2048x512; past 2048 px a side the
    # attention memory grows quadratically and the models repeat subjects; under 64 px the latent
    # is smaller than 8x8. Widths and heights must also be multiples of 8 (the VAE's factor).
    size_range: tuple[int, int] = (64, 2048)
    limits_reason: str = ""
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    licence: str = "CreativeML Open RAIL++-M"
    fp16_fix_vae: bool = True

    def scheduler_label(self) -> str:
        if not self.scheduler_config:
            return self.scheduler
        return self.scheduler + "(" + ", ".join(f"{k}={v}" for k, v in sorted(self.scheduler_config.items())) + ")"

    def weights_label(self) -> str:
        parts = [self.base] + [ref for ref in (self.unet, self.lora) if ref]
        return " + ".join(p.removeprefix("hf://") for p in parts)

    def check_settings(self, *, steps: int, guidance_scale: float) -> str | None:
        """The reason these settings are outside what the model's authors support, or None."""
        low, high = self.steps_range
        if not low <= steps <= high:
            allowed = str(low) if low == high else f"{low} to {high}"
            return f"preset {self.name} takes {allowed} steps, not {steps}: {self.limits_reason}"
        g_low, g_high = self.guidance_range
        if not g_low <= guidance_scale <= g_high:
            return (
                f"preset {self.name} takes guidance {g_low:g} to {g_high:g}, not {guidance_scale:g}: "
                f"{self.limits_reason}"
            )
        return None

    def check_size(self, *, width: int, height: int) -> str | None:
        """The reason this image size is outside what the model renders, or None."""
        low, high = self.size_range
        for name, value in (("width", width), ("height", height)):
            if value % 8:
                return f"{name} {value} is not a multiple of 8"
            if not low <= value <= high:
                return f"preset {self.name} renders {name}s from {low} to {high} px, not {value}"
        return None


def vae_source(model: ModelConfig, preset: Preset, dtype: str) -> str | None:
    """The VAE loaded instead of the pipeline's own for this precision (`dtype`: torch's name,
    `float16`, ...), or None. SDXL's VAE overflows to NaN (black images) in float16; the fp16-fix
    VAE was finetuned to keep activations in range, so float16 runs use it unless told otherwise.
    A function of the config, so that the driver knows which VAE renders a job before any actor
    loads one (the settings fingerprint, the metadata)."""
    if model.vae:
        return model.vae
    if dtype == "float16" and model.fp16_fix_vae and preset.fp16_fix_vae:
        return FP16_FIX_VAE
    return None


def vae_label(model: ModelConfig, preset: Preset, dtype: str) -> str:
    """Which VAE decodes: `vae_source`, or the base pipeline's own (`<base>/vae`)."""
    return vae_source(model, preset, dtype) or f"{model.path or preset.base}/vae"


def _lightning_unet(steps: int) -> Preset:
    x0 = steps == 1
    return Preset(
        name=f"lightning-{steps}step",
        description=f"SDXL-Lightning {steps}-step UNet (ByteDance) on SDXL base 1.0"
        + (" (x0 prediction)" if x0 else ""),
        base=SDXL_BASE,
        unet=f"{LIGHTNING}/sdxl_lightning_{steps}step_unet{'_x0' if x0 else ''}.safetensors",
        scheduler="EulerDiscreteScheduler",
        scheduler_config={**TRAILING, **({"prediction_type": "sample"} if x0 else {})},
        steps=steps,
        steps_range=(steps, steps),
        guidance_range=NO_CFG,
        limits_reason="the checkpoint was distilled for exactly this step count, with guidance baked in (CFG > 1 "
        "over-saturates)",
        licence="OpenRAIL++",
    )


def _n_step_lora(name: str, description: str, lora: str, scheduler: str, steps: int, reason: str) -> Preset:
    """An acceleration LoRA distilled for exactly `steps` steps without CFG, on any SDXL base."""
    return Preset(
        name=name,
        description=description,
        base=SDXL_BASE,
        lora=lora,
        scheduler=scheduler,
        scheduler_config=dict(TRAILING),
        steps=steps,
        steps_range=(steps, steps),
        guidance_range=NO_CFG,
        limits_reason=reason,
        licence="OpenRAIL++",
    )


def _lightning_lora(steps: int) -> Preset:
    return _n_step_lora(
        f"lightning-lora-{steps}step",
        f"SDXL-Lightning {steps}-step LoRA, fused into the SDXL base or fine-tune named by model.path",
        f"{LIGHTNING}/sdxl_lightning_{steps}step_lora.safetensors",
        "EulerDiscreteScheduler",
        steps,
        "each Lightning LoRA was distilled for its own step count, with guidance baked in",
    )


def _hyper_lora(steps: int) -> Preset:
    return _n_step_lora(
        f"hyper-sd-{steps}step",
        f"Hyper-SD {steps}-step LoRA (ByteDance) with trailing DDIM, on any SDXL base",
        f"{HYPER_SD}/Hyper-SDXL-{steps}steps-lora.safetensors",
        "DDIMScheduler",
        steps,
        "each Hyper-SD N-step LoRA was distilled for N steps without CFG",
    )


_PRESETS: list[Preset] = [
    Preset(
        name="tiny",
        description="Random-weight miniature SDXL built offline from configs (demo and tests; not a real model)",
        base=TINY,
        scheduler="EulerDiscreteScheduler",
        scheduler_config=dict(TRAILING),
        width=128,
        height=128,
        size_range=(8, 2048),
        licence="Apache-2.0 (generated)",
        fp16_fix_vae=False,
    ),
    Preset(
        name="sdxl-base",
        description="SDXL base 1.0, the baseline: its own stored scheduler, 30 steps, CFG 5.0",
        base=SDXL_BASE,
        scheduler="stored",
        steps=30,
        guidance_scale=5.0,
    ),
    *(_lightning_unet(n) for n in (1, 2, 4, 8)),
    *(_lightning_lora(n) for n in (2, 4, 8)),
    Preset(
        name="lcm",
        description="LCM-SDXL: the latent consistency UNet, guidance through its embedding (no CFG pass)",
        base=SDXL_BASE,
        unet="hf://latent-consistency/lcm-sdxl",
        scheduler="LCMScheduler",
        steps=4,
        guidance_scale=8.0,
        steps_range=(1, 8),
        guidance_range=(0.0, 20.0),
        limits_reason="the LCM solver is trained for 1 to 8 steps",
        licence="OpenRAIL++",
    ),
    Preset(
        name="lcm-lora",
        description="LCM-LoRA on any SDXL base or fine-tune: guidance 1 by default, up to 2 for negative prompts",
        base=SDXL_BASE,
        lora="hf://latent-consistency/lcm-lora-sdxl/pytorch_lora_weights.safetensors",
        scheduler="LCMScheduler",
        steps=4,
        guidance_scale=1.0,
        steps_range=(1, 8),
        guidance_range=(0.0, 2.0),
        limits_reason="LCM-LoRA has guidance frozen at distillation; 1 to 2 lets a negative prompt act, more degrades",
        licence="OpenRAIL++",
    ),
    Preset(
        name="turbo",
        description="SDXL-Turbo (adversarial diffusion distillation): 512x512, 1 step by default",
        base=SDXL_TURBO,
        scheduler="stored",
        steps=1,
        width=512,
        height=512,
        steps_range=(1, 4),
        guidance_range=NO_CFG,
        limits_reason="SDXL-Turbo is trained for 1 to 4 steps without guidance",
        licence="Stability AI Non-Commercial Research Community License",
    ),
    *(_hyper_lora(n) for n in (2, 4, 8)),
    Preset(
        name="hyper-sd-1step",
        description="Hyper-SD 1-step unified LoRA with the TCD scheduler (1 to 8 steps; eta 1.0)",
        base=SDXL_BASE,
        lora=f"{HYPER_SD}/Hyper-SDXL-1step-lora.safetensors",
        scheduler="TCDScheduler",
        steps=1,
        steps_range=(1, 8),
        guidance_range=NO_CFG,
        limits_reason="the unified LoRA with TCD is trained for 1 to 8 steps without CFG",
        call_kwargs={"eta": 1.0},
        licence="OpenRAIL++",
    ),
    Preset(
        name="dmd2-4step",
        description="DMD2 4-step UNet (tianweiy) with the LCM solver on its training timesteps 999/749/499/249",
        base=SDXL_BASE,
        unet="hf://tianweiy/DMD2/dmd2_sdxl_4step_unet_fp16.bin",
        scheduler="LCMScheduler",
        steps=4,
        steps_range=(4, 4),
        guidance_range=NO_CFG,
        limits_reason="DMD2 is sampled on the four timesteps it was trained on, without CFG",
        call_kwargs={"timesteps": [999, 749, 499, 249]},
        licence="CC BY-NC 4.0 (non-commercial)",
    ),
    Preset(
        name="tcd-lora",
        description="TCD-LoRA (h1t) with the TCD scheduler, eta 0.3, on any SDXL base",
        base=SDXL_BASE,
        lora="hf://h1t/TCD-SDXL-LoRA/pytorch_lora_weights.safetensors",
        scheduler="TCDScheduler",
        steps=4,
        steps_range=(1, 8),
        guidance_range=NO_CFG,
        limits_reason="TCD-LoRA is trained for few-step sampling without CFG",
        call_kwargs={"eta": 0.3},
        licence="MIT",
    ),
]
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}

# Names users try that do not exist, with the reason.
_IMPOSSIBLE = {
    "lightning-lora-1step": "SDXL-Lightning publishes no 1-step LoRA (only a 1-step UNet): use lightning-1step",
}


def get_preset(name: str) -> Preset:
    if name in _IMPOSSIBLE:
        raise ModelError(f"preset {name!r} does not exist: {_IMPOSSIBLE[name]}")
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def check_job_settings(
    preset: Preset, *, steps: int, guidance_scale: float, width: int | None = None, height: int | None = None
) -> None:
    """Reject a job whose default settings the model's authors document as harmful or impossible."""
    reason = preset.check_settings(steps=steps, guidance_scale=guidance_scale)
    if reason:
        raise ConfigError(f"{reason}. Change generation.steps / generation.guidance_scale or pick another preset.")
    if width is not None and height is not None:
        reason = preset.check_size(width=width, height=height)
        if reason:
            raise ConfigError(f"{reason}. Change generation.width / generation.height.")
