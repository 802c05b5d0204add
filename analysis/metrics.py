"""Redundancy measures of attention maps: pure functions from maps to numbers.

Every function takes row-stochastic maps P of shape (..., N, M) (row i is query i's distribution over keys;
M = N for full attention and for the mediator product map) and returns one number per map, shape (...).
Singular values are computed in float64 (or float32 when asked), never in half precision.

- `jsd_redundancy`: the paper's score (REFERENCE §8), mean Jensen–Shannon divergence between the rows,
  in bits: 0 when every query attends alike (redundant), 1 when their supports are disjoint.
- `normalized_entropy`: mean over queries of H(P_i) / log M: 1 = uniform attention, 0 = one key.
- `effective_rank`: exp(H(σ/Σσ)) (Roy & Vetterli 2007).
- `stable_rank`: Σσ² / σ₁².
- `numerical_rank`: #{σ_i > rtol·σ₁}.
- `energy_rank`: smallest k with Σ_{i≤k} σ_i² ≥ τ·Σσ².
- `mean_cosine`: mean cosine similarity between distinct query rows.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Reducer = Callable[[torch.Tensor], torch.Tensor]

_TINY = 1e-30


def _entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats, with 0·log 0 = 0."""
    return -(p * torch.log(p.clamp_min(_TINY))).sum(dim)


def _pair_indices(n: int, max_pairs: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """All unordered pairs i < j, or `max_pairs` of them drawn uniformly (fixed seed) when there are more."""
    total = n * (n - 1) // 2
    if max_pairs is None or total <= max_pairs:
        i, j = torch.triu_indices(n, n, offset=1, device=device)
        return i, j
    generator = torch.Generator().manual_seed(0)
    i = torch.randint(0, n, (max_pairs,), generator=generator)
    offset = torch.randint(1, n, (max_pairs,), generator=generator)  # j ≠ i, uniform over the others
    return i.to(device), ((i + offset) % n).to(device)


def jsd_redundancy(maps: torch.Tensor, max_pairs: int | None = 8192, chunk_elements: int = 2**24) -> torch.Tensor:
    """Mean JSD(P_i ‖ P_j) over unordered pairs of rows, in bits. maps (..., N, M) -> (...).

    JSD(p, q) = H((p + q)/2) − (H(p) + H(q))/2. Pairs are processed in chunks of about `chunk_elements`
    values, so memory stays bounded instead of growing as N²·M. Above `max_pairs` pairs the mean is estimated
    from that many pairs drawn uniformly with a fixed seed (unbiased; all pairs for N ≤ 128 at the default).
    """
    p = maps.double()
    n = p.shape[-2]
    if n < 2:
        return torch.zeros(p.shape[:-2], dtype=torch.float64, device=p.device)
    row_entropy = _entropy(p)  # (..., N)
    first, second = _pair_indices(n, max_pairs, p.device)
    total = torch.zeros(p.shape[:-2], dtype=torch.float64, device=p.device)
    chunk = max(1, chunk_elements // max(1, p[..., 0, :].numel()))
    for start in range(0, len(first), chunk):
        i, j = first[start : start + chunk], second[start : start + chunk]
        mixture = 0.5 * (p[..., i, :] + p[..., j, :])
        jsd = _entropy(mixture) - 0.5 * (row_entropy[..., i] + row_entropy[..., j])
        total += jsd.clamp_min(0).sum(-1)
    return total / len(first) / math.log(2.0)


def normalized_entropy(maps: torch.Tensor) -> torch.Tensor:
    """Mean over queries of H(P_i) / log M. maps (..., N, M) -> (...)."""
    m = maps.shape[-1]
    return _entropy(maps.double()).mean(-1) / math.log(m)


def mean_cosine(maps: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over ordered pairs of distinct rows: (‖Σ r̂_i‖² − N) / (N(N − 1))."""
    rows = maps.double()
    n = rows.shape[-2]
    unit = rows / rows.norm(dim=-1, keepdim=True).clamp_min(_TINY)
    summed = unit.sum(-2)
    return ((summed * summed).sum(-1) - n) / (n * (n - 1))


def singular_values(maps: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """σ in descending order, computed in float32 or float64 (half precision is refused)."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError("singular values are computed in float32 or float64, never in half precision")
    return torch.linalg.svdvals(maps.to(dtype))


def effective_rank(sigma: torch.Tensor) -> torch.Tensor:
    """exp of the entropy of the normalised singular values; from σ (..., K) -> (...)."""
    weights = sigma / sigma.sum(-1, keepdim=True).clamp_min(_TINY)
    return torch.exp(_entropy(weights))


def stable_rank(sigma: torch.Tensor) -> torch.Tensor:
    return (sigma**2).sum(-1) / (sigma[..., 0] ** 2).clamp_min(_TINY)


def numerical_rank(sigma: torch.Tensor, rtol: float = 1e-3) -> torch.Tensor:
    """Number of singular values above rtol·σ₁."""
    return (sigma > rtol * sigma[..., :1]).sum(-1).to(sigma.dtype)


def energy_rank(sigma: torch.Tensor, tau: float = 0.9) -> torch.Tensor:
    """Smallest k whose top-k singular values hold a fraction τ of Σσ²."""
    energy = sigma**2
    cumulative = energy.cumsum(-1) / energy.sum(-1, keepdim=True).clamp_min(_TINY)
    return (cumulative < tau - 1e-12).sum(-1).to(sigma.dtype) + 1


# ---- metric sets the recorder applies --------------------------------------------------------------------

CHEAP_METRICS = ("jsd", "entropy", "cosine")
SPECTRAL_METRICS = ("effective_rank", "stable_rank", "numerical_rank", "energy_rank_0.9", "energy_rank_0.99")
ALL_METRICS = CHEAP_METRICS + SPECTRAL_METRICS


def measure(maps: torch.Tensor, metrics: tuple[str, ...] = CHEAP_METRICS, *, numerical_rtol: float = 1e-3,
            svd_dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """The named metrics of a batch of maps (..., N, M), each of shape (...)."""
    unknown = set(metrics) - set(ALL_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {ALL_METRICS}")
    out: dict[str, torch.Tensor] = {}
    if "jsd" in metrics:
        out["jsd"] = jsd_redundancy(maps)
    if "entropy" in metrics:
        out["entropy"] = normalized_entropy(maps)
    if "cosine" in metrics:
        out["cosine"] = mean_cosine(maps)
    if any(m in metrics for m in SPECTRAL_METRICS):
        sigma = singular_values(maps, svd_dtype)
        spectral = {
            "effective_rank": lambda: effective_rank(sigma),
            "stable_rank": lambda: stable_rank(sigma),
            "numerical_rank": lambda: numerical_rank(sigma, numerical_rtol),
            "energy_rank_0.9": lambda: energy_rank(sigma, 0.9),
            "energy_rank_0.99": lambda: energy_rank(sigma, 0.99),
        }
        out.update({name: spectral[name]() for name in metrics if name in spectral})
    return out


def metric_reducer(metrics: tuple[str, ...] = CHEAP_METRICS, **options) -> Callable:
    """A reducer for the recorder: `AttentionMaps` -> {metric: (B, heads)}, on the effective N×N map
    (full attention's map, or the mediator product softmax(q·Tᵀ)·softmax(T·kᵀ))."""

    def reduce(maps) -> dict[str, torch.Tensor]:
        return measure(maps.effective, metrics, **options)

    reduce.metrics = tuple(metrics)  # type: ignore[attr-defined]
    return reduce
