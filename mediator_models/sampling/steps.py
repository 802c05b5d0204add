"""The one contract every sampler follows: how it calls the network, and what a step callback sees.

Both processes (DiT's DDPM/DDIM in diffusion.py, SiT's ODE/SDE in transport.py) evaluate the network only
through a `NetworkCaller`. Before each evaluation it calls the step callback with a `StepInfo` that places
the step on one axis shared by both conventions, the **noise level** σ/(α+σ) of x_t = α·x_data + σ·ε:
1 is pure noise, 0 is data (for SiT's linear interpolant it is exactly 1 − t; in general it is
sigmoid(−logSNR/2)). The callback may return another network for that step: this is how mediator
switching plugs in, and how the recorder learns the current step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from mediator_models.network.config import ModelConfig

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepInfo:
    """What a step callback is told before a network evaluation."""

    index: int  # evaluation number within this sampling run, from 0 (the NFE so far)
    model_time: torch.Tensor  # (B,) time as the network receives it (DiT: 0..999 integers; SiT: t in [0, 1])
    noise_level: float  # σ/(α+σ) on the common axis: 1 = pure noise, 0 = data
    x: torch.Tensor  # the state the network is about to see, (B, C, H, W)
    # The random increment the sampler added to x since the previous evaluation (SDE Euler–Maruyama: √(2w)·dW),
    # so a callback can tell the drift's part of a step from the noise's; None where nothing random was added.
    injected: Optional[torch.Tensor] = None


StepCallback = Callable[[StepInfo], Optional[ModelFn]]


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` in a run seeded with `seed` (its noise stream and nothing else)."""
    return seed * 1_000_003 + index


def noise_level(alpha: float, sigma: float) -> float:
    """The common axis σ/(α+σ) for x_t = α·x + σ·ε (a monotone function of the log-SNR 2·log(α/σ))."""
    return float(sigma / (alpha + sigma))


def guided(model: torch.nn.Module, cfg_scale: float, null_class: int, guided_channels: int | None = None) -> ModelFn:
    """A model function that applies classifier-free guidance: batch (B) in, guided prediction (B) out.

    Evaluates conditional and null-label inputs as one doubled batch through `model.forward_with_cfg`
    (so the network sees 2B samples per call: conditional first, unconditional second).
    """
    if cfg_scale == 1.0:
        return model

    def call(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        doubled_y = torch.cat([y, torch.full_like(y, null_class)])
        out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), doubled_y, cfg_scale, guided_channels)
        return out[: len(x)]

    return call


@dataclass
class NetworkCaller:
    """Evaluates the network for a sampler: asks the callback first, counts evaluations and their cost.

    `model` is the default network; the callback may return another for any step. With `cfg_scale` > 1
    every network used is wrapped in classifier-free guidance (each evaluation then costs two forward
    passes, which `forward_passes` records).
    """

    model: ModelFn
    callback: StepCallback | None = None
    cfg_scale: float = 1.0
    null_class: int | None = None
    guided_channels: int | None = None
    nfe: int = 0
    forward_passes: int = 0
    used: list = field(default_factory=list)  # the network used at each evaluation, in order
    gflops: torch.Tensor | None = None  # (B,) GFLOPs spent on each sample so far (networks with a config)
    injected: torch.Tensor | None = None  # set by a stochastic sampler: the noise it added since the last evaluation

    def __call__(self, x: torch.Tensor, model_time: torch.Tensor, y: torch.Tensor, level: float) -> torch.Tensor:
        chosen = None
        if self.callback is not None:
            # Adaptive solvers may evaluate slightly past the end of time; the axis stays within [0, 1].
            level = min(max(float(level), 0.0), 1.0)
            chosen = self.callback(StepInfo(self.nfe, model_time, level, x, self.injected))
        self.injected = None
        network = self.model if chosen is None else chosen
        self.used.append(network)
        self.nfe += 1
        self._account(network, len(x))
        if self.cfg_scale != 1.0:
            if self.null_class is None:
                raise ValueError("classifier-free guidance needs the null class index (num_classes)")
            self.forward_passes += 2
            return guided(network, self.cfg_scale, self.null_class, self.guided_channels)(x, model_time, y)
        self.forward_passes += 1
        return network(x, model_time, y)

    def _account(self, network, batch: int) -> None:
        """Add this evaluation's cost per sample: the network's forward GFLOPs, twice with guidance."""
        from mediator_models.network.flops import config_gmacs

        if hasattr(network, "gmacs_per_sample"):
            cost = network.gmacs_per_sample().double()
        elif hasattr(network, "config"):
            cost = torch.full((batch,), config_gmacs(network.config), dtype=torch.float64)
        else:
            return
        cost = cost * (2 if self.cfg_scale != 1.0 else 1)
        self.gflops = cost if self.gflops is None else self.gflops + cost


class PerSampleNoise:
    """Gaussian noise drawn from one generator per sample, so a sample's trajectory does not depend on the
    batch it is drawn in (restartable sampling, and batch-vs-single comparisons)."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = []
        for seed in seeds:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(seed))
            self.generators.append(generator)

    def __call__(self, shape: Sequence[int]) -> torch.Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for a batch of {shape[0]} requested from {len(self.generators)} per-sample seeds")
        per_sample = tuple(shape[1:])
        return torch.stack([torch.randn(per_sample, generator=g, device=self.device) for g in self.generators])


def iterate_steps(items: Iterable, progress: Callable | None = None):
    """The sampler's step loop, wrapped in a progress bar (e.g. tqdm) when one is given."""
    return progress(list(items)) if progress is not None else items


def sample_label(index: int, seed: int, num_classes: int, classes: list[int] | None) -> int:
    if classes:
        return classes[index % len(classes)]
    return int(np.random.default_rng([seed, index, 1]).integers(num_classes))


def start_batch(
    indices: list[int], seed: int, config: ModelConfig, classes: list[int] | None, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, PerSampleNoise]:
    """Initial noise, labels and the per-sample noise stream of samples `indices` of a run seeded `seed`;
    each depends only on its own index, so any batching draws the same samples."""
    noise = PerSampleNoise([sample_seed(seed, i) for i in indices], device)
    x_T = noise((len(indices), config.in_channels, config.input_size, config.input_size))
    y = torch.tensor([sample_label(i, seed, config.num_classes, classes) for i in indices], device=device)
    return x_T, y, noise
