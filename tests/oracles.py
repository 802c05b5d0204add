"""Exact denoisers for Gaussian data, in the network interface `(x, t, y) -> prediction`.

For data x₁ ~ N(μ, Σ) and x_t = α·x₁ + σ·ε the posterior is Gaussian: with C_t = α²Σ + σ²I,
    E[ε | x_t] = σ·C_t⁻¹(x_t − αμ),   E[x₁ | x_t] = μ + αΣ·C_t⁻¹(x_t − αμ),   ∇log p_t = −C_t⁻¹(x_t − αμ).
A sampler driven by these must reproduce N(μ, Σ); that is the test of the sampler, free of any training.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mediator_models.sampling.diffusion import linear_betas
from mediator_models.sampling.transport import Transport

SHAPE = (1, 2, 2)  # one channel, 2×2: a 4-dimensional Gaussian in image layout


def gaussian_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(generator.normal(size=(4, 4)))
    cov = basis @ np.diag([0.5, 0.3, 0.1, 0.04]) @ basis.T  # narrower than the noise, like images
    mean = np.array([0.5, -0.3, 0.2, 0.0])
    return torch.tensor(mean, dtype=torch.float64), torch.tensor(cov, dtype=torch.float64)


def sample_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(x.shape[0], -1).double()
    return flat.mean(0), torch.cov(flat.T)


class _GaussianOracle(nn.Module):
    def __init__(self, mean: torch.Tensor, cov: torch.Tensor):
        super().__init__()
        self.mean, self.cov = mean, cov
        self.calls = 0

    def posterior(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        """(whitened residual C_t⁻¹(x − αμ), α, σ), all float64, batched over the per-sample times."""
        flat = x.reshape(x.shape[0], -1).double()
        a, s = alpha.double()[:, None, None], sigma.double()[:, None, None]
        cov_t = a**2 * self.cov + s**2 * torch.eye(len(self.mean), dtype=torch.float64)
        residual = torch.linalg.solve(cov_t, (flat - alpha.double()[:, None] * self.mean)[..., None])[..., 0]
        return residual, alpha.double()[:, None], sigma.double()[:, None]


class DDPMOracle(_GaussianOracle):
    """Predicts ε exactly at DiT's original timesteps; with `learn_sigma` adds v = −1 (posterior variance)."""

    def __init__(self, mean, cov, learn_sigma: bool = True):
        super().__init__(mean, cov)
        self.alphas_cumprod = torch.tensor(np.cumprod(1 - linear_betas(1000)))
        self.learn_sigma = learn_sigma

    def forward(self, x, t, y):
        self.calls += 1
        alpha_bar = self.alphas_cumprod[t.round().long().cpu()]
        residual, _, sigma = self.posterior(x, alpha_bar.sqrt(), (1 - alpha_bar).sqrt())
        eps = (sigma * residual).reshape(x.shape).to(x.dtype)
        return torch.cat([eps, -torch.ones_like(eps)], dim=1) if self.learn_sigma else eps


class TransportOracle(_GaussianOracle):
    """Predicts SiT's velocity, noise (x₀) or score exactly for the given transport."""

    def __init__(self, mean, cov, transport: Transport):
        super().__init__(mean, cov)
        self.transport = transport

    def forward(self, x, t, y):
        self.calls += 1
        alpha, d_alpha, sigma, d_sigma = self.transport.alpha_sigma(t.double())
        residual, a, s = self.posterior(x, alpha, sigma)
        noise = s * residual
        data = self.mean + (a * residual) @ self.cov
        prediction = {
            "velocity": d_alpha.double()[:, None] * data + d_sigma.double()[:, None] * noise,
            "noise": noise,
            "score": -residual,
        }[self.transport.prediction]
        return prediction.reshape(x.shape).to(x.dtype)
