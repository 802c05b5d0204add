"""Redundancy measures of attention maps: pure functions from maps to numbers.

Every function takes row-stochastic maps P of shape (..., N, M) (row i is query i's distribution over keys;
M = N for full attention and for the mediator product map) and returns one number per map, shape (...).
Singular values are computed in float64 (or float32 when asked), never in half precision.

- `jsd_redundancy`: the paper's score (docs/reference.md §8), mean Jensen–Shannon divergence between the rows,
  in bits: 0 when every query attends alike (redundant), 1 when their supports are disjoint.
- `normalized_entropy`: mean over queries of H(P_i) / log M: 1 = uniform attention, 0 = one key.
- `effective_rank`: exp(H(σ/Σσ)) (Roy & Vetterli 2007).
- `stable_rank`: Σσ² / σ₁².
- `numerical_rank`: #{σ_i > rtol·σ₁}.
- `energy_rank`: smallest k with Σ_{i≤k} σ_i² ≥ τ·Σσ².
- `mean_cosine`: mean cosine similarity between distinct query rows.

What kind of redundancy a map holds (ATLAS_METRICS; named with their parameter, e.g. `local_mass_r1`):
- `local_mass` (`local_mass_rR`): mean over queries of the mass within Chebyshev distance R on the token grid,
  the (2R+1)×(2R+1) window around the query: how much a window attention keeps (DiTFastAttn, arXiv 2406.08552).
- `sink_mass` (`sink_mass_K`): the share of all mass on the K keys of most mean mass over queries ("attention
  sinks", Xiao et al., arXiv 2309.17453); `jsd_nosink_K`, `entropy_nosink_K`: JSD and entropy of the maps
  with those keys removed and the rows renormalised (`without_sinks`), entropy normalised by log(M − K).
- `null_maps` (`jsd_null`, `cosine_null`): the measure on the map with each row's entries permuted at random,
  same row entropies, random key positions; a baseline of ours. JSD well below its null means queries attend
  alike; JSD low and near its null means rows are flat, not alike.

The premise of sizing mediators from redundancy, measured on the layer's output rather than its map
(`recovery_errors`): how much of A·V a map of rank n keeps, as ‖(A − Â)·V‖_F / ‖A·V‖_F for Â the best rank-n
approximation of A (truncated SVD), and for Â the mediator form built from the layer's own queries and keys
(queries pooled to n mediators, no position biases: our construction, not a trained mediator layer). Beside them,
the bound (`bound_recovery_errors`): ‖A·V − [A·V]_n‖_F / ‖A·V‖_F for [A·V]_n the best rank-n approximation of the
N×d output itself, the least error any rank-n map can reach. The truncated SVD of A is best for A, not for A·V, so
the bound lies at or below the rank measure; it is 0 once n ≥ d (the head dimension), where a rank-n measure says
nothing about the output. The mediator form adds constraints beyond rank n: both factors row-stochastic, the n
mediators pooled from the layer's own queries.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Callable

import torch

_TINY = 1e-30


def _entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats, with 0·log 0 = 0 (the logs computed in place: one temporary, not three)."""
    terms = p.clamp_min(torch.finfo(p.dtype).tiny).log_().mul_(p)
    return -terms.sum(dim)


@functools.lru_cache(maxsize=32)
def _pair_indices_cpu(n: int, max_pairs: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    total = n * (n - 1) // 2
    if max_pairs is None or total <= max_pairs:
        i, j = torch.triu_indices(n, n, offset=1)
        return i, j
    generator = torch.Generator().manual_seed(0)
    i = torch.randint(0, n, (max_pairs,), generator=generator)
    offset = torch.randint(1, n, (max_pairs,), generator=generator)  # j ≠ i, uniform over the others
    return i, (i + offset) % n


def _pair_selector(i: torch.Tensor, j: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """(pairs, N) 0/1 matrix whose row k adds rows i_k and j_k: S @ P gives every pair sum in one matmul."""
    selector = torch.zeros(len(i), n, dtype=dtype, device=i.device)
    rows = torch.arange(len(i), device=i.device)
    selector[rows, i] += 1
    selector[rows, j] += 1
    return selector


def _pair_indices(n: int, max_pairs: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """All unordered pairs i < j, or `max_pairs` of them drawn uniformly (fixed seed) when there are more."""
    i, j = _pair_indices_cpu(n, max_pairs)
    return i.to(device), j.to(device)


def jsd_redundancy(
    maps: torch.Tensor,
    max_pairs: int | None = 8192,
    chunk_elements: int = 2**19,
    row_entropy: torch.Tensor | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Mean JSD(P_i ‖ P_j) over unordered pairs of rows, in bits. maps (..., N, M) -> (...).

    JSD(p, q) = H((p + q)/2) − (H(p) + H(q))/2. Pairs are processed in chunks of about `chunk_elements`
    values, so memory stays bounded instead of growing as N²·M (2¹⁹ values, 2 MB: small enough to stay in cache,
    three times faster than 64 MB chunks on this CPU). Above `max_pairs` pairs the mean is estimated
    from `max_pairs` pairs drawn uniformly and independently for every map (an unbiased estimate whose errors
    average out over maps, also on structured maps; fixed pairs shared by all maps would not). The draw is
    seeded by `seed`, or by each map's own contents, so a measurement is reproducible and a map's estimate does
    not depend on the maps measured beside it (the recorder reduces large layers a few maps at a time). All pairs for N ≤ 64 at the
    recorder's 2048. Computed in the maps' precision (float32 at least), averaged in float64. `row_entropy`
    (the rows' entropies in nats, (..., N)) may be passed when already computed.
    """
    p = _working_precision(maps)
    n = p.shape[-2]
    if n < 2:
        return torch.zeros(p.shape[:-2], dtype=torch.float64, device=p.device)
    if row_entropy is None:
        row_entropy = _entropy(p)  # (..., N)
    if max_pairs is not None and n * (n - 1) // 2 > max_pairs:
        return _sampled_jsd(p, row_entropy, max_pairs, chunk_elements, seed)
    first, second = _pair_indices(n, None, p.device)
    total = torch.zeros(p.shape[:-2], dtype=torch.float64, device=p.device)
    chunk = max(1, chunk_elements // max(1, p[..., 0, :].numel()))
    for start in range(0, len(first), chunk):
        i, j = first[start : start + chunk], second[start : start + chunk]
        # With s = p_i + p_j (which sums to 2): H(s/2) = H(s)/2 + log 2, saving a pass over the pairs.
        # The pair sums come from one matmul with the 0/1 selector (exact, and faster than gathering rows).
        pair_sum = _pair_selector(i, j, n, p.dtype) @ p
        mean_row_entropy = row_entropy.index_select(-1, i) + row_entropy.index_select(-1, j)
        jsd = 0.5 * (_entropy(pair_sum) - mean_row_entropy) + math.log(2.0)
        total += jsd.clamp_min(0).double().sum(-1)
    return total / len(first) / math.log(2.0)


def _content_seeds(flat: torch.Tensor) -> list[int]:
    """One reproducible seed per map (G, N, M) from a few of its values: the same map gives the same pairs,
    however the maps are grouped into batches (one transfer to the host for all of them)."""
    values = flat.reshape(len(flat), -1)
    probes = values[:, :: max(1, values.shape[1] // 97)].double().sum(-1)
    return [int(abs(probe) * 1e9) % (2**62) for probe in probes.tolist()]


def _sampled_jsd(
    p: torch.Tensor, row_entropy: torch.Tensor, pairs: int, chunk_elements: int, seed: int | None
) -> torch.Tensor:
    """The mean JSD over `pairs` pairs drawn independently for each map."""
    lead, (n, m) = p.shape[:-2], p.shape[-2:]
    flat, entropy = p.reshape(-1, n, m), row_entropy.reshape(-1, n)
    groups = len(flat)
    if seed is None:  # each map's pairs from its own contents, so a map's estimate never depends on its batch
        draws = [_pairs(n, pairs, torch.Generator().manual_seed(s), 1) for s in _content_seeds(flat)]
        first, second = torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])
    else:
        first, second = _pairs(n, pairs, torch.Generator().manual_seed(seed), groups)
    # Rows of all maps stacked (groups·N, M), a pair's two rows picked by index_select (three times faster on this
    # CPU than advanced indexing), `chunk_elements` / 4 values at a time (the gathered rows stay in cache); the pairs'
    # H(p_i + p_j) land in one buffer, group after group.
    offsets = (torch.arange(groups) * n)[:, None]
    first, second = (first + offsets).reshape(-1).to(p.device), (second + offsets).reshape(-1).to(p.device)
    stacked, entropy = flat.reshape(groups * n, m), entropy.reshape(-1)
    summed = torch.empty(len(first), dtype=p.dtype, device=p.device)
    chunk = max(1, chunk_elements // 4 // m)
    for start in range(0, len(first), chunk):
        i, j = first[start : start + chunk], second[start : start + chunk]
        summed[start : start + chunk] = _entropy(stacked.index_select(0, i).add_(stacked.index_select(0, j)))
    # With s = p_i + p_j (which sums to 2): H(s/2) = H(s)/2 + log 2.
    jsd = 0.5 * (summed - entropy.index_select(0, first) - entropy.index_select(0, second)) + math.log(2.0)
    total = jsd.view(groups, pairs).clamp_min(0).double().sum(-1)
    return (total / pairs / math.log(2.0)).reshape(lead)


def _pairs(n: int, pairs: int, generator: torch.Generator, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(groups, pairs) indices i and j ≠ i, each uniform over the rows."""
    first = torch.randint(0, n, (groups, pairs), generator=generator)
    return first, (first + torch.randint(1, n, (groups, pairs), generator=generator)) % n


def _working_precision(maps: torch.Tensor) -> torch.Tensor:
    """float32 or float64 as given; half precision is upcast to float32."""
    return maps if maps.dtype in (torch.float32, torch.float64) else maps.float()


def normalized_entropy(maps: torch.Tensor, row_entropy: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over queries of H(P_i) / log M. maps (..., N, M) -> (...). With one key (M = 1) every query
    attends to it alone: entropy 0 (log M = 0 would otherwise give 0/0)."""
    if maps.shape[-1] == 1:
        return torch.zeros(maps.shape[:-2], dtype=torch.float64, device=maps.device)
    if row_entropy is None:
        row_entropy = _entropy(_working_precision(maps))
    return row_entropy.double().mean(-1) / math.log(maps.shape[-1])


def mean_cosine(maps: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over ordered pairs of distinct rows: (‖Σ r̂_i‖² − N) / (N(N − 1)).
    A single query (N = 1) has no pair: 1, the value of queries that all attend alike (as JSD gives 0)."""
    rows = _working_precision(maps)
    n = rows.shape[-2]
    if n < 2:
        return torch.ones(rows.shape[:-2], dtype=torch.float64, device=rows.device)
    unit = rows / rows.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
    summed = unit.sum(-2).double()
    return ((summed * summed).sum(-1) - n) / (n * (n - 1))


def singular_values(maps: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """σ in descending order, computed in float32 or float64 (half precision is refused).

    In float64 they are the square roots of the eigenvalues of the smaller Gram matrix (A·Aᵀ or Aᵀ·A): 1.6× faster
    than the SVD on this CPU, and as good for every spectral measure. Squaring costs precision only below
    √(N·ε₆₄)·σ₁ (2.4·10⁻⁷ σ₁ at 256 tokens), far under the numerical rank's 10⁻³ σ₁ and too small to move the
    effective rank (errors against the SVD on a trained model's maps: benchmarks/RESULTS.md, sketch_accuracy).
    In float32 that floor would be 10⁻³ σ₁ itself, so float32 takes the SVD."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError("singular values are computed in float32 or float64, never in half precision")
    if dtype == torch.float32:
        return torch.linalg.svdvals(maps.to(dtype))
    return gram_singular_values(maps)


def gram_singular_values(maps: torch.Tensor) -> torch.Tensor:
    """σ in descending order from the float64 eigenvalues of the smaller Gram matrix (see singular_values)."""
    a = maps.double()
    gram = a @ a.transpose(-2, -1) if a.shape[-2] <= a.shape[-1] else a.transpose(-2, -1) @ a
    return _singular_from_eigenvalues(torch.linalg.eigvalsh(gram).flip(-1), gram.shape[-1])


def gram_decomposition(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ descending, Wᵀ) of maps (..., N, M) = U·S·Wᵀ from the float64 eigenvectors of Aᵀ·A: what the premise's
    rank measure needs with the spectral measures, twice as fast as the SVD on this CPU. On softmax maps of 256
    tokens its recovery errors equal the SVD's to 4·10⁻¹³ (tests/test_metrics.py)."""
    a = maps.double()
    gram = a.transpose(-2, -1) @ a
    eigenvalues, vectors = torch.linalg.eigh(gram)
    sigma = _singular_from_eigenvalues(eigenvalues.flip(-1), gram.shape[-1])
    return sigma, vectors.flip(-1).transpose(-2, -1)


def _singular_from_eigenvalues(eigenvalues: torch.Tensor, size: int) -> torch.Tensor:
    """√λ of a Gram matrix's descending eigenvalues. Below n·ε·λ₁ an eigenvalue is rounding noise around its true
    value (zero for a map of lower rank): read as 0, not as a σ of about √(n·ε)·σ₁, which would give an exactly
    low-rank map a tail."""
    floor = eigenvalues[..., :1] * (size * torch.finfo(torch.float64).eps)
    return torch.where(eigenvalues > floor, eigenvalues, torch.zeros_like(eigenvalues)).sqrt()


def effective_rank(sigma: torch.Tensor) -> torch.Tensor:
    """exp of the entropy of the normalised singular values; from σ (..., K) -> (...). A zero map has rank 0."""
    total = sigma.sum(-1, keepdim=True)
    weights = sigma / total.clamp_min(_TINY)
    return torch.where(total[..., 0] > 0, torch.exp(_entropy(weights)), torch.zeros_like(total[..., 0]))


def stable_rank(sigma: torch.Tensor) -> torch.Tensor:
    """Σσ² / σ₁² (0 for a zero map)."""
    return (sigma**2).sum(-1) / (sigma[..., 0] ** 2).clamp_min(_TINY)


def numerical_rank(sigma: torch.Tensor, rtol: float = 1e-3) -> torch.Tensor:
    """Number of singular values above rtol·σ₁."""
    return (sigma > rtol * sigma[..., :1]).sum(-1).to(sigma.dtype)


def energy_rank(sigma: torch.Tensor, tau: float = 0.9) -> torch.Tensor:
    """Smallest k whose top-k singular values hold a fraction τ of Σσ² (0 for a zero map, which holds none)."""
    energy = sigma**2
    total = energy.sum(-1, keepdim=True)
    cumulative = energy.cumsum(-1) / total.clamp_min(_TINY)
    rank = (cumulative < tau - 1e-12).sum(-1).to(sigma.dtype) + 1
    return torch.where(total[..., 0] > 0, rank, torch.zeros_like(rank))


# ---- what kind of redundancy: locality, sinks, and a null baseline -------------------------------------


def local_mass(maps: torch.Tensor, radius: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Mean over queries of the mass on keys within Chebyshev distance `radius` of the query, queries and keys
    on one token grid in row-major (patch) order: the (2r+1)×(2r+1) window, clipped at the borders. maps
    (..., N, N) -> (...). `grid` is (height, width); by default the square grid of N = g² tokens."""
    if radius < 0:
        raise ValueError(f"local mass takes a radius of 0 or more on the token grid, got {radius}")
    queries, keys = maps.shape[-2:]
    height, width = grid if grid is not None else (math.isqrt(queries),) * 2
    if queries != keys or height * width != queries:
        raise ValueError(
            f"local mass needs queries and keys on one {'given' if grid else 'square'} token grid "
            f"(N = M = {'height·width' if grid else 'g²'}); got {queries} queries and {keys} keys"
        )
    p = _working_precision(maps)
    index = torch.arange(queries, device=p.device)
    rows, columns = index // width, index % width
    distance = torch.maximum((rows[:, None] - rows).abs(), (columns[:, None] - columns).abs())  # (N, N)
    return (p * (distance <= radius).to(p.dtype)).sum(-1).double().mean(-1)


def _key_mass(p: torch.Tensor) -> torch.Tensor:
    """Each key's mean mass over the queries (..., M), in float64 so that sink ranking and share agree."""
    return p.double().mean(-2)


def sink_mass(maps: torch.Tensor, count: int) -> torch.Tensor:
    """The share of all mass on the `count` keys of most mean mass over queries (the sinks). maps (..., N, M)
    -> (...): 1 when `count` keys take everything, count/M for uniform attention."""
    key_mass = _key_mass(_working_precision(maps))
    return key_mass.topk(min(count, key_mass.shape[-1]), dim=-1).values.sum(-1)


def without_sinks(maps: torch.Tensor, count: int) -> torch.Tensor:
    """The maps without their `count` sink keys (those of `sink_mass`; ties go to the lower key index), rows
    renormalised: (..., N, M) -> (..., N, M − count), keys in their order. A row that held nothing off the
    sinks (only in constructed maps: softmax rows hold no zeros) becomes uniform over the keys left."""
    p = _working_precision(maps)
    keys = p.shape[-1]
    if not 0 <= count < keys:
        raise ValueError(
            f"removing {count} sink keys from maps of {keys} keys leaves none to measure: name 0 to {keys - 1} sinks"
        )
    ranked = torch.sort(_key_mass(p), dim=-1, descending=True, stable=True).indices
    kept = ranked[..., count:].sort(-1).values
    rest = p.gather(-1, kept.unsqueeze(-2).expand(*p.shape[:-1], keys - count))
    total = rest.sum(-1, keepdim=True)
    return torch.where(total > 0, rest / total.clamp_min(torch.finfo(p.dtype).tiny), 1.0 / (keys - count))


def null_maps(maps: torch.Tensor, seed: int | None = None) -> torch.Tensor:
    """The maps with each row's entries permuted at random: the same values in every row, so the same row
    entropies, at random key positions. (..., N, M) -> (..., N, M). Drawn on the CPU (the same maps on any
    device), seeded by `seed`, or by each map's own contents as the JSD's pairs are, so a map's null does not
    depend on the maps measured beside it. Costs a sort of every row, O(N·M log M)."""
    p = _working_precision(maps)
    queries, keys = p.shape[-2:]
    flat = p.reshape(-1, queries, keys)
    if seed is None:
        draws = [torch.rand(queries, keys, generator=torch.Generator().manual_seed(s)) for s in _content_seeds(flat)]
        order = torch.stack(draws).argsort(-1)
    else:
        order = torch.rand(flat.shape, generator=torch.Generator().manual_seed(seed)).argsort(-1)
    return flat.gather(-1, order.to(p.device)).reshape(p.shape)


# ---- spectra at scale: a randomized sketch of the top of the spectrum -----------------------------------------

# Above this many query rows the spectral measures come from `completed_spectrum` instead of a full SVD (one of
# 4096×4096 in float64 takes about a minute on this CPU); at or below it, tables are exact as before.
SKETCH_ABOVE_TOKENS = 2048
SKETCH_RANK = 256  # singular values the sketch resolves


def sketched_spectrum(
    maps: torch.Tensor, rank: int = SKETCH_RANK, oversample: int = 16, power_iterations: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the top `rank` singular values (..., rank), the squared Frobenius norm (...)) of maps (..., N, M), by the
    randomized range finder with power iterations (Halko, Martinsson & Tropp 2011, Alg. 4.4).

    The top values are estimated from below (the sketch's subspace holds at most the true energy); the total
    ‖A‖_F² is exact, so what the top values leave, ‖A‖_F² − Σσ̂², is the tail's energy (an upper bound).
    The range finder runs in the maps' precision, float32 at least (the recorder's maps are float32: 2.3× faster
    than float64 on two maps of 4096 tokens, the values within 4·10⁻⁹ σ₁ of float64's; on a trained model's maps
    every measure's error equals float64's, benchmarks/RESULTS.md sketch_accuracy); the last projection, its SVD
    and the norm are float64."""
    work = torch.float64 if maps.dtype == torch.float64 else torch.float32
    a = maps.to(work)
    width = min(rank + oversample, *a.shape[-2:])
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(a.shape[-1], width, generator=generator, dtype=torch.float64).to(a.device, work)
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(power_iterations):
        basis = torch.linalg.qr(a.transpose(-2, -1) @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    # The last projection in float64 on the re-orthonormalised basis: what the top values leave of ‖A‖_F² is a small
    # difference of large numbers, and float32's basis would move it by more than the tail itself on a spread map.
    exact = a.double()
    if work != torch.float64:
        basis = torch.linalg.qr(basis.double()).Q
    sigma = torch.linalg.svdvals(basis.transpose(-2, -1) @ exact)[..., :rank]
    return sigma, exact.square().sum((-2, -1))


def completed_spectrum(maps: torch.Tensor, rank: int = SKETCH_RANK) -> torch.Tensor:
    """All min(N, M) singular values, estimated: the sketched top `rank`, then a tail decaying geometrically from
    the last sketched value, σ̂_k·r^j, with the ratio r chosen so that the tail holds exactly the energy the top
    values leave (flat at σ̂_k where even that cannot hold it). Every spectral measure is computed from it as from an
    exact spectrum; the errors on trained maps are in benchmarks/RESULTS.md (sketch_accuracy): stable and energy
    ranks below the sketch's rank are reliable, effective and numerical ranks depend on the tail's shape."""
    sigma, total = sketched_spectrum(maps, rank)
    rest = min(maps.shape[-2:]) - sigma.shape[-1]
    if rest <= 0:
        return sigma
    last = sigma[..., -1:]
    tail = (total - sigma.square().sum(-1)).clamp_min(0)[..., None]
    powers = torch.arange(1, rest + 1, dtype=sigma.dtype, device=sigma.device)

    def held(ratio: torch.Tensor) -> torch.Tensor:  # Σ_j (σ̂_k r^j)², increasing in r
        return (last.square() * ratio[..., None].pow(2 * powers)).sum(-1, keepdim=True).squeeze(-1)

    low, high = torch.zeros_like(last[..., 0]), torch.ones_like(last[..., 0])
    for _ in range(40):  # bisection for held(r) = tail energy
        middle = (low + high) / 2
        below = held(middle) < tail[..., 0]
        low, high = torch.where(below, middle, low), torch.where(below, high, middle)
    ratio = (low + high) / 2
    return torch.cat([sigma, last * ratio[..., None].pow(powers)], dim=-1)


# ---- the premise: how much of the output a rank-n map recovers ------------------------------------------


def rank_recovery_errors(
    maps: torch.Tensor, values: torch.Tensor, ranks: tuple[int, ...], decomposition=None
) -> dict[int, torch.Tensor]:
    """{n: ‖(A − A_n)·V‖_F / ‖A·V‖_F} for A_n the truncated SVD of A at rank n. maps (..., N, N), values (..., N, d).

    With A = U·S·Wᵀ, (A − A_n)·V = Σ_{i>n} u_i·s_i·(w_iᵀV) and the u_i are orthonormal, so the error is the norm
    of the rows i > n of S·WᵀV: one decomposition per map serves every n. A rank at or above N recovers A·V exactly (0).
    `decomposition` is (S, Wᵀ) of `maps` in float64 where the caller has it already (the recorder's
    `gram_decomposition`, which serves the spectral measures too); without it, the SVD.
    """
    a, v = maps.double(), values.double()
    s, wh = decomposition if decomposition is not None else torch.linalg.svd(a, full_matrices=False)[1:]
    row_energy = ((s[..., None] * (wh @ v)) ** 2).sum(-1)  # (..., K): ‖s_i·w_iᵀV‖²
    tail = row_energy.flip(-1).cumsum(-1).flip(-1)  # tail[i] = Σ_{j≥i}
    total = (a @ v).square().sum((-2, -1)).clamp_min(_TINY)
    out = {}
    for n in ranks:
        left = tail[..., n] if n < tail.shape[-1] else torch.zeros_like(total)
        out[n] = (left.clamp_min(0) / total).sqrt()
    return out


def bound_recovery_errors(maps: torch.Tensor, values: torch.Tensor, ranks: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """{n: ‖A·V − [A·V]_n‖_F / ‖A·V‖_F}, the least relative error on the output that any map of rank ≤ n can reach
    (Eckart–Young on the N×d matrix A·V; a rank-n map gives an output of rank ≤ n). maps (..., N, N), values
    (..., N, d). One small decomposition (of N×d, not N×N) serves every n; n ≥ d gives 0."""
    sigma = torch.linalg.svdvals(maps.double() @ values.double())
    energy = sigma.square()
    tail = energy.flip(-1).cumsum(-1).flip(-1)  # tail[i] = Σ_{j≥i} σ_j²
    total = tail[..., 0].clamp_min(_TINY)
    out = {}
    for n in ranks:
        left = tail[..., n] if n < tail.shape[-1] else torch.zeros_like(total)
        out[n] = (left.clamp_min(0) / total).sqrt()
    return out


def pooled_recovery_errors(
    maps: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, counts: tuple[int, ...]
) -> dict[int, torch.Tensor]:
    """{n: ‖(A − Â_n)·V‖_F / ‖A·V‖_F} for Â_n = softmax(s·Q·Tᵀ)·softmax(s·T·Kᵀ), T the queries pooled to n
    mediators: the mediator form of this very layer, without training. maps (..., N, N); q, k, v (..., N, d)."""
    from mediator_models.network.attention import pool_tokens

    q, k, v = queries.double(), keys.double(), values.double()
    tokens, scale = q.shape[-2], q.shape[-1] ** -0.5
    exact = maps.double() @ v
    total = exact.square().sum((-2, -1)).clamp_min(_TINY)
    out = {}
    for n in counts:
        side, grid = math.isqrt(n), math.isqrt(tokens)
        if side * side != n or grid * grid != tokens:
            raise ValueError(f"pooling needs square counts: {tokens} tokens to {n} mediators")
        mediators = pool_tokens(q, grid, side)
        through = (scale * q @ mediators.transpose(-2, -1)).softmax(-1) @ (
            (scale * mediators @ k.transpose(-2, -1)).softmax(-1) @ v
        )
        out[n] = ((through - exact).square().sum((-2, -1)) / total).sqrt()
    return out


# ---- metric sets the recorder applies --------------------------------------------------------------------

CHEAP_METRICS = ("jsd", "entropy", "cosine")
SPECTRAL_METRICS = ("effective_rank", "stable_rank", "numerical_rank", "energy_rank_0.9", "energy_rank_0.99")
ALL_METRICS = CHEAP_METRICS + SPECTRAL_METRICS
# What kind of redundancy, named by radius or sink count (local_mass_r1, sink_mass_4, jsd_nosink_1) or fixed.
# Each costs what a cheap measure does (O(N·M) per map, or one more JSD); the nulls add a sort of every row.
_LOCAL = re.compile(r"^local_mass_r(0|[1-9][0-9]*)$")
_SINK = re.compile(r"^(sink_mass|jsd_nosink|entropy_nosink)_([1-9][0-9]*)$")
NULL_METRICS = ("jsd_null", "cosine_null")
ATLAS_METRICS = (
    "local_mass_r1",
    "local_mass_r2",
    "sink_mass_1",
    "sink_mass_4",
    "jsd_nosink_1",
    "entropy_nosink_1",
    *NULL_METRICS,
)
# The premise measures are named by their rank or mediator count: recovery_rank_16, recovery_pooled_16.
_RECOVERY = re.compile(r"^recovery_(rank|pooled|bound)_([1-9][0-9]*)$")
RECOVERY_KINDS = ("rank", "pooled", "bound")


def recovery_metrics(counts) -> tuple[str, ...]:
    """The premise measures for these mediator counts: rank-n truncation and the pooled mediator form (the bound
    on the output, `recovery_bound_N`, is named explicitly)."""
    return tuple(f"recovery_{kind}_{n}" for kind in ("rank", "pooled") for n in counts)


def _is_atlas_metric(name: str) -> bool:
    return bool(_LOCAL.match(name) or _SINK.match(name)) or name in NULL_METRICS


def check_metric_names(metrics) -> None:
    unknown = sorted(m for m in set(metrics) - set(ALL_METRICS) if not (_RECOVERY.match(m) or _is_atlas_metric(m)))
    if unknown or not metrics:
        raise ValueError(
            f"unknown metrics {unknown or '(none named)'}; --metrics takes 'cheap', 'all', 'atlas', 'changes' or "
            f"a comma list of {', '.join(ALL_METRICS)}, recovery_rank_N, recovery_pooled_N, recovery_bound_N, "
            f"local_mass_rR, sink_mass_K, jsd_nosink_K, entropy_nosink_K, {', '.join(NULL_METRICS)}, and the "
            "changes between calls step_* and branch_* (analysis.relations)"
        )


def check_maps(maps: torch.Tensor) -> None:
    """Refuse maps that are not attention maps: NaN or infinite entries (a diverged model), negative entries
    or rows that do not sum to 1. Every measure here assumes row-stochastic maps."""
    if maps.dim() < 2 or maps.shape[-1] < 1 or maps.shape[-2] < 1:
        raise ValueError(f"attention maps have shape (..., queries, keys); got {tuple(maps.shape)}")
    # One pass for the row sums (NaN and infinities reach them) and one for the minimum, read back in one transfer.
    rows = maps.sum(-1).double()  # in the maps' precision: a float64 sum would first copy every map
    finite, least, worst = torch.stack(
        [torch.isfinite(rows).all().double(), maps.amin().double(), (rows - 1).abs().max()]
    ).tolist()
    if not finite:
        bad = (~torch.isfinite(maps)).sum().item()
        raise ValueError(
            f"attention maps hold {bad} NaN or infinite entries (did the model diverge?); refusing to "
            "average them into the statistics"
        )
    if least < 0 or worst > 1e-3:
        raise ValueError(
            f"attention maps must be row-stochastic (non-negative rows summing to 1; the worst row is "
            f"off by {worst:.3g}): pass post-softmax maps"
        )


def measure(
    maps: torch.Tensor,
    metrics: tuple[str, ...] = CHEAP_METRICS,
    *,
    jsd_pairs: int | None = 8192,
    numerical_rtol: float = 1e-3,
    svd_dtype: torch.dtype = torch.float64,
    sigma: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The named metrics of a batch of row-stochastic maps (..., N, M), each of shape (...). `sigma`: the maps'
    singular values in `svd_dtype` where the caller has decomposed them already."""
    check_metric_names(metrics)
    if any(_RECOVERY.match(m) for m in metrics):
        raise ValueError(
            "the recovery measures need the layer's values too: use metric_reducer on AttentionMaps, "
            "or rank_recovery_errors / pooled_recovery_errors directly"
        )
    check_maps(maps)
    out: dict[str, torch.Tensor] = {}
    rows = _entropy(_working_precision(maps)) if {"jsd", "entropy"} & set(metrics) else None
    if "jsd" in metrics:
        out["jsd"] = jsd_redundancy(maps, max_pairs=jsd_pairs, row_entropy=rows)
    if "entropy" in metrics:
        out["entropy"] = normalized_entropy(maps, row_entropy=rows)
    if "cosine" in metrics:
        out["cosine"] = mean_cosine(maps)
    out.update(_atlas_measures(maps, [m for m in metrics if _is_atlas_metric(m)], jsd_pairs))
    if any(m in metrics for m in SPECTRAL_METRICS):
        if sigma is None:
            large = maps.shape[-2] > SKETCH_ABOVE_TOKENS and maps.shape[-1] > SKETCH_ABOVE_TOKENS
            sigma = completed_spectrum(maps) if large else singular_values(maps, svd_dtype)
        spectral = {
            "effective_rank": lambda: effective_rank(sigma),
            "stable_rank": lambda: stable_rank(sigma),
            "numerical_rank": lambda: numerical_rank(sigma, numerical_rtol),
            "energy_rank_0.9": lambda: energy_rank(sigma, 0.9),
            "energy_rank_0.99": lambda: energy_rank(sigma, 0.99),
        }
        out.update({name: spectral[name]() for name in metrics if name in spectral})
    return out


def _atlas_measures(maps: torch.Tensor, names: list[str], jsd_pairs: int | None) -> dict[str, torch.Tensor]:
    """The ATLAS-kind measures named (see ATLAS_METRICS); each map's null, and its maps without K sinks, are
    built once for all the measures on them."""
    out: dict[str, torch.Tensor] = {}
    null = null_maps(maps) if set(names) & set(NULL_METRICS) else None
    rests: dict[int, torch.Tensor] = {}
    for name in names:
        if local := _LOCAL.match(name):
            out[name] = local_mass(maps, int(local.group(1)))
        elif name == "jsd_null":
            out[name] = jsd_redundancy(null, max_pairs=jsd_pairs)
        elif name == "cosine_null":
            out[name] = mean_cosine(null)
        else:
            kind, count = _SINK.match(name).groups()
            if kind == "sink_mass":
                out[name] = sink_mass(maps, int(count))
                continue
            if int(count) not in rests:
                rests[int(count)] = without_sinks(maps, int(count))
            rest = rests[int(count)]
            if kind == "jsd_nosink":
                out[name] = jsd_redundancy(rest, max_pairs=jsd_pairs)
            else:
                out[name] = normalized_entropy(rest)
    return out


RECORDING_JSD_PAIRS = 2048

# Above this many query rows the measures that average over queries (ROW_METRICS) are estimated from
# RECORDING_QUERY_ROWS rows drawn for each map (only those rows of the map are computed); at or below it they read
# every row, as before. Errors on maps of a trained model at 4096 tokens: benchmarks/RESULTS.md (row_accuracy).
SAMPLE_ROWS_ABOVE_TOKENS = 2048
RECORDING_QUERY_ROWS = 512
ROW_METRICS = CHEAP_METRICS


def sampled_query_rows(maps, rows: int) -> torch.Tensor:
    """(B, heads, R) query positions, `rows` distinct ones drawn uniformly for each map of an `AttentionMaps`,
    seeded by each map's own queries (or rows), so a map's draw never depends on the maps reduced beside it."""
    source = maps.row_source()
    batch, heads, n = source.shape[:3]
    seeds = _content_seeds(source.reshape(batch * heads, n, -1))
    index = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(s))[:rows] for s in seeds])
    return index.sort(-1).values.reshape(batch, heads, -1).to(source.device)


def metric_reducer(
    metrics: tuple[str, ...] = CHEAP_METRICS,
    *,
    jsd_pairs: int | None = RECORDING_JSD_PAIRS,
    query_rows: int | None = RECORDING_QUERY_ROWS,
    **options,
) -> Callable:
    """A reducer for the recorder: `AttentionMaps` -> {metric: (B, heads)}, on the effective N×N map
    (full attention's map, or the mediator product softmax(q·Tᵀ)·softmax(T·kᵀ)).

    The JSD score is the exact all-pairs mean up to 2048 pairs (every map of N ≤ 64 tokens, the embedded
    study). Above, it is estimated from 2048 pairs drawn independently for each map. On the maps of a SiT trained at
    256 tokens (benchmarks/RESULTS.md, jsd_accuracy) the mean over a table row's maps is within 1.1% of the exact
    one; single maps within 2.7% at the 95th percentile (7.4% at worst, on maps of JSD below 0.1 bit). On 32
    synthetic maps of 256 tokens (local windows, blocks, random; tests/test_metrics.py) the mean is within 0.2%.
    Pass `jsd_pairs=None` for the exact mean at any size.

    Above `SAMPLE_ROWS_ABOVE_TOKENS` (2048) query rows, JSD, entropy and cosine come from `query_rows` (512) rows
    drawn for each map, and only those rows are computed: each is an unbiased estimate of the all-rows value
    (a mean over rows, or over pairs of rows, of a uniform random subset), its error on a trained model's maps in
    benchmarks/RESULTS.md (row_accuracy). `query_rows=None` reads every row.
    """

    check_metric_names(metrics)
    on_maps = tuple(m for m in metrics if not _RECOVERY.match(m))
    recovery = [_RECOVERY.match(m).groups() for m in metrics if _RECOVERY.match(m)]
    ranks = tuple(sorted({int(n) for kind, n in recovery if kind == "rank"}))
    pooled = tuple(sorted({int(n) for kind, n in recovery if kind == "pooled"}))
    bounds = tuple(sorted({int(n) for kind, n in recovery if kind == "bound"}))
    # One float64 decomposition per map (the Gram matrix's eigenvectors) serves the premise's rank measure and every
    # spectral measure.
    shared_decomposition = bool(ranks) and any(m in SPECTRAL_METRICS for m in on_maps)
    shared_decomposition = shared_decomposition and options.get("svd_dtype", torch.float64) == torch.float64

    def reduce(maps) -> dict[str, torch.Tensor]:
        decomposition = None
        if shared_decomposition:
            decomposition = gram_decomposition(maps.effective)
        spectra = {"sigma": decomposition[0]} if decomposition is not None else {}
        by_rows = [m for m in on_maps if m in ROW_METRICS]
        if by_rows and query_rows is not None and maps.shape[-2] > max(SAMPLE_ROWS_ABOVE_TOKENS, query_rows):
            rows = maps.effective_rows(sampled_query_rows(maps, query_rows))
            out = measure(rows, tuple(by_rows), jsd_pairs=jsd_pairs, **options)
            rest = tuple(m for m in on_maps if m not in ROW_METRICS)
        else:
            out, rest = {}, on_maps
        if rest:
            out.update(measure(maps.effective, rest, jsd_pairs=jsd_pairs, **options, **spectra))
        if recovery and maps.values is None:
            raise ValueError(
                "the recovery measures need the layer's values; this attention module does not hand them over"
            )
        if ranks:
            errors = rank_recovery_errors(maps.effective, maps.values, ranks, decomposition)
            out.update({f"recovery_rank_{n}": e for n, e in errors.items()})
        if bounds:
            errors = bound_recovery_errors(maps.effective, maps.values, bounds)
            out.update({f"recovery_bound_{n}": e for n, e in errors.items()})
        if pooled:
            if maps.kind != "full":
                raise ValueError(
                    "recovery_pooled_N builds the mediator form of a full-attention layer; record it on a "
                    "full-attention model"
                )
            errors = pooled_recovery_errors(maps.full, maps.queries, maps.keys, maps.values, pooled)
            out.update({f"recovery_pooled_{n}": e for n, e in errors.items()})
        return out

    reduce.metrics = tuple(metrics)  # type: ignore[attr-defined]
    return reduce
