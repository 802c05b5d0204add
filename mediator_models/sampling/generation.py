"""Which process a model family uses, and one entry point that runs any sampler on a batch.

DiT models are sampled with DDPM (250 respaced steps) or DDIM; SiT models with the SDE (250 steps) or the
ODE sampler. Everything that samples (the sample command, the recorder's collection, the reproduction
pipeline) goes through `generate`, so recording and mediator switching see every sampler the same way.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mediator_models.sampling.diffusion import GaussianDiffusion
from mediator_models.sampling.steps import ModelFn, NetworkCaller, StepCallback
from mediator_models.sampling.transport import ODE_METHODS, SDE_METHODS, Transport
from mediator_models.storage.errors import SettingError

SAMPLER_KINDS = {"DiT": ("ddpm", "ddim"), "SiT": ("sde", "ode")}


@dataclass(frozen=True)
class ProcessConfig:
    """The training/sampling process of a model; saved in checkpoints beside the model config."""

    family: str = "SiT"
    interpolant: str = "linear"  # SiT only
    prediction: str = "velocity"  # SiT only
    loss_weight: str | None = None  # SiT only

    def build(self, spacing: str | int | None = None):
        """GaussianDiffusion (DiT; `spacing` respaces it) or Transport (SiT)."""
        if self.family == "DiT":
            return GaussianDiffusion.dit(spacing)
        if self.family == "SiT":
            return Transport(self.interpolant, self.prediction, self.loss_weight)
        raise ValueError(f"unknown model family {self.family!r}; choose 'DiT' or 'SiT'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SamplerConfig:
    """A sampler and its settings. `method`: SDE "euler"/"heun", ODE "dopri5"/"euler"/"heun"."""

    kind: str = "sde"
    steps: int = 250
    method: str | None = None
    cfg_scale: float = 1.0
    guided_channels: int | None = None
    eta: float = 0.0  # DDIM only
    atol: float = 1e-6  # ODE dopri5 only
    rtol: float = 1e-3
    diffusion_form: str = "sigma"  # SDE only
    last_step: str | None = "Mean"
    last_step_size: float = 0.04

    def check(self, family: str, in_channels: int | None = None) -> None:
        """Refuse a sampler the model family cannot use, naming the setting (`in_channels` bounds guided_channels)."""
        kinds = SAMPLER_KINDS.get(family)
        if kinds is None:
            raise ValueError(f"unknown model family {family!r}")
        if self.kind not in kinds:
            raise SettingError("sampler", f"{self.kind} does not apply to a {family} model; choose one of {kinds}")
        if self.kind == "sde" and self.method not in (None, *SDE_METHODS):
            raise SettingError("method", f"{self.method!r} is no SDE method; choose one of {SDE_METHODS}")
        if self.kind == "ode" and self.method not in (None, *ODE_METHODS):
            raise SettingError("method", f"{self.method!r} is no ODE method; choose one of {ODE_METHODS}")
        if self.kind in ("ddpm", "ddim") and self.method is not None:
            raise SettingError(
                "method", f"{self.method} applies to SiT's sde/ode samplers; DiT's {self.kind} has no method: drop it"
            )
        if not isinstance(self.steps, int) or self.steps < 1:
            raise SettingError("steps", f"must be at least 1, got {self.steps!r}")
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 1.0):
            raise SettingError("cfg_scale", f"must be at least 1 (1 = no guidance), got {self.cfg_scale!r}")
        # guided_channels at cfg_scale 1 is accepted and inactive (a sweep over scales starts at 1): see describe().
        if self.guided_channels is not None:
            upper = in_channels if in_channels is not None else self.guided_channels
            if not 1 <= self.guided_channels <= upper:
                raise SettingError(
                    "guided_channels",
                    f"must lie in 1..{upper} (the model's input channels; 3 reproduces the public code), got "
                    f"{self.guided_channels}",
                )

    @property
    def adaptive(self) -> bool:
        """True for samplers that choose their own steps (dopri5): their evaluations depend on the batch."""
        return self.kind == "ode" and (self.method or "dopri5") == "dopri5"

    def describe(self) -> str:
        method = f"/{self.method}" if self.method else ""
        cfg = f", cfg {self.cfg_scale:g}" if self.cfg_scale != 1.0 else ""
        if self.guided_channels is not None:
            cfg += f", guided channels {self.guided_channels}" + (
                " (inactive: no guidance)" if self.cfg_scale == 1.0 else ""
            )
        return f"{self.kind}{method} {self.steps} steps{cfg}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_sampler(family: str, **changes: Any) -> SamplerConfig:
    """The papers' samplers: DiT with DDPM over 250 respaced steps, SiT with the 250-step SDE."""
    base = SamplerConfig(kind="ddpm", steps=250) if family == "DiT" else SamplerConfig(kind="sde", steps=250)
    return dataclasses.replace(base, **changes)


def generate(
    model: ModelFn,
    process: ProcessConfig,
    sampler: SamplerConfig,
    x_T: torch.Tensor,
    y: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    noise_fn: Callable | None = None,
    null_class: int | None = None,
    progress: Callable | None = None,
) -> tuple[torch.Tensor, NetworkCaller]:
    """Run `sampler` from the noise `x_T` with labels `y`; returns the samples and the caller, whose
    `nfe`, `forward_passes` and `used` say what the run cost and which network made each step."""
    sampler.check(process.family)
    if null_class is None:
        null_class = getattr(getattr(model, "config", None), "num_classes", None)
    network = NetworkCaller(
        model,
        callback=callback,
        cfg_scale=sampler.cfg_scale,
        null_class=null_class,
        guided_channels=sampler.guided_channels,
    )
    with torch.no_grad():
        if process.family == "DiT":
            diffusion = process.build(spacing=sampler.steps)
            if sampler.kind == "ddpm":
                out = diffusion.ddpm_sample(network, x_T, y, noise_fn=noise_fn, progress=progress)
            else:
                out = diffusion.ddim_sample(network, x_T, y, eta=sampler.eta, noise_fn=noise_fn, progress=progress)
        else:
            transport = process.build()
            if sampler.kind == "sde":
                out = transport.sample_sde(
                    network,
                    x_T,
                    y,
                    method=sampler.method or "euler",
                    num_steps=sampler.steps,
                    diffusion_form=sampler.diffusion_form,
                    last_step=sampler.last_step,
                    last_step_size=sampler.last_step_size,
                    noise_fn=noise_fn,
                    progress=progress,
                )
            else:
                out = transport.sample_ode(
                    network,
                    x_T,
                    y,
                    method=sampler.method or "dopri5",
                    num_steps=sampler.steps,
                    atol=sampler.atol,
                    rtol=sampler.rtol,
                    progress=progress,
                )
    return out, network
