"""Attention modules equal docs/reference.md §6 written out head by head; observed maps are exact and change nothing."""

from __future__ import annotations

import math
import re

import pytest
import torch
from helpers import tiny_inputs, tiny_model

from mediator_models import build_model
from mediator_models.network.attention import AttentionMaps, FullAttention, MediatorAttention


def bilinear_resize_reference(table: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of the last two dims with half-pixel centres (align_corners=False), written out."""
    src = table.shape[-1]
    scale = src / size
    coords = [max((i + 0.5) * scale - 0.5, 0.0) for i in range(size)]
    lo = [min(int(math.floor(c)), src - 1) for c in coords]
    hi = [min(low + 1, src - 1) for low in lo]
    frac = torch.tensor([c - low for c, low in zip(coords, lo)], dtype=table.dtype)
    rows = table[..., lo, :] * (1 - frac)[:, None] + table[..., hi, :] * frac[:, None]
    return rows[..., lo] * (1 - frac) + rows[..., hi] * frac


def depthwise3x3_reference(image: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise 3×3 convolution with zero padding as a sum of nine shifted copies. image (B, C, H, W)."""
    padded = torch.nn.functional.pad(image, (1, 1, 1, 1))
    h, w = image.shape[-2:]
    out = bias[None, :, None, None].expand_as(image).clone()
    for dy in range(3):
        for dx in range(3):
            out = out + weight[None, :, 0, dy, dx, None, None] * padded[:, :, dy : dy + h, dx : dx + w]
    return out


def mediator_attention_reference(module: MediatorAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/reference.md §6 step by step, one head at a time. Returns the output and the N×N product map."""
    b, n_tok, c = x.shape
    g, heads, n = module.grid_size, module.num_heads, module.mediators
    d, side = c // heads, math.isqrt(n)
    qkv = x @ module.qkv.weight.T + module.qkv.bias
    q, k, v = qkv[..., :c], qkv[..., c : 2 * c], qkv[..., 2 * c :]
    cell = g // side  # adaptive pooling on an evenly divisible grid = mean over cell×cell blocks
    mediators = q.reshape(b, side, cell, side, cell, c).mean(dim=(2, 4)).reshape(b, n, c)
    an = bilinear_resize_reference(module.an_bias, g)  # (heads, n, g, g)
    na = bilinear_resize_reference(module.na_bias, g)
    out = torch.zeros(b, n_tok, c)
    product = torch.zeros(b, heads, n_tok, n_tok)
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        q_h, k_h, v_h, t_h = q[..., cols], k[..., cols], v[..., cols], mediators[..., cols]
        bias_tk = an[h] + module.ah_bias[0, h] + module.aw_bias[0, h]  # (n, g, g)
        bias_qt = na[h].permute(1, 2, 0) + module.ha_bias[0, h] + module.wa_bias[0, h]  # (g, g, n)
        gather = torch.softmax(t_h @ k_h.transpose(1, 2) / math.sqrt(d) + bias_tk.reshape(n, n_tok), dim=-1)
        read = torch.softmax(q_h @ t_h.transpose(1, 2) / math.sqrt(d) + bias_qt.reshape(n_tok, n), dim=-1)
        out[..., cols] = read @ (gather @ v_h)
        product[:, h] = read @ gather
    v_image = v.transpose(1, 2).reshape(b, c, g, g)
    local = depthwise3x3_reference(v_image, module.dwc.weight, module.dwc.bias).reshape(b, c, n_tok).transpose(1, 2)
    return (out + local) @ module.proj.weight.T + module.proj.bias, product


def full_attention_reference(module: FullAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, n_tok, c = x.shape
    heads = module.num_heads
    d = c // heads
    qkv = x @ module.qkv.weight.T + module.qkv.bias
    out = torch.zeros_like(x)
    maps = torch.zeros(b, heads, n_tok, n_tok)
    for h in range(heads):
        q, k, v = (qkv[..., i * c + h * d : i * c + (h + 1) * d] for i in range(3))
        maps[:, h] = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
        out[..., h * d : (h + 1) * d] = maps[:, h] @ v
    return out @ module.proj.weight.T + module.proj.bias, maps


def observe(module):
    seen: list[AttentionMaps] = []
    module.map_observer = seen.append
    return seen


def randomise_biases(module: MediatorAttention) -> None:
    with torch.no_grad():
        for name in ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias"):
            getattr(module, name).normal_(0, 1.0)  # large enough that a wrong layout changes the output


def test_full_attention_output_and_observed_map_equal_the_reference():
    module = FullAttention(32, 4)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        fused = module(x)
        seen = observe(module)
        observed = module(x)
        reference, reference_maps = full_attention_reference(module, x)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(observed, fused, atol=0, rtol=0)  # observing never changes the output
    (maps,) = seen
    assert maps.kind == "full" and maps.full.shape == (2, 4, 16, 16)
    torch.testing.assert_close(maps.full, reference_maps, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps.full.sum(-1), torch.ones(2, 4, 16))


@pytest.mark.parametrize("grid,mediators", [(4, 4), (4, 16), (8, 4), (8, 16), (6, 9)])
def test_mediator_attention_equals_the_reference_formulas(grid, mediators):
    module = MediatorAttention(48, 3, grid, mediators)
    randomise_biases(module)
    x = torch.randn(2, grid * grid, 48)
    with torch.no_grad():
        reference, product = mediator_attention_reference(module, x)
        fused = module(x)
        seen = observe(module)
        observed = module(x)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(observed, fused, atol=0, rtol=0)
    torch.testing.assert_close(seen[0].effective, product, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mediators", [1, 4, 16])
def test_mediator_product_map_is_stochastic_with_rank_at_most_n(mediators):
    module = MediatorAttention(64, 4, 8, mediators)
    randomise_biases(module)
    seen = observe(module)
    with torch.no_grad():
        module(torch.randn(2, 64, 64))
    maps = seen[0]
    assert maps.query_to_mediator.shape == (2, 4, 64, mediators)
    assert maps.mediator_to_key.shape == (2, 4, mediators, 64)
    effective = maps.query_to_mediator.double() @ maps.mediator_to_key.double()
    torch.testing.assert_close(effective.sum(-1), torch.ones(2, 4, 64, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (effective >= 0).all()
    ranks = torch.linalg.matrix_rank(effective, rtol=1e-6)
    assert ranks.max() <= mediators
    assert ranks.min() == mediators  # generic maps reach the bound


@pytest.mark.parametrize("attention,mediators", [("full", None), ("mediator", 4)])
def test_observing_maps_leaves_the_model_output_unchanged(attention, mediators):
    model = tiny_model(attention=attention, mediators=mediators)
    x, t, y = tiny_inputs(model)
    with torch.no_grad():
        fused = model(x, t, y)
        seen = [observe(m) for m in model.attention_modules()]
        observed = model(x, t, y)
    torch.testing.assert_close(observed, fused, atol=0, rtol=0)
    assert [len(s) for s in seen] == [1, 1, 1, 1]  # one map per layer per forward


def test_mediator_attention_refuses_a_grid_it_was_not_built_for():
    module = MediatorAttention(32, 4, 4, 4)
    with pytest.raises(ValueError, match="built for a 4×4 grid"):
        module(torch.randn(1, 25, 32))


def test_cached_position_biases_follow_parameter_updates_and_training_gets_gradients():
    module = MediatorAttention(32, 4, 4, 4)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        module(x)  # fills the cache
        module.an_bias.add_(1.0)
        module.load_state_dict({**module.state_dict(), "wa_bias": torch.randn_like(module.wa_bias)})
        cached = module(x)
        reference, _ = mediator_attention_reference(module, x)
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=1e-5)
    module(x).square().sum().backward()
    for name in ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias"):
        assert getattr(module, name).grad.abs().sum() > 0, name


# ---- the ablations that isolate the mediators from the depthwise conv ---------------------------------------


def test_ablations_compute_what_their_names_say():
    from mediator_models.network.attention import ConvMixing, FullAttention, MediatorAttention, depthwise_conv_on_values

    torch.manual_seed(0)
    x = torch.randn(2, 16, 32)
    mediated = MediatorAttention(32, 4, grid_size=4, mediators=4)
    bare = MediatorAttention(32, 4, grid_size=4, mediators=4, depthwise_conv=False)
    bare.load_state_dict({k: v for k, v in mediated.state_dict().items() if not k.startswith("dwc.")})
    assert not hasattr(bare, "dwc")
    with torch.no_grad():
        mediated.dwc.weight.zero_()
        mediated.dwc.bias.zero_()
        torch.testing.assert_close(bare(x), mediated(x))  # without the conv = with a conv that adds nothing
    full = FullAttention(32, 4)
    with_conv = FullAttention(32, 4, grid_size=4)
    with_conv.load_state_dict(
        {**full.state_dict(), **{k: v for k, v in with_conv.state_dict().items() if k.startswith("dwc.")}}
    )
    with torch.no_grad():
        v = with_conv.qkv(x)[..., 64:]
        expected = with_conv.proj(full_attention_core(full, x) + depthwise_conv_on_values(with_conv.dwc, v, 4))
        torch.testing.assert_close(with_conv(x), expected, atol=1e-6, rtol=1e-5)
    conv = ConvMixing(32, grid_size=4)
    with torch.no_grad():
        manual = conv.dwc(conv.v(x).reshape(2, 4, 4, 32).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(2, 16, 32)
        torch.testing.assert_close(conv(x), conv.proj(manual))


def full_attention_core(module, x):
    """softmax(q·kᵀ/√d)·v with heads merged, written out."""
    b, n, c = x.shape
    q, k, v = module.qkv(x).reshape(b, n, 3, module.num_heads, c // module.num_heads).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-1, -2) / (c // module.num_heads) ** 0.5).softmax(-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, c)


@pytest.mark.parametrize(
    "attention,mediators,conv,label",
    [
        ("full", None, True, "full + conv"),
        ("mediator", 4, False, "mediator n=4, no conv"),
        ("conv", None, None, "conv only"),
    ],
)
def test_ablation_models_build_train_and_reload_strictly(tmp_path, attention, mediators, conv, label):
    from mediator_models import load_checkpoint
    from mediator_models.storage.checkpoints import CheckpointMismatchError

    model = build_model("SiT-T/2", input_size=8, attention=attention, mediators=mediators, depthwise_conv=conv)
    assert model.config.label == f"SiT-T/2 ({label}) @8"
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    model(x, t, y).square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "pos_embed" not in n)
    twin = build_model("SiT-T/2", input_size=8, attention=attention, mediators=mediators, depthwise_conv=conv)
    load_checkpoint(twin, model.state_dict())
    with pytest.raises(CheckpointMismatchError, match="attention: checkpoint has " + re.escape(label)):
        load_checkpoint(build_model("SiT-T/2", input_size=8), model.state_dict())


def test_a_conv_only_block_without_its_conv_and_recording_it_are_refused():
    from analysis.metrics import metric_reducer
    from mediator_models.recording.recorder import record_attention

    with pytest.raises(ValueError, match="without it the block mixes no tokens"):
        build_model("SiT-T/2", input_size=8, attention="conv", depthwise_conv=False)
    with pytest.raises(ValueError, match="no attention maps to record"):
        with record_attention(build_model("SiT-T/2", input_size=8, attention="conv"), metric_reducer()):
            pass


@pytest.mark.parametrize("grid, side", [(8, 2), (16, 4), (10, 4), (7, 3), (14, 8)])
def test_pooling_queries_is_adaptive_average_pooling_on_even_and_uneven_grids(grid, side):
    from mediator_models.network.attention import pool_tokens

    tokens = torch.randn(2, 3, grid * grid, 5)  # (batch, heads, N, d), as the premise measures pool them
    image = tokens.reshape(6, grid, grid, 5).permute(0, 3, 1, 2)
    expected = torch.nn.functional.adaptive_avg_pool2d(image, side).flatten(2).transpose(1, 2).reshape(2, 3, -1, 5)
    torch.testing.assert_close(pool_tokens(tokens, grid, side), expected, rtol=1e-6, atol=1e-6)
