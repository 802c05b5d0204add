"""Samplers driven by exact Gaussian denoisers reproduce the data distribution; the step contract holds.

Tolerances: 4000 samples of a 4-dimensional Gaussian (variances 0.04 to 0.5) estimate the mean to about
±0.01 and covariance entries to about ±0.01 (one standard error); we allow 0.05 on the mean and 0.04 on the
covariance, which also bounds the discretisation error of each sampler at its stated step count.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_model
from oracles import SHAPE, DDPMOracle, TransportOracle, gaussian_data, sample_stats

from mediator_models.sampling.diffusion import (
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    normal_kl,
    space_timesteps,
)
from mediator_models.sampling.steps import NetworkCaller, PerSampleNoise, StepInfo
from mediator_models.sampling.transport import Transport

N_SAMPLES = 4000
MEAN_TOL, COV_TOL = 0.05, 0.04


def assert_matches_data(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> None:
    got_mean, got_cov = sample_stats(samples)
    assert (got_mean - mean).abs().max() < MEAN_TOL, (got_mean, mean)
    assert (got_cov - cov).abs().max() < COV_TOL, (got_cov, cov)


def start(seed: int = 0, n: int = N_SAMPLES):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=generator), torch.zeros(n, dtype=torch.long)


# ---- DiT's process -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing,method", [("250", "ddpm"), ("50", "ddim"), ("1000", "ddpm")])
def test_ddpm_and_ddim_reproduce_gaussian_data(spacing, method):
    mean, cov = gaussian_data()
    diffusion = GaussianDiffusion.dit(spacing)
    oracle = DDPMOracle(mean, cov)
    x_T, y = start()
    sample = diffusion.ddpm_sample if method == "ddpm" else diffusion.ddim_sample
    out = sample(NetworkCaller(oracle), x_T, y)
    assert oracle.calls == diffusion.num_timesteps
    assert_matches_data(out, mean, cov)


def test_respacing_to_every_step_is_the_unrespaced_process():
    full, respaced = GaussianDiffusion.dit(), GaussianDiffusion.dit("ddim1000")
    np.testing.assert_allclose(respaced.betas, full.betas, rtol=1e-12)
    np.testing.assert_array_equal(respaced.timestep_map, np.arange(1000))
    mean, cov = gaussian_data()
    x_T, y = start(n=64)
    a = full.ddim_sample(NetworkCaller(DDPMOracle(mean, cov)), x_T, y)
    b = respaced.ddim_sample(NetworkCaller(DDPMOracle(mean, cov)), x_T, y)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_ddim_with_all_1000_steps_agrees_with_ddpm_in_distribution():
    mean, cov = gaussian_data()
    diffusion = GaussianDiffusion.dit()
    x_T, y = start(seed=1)
    ddim = diffusion.ddim_sample(NetworkCaller(DDPMOracle(mean, cov)), x_T, y)
    ddpm = diffusion.ddpm_sample(NetworkCaller(DDPMOracle(mean, cov)), x_T, y)
    for a, b in zip(sample_stats(ddim), sample_stats(ddpm)):
        assert (a - b).abs().max() < 2 * COV_TOL


def test_respacing_keeps_the_ends_and_the_requested_count():
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert len(space_timesteps(1000, "10,20")) == 30
    diffusion = GaussianDiffusion.dit("250")
    assert diffusion.timestep_map[-1] == 999 and diffusion.alphas_cumprod[-1] == pytest.approx(
        np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[-1], rel=1e-10
    )
    with pytest.raises(ValueError, match="cannot take 600 steps from a section of 500"):
        space_timesteps(1000, "600,10")


# ---- SiT's process -----------------------------------------------------------------------------------------

TRANSPORT_CASES = [
    ("linear", "velocity", "ode", "dopri5", 0),
    ("linear", "velocity", "ode", "euler", 100),
    ("linear", "velocity", "ode", "heun", 30),
    ("linear", "velocity", "sde", "euler", 250),
    ("linear", "velocity", "sde", "heun", 100),
    ("gvp", "velocity", "sde", "euler", 250),
    ("gvp", "velocity", "ode", "dopri5", 0),
    ("linear", "noise", "ode", "dopri5", 0),
    ("linear", "score", "sde", "euler", 250),
]


@pytest.mark.parametrize("interpolant,prediction,kind,method,steps", TRANSPORT_CASES)
def test_sit_samplers_reproduce_gaussian_data(interpolant, prediction, kind, method, steps):
    mean, cov = gaussian_data()
    transport = Transport(interpolant, prediction)
    oracle = TransportOracle(mean, cov, transport)
    x0, y = start()
    network = NetworkCaller(oracle)
    if kind == "ode":
        out = transport.sample_ode(network, x0, y, method=method, num_steps=steps)
    else:
        out = transport.sample_sde(network, x0, y, method=method, num_steps=steps)
    assert_matches_data(out, mean, cov)


def test_ode_and_sde_agree_with_each_other():
    mean, cov = gaussian_data()
    transport = Transport()
    x0, y = start(seed=2)
    ode = transport.sample_ode(NetworkCaller(TransportOracle(mean, cov, transport)), x0, y)
    sde = transport.sample_sde(NetworkCaller(TransportOracle(mean, cov, transport)), x0, y)
    for a, b in zip(sample_stats(ode), sample_stats(sde)):
        assert (a - b).abs().max() < 2 * COV_TOL


def test_sit_sde_default_spends_exactly_250_evaluations_ending_with_the_mean_step():
    mean, cov = gaussian_data()
    transport = Transport()
    seen: list[StepInfo] = []
    network = NetworkCaller(TransportOracle(mean, cov, transport), callback=lambda info: seen.append(info))
    transport.sample_sde(network, *start(n=8))
    assert network.nfe == len(seen) == 250
    times = [float(info.model_time[0]) for info in seen]
    assert times[0] == 0.0 and times[-1] == pytest.approx(0.96)  # last step "Mean" of size 0.04 from t = 0.96
    assert [info.index for info in seen] == list(range(250))


def test_noise_level_is_one_at_noise_zero_at_data_and_shared_by_both_processes():
    transport = Transport()
    assert transport.noise_level(0.0) == 1.0 and transport.noise_level(1.0) == 0.0
    assert transport.noise_level(0.3) == pytest.approx(0.7)  # 1 − t for the linear interpolant
    diffusion = GaussianDiffusion.dit("250")
    levels = [diffusion.noise_level(i) for i in reversed(range(250))]
    assert levels[0] > 0.99 and levels[-1] < 0.02 and all(a > b for a, b in zip(levels, levels[1:]))
    # At equal SNR the two conventions give the same level.
    alpha_bar = diffusion.alphas_cumprod[100]
    t = np.sqrt(alpha_bar) / (np.sqrt(alpha_bar) + np.sqrt(1 - alpha_bar))
    assert transport.noise_level(t) == pytest.approx(diffusion.noise_level(100))


def test_callback_can_switch_the_network_for_a_step():
    mean, cov = gaussian_data()
    transport = Transport()
    default, other = TransportOracle(mean, cov, transport), TransportOracle(mean, cov, transport)
    network = NetworkCaller(default, callback=lambda info: other if info.noise_level < 0.55 else None)
    transport.sample_ode(network, *start(n=4), method="euler", num_steps=10)
    assert (default.calls, other.calls) == (5, 5)
    assert network.used[:5] == [default] * 5 and network.used[5:] == [other] * 5


# ---- classifier-free guidance in every sampler -------------------------------------------------------------


def run_sampler(kind: str, model, cfg_scale: float):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    y = torch.tensor([1, 2])
    network = NetworkCaller(model, cfg_scale=cfg_scale, null_class=10)
    noise = PerSampleNoise([5, 6])
    if kind in ("ddpm", "ddim"):
        diffusion = GaussianDiffusion.dit("5")
        sample = diffusion.ddpm_sample if kind == "ddpm" else diffusion.ddim_sample
        out = sample(network, x, y, noise_fn=noise)
    elif kind == "sde":
        out = Transport().sample_sde(network, x, y, num_steps=5, noise_fn=noise)
    else:
        out = Transport().sample_ode(network, x, y, method="heun", num_steps=3)
    return out, network


@pytest.mark.parametrize("kind", ["ddpm", "ddim", "sde", "ode"])
def test_guidance_works_in_every_sampler_at_twice_the_forward_passes(kind):
    model = tiny_model("DiT-T/2" if kind in ("ddpm", "ddim") else "SiT-T/2")
    with torch.no_grad():
        plain, plain_net = run_sampler(kind, model, 1.0)
        guided, guided_net = run_sampler(kind, model, 4.0)
    assert plain_net.forward_passes == plain_net.nfe and guided_net.forward_passes == 2 * guided_net.nfe
    assert not torch.allclose(plain, guided)
    assert torch.isfinite(guided).all()


def test_per_sample_noise_does_not_depend_on_the_batch():
    together = PerSampleNoise([3, 4, 5])((3, 2, 2))
    alone = PerSampleNoise([4])((1, 2, 2))
    torch.testing.assert_close(together[1:2], alone)


# ---- the loss terms ----------------------------------------------------------------------------------------


def test_discretised_likelihood_sums_to_one_over_the_256_levels():
    levels = torch.linspace(-1, 1, 256)
    log_p = discretized_gaussian_log_likelihood(levels, torch.tensor(0.1), torch.tensor(np.log(0.3)))
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_normal_kl_is_zero_for_equal_gaussians_and_matches_the_closed_form():
    zero = normal_kl(torch.tensor(0.3), torch.tensor(-1.0), torch.tensor(0.3), torch.tensor(-1.0))
    assert zero.item() == pytest.approx(0.0, abs=1e-7)
    kl = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(np.log(4.0)))
    assert kl.item() == pytest.approx(np.log(2.0) + (1 + 1) / 8 - 0.5, rel=1e-6)


def test_exact_predictors_minimise_the_training_losses():
    mean, cov = gaussian_data()
    x1 = torch.distributions.MultivariateNormal(mean, cov).sample((4000,)).float().reshape(4000, *SHAPE)
    y = torch.zeros(4000, dtype=torch.long)
    t = torch.rand(4000)
    noise = torch.randn_like(x1)
    for prediction in ("velocity", "noise", "score"):
        transport = Transport("linear", prediction, loss_weight="likelihood" if prediction == "score" else None)
        ts = t * 0.98 + 0.01
        oracle = TransportOracle(mean, cov, transport)
        exact = transport.training_loss(oracle, x1, y, t=ts, noise=noise)["loss"].mean()
        biased = transport.training_loss(lambda x, tt, yy: oracle(x, tt, yy) + 0.05, x1, y, t=ts, noise=noise)
        assert exact < biased["loss"].mean(), prediction
    diffusion = GaussianDiffusion.dit()
    oracle = DDPMOracle(mean, cov, learn_sigma=False)
    steps = torch.randint(0, 1000, (4000,))
    exact = diffusion.training_loss(oracle, x1, y, t=steps, noise=noise)["loss"].mean()
    biased = diffusion.training_loss(lambda x, tt, yy: oracle(x, tt, yy) + 0.05, x1, y, t=steps, noise=noise)
    assert exact < biased["loss"].mean()


def test_dit_hybrid_loss_has_a_variance_term_that_trains_only_the_variance_channels():
    model = tiny_model("DiT-T/2")
    diffusion = GaussianDiffusion.dit()
    x = torch.rand(4, 4, 8, 8) * 2 - 1
    terms = diffusion.training_loss(model.train(), x, torch.tensor([0, 1, 2, 3]))
    assert set(terms) == {"mse", "vb", "loss"} and torch.isfinite(terms["loss"]).all()
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    # The vb term reaches the network only through the variance channels: its gradient through the ε half is cut.
    out = torch.randn(4, 8, 8, 8, requires_grad=True)
    t = torch.tensor([0, 10, 500, 999])
    x_t = diffusion.q_sample(x, t, torch.randn_like(x))
    frozen = torch.cat([out[:, :4].detach(), out[:, 4:]], dim=1)
    diffusion.variational_bound_bits(frozen, x, x_t, t).sum().backward()
    assert out.grad[:, :4].abs().sum() == 0 and out.grad[:, 4:].abs().sum() > 0
