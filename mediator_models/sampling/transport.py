"""SiT's process: stochastic interpolants x_t = α_t·x₁ + σ_t·x₀ (x₀ noise, x₁ data, **t = 0 noise, t = 1 data**),
velocity / noise / score prediction with their losses, and the ODE and SDE samplers (docs/reference.md §5).

Written from the SiT paper (Ma et al. 2024) in the public code's conventions: the SDE sampler integrates
dx = [v + w_t·s] dt + √(2·w_t) dW on [t₀, 1 − last_step_size] with Euler–Maruyama or Heun, then takes one
last deterministic step; with w_t = σ_t ("sigma", the default) and 250 steps it is SiT's sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from mediator_models.sampling.diffusion import mean_flat
from mediator_models.sampling.steps import NetworkCaller, iterate_steps, noise_level

INTERPOLANTS = ("linear", "gvp")
PREDICTIONS = ("velocity", "noise", "score")
LOSS_WEIGHTS = (None, "velocity", "likelihood")
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = ("Mean", "Tweedie", "Euler", None)
ODE_METHODS = ("dopri5", "euler", "heun")
SDE_METHODS = ("euler", "heun")


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) to broadcast against x."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


@dataclass(frozen=True)
class Transport:
    """An interpolant, what the network predicts, and how the loss is weighted.

    `train_eps` / `sample_eps` keep time away from the singular end points where a prediction needs it
    (noise and score predictions divide by σ_t or α_t); SiT's defaults are 0 for velocity and 1e-3 otherwise.
    """

    interpolant: str = "linear"
    prediction: str = "velocity"
    loss_weight: str | None = None
    train_eps: float | None = None
    sample_eps: float | None = None

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.interpolant, INTERPOLANTS, "interpolant"),
            (self.prediction, PREDICTIONS, "prediction"),
            (self.loss_weight, LOSS_WEIGHTS, "loss weight"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; choose one of {allowed}")
        default_eps = 0.0 if self.prediction == "velocity" else 1e-3
        if self.train_eps is None:
            object.__setattr__(self, "train_eps", default_eps)
        if self.sample_eps is None:
            object.__setattr__(self, "sample_eps", default_eps)

    # ---- the interpolant ----------------------------------------------------------------------------------
    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(α_t, dα/dt, σ_t, dσ/dt)."""
        if self.interpolant == "linear":
            return t, torch.ones_like(t), 1 - t, -torch.ones_like(t)
        half_pi = math.pi / 2
        return (
            torch.sin(half_pi * t),
            half_pi * torch.cos(half_pi * t),
            torch.cos(half_pi * t),
            -half_pi * torch.sin(half_pi * t),
        )

    def noise_level(self, t: float) -> float:
        alpha, _, sigma, _ = self.alpha_sigma(torch.tensor(float(t), dtype=torch.float64))
        return noise_level(float(alpha), float(sigma))

    def interpolate(self, t: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t and its velocity u_t = dα·x₁ + dσ·x₀."""
        alpha, d_alpha, sigma, d_sigma = (_like(v, x1) for v in self.alpha_sigma(t))
        return alpha * x1 + sigma * x0, d_alpha * x1 + d_sigma * x0

    def time_interval(self, *, sde: bool, training: bool, diffusion_form: str = "sigma", last_step_size: float = 0.0):
        """[t₀, t₁] on which to train or integrate, as SiT chooses it for these settings."""
        eps = self.train_eps if training else self.sample_eps
        t0, t1 = 0.0, 1.0
        if self.prediction != "velocity" or sde:
            t0 = eps if (diffusion_form == "SBDM" and sde) or self.prediction != "velocity" else 0.0
            t1 = 1.0 - eps if (not sde or last_step_size == 0) else 1.0 - last_step_size
        return t0, t1

    # ---- conversions between predictions --------------------------------------------------------------------
    def _drift_terms(self, x, t):
        """The score-parametrised drift: velocity = a_t·x + b_t·score with a_t = α'/α, b_t = α'/α·σ² − σσ'."""
        alpha, d_alpha, sigma, d_sigma = (_like(v, x) for v in self.alpha_sigma(t))
        ratio = d_alpha / alpha
        return ratio * x, ratio * sigma**2 - sigma * d_sigma

    def velocity(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "velocity":
            return model_output
        mean_term, var_term = self._drift_terms(x, t)
        return mean_term + var_term * self.score(model_output, x, t)

    def score(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """∇ log p_t(x) from any prediction."""
        alpha, d_alpha, sigma, d_sigma = (_like(v, x) for v in self.alpha_sigma(t))
        if self.prediction == "score":
            return model_output
        if self.prediction == "noise":
            return -model_output / sigma
        ratio = alpha / d_alpha  # velocity -> score, through E[x₀|x_t]
        variance = sigma**2 - ratio * d_sigma * sigma
        return (ratio * model_output - x) / variance

    # ---- training -----------------------------------------------------------------------------------------
    def training_loss(
        self, model, x1: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-sample loss: ‖v̂ − u_t‖² for velocity; weighted ‖x̂₀ − x₀‖² or ‖σ·ŝ + x₀‖² for noise / score."""
        t0, t1 = self.time_interval(sde=False, training=True)
        if t is None:
            t = torch.rand(x1.shape[0], device=x1.device) * (t1 - t0) + t0
        x0 = torch.randn_like(x1) if noise is None else noise
        x_t, u_t = self.interpolate(t, x0, x1)
        output = model(x_t, t, y)
        if self.prediction == "velocity":
            return {"loss": mean_flat((output - u_t) ** 2)}
        _, var_term = self._drift_terms(x_t, t)
        _, _, sigma, _ = (_like(v, x1) for v in self.alpha_sigma(t))
        weight = {None: 1.0, "velocity": (var_term / sigma) ** 2, "likelihood": var_term / sigma**2}[self.loss_weight]
        if self.prediction == "noise":
            return {"loss": mean_flat(weight * (output - x0) ** 2)}
        return {"loss": mean_flat(weight * (output * sigma + x0) ** 2)}

    # ---- samplers -----------------------------------------------------------------------------------------
    def _velocity_fn(self, network: NetworkCaller, y):
        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            tt = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
            return self.velocity(network(x, tt, y, self.noise_level(t)), x, tt)

        return velocity

    def _score_fn(self, velocity_out: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
        tt = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
        # Convert through the velocity so every prediction type yields the same score.
        return Transport(self.interpolant, "velocity").score(velocity_out, x, tt)

    def diffusion_coefficient(self, t: float, form: str = "sigma", norm: float = 1.0) -> float:
        """w_t of the SDE dx = [v + w_t·s] dt + √(2·w_t) dW."""
        if form not in DIFFUSION_FORMS:
            raise ValueError(f"unknown diffusion form {form!r}; choose one of {DIFFUSION_FORMS}")
        tt = torch.tensor(float(t), dtype=torch.float64)
        alpha, d_alpha, sigma, d_sigma = self.alpha_sigma(tt)
        if form == "constant":
            return norm
        if form == "SBDM":
            return norm * float(d_alpha / alpha * sigma**2 - sigma * d_sigma)
        if form == "sigma":
            return norm * float(sigma)
        if form == "linear":
            return norm * (1 - float(t))
        if form == "decreasing":
            return 0.25 * (norm * math.cos(math.pi * float(t)) + 1) ** 2
        return norm * math.sin(math.pi * float(t)) ** 2  # increasing-decreasing

    def sample_ode(
        self,
        network: NetworkCaller,
        x0: torch.Tensor,
        y: torch.Tensor,
        *,
        method: str = "dopri5",
        num_steps: int = 50,
        atol: float = 1e-6,
        rtol: float = 1e-3,
        progress: Callable | None = None,
    ) -> torch.Tensor:
        """Integrate dx/dt = v(x, t) from noise (t₀) to data (t₁): torchdiffeq's adaptive dopri5 (SiT's
        default, with atol/rtol), or fixed-step Euler (num_steps evaluations) or Heun (2 per step)."""
        if method not in ODE_METHODS:
            raise ValueError(f"unknown ODE method {method!r}; choose one of {ODE_METHODS}")
        t0, t1 = self.time_interval(sde=False, training=False)
        velocity = self._velocity_fn(network, y)
        if method == "dopri5":
            from torchdiffeq import odeint

            times = torch.tensor([t0, t1], dtype=torch.float64)
            return odeint(
                lambda t, x: velocity(x, float(t)), x0, times.to(x0.dtype), method="dopri5", atol=atol, rtol=rtol
            )[-1]
        times = torch.linspace(t0, t1, num_steps + 1, dtype=torch.float64).tolist()
        x = x0
        for i in iterate_steps(range(num_steps), progress):
            t, dt = times[i], times[i + 1] - times[i]
            k1 = velocity(x, t)
            if method == "euler":
                x = x + dt * k1
            else:
                k2 = velocity(x + dt * k1, t + dt)
                x = x + 0.5 * dt * (k1 + k2)
        return x

    def sample_sde(
        self,
        network: NetworkCaller,
        x0: torch.Tensor,
        y: torch.Tensor,
        *,
        method: str = "euler",
        num_steps: int = 250,
        diffusion_form: str = "sigma",
        diffusion_norm: float = 1.0,
        last_step: str | None = "Mean",
        last_step_size: float = 0.04,
        noise_fn: Callable | None = None,
        progress: Callable | None = None,
    ) -> torch.Tensor:
        """SiT's SDE sampler: num_steps − 1 Euler–Maruyama (or stochastic Heun) steps on [t₀, 1 − last_step_size],
        then one last step ("Mean": x + drift·h; "Tweedie": the posterior mean; "Euler": x + v·h; None: none),
        so the default spends exactly num_steps network evaluations."""
        if method not in SDE_METHODS:
            raise ValueError(f"unknown SDE method {method!r}; choose one of {SDE_METHODS}")
        if last_step not in LAST_STEPS:
            raise ValueError(f"unknown last step {last_step!r}; choose one of {LAST_STEPS}")
        noise_fn = noise_fn or (lambda shape: torch.randn(shape, device=x0.device))
        t0, t1 = self.time_interval(
            sde=True,
            training=False,
            diffusion_form=diffusion_form,
            last_step_size=last_step_size if last_step is not None else 0.0,
        )
        times = torch.linspace(t0, t1, num_steps, dtype=torch.float64).tolist()
        dt = times[1] - times[0] if num_steps > 1 else 0.0
        velocity = self._velocity_fn(network, y)

        def drift(x: torch.Tensor, t: float) -> torch.Tensor:
            v = velocity(x, t)
            return v + self.diffusion_coefficient(t, diffusion_form, diffusion_norm) * self._score_fn(v, x, t)

        x = x0
        for t in iterate_steps(times[:-1], progress):
            dw = noise_fn(tuple(x.shape)) * math.sqrt(dt)
            w = self.diffusion_coefficient(t, diffusion_form, diffusion_norm)
            if method == "euler":
                injected = math.sqrt(2 * w) * dw
                x = x + drift(x, t) * dt + injected
                network.injected = injected  # the next evaluation's callback sees which part of Δx was noise
            else:
                x_hat = x + math.sqrt(2 * w) * dw
                k1 = drift(x_hat, t)
                k2 = drift(x_hat + dt * k1, t + dt)
                x = x_hat + 0.5 * dt * (k1 + k2)
        return self._last_step(x, times[-1], last_step, last_step_size, drift, velocity)

    def _last_step(self, x, t, kind, size, drift, velocity):
        if kind is None:
            return x
        if kind == "Mean":
            return x + drift(x, t) * size
        if kind == "Euler":
            return x + velocity(x, t) * size
        alpha, _, sigma, _ = self.alpha_sigma(torch.tensor(t, dtype=torch.float64))
        score = self._score_fn(velocity(x, t), x, t)
        return x / float(alpha) + float(sigma) ** 2 / float(alpha) * score  # Tweedie: E[x₁ | x_t]
