"""Redundancy metrics on maps whose answers are known by hand."""

from __future__ import annotations

import math

import pytest
import torch

from analysis.metrics import (
    ALL_METRICS,
    effective_rank,
    energy_rank,
    jsd_redundancy,
    mean_cosine,
    measure,
    metric_reducer,
    normalized_entropy,
    numerical_rank,
    pooled_recovery_errors,
    rank_recovery_errors,
    recovery_metrics,
    singular_values,
    stable_rank,
)
from mediator_models.network.attention import AttentionMaps

N = 8


def uniform(n=N):
    return torch.full((n, n), 1.0 / n)


def block_diagonal(n=N, blocks=2):
    size = n // blocks
    return torch.block_diag(*[torch.full((size, size), 1.0 / size)] * blocks)


def all_metrics(p):
    """Every metric of one map, in float64 so that hand-derived answers hold to 1e-12."""
    return {k: float(v) for k, v in measure(p.double(), ALL_METRICS, jsd_pairs=None).items()}


def test_uniform_attention_is_fully_redundant():
    m = all_metrics(uniform())
    assert m["jsd"] == pytest.approx(0, abs=1e-12) and m["cosine"] == pytest.approx(1)
    assert m["entropy"] == pytest.approx(1)
    assert m["effective_rank"] == pytest.approx(1, abs=1e-6) and m["stable_rank"] == pytest.approx(1)
    assert m["numerical_rank"] == 1 and m["energy_rank_0.9"] == 1 and m["energy_rank_0.99"] == 1


@pytest.mark.parametrize("make", [lambda: torch.eye(N), lambda: torch.eye(N)[torch.tensor([3, 0, 7, 1, 2, 6, 4, 5])]])
def test_identity_and_permutation_have_no_redundancy(make):
    m = all_metrics(make())
    assert m["jsd"] == pytest.approx(1.0)  # disjoint supports: ln 2 nats = 1 bit
    assert m["entropy"] == pytest.approx(0, abs=1e-12) and m["cosine"] == pytest.approx(0)
    assert m["effective_rank"] == pytest.approx(N) and m["stable_rank"] == pytest.approx(N)
    assert m["numerical_rank"] == N
    assert m["energy_rank_0.9"] == math.ceil(0.9 * N) and m["energy_rank_0.99"] == N


def test_rank_one_map_with_repeated_rows():
    row = torch.tensor([0.5, 0.25, 0.125, 0.125, 0, 0, 0, 0])
    m = all_metrics(row.expand(N, N))
    entropy_bits = 0.5 * 1 + 0.25 * 2 + 2 * 0.125 * 3
    assert m["jsd"] == pytest.approx(0, abs=1e-12) and m["cosine"] == pytest.approx(1)
    assert m["entropy"] == pytest.approx(entropy_bits / 3)  # log2(8) = 3
    assert m["effective_rank"] == pytest.approx(1, abs=1e-6) and m["numerical_rank"] == 1


def test_block_diagonal_by_hand():
    m = all_metrics(block_diagonal())
    assert m["jsd"] == pytest.approx(16 / 28)  # 16 of the 28 pairs cross blocks (1 bit), 12 lie within (0)
    assert m["entropy"] == pytest.approx(math.log(4) / math.log(8))
    assert m["cosine"] == pytest.approx(24 / 56)  # each row has 3 identical rows among its 7 others
    assert m["effective_rank"] == pytest.approx(2) and m["stable_rank"] == pytest.approx(2)
    assert m["numerical_rank"] == 2 and m["energy_rank_0.9"] == 2 and m["energy_rank_0.99"] == 2


def test_metrics_are_batched_over_leading_dimensions():
    maps = torch.stack([torch.stack([uniform(), torch.eye(N)]), torch.stack([block_diagonal(), uniform()])])
    out = measure(maps, ALL_METRICS)
    assert all(v.shape == (2, 2) for v in out.values())
    expected = torch.tensor([[0.0, 1.0], [16 / 28, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(out["jsd"], expected, atol=1e-6, rtol=0)  # float32 maps: float32 arithmetic
    torch.testing.assert_close(measure(maps.double(), ("jsd",))["jsd"], expected, atol=1e-12, rtol=0)


def random_maps(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g) * 3, dim=-1)


def test_jsd_in_chunks_equals_the_direct_pairwise_mean():
    p = random_maps((2, 3, 12, 12)).double()
    direct = torch.zeros(2, 3, dtype=torch.float64)
    pairs = 0
    for i in range(12):
        for j in range(i + 1, 12):
            m = 0.5 * (p[..., i, :] + p[..., j, :])
            h = lambda x: -(x * x.log()).sum(-1)  # noqa: E731
            direct += h(m) - 0.5 * (h(p[..., i, :]) + h(p[..., j, :]))
            pairs += 1
    direct = direct / pairs / math.log(2)
    torch.testing.assert_close(jsd_redundancy(p, chunk_elements=40), direct)
    torch.testing.assert_close(jsd_redundancy(p), direct)


def local_window_maps(count: int, side: int = 16, seed: int = 0) -> torch.Tensor:
    """Maps like trained models make: each query attends to a window around itself, of its own width."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    position = torch.stack([ys.flatten(), xs.flatten()], 1).float()
    distance = ((position[:, None] - position[None]) ** 2).sum(-1)
    maps = []
    for _ in range(count):
        width = 0.5 + 3 * torch.rand(side * side, 1, generator=generator)
        logits = -distance / (2 * width**2) + 0.5 * torch.randn(side * side, side * side, generator=generator)
        maps.append(torch.softmax(logits, -1))
    return torch.stack(maps)


def block_maps(count: int, n: int = 256, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    maps = []
    for _ in range(count):
        blocks = int(torch.randint(2, 9, (1,), generator=generator))
        logits = torch.full((n, n), -8.0)
        size = n // blocks
        for k in range(blocks):
            logits[k * size : (k + 1) * size, k * size : (k + 1) * size] = 0
        maps.append(torch.softmax(logits + torch.randn(n, n, generator=generator), -1))
    return torch.stack(maps)


@pytest.mark.parametrize("make", [local_window_maps, block_maps, lambda count: random_maps((count, 256, 256), seed=2)])
def test_the_recorders_sampled_jsd_is_accurate_on_structured_maps(make):
    """The documented bound of metric_reducer: 2048 pairs drawn per map, 32 maps of 256 tokens."""
    from analysis.metrics import RECORDING_JSD_PAIRS

    maps = make(32)
    exact = jsd_redundancy(maps, max_pairs=None)
    estimate = jsd_redundancy(maps, max_pairs=RECORDING_JSD_PAIRS)
    assert ((estimate - exact).abs() / exact).max() < 0.025  # each map
    assert abs(float(estimate.mean() / exact.mean()) - 1) < 0.005  # the mean over maps: errors do not pile up
    torch.testing.assert_close(jsd_redundancy(maps, max_pairs=RECORDING_JSD_PAIRS), estimate)  # reproducible


def test_the_recorder_measures_jsd_exactly_on_the_embedded_grid():
    from analysis.metrics import RECORDING_JSD_PAIRS

    p = random_maps((4, 64, 64), seed=1)  # 64 tokens: 2016 pairs, all of them
    torch.testing.assert_close(jsd_redundancy(p, max_pairs=RECORDING_JSD_PAIRS), jsd_redundancy(p, max_pairs=None))


def test_rank_functions_on_given_spectra():
    sigma = torch.tensor([4.0, 2.0, 1.0, 0.001], dtype=torch.float64)
    weights = sigma / sigma.sum()
    assert float(effective_rank(sigma)) == pytest.approx(math.exp(-(weights * weights.log()).sum().item()))
    assert float(stable_rank(sigma)) == pytest.approx((16 + 4 + 1 + 1e-6) / 16)
    assert float(numerical_rank(sigma, rtol=1e-3)) == 3 and float(numerical_rank(sigma, rtol=1e-4)) == 4
    assert float(energy_rank(sigma, 0.75)) == 1 and float(energy_rank(sigma, 0.9)) == 2  # 16/21, 20/21
    assert float(energy_rank(sigma, 0.99)) == 3


def test_singular_values_refuse_half_precision_and_accept_half_maps():
    maps = uniform().half()
    with pytest.raises(ValueError, match="never in half precision"):
        singular_values(maps, torch.float16)
    assert singular_values(maps).dtype == torch.float64
    assert singular_values(maps, torch.float32).dtype == torch.float32


def test_entropy_and_cosine_of_rectangular_maps_use_the_key_count():
    p = torch.full((4, 16), 1 / 16)
    assert float(normalized_entropy(p)) == pytest.approx(1.0) and float(mean_cosine(p)) == pytest.approx(1.0)


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="unknown metrics"):
        measure(uniform(), ("jsd", "gini"))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_maps_are_refused_not_averaged_in(value):
    maps = uniform().clone()
    maps[2, 3] = value
    with pytest.raises(ValueError, match="NaN or infinite entries"):
        measure(maps, ALL_METRICS)


def test_maps_that_are_not_row_stochastic_are_refused():
    with pytest.raises(ValueError, match="row-stochastic"):
        measure(torch.zeros(N, N), ALL_METRICS)  # a zero map holds no distribution at all
    with pytest.raises(ValueError, match="row-stochastic"):
        measure(torch.eye(N) * 2)


def test_a_single_query_or_key_has_defined_values():
    one_query = torch.full((1, 4), 0.25)
    values = {k: float(v) for k, v in measure(one_query, ALL_METRICS).items()}
    assert values["jsd"] == 0.0 and values["cosine"] == 1.0  # nothing differs from itself: fully redundant
    assert values["entropy"] == pytest.approx(1.0) and values["energy_rank_0.9"] == 1.0
    one_key = torch.ones(5, 1)
    values = {k: float(v) for k, v in measure(one_key, ALL_METRICS).items()}
    assert values["entropy"] == 0.0 and values["jsd"] == 0.0 and values["cosine"] == pytest.approx(1.0)
    assert all(math.isfinite(v) for v in values.values())


def test_rank_measures_of_a_zero_spectrum_are_zero():
    sigma = torch.zeros(2, 5, dtype=torch.float64)
    for rank in (effective_rank(sigma), stable_rank(sigma), energy_rank(sigma, 0.9), numerical_rank(sigma)):
        assert rank.tolist() == [0.0, 0.0]


# ---- the premise: how much of A·V a rank-n map keeps ---------------------------------------------------------


def maps_of_rank(rank: int, tokens: int = 64, seed: int = 0) -> torch.Tensor:
    """Row-stochastic maps of rank `rank`: P (N×r) · Q (r×N), both row-stochastic (3 maps)."""
    generator = torch.Generator().manual_seed(seed)
    p = torch.rand(3, tokens, rank, generator=generator, dtype=torch.float64).softmax(-1)
    q = torch.rand(3, rank, tokens, generator=generator, dtype=torch.float64) ** 4
    return p @ (q / q.sum(-1, keepdim=True))


def test_rank_recovery_is_exact_from_the_maps_rank_on_and_lossy_below():
    maps = maps_of_rank(6)
    values = torch.randn(3, 64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    errors = rank_recovery_errors(maps, values, (1, 2, 4, 6, 16, 64, 100))
    assert all(float(errors[n].max()) < 1e-10 for n in (6, 16, 64, 100))
    assert all(float(errors[n].min()) > 1e-4 for n in (1, 2, 4))
    assert (errors[1] >= errors[2]).all() and (errors[2] >= errors[4]).all()  # more rank, less lost
    # Equal to truncating the SVD by hand and measuring the output.
    u, s, wh = torch.linalg.svd(maps)
    truncated = (u[..., :2] * s[..., None, :2]) @ wh[..., :2, :]
    by_hand = ((maps - truncated) @ values).norm(dim=(-2, -1)) / (maps @ values).norm(dim=(-2, -1))
    torch.testing.assert_close(errors[2], by_hand)


def test_pooled_mediators_recover_queries_that_are_alike_exactly():
    generator = torch.Generator().manual_seed(2)
    keys = torch.randn(2, 64, 8, generator=generator, dtype=torch.float64)
    values = torch.randn(2, 64, 8, generator=generator, dtype=torch.float64)
    same = torch.randn(2, 1, 8, generator=generator, dtype=torch.float64).expand(2, 64, 8)
    maps = (same @ keys.transpose(-2, -1) / 8**0.5).softmax(-1)
    errors = pooled_recovery_errors(maps, same, keys, values, (4, 16))
    assert float(max(e.max() for e in errors.values())) < 1e-12  # every query reads alike: one mediator suffices
    varied = torch.randn(2, 64, 8, generator=generator, dtype=torch.float64) * 3
    maps = (varied @ keys.transpose(-2, -1) / 8**0.5).softmax(-1)
    errors = pooled_recovery_errors(maps, varied, keys, values, (4, 64))
    assert (errors[4] > 0.05).all() and (errors[64] < errors[4]).all()


def test_the_recorder_reducer_measures_recovery_from_the_layers_values_and_refuses_without_them():
    reducer = metric_reducer(("jsd", *recovery_metrics((4, 16))))
    model_maps = maps_of_rank(4).float()[None]  # (1 batch, 3 heads, N, N)
    values = torch.randn(1, 3, 64, 8)
    queries = keys = torch.randn(1, 3, 64, 8)
    out = reducer(AttentionMaps("full", full=model_maps, values=values, queries=queries, keys=keys))
    assert set(out) == {"jsd", "recovery_rank_4", "recovery_rank_16", "recovery_pooled_4", "recovery_pooled_16"}
    assert float(out["recovery_rank_4"].max()) < 1e-5 and out["recovery_pooled_4"].shape == (1, 3)
    with pytest.raises(ValueError, match="need the layer's values"):
        reducer(AttentionMaps("full", full=model_maps))
    with pytest.raises(ValueError, match="unknown metrics"):
        metric_reducer(("recovery_rank_x",))
    with pytest.raises(ValueError, match="need the layer's values too"):
        measure(model_maps, ("recovery_rank_4",))


def test_full_attention_hands_its_values_queries_and_keys_to_observers():
    from mediator_models.network.attention import FullAttention

    torch.manual_seed(0)
    layer = FullAttention(16, 2)
    seen = []
    layer.map_observer = seen.append
    x = torch.randn(2, 9, 16)
    out = layer(x)
    maps = seen[0]
    assert maps.values.shape == maps.queries.shape == maps.keys.shape == (2, 2, 9, 8)
    torch.testing.assert_close(merge(maps.full @ maps.values) @ layer.proj.weight.T + layer.proj.bias, out)


def merge(x):
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def test_the_bound_is_the_least_output_error_any_rank_n_map_reaches():
    from analysis.metrics import bound_recovery_errors

    generator = torch.Generator().manual_seed(3)
    maps = torch.rand(4, 64, 64, generator=generator, dtype=torch.float64).pow(6)
    maps = maps / maps.sum(-1, keepdim=True)
    values = torch.randn(4, 64, 8, generator=generator, dtype=torch.float64)
    counts = (1, 2, 4, 7, 8, 16)
    bound = bound_recovery_errors(maps, values, counts)
    truncated = rank_recovery_errors(maps, values, counts)
    for n in counts:  # the truncated SVD of A is one rank-n map: it cannot beat the bound
        assert (bound[n] <= truncated[n] + 1e-12).all()
    assert all(float(bound[n].max()) < 1e-10 for n in (8, 16))  # n ≥ d = 8: the output itself has rank ≤ 8
    assert (bound[4] > 1e-3).all() and (bound[1] >= bound[2]).all() and (bound[2] >= bound[4]).all()
    # Equal to the output's own truncated SVD, by hand.
    u, s, vh = torch.linalg.svd(maps @ values, full_matrices=False)
    best = (u[..., :2] * s[..., None, :2]) @ vh[..., :2, :]
    by_hand = (maps @ values - best).norm(dim=(-2, -1)) / (maps @ values).norm(dim=(-2, -1))
    torch.testing.assert_close(bound[2], by_hand)
    # With V = I the output is the map: the bound and the truncated SVD coincide.
    eye = torch.eye(64, dtype=torch.float64).expand(4, 64, 64)
    torch.testing.assert_close(bound_recovery_errors(maps, eye, (4,))[4], rank_recovery_errors(maps, eye, (4,))[4])


def test_one_decomposition_serves_the_spectral_measures_and_the_premise(monkeypatch):
    from analysis.metrics import SPECTRAL_METRICS

    maps = maps_of_rank(5).float()[None]
    values = torch.randn(1, 3, 64, 8, generator=torch.Generator().manual_seed(4))
    shared = metric_reducer((*SPECTRAL_METRICS, "recovery_rank_4", "recovery_bound_4"))
    separate = {
        **measure(maps, SPECTRAL_METRICS),
        **metric_reducer(("recovery_rank_4",))(AttentionMaps("full", full=maps, values=values)),
    }
    out = shared(AttentionMaps("full", full=maps, values=values))
    for name, value in separate.items():
        torch.testing.assert_close(out[name], value, rtol=1e-9, atol=1e-9)
    calls = []
    for name in ("eigh", "svdvals"):
        real = getattr(torch.linalg, name)
        monkeypatch.setattr(
            torch.linalg, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k)
        )
    shared(AttentionMaps("full", full=maps, values=values))
    assert calls == ["eigh", "svdvals"]  # the map's Gram matrix once; the bound decomposes the small N×d output


# ---- what kind of redundancy: locality, sinks, null baselines ------------------------------------------


def atlas(p, names):
    return {k: float(v) for k, v in measure(p.double(), tuple(names), jsd_pairs=None).items()}


@pytest.mark.parametrize("radius", [0, 1, 2, 5])
def test_attention_to_itself_is_wholly_local_at_any_radius(radius):
    from analysis.metrics import local_mass

    assert float(local_mass(torch.eye(16), radius)) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "side, radius, share",
    [
        (4, 0, 1 / 16),
        (4, 1, (10 / 4) ** 2 / 16),  # 3×3 windows clipped at the border: 2, 3, 3, 2 rows (and columns) of 4
        (5, 2, (19 / 5) ** 2 / 25),  # 5×5 windows: 3, 4, 5, 4, 3 rows of 5
        (4, 3, 1.0),
    ],
)
def test_uniform_attention_holds_the_windows_share_of_the_grid(side, radius, share):
    assert atlas(uniform(side * side), [f"local_mass_r{radius}"])[f"local_mass_r{radius}"] == pytest.approx(share)


def test_attention_to_the_far_corner_holds_no_local_mass():
    side = 6
    corners = torch.zeros(side * side, side * side)
    for query in range(side * side):
        row, column = divmod(query, side)
        far = (0 if row >= side / 2 else side - 1) * side + (0 if column >= side / 2 else side - 1)
        corners[query, far] = 1.0  # at Chebyshev distance 3 or more
    out = atlas(corners, ["local_mass_r1", "local_mass_r2"])
    assert out == {"local_mass_r1": 0.0, "local_mass_r2": 0.0}


def test_local_mass_refuses_token_counts_off_a_square_grid_unless_the_grid_is_given():
    from analysis.metrics import local_mass

    with pytest.raises(ValueError, match="square token grid .* got 8 queries and 8 keys"):
        measure(uniform(8), ("local_mass_r1",))
    with pytest.raises(ValueError, match="got 16 queries and 9 keys"):
        local_mass(torch.full((16, 9), 1 / 9), 1)
    with pytest.raises(ValueError, match="radius of 0 or more"):
        local_mass(torch.eye(16), -1)
    assert float(local_mass(uniform(8), 0, grid=(2, 4))) == pytest.approx(1 / 8)
    # 2×4 grid, 3×3 windows: the 4 queries in the end columns see 2×2 keys, the 4 inner ones 2×3, of 8.
    assert float(local_mass(uniform(8), 1, grid=(2, 4))) == pytest.approx((4 * 4 + 4 * 6) / 8 / 8)


def test_one_key_taking_all_mass_is_the_whole_sink_and_uniform_maps_spread_it():
    sink = torch.zeros(N, N)
    sink[:, 3] = 1.0
    assert atlas(sink, ["sink_mass_1", "sink_mass_4"]) == {"sink_mass_1": 1.0, "sink_mass_4": 1.0}
    spread = atlas(uniform(), ["sink_mass_1", "sink_mass_4"])
    assert spread == pytest.approx({"sink_mass_1": 1 / N, "sink_mass_4": 4 / N})


def test_without_its_sink_a_map_whose_other_mass_is_uniform_has_entropy_one():
    from analysis.metrics import without_sinks

    maps = torch.full((N, N), 0.4 / (N - 1), dtype=torch.float64)
    maps[:, 2] = 0.6
    out = atlas(maps, ["entropy", "sink_mass_1", "entropy_nosink_1", "jsd_nosink_1"])
    assert out["sink_mass_1"] == pytest.approx(0.6) and out["entropy"] < 0.8
    assert out["entropy_nosink_1"] == pytest.approx(1.0) and out["jsd_nosink_1"] == pytest.approx(0, abs=1e-12)
    rest = without_sinks(maps, 1)
    assert rest.shape == (N, N - 1) and torch.allclose(rest, torch.full_like(rest, 1 / (N - 1)))
    # Sinks are ranked by mean mass over queries: the key most queries favour, not one query's peak.
    tilted = torch.eye(N, dtype=torch.float64) * 0.1 + 0.9 * torch.nn.functional.one_hot(torch.tensor(5), N)
    assert without_sinks(tilted, 1)[0].tolist() == [1.0] + [0.0] * (N - 2)  # key 5 gone, query 0 keeps key 0


def test_removing_every_key_as_a_sink_is_refused():
    with pytest.raises(ValueError, match="leaves none to measure: name 0 to 7 sinks"):
        measure(uniform(), ("entropy_nosink_8",))
    assert atlas(uniform(), ["entropy_nosink_7", "jsd_nosink_7"]) == {"entropy_nosink_7": 0.0, "jsd_nosink_7": 0.0}


def test_identical_peaked_rows_are_alike_not_diffuse_by_the_null_baseline():
    row = torch.full((16,), 0.1 / 15, dtype=torch.float64)
    row[0] = 0.9
    out = atlas(row.expand(16, 16), ["jsd", "jsd_null", "cosine", "cosine_null"])
    assert out["jsd"] == pytest.approx(0, abs=1e-12) and out["jsd_null"] > 0.5  # rows coincide; nulls do not
    assert out["cosine"] == pytest.approx(1.0) and out["cosine_null"] < 0.2


def test_uniform_rows_are_diffuse_the_null_baseline_agrees():
    out = atlas(uniform(16), ["jsd", "jsd_null", "cosine", "cosine_null"])
    assert out["jsd"] == pytest.approx(0, abs=1e-12) and out["jsd_null"] == pytest.approx(0, abs=1e-12)
    assert out["cosine"] == pytest.approx(1.0) and out["cosine_null"] == pytest.approx(1.0)


def test_null_maps_keep_every_rows_values_and_are_reproducible_per_map():
    from analysis.metrics import _entropy, null_maps

    maps = random_maps((3, 16, 16)).double()
    null = null_maps(maps)
    assert not torch.equal(null, maps)
    assert torch.equal(null.sort(-1).values, maps.sort(-1).values)  # the same entries in every row, exactly
    torch.testing.assert_close(_entropy(null), _entropy(maps), rtol=0, atol=1e-12)
    assert torch.equal(null_maps(maps), null) and torch.equal(null_maps(maps[1:2])[0], null[1])  # batch-free
    assert torch.equal(null_maps(maps, seed=1), null_maps(maps, seed=1))


def test_the_recorder_reducer_records_the_atlas_measures_per_head():
    from analysis.metrics import ATLAS_METRICS, check_metric_names

    maps = random_maps((2, 3, 16, 16))
    out = metric_reducer(("jsd", *ATLAS_METRICS))(AttentionMaps("full", full=maps))
    assert set(out) == {"jsd", *ATLAS_METRICS} and all(v.shape == (2, 3) for v in out.values())
    torch.testing.assert_close(out["jsd"], measure(maps, ("jsd",), jsd_pairs=2048)["jsd"])
    check_metric_names(("local_mass_r0", "local_mass_r12", "sink_mass_16", "jsd_nosink_2", "entropy_nosink_4"))
    for wrong in ("local_mass_r", "local_mass_r01", "sink_mass_0", "jsd_nosink", "entropy_null"):
        with pytest.raises(ValueError, match="unknown metrics .*local_mass_rR, sink_mass_K"):
            check_metric_names((wrong,))


def test_the_sketched_spectrum_is_exact_on_maps_of_lower_rank_and_close_on_a_decaying_spectrum():
    from analysis.metrics import SPECTRAL_METRICS, completed_spectrum

    low = maps_of_rank(6)  # 3 maps of 64 tokens, rank 6 < the sketch's 16
    exact = torch.linalg.svdvals(low)
    torch.testing.assert_close(completed_spectrum(low, rank=16)[..., :6], exact[..., :6], rtol=1e-9, atol=1e-12)
    for name, value in measure(low, SPECTRAL_METRICS, sigma=completed_spectrum(low, rank=16)).items():
        torch.testing.assert_close(value, measure(low, (name,))[name], rtol=1e-6, atol=1e-6)
    # A softmax of smooth scores: a decaying spectrum the sketch resolves in its top values.
    generator = torch.Generator().manual_seed(5)
    scores = torch.randn(3, 128, 8, generator=generator, dtype=torch.float64) @ torch.randn(
        3, 8, 128, generator=generator, dtype=torch.float64
    )
    maps = scores.softmax(-1)
    sketched = completed_spectrum(maps, rank=32)
    assert sketched.shape == (3, 128)
    torch.testing.assert_close(sketched.square().sum(-1), maps.square().sum((-2, -1)))  # the energy is exact
    torch.testing.assert_close(sketched[..., :8], torch.linalg.svdvals(maps)[..., :8], rtol=1e-6, atol=1e-9)
    ranks = measure(maps, ("energy_rank_0.9", "stable_rank"), sigma=sketched)
    exact_ranks = measure(maps, ("energy_rank_0.9", "stable_rank"))
    torch.testing.assert_close(ranks["stable_rank"], exact_ranks["stable_rank"], rtol=1e-6, atol=0)
    assert (ranks["energy_rank_0.9"] == exact_ranks["energy_rank_0.9"]).all()


def test_maps_above_the_threshold_are_measured_from_the_sketch(monkeypatch):
    from analysis import metrics

    monkeypatch.setattr(metrics, "SKETCH_ABOVE_TOKENS", 32)
    called = []
    real = metrics.completed_spectrum
    monkeypatch.setattr(metrics, "completed_spectrum", lambda maps, *a: called.append(maps.shape) or real(maps, 16))
    out = measure(maps_of_rank(4), ("energy_rank_0.9",))
    assert called == [(3, 64, 64)] and (out["energy_rank_0.9"] <= 4).all()


def _structured_queries(batch: int, heads: int, n: int, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys whose maps differ from row to row (local bumps of varied sharpness plus noise)."""
    torch.manual_seed(0)
    position = torch.linspace(-1, 1, n)
    frequencies = torch.arange(1, d // 2 + 1).float()
    features = torch.cat([torch.sin(position[:, None] * frequencies), torch.cos(position[:, None] * frequencies)], -1)
    sharpness = torch.rand(batch, heads, n, 1) * 6
    queries = features * sharpness + 0.5 * torch.randn(batch, heads, n, d)
    keys = features + 0.5 * torch.randn(batch, heads, n, d)
    return queries, keys


def test_above_the_threshold_the_row_measures_come_from_sampled_rows_estimating_the_all_rows_values(monkeypatch):
    from analysis import metrics

    monkeypatch.setattr(metrics, "SAMPLE_ROWS_ABOVE_TOKENS", 64)
    queries, keys = _structured_queries(8, 4, 256)
    lazy = AttentionMaps("full", queries=queries, keys=keys)
    reducer = metric_reducer(("jsd", "entropy", "cosine"), query_rows=64)
    sampled = reducer(lazy)
    assert all(v.shape == (8, 4) for v in sampled.values())
    # The estimate is those rows' measures, the rows computed from the queries alone (no 256×256 map made) ...
    assert lazy._full is None
    index = metrics.sampled_query_rows(lazy, 64)
    assert index.shape == (8, 4, 64) and all(len(set(r.tolist())) == 64 for r in index.flatten(0, 1))
    full = lazy.full
    rows = full.gather(2, index[..., None].expand(-1, -1, -1, 256))
    torch.testing.assert_close(lazy.effective_rows(index), rows)
    by_hand = measure(rows, ("jsd", "entropy", "cosine"), jsd_pairs=metrics.RECORDING_JSD_PAIRS)
    for name, value in by_hand.items():
        torch.testing.assert_close(sampled[name], value)
    # ... reproducible, independent of the maps reduced beside it, and the full map still serves the rest.
    torch.testing.assert_close(reducer(lazy)["entropy"], sampled["entropy"])
    torch.testing.assert_close(reducer(lazy.select(slice(2, 3)))["entropy"], sampled["entropy"][2:3])
    exact = measure(full, ("jsd", "entropy", "cosine", "stable_rank"), jsd_pairs=None)
    beside = metric_reducer(("entropy", "stable_rank"), query_rows=64)(lazy)
    torch.testing.assert_close(beside["stable_rank"], exact["stable_rank"])
    torch.testing.assert_close(beside["entropy"], sampled["entropy"])
    # Unbiased: over the 32 maps the mean error is within 4 standard errors of 0, and within 3% of the value.
    for name in ("jsd", "entropy", "cosine"):
        error = (sampled[name] - exact[name]).flatten()
        assert error.mean().abs() < 4 * error.std() / math.sqrt(len(error)), name
        assert sampled[name].mean().item() == pytest.approx(exact[name].mean().item(), rel=0.03), name
    # query_rows=None, or maps at or below the threshold, read every row as before.
    every_row = metric_reducer(("entropy",), query_rows=None)(lazy)["entropy"]
    torch.testing.assert_close(every_row, exact["entropy"])
    monkeypatch.setattr(metrics, "SAMPLE_ROWS_ABOVE_TOKENS", 256)
    torch.testing.assert_close(metric_reducer(("entropy",), query_rows=64)(lazy)["entropy"], exact["entropy"])


def test_sampled_rows_of_a_mediator_layer_are_rows_of_its_product_map():
    torch.manual_seed(1)
    reads = torch.rand(2, 3, 64, 4).softmax(-1)
    gathers = torch.rand(2, 3, 4, 64).softmax(-1)
    maps = AttentionMaps("mediator", query_to_mediator=reads, mediator_to_key=gathers)
    index = torch.randint(0, 64, (2, 3, 5))
    torch.testing.assert_close(
        maps.effective_rows(index), maps.effective.gather(2, index[..., None].expand(-1, -1, -1, 64))
    )


def test_singular_values_from_the_gram_matrix_equal_the_svds_and_keep_a_low_rank_map_exact():
    """float64 singular_values take the Gram route: equal to the SVD to about √(N·ε)·σ₁, square or rectangular
    (sampled rows), and an exactly rank-5 map keeps its 59 zero values (rounding noise below n·ε·λ₁ is read as 0)."""
    from analysis.metrics import gram_singular_values

    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 3, 256, 256, generator=generator, dtype=torch.float64)
    for maps in ((scores * 3).softmax(-1).float(), (scores * 0.3).softmax(-1), (scores[..., :40, :] * 8).softmax(-1)):
        exact = torch.linalg.svdvals(maps.double())
        route = singular_values(maps)
        assert route.shape == exact.shape and route.dtype == torch.float64
        assert float((route - exact).abs().max()) < 1e-6 * float(exact[..., 0].min())
        assert (route[..., :-1] >= route[..., 1:]).all()  # descending, as the SVD's
    low = maps_of_rank(5)
    sigma = gram_singular_values(low)
    torch.testing.assert_close(sigma[..., :5], torch.linalg.svdvals(low)[..., :5], rtol=1e-9, atol=1e-12)
    assert (sigma[..., 5:] == 0).all()
    assert (numerical_rank(sigma) == 5).all()


def test_the_gram_decomposition_gives_the_svds_recovery_errors_on_softmax_maps():
    from analysis.metrics import gram_decomposition

    generator = torch.Generator().manual_seed(5)
    queries, keys, values = (torch.randn(2, 3, 256, 32, generator=generator) for _ in range(3))
    for temperature in (0.3, 3.0, 10.0):  # diffuse to peaked
        maps = (queries @ keys.transpose(-2, -1) * temperature / 32**0.5).softmax(-1)
        by_svd = rank_recovery_errors(maps, values, (1, 4, 16, 64, 256))
        by_gram = rank_recovery_errors(maps, values, (1, 4, 16, 64, 256), gram_decomposition(maps))
        for n, error in by_svd.items():
            torch.testing.assert_close(by_gram[n], error, rtol=0, atol=1e-12)
        assert float(by_gram[64].min()) > 0.01 and float(by_gram[256].max()) == 0
