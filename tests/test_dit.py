"""The networks: public parameter layout, forward behaviour, guidance, and bad configurations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import tiny_inputs, tiny_model

from mediator_models import build_model, registry_names
from mediator_models.network.config import SIZES
from mediator_models.network.layers import TimestepEmbedder, sincos_pos_embed_2d

# ---- parameter layout, written out from the public DiT / mediator code's module tree (docs/reference.md §1, §6) ----


def expected_state_shapes(depth, d, heads, p, c_in=4, classes=1000, grid=16, learn_sigma=True, mediators=None):
    c_out = 2 * c_in if learn_sigma else c_in
    shapes = {
        "pos_embed": (1, grid * grid, d),
        "x_embedder.proj.weight": (d, c_in, p, p),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (classes + 1, d),
        "final_layer.linear.weight": (p * p * c_out, d),
        "final_layer.linear.bias": (p * p * c_out,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(depth):
        block = {
            "attn.qkv.weight": (3 * d, d),
            "attn.qkv.bias": (3 * d,),
            "attn.proj.weight": (d, d),
            "attn.proj.bias": (d,),
            "mlp.fc1.weight": (4 * d, d),
            "mlp.fc1.bias": (4 * d,),
            "mlp.fc2.weight": (d, 4 * d),
            "mlp.fc2.bias": (d,),
            "adaLN_modulation.1.weight": (6 * d, d),
            "adaLN_modulation.1.bias": (6 * d,),
        }
        if mediators:
            n = mediators
            block.update(
                {
                    "attn.dwc.weight": (d, 1, 3, 3),
                    "attn.dwc.bias": (d,),
                    "attn.an_bias": (heads, n, 7, 7),
                    "attn.na_bias": (heads, n, 7, 7),
                    "attn.ah_bias": (1, heads, n, grid, 1),
                    "attn.aw_bias": (1, heads, n, 1, grid),
                    "attn.ha_bias": (1, heads, grid, 1, n),
                    "attn.wa_bias": (1, heads, 1, grid, n),
                }
            )
        shapes.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return shapes


def state_shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_dit_xl2_has_exactly_the_292_official_keys_and_shapes():
    with torch.device("meta"):
        model = build_model("DiT-XL/2")
    shapes = state_shapes(model)
    assert len(shapes) == 292
    assert shapes == expected_state_shapes(28, 1152, 16, 2)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(675.1e6, rel=1e-3)


@pytest.mark.parametrize("name", registry_names())
def test_every_registry_entry_has_the_public_layout(name):
    size, patch = name.split("-")[1].split("/")
    depth, d, heads = SIZES[size]
    with torch.device("meta"):
        model = build_model(name)
    assert state_shapes(model) == expected_state_shapes(depth, d, heads, int(patch), grid=32 // int(patch))


@pytest.mark.parametrize("mediators", [4, 16, 64])
def test_mediator_sit_s2_has_the_public_mediator_layout(mediators):
    with torch.device("meta"):
        model = build_model("SiT-S/2", attention="mediator", mediators=mediators)
    assert state_shapes(model) == expected_state_shapes(12, 384, 6, 2, mediators=mediators)


@pytest.mark.parametrize(
    "name,params_m", [("DiT-S/2", 33.0), ("DiT-B/2", 130.5), ("DiT-L/2", 458.1), ("DiT-XL/2", 675.1)]
)
def test_parameter_counts_match_the_papers(name, params_m):
    with torch.device("meta"):
        model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, abs=0.05)


# ---- fixed embeddings, checked against their formulas by hand ----------------------------------------------


def test_pos_embed_is_the_mae_sincos_table_with_columns_in_the_first_half():
    d, grid = 8, 4
    table = sincos_pos_embed_2d(d, grid)
    omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
    row, col = 2, 1
    token = row * grid + col
    expected = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
    np.testing.assert_allclose(table[token], expected, atol=1e-12)
    model = build_model("DiT-T/2", input_size=8)
    np.testing.assert_allclose(model.pos_embed[0].numpy(), sincos_pos_embed_2d(128, 4), atol=1e-6)
    assert not model.pos_embed.requires_grad


def test_timestep_embedding_is_cos_then_sin():
    emb = TimestepEmbedder.timestep_embedding(torch.tensor([0.0, 3.0]), 6)
    freqs = torch.exp(-math.log(10000) * torch.arange(3) / 3)
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))


# ---- forward behaviour -------------------------------------------------------------------------------------


def test_dit_returns_noise_and_variance_and_sit_only_the_prediction():
    dit = tiny_model("DiT-T/2")
    sit = tiny_model("SiT-T/2")
    sit.load_state_dict(dit.state_dict())
    x, t, y = tiny_inputs(dit)
    with torch.no_grad():
        full, dropped = dit(x, t, y), sit(x, t, y)
    assert full.shape == (3, 8, 8, 8) and dropped.shape == (3, 4, 8, 8)
    torch.testing.assert_close(dropped, full[:, :4])


def test_freshly_initialised_model_predicts_zero_as_adaln_zero_intends():
    model = build_model("DiT-T/2", input_size=8, num_classes=10).eval()
    x = torch.randn(2, 4, 8, 8)
    assert torch.count_nonzero(model(x, torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))) == 0


@pytest.mark.parametrize("attention,mediators", [("full", None), ("mediator", 4), ("mediator", 16)])
def test_outputs_are_equivariant_to_batch_order(attention, mediators):
    model = tiny_model(attention=attention, mediators=mediators)
    x, t, y = tiny_inputs(model, batch=4)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        out = model(x, t, y)
        out_perm = model(x[perm], t[perm], y[perm])
    torch.testing.assert_close(out_perm, out[perm], atol=1e-5, rtol=1e-5)


def test_label_dropout_only_in_training_mode_and_null_class_is_the_last_row():
    model = tiny_model()
    assert model.y_embedder.embedding_table.num_embeddings == 11
    x, t, y = tiny_inputs(model, batch=2)
    y_null = torch.full_like(y, 10)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, y), model(x, t, y_null))
    model.train()
    model.y_embedder.dropout_prob = 1.0  # drop every label
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), model(x, t, y_null))


# ---- classifier-free guidance ------------------------------------------------------------------------------


def test_cfg_guides_all_channels_by_default_and_first_three_in_public_mode():
    model = tiny_model("DiT-T/2")
    x, t, y = tiny_inputs(model, batch=2)
    xx, tt = torch.cat([x, x]), torch.cat([t, t])
    yy = torch.cat([y, torch.full_like(y, 10)])
    scale = 4.0
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
        standard = model.forward_with_cfg(xx, tt, yy, scale)
        public = model.forward_with_cfg(xx, tt, yy, scale, guided_channels=3)
    guided = uncond + scale * (cond - uncond)
    torch.testing.assert_close(standard[:2, :4], guided[:, :4], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(standard[2:, :4], standard[:2, :4])  # both halves carry the guided prediction
    torch.testing.assert_close(standard[:2, 4:], cond[:, 4:], atol=1e-5, rtol=1e-4)  # variance unguided
    torch.testing.assert_close(public[:2, :3], guided[:, :3], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(public[:2, 3:], cond[:, 3:], atol=1e-5, rtol=1e-4)  # 4th channel: conditional only


def test_cfg_scale_one_is_the_conditional_prediction():
    model = tiny_model("SiT-T/2")
    x, t, y = tiny_inputs(model, batch=2)
    with torch.no_grad():
        out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]), 1.0)
        torch.testing.assert_close(out[:2], model(x, t, y), atol=1e-5, rtol=1e-5)


# ---- bad configurations fail at construction ---------------------------------------------------------------


def test_mediator_count_that_is_not_a_square_names_the_nearest_valid_ones():
    with pytest.raises(ValueError, match="not a perfect square.*9 or 16"):
        build_model("SiT-S/2", attention="mediator", mediators=12)


def test_more_mediators_than_tokens_is_refused():
    with pytest.raises(ValueError, match="exceed the 16 tokens"):
        build_model("SiT-T/2", input_size=8, attention="mediator", mediators=25)


def test_patch_size_that_does_not_divide_the_input_is_refused():
    with pytest.raises(ValueError, match="patch size 4 does not divide input_size 30"):
        build_model("DiT-S/4", input_size=30)


def test_mediator_attention_needs_a_count_and_full_attention_refuses_one():
    with pytest.raises(ValueError, match="needs a mediator count"):
        build_model("SiT-S/2", attention="mediator")
    with pytest.raises(ValueError, match="attention='full'"):
        build_model("SiT-S/2", mediators=16)


def test_unknown_names_and_attention_kinds_list_the_valid_ones():
    with pytest.raises(ValueError, match="known names: DiT-S/2"):
        build_model("DiT-XXL/2")
    with pytest.raises(ValueError, match="choose one of"):
        build_model("DiT-S/2", attention="linear")


def test_input_of_the_wrong_shape_or_a_non_square_grid_is_refused_with_the_expected_shape():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"expects inputs of shape \(B, 4, 8, 8\)"):
        model(torch.randn(1, 4, 8, 12), torch.zeros(1), torch.zeros(1, dtype=torch.long))
