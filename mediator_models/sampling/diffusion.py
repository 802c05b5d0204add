"""DiT's process: DDPM with 1000 linear-beta steps, learned-range variance, the hybrid loss, respacing,
and the DDPM and DDIM samplers (docs/reference.md §5). Written from the equations of Ho et al. 2020 and Nichol &
Dhariwal 2021 (improved DDPM), in the conventions of the public DiT code: the network receives the
original integer timestep (999 = pure noise) even when sampling with fewer, respaced steps.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch

from mediator_models.sampling.steps import NetworkCaller, iterate_steps, noise_level

NoiseFn = Callable[[tuple], torch.Tensor]


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """Linear schedule from 1e-4 to 0.02, rescaled so any step count spans the same total noise."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, spacing: str | int) -> list[int]:
    """Which original steps to keep: "250" (evenly spread, ends included), "10,20,30" (per section),
    or "ddim50" (a fixed stride giving exactly 50 steps, as DDIM samples)."""
    spacing = str(spacing)
    if spacing.startswith("ddim"):
        wanted = int(spacing[4:])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == wanted:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"no integer stride gives exactly {wanted} of {num_timesteps} steps; use plain '{wanted}'")
    counts = [int(c) for c in spacing.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size or count < 1:
            raise ValueError(f"cannot take {count} steps from a section of {size}; ask for 1..{size}")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        kept += [start + round(stride * k) for k in range(count)]
        start += size
    return sorted(set(kept))


def _gather(values: np.ndarray, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[index] broadcast to like's shape (B, 1, 1, 1), in float32 on like's device."""
    out = torch.from_numpy(values).to(like.device)[index].float()
    return out.reshape(-1, *([1] * (like.dim() - 1)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) by the tanh approximation used in the improved-DDPM likelihood."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) for data in [−1, 1] quantised to 256 levels, under N(means, e^(2·log_scales)); elementwise."""
    centred = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.dim())))


class GaussianDiffusion:
    """DDPM over `len(betas)` steps; `timestep_map[i]` is the original step the network sees at index i.

    `GaussianDiffusion.dit(spacing)` builds DiT's process: 1000 linear betas, optionally respaced
    (e.g. "250" for sampling). Training uses the full process.
    """

    def __init__(self, betas: np.ndarray, timestep_map: Iterable[int] | None = None, original_steps: int | None = None):
        self.betas = np.asarray(betas, dtype=np.float64)
        if self.betas.ndim != 1 or not ((self.betas > 0) & (self.betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.num_timesteps = len(self.betas)
        self.timestep_map = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(list(timestep_map))
        self.original_steps = original_steps or self.num_timesteps
        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at the first step; the log is clipped to the next value, as in ADM.
        first = self.posterior_variance[1] if self.num_timesteps > 1 else self.betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    @classmethod
    def dit(cls, spacing: str | int | None = None, num_timesteps: int = 1000) -> "GaussianDiffusion":
        """DiT's process; `spacing` ("250", "ddim50", ...) respaces it for sampling."""
        betas = linear_betas(num_timesteps)
        if spacing is None or str(spacing) == str(num_timesteps):
            return cls(betas)
        kept = set(space_timesteps(num_timesteps, spacing))
        cumprod = np.cumprod(1.0 - betas)
        new_betas, last = [], 1.0
        for i, value in enumerate(cumprod):
            if i in kept:
                new_betas.append(1.0 - value / last)
                last = value
        return cls(np.array(new_betas), timestep_map=sorted(kept), original_steps=num_timesteps)

    # ---- the forward process ------------------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (
            _gather(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + _gather(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior(self, x_start, x_t, t):
        mean = _gather(self.posterior_mean_coef1, t, x_t) * x_start + _gather(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _gather(self.posterior_log_variance_clipped, t, x_t)

    def noise_level(self, index: int) -> float:
        return noise_level(self.sqrt_alphas_cumprod[index], self.sqrt_one_minus_alphas_cumprod[index])

    def model_time(self, index: int, batch: int, device) -> torch.Tensor:
        return torch.full((batch,), float(self.timestep_map[index]), device=device)

    # ---- the reverse process ------------------------------------------------------------------------------
    def p_mean_variance(
        self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ):
        """Mean, log-variance and x̂₀ of p(x_{t−1} | x_t) from the network's ε (and variance) prediction.

        With 2C output channels the second half v ∈ [−1, 1] interpolates the log-variance between the
        posterior variance β̃_t (v = −1) and β_t (v = 1); with C channels the variance is fixed to β̃_t.
        """
        channels = x.shape[1]
        if model_output.shape[1] == 2 * channels:
            eps, var_values = model_output[:, :channels], model_output[:, channels:]
            min_log = _gather(self.posterior_log_variance_clipped, t, x)
            max_log = _gather(np.log(self.betas), t, x)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        elif model_output.shape[1] == channels:
            eps = model_output
            log_variance = _gather(self.posterior_log_variance_clipped, t, x).expand_as(x)
        else:
            raise ValueError(
                f"model output has {model_output.shape[1]} channels; expected {channels} or {2 * channels}"
            )
        pred_x0 = (
            _gather(self.sqrt_recip_alphas_cumprod, t, x) * x - _gather(self.sqrt_recipm1_alphas_cumprod, t, x) * eps
        )
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _ = self.q_posterior(pred_x0, x, t)
        return mean, log_variance, pred_x0, eps

    # ---- training -----------------------------------------------------------------------------------------
    def training_loss(
        self,
        model,
        x_start: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """DiT's hybrid loss per sample: MSE on ε, plus (with learned variance) the variational bound term
        in bits/dim computed with the mean frozen, so it trains only the variance (improved DDPM)."""
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x_start.shape[0],), device=x_start.device)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        output = model(x_t, torch.from_numpy(self.timestep_map).to(t.device)[t].float(), y)
        channels = x_start.shape[1]
        terms = {"mse": mean_flat((noise - output[:, :channels]) ** 2)}
        if output.shape[1] == 2 * channels:
            frozen = torch.cat([output[:, :channels].detach(), output[:, channels:]], dim=1)
            terms["vb"] = self.variational_bound_bits(frozen, x_start, x_t, t) * (self.num_timesteps / 1000.0)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def variational_bound_bits(self, model_output, x_start, x_t, t) -> torch.Tensor:
        """L_{t−1} = KL(q(x_{t−1}|x_t,x₀) ‖ p(x_{t−1}|x_t)) in bits/dim; at t = 0 the decoder NLL instead."""
        true_mean, true_log_var = self.q_posterior(x_start, x_t, t)
        mean, log_var, _, _ = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ---- samplers -----------------------------------------------------------------------------------------
    def _reverse_step(self, network: NetworkCaller, x: torch.Tensor, y: torch.Tensor, i: int, clip_denoised: bool):
        """Evaluate the network at step index i: (t, mean, log-variance, x̂₀) of p(x_{i−1} | x_i)."""
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        out = network(x, self.model_time(i, x.shape[0], x.device), y, self.noise_level(i))
        mean, log_var, pred_x0, _ = self.p_mean_variance(out, x, t, clip_denoised)
        return t, mean, log_var, pred_x0

    def ddpm_sample(
        self,
        network: NetworkCaller,
        x_T: torch.Tensor,
        y: torch.Tensor,
        noise_fn: NoiseFn | None = None,
        clip_denoised: bool = False,
        progress: Callable | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling: x_{t−1} = μ_θ(x_t) + σ_θ(x_t)·z for each of the process's steps."""
        x = x_T
        noise_fn = noise_fn or (lambda shape: torch.randn(shape, device=x_T.device))
        for i in iterate_steps(reversed(range(self.num_timesteps)), progress):
            _, mean, log_var, _ = self._reverse_step(network, x, y, i, clip_denoised)
            x = mean + torch.exp(0.5 * log_var) * noise_fn(tuple(x.shape)) if i > 0 else mean
        return x

    def ddim_sample(
        self,
        network: NetworkCaller,
        x_T: torch.Tensor,
        y: torch.Tensor,
        eta: float = 0.0,
        noise_fn: NoiseFn | None = None,
        clip_denoised: bool = False,
        progress: Callable | None = None,
    ) -> torch.Tensor:
        """DDIM (Song et al. 2021): deterministic for η = 0, DDPM-like for η = 1."""
        x = x_T
        noise_fn = noise_fn or (lambda shape: torch.randn(shape, device=x_T.device))
        for i in iterate_steps(reversed(range(self.num_timesteps)), progress):
            t, _, _, pred_x0 = self._reverse_step(network, x, y, i, clip_denoised)
            # Re-derive ε from x̂₀ so that clipping (if any) is reflected in it, as ADM does.
            eps = (_gather(self.sqrt_recip_alphas_cumprod, t, x) * x - pred_x0) / _gather(
                self.sqrt_recipm1_alphas_cumprod, t, x
            )
            alpha_bar = _gather(self.alphas_cumprod, t, x)
            alpha_bar_prev = _gather(self.alphas_cumprod_prev, t, x)
            sigma = (
                eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
            )
            x = pred_x0 * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
            if i > 0 and eta > 0:
                x = x + sigma * noise_fn(tuple(x.shape))
        return x
