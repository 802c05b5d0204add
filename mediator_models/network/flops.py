"""Analytic multiply-accumulate counts per config, and a measured counterpart on the real forward pass.

Convention of the field (DiT paper, docs/reference.md §2): "GFLOPs" are forward multiply-accumulates at batch 1,
without doubling for classifier-free guidance, including the two attention matmuls. Per block, with N tokens,
width D, MLP ratio r and n mediators:
    full:      (4 + 2r)·N·D² + 6·D² + 2·N²·D
    mediator:  (4 + 2r)·N·D² + 6·D² + 4·n·N·D + 9·N·D (depthwise 3×3 conv) + N·D (pooling)
and for the ablations: full + conv adds 9·N·D to full; mediators without the conv drop it; conv only is
    (2 + 2r)·N·D² + 6·D² + 9·N·D (v, proj, the MLP, adaLN and the conv),
plus the patch embedding, the timestep MLP and the final layer. Label embedding is a lookup (no MACs);
norms, activations, softmax and modulation are elementwise and not counted (as in the published tables).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Sequence

import torch
from torch import nn

from mediator_models.network.config import ModelConfig, make_config

FREQUENCY_EMBEDDING_SIZE = 256


def macs_breakdown(config: ModelConfig) -> "OrderedDict[str, int]":
    """MACs of one forward pass at batch 1, by part; the values sum to the model's total."""
    if config.serves_several:
        raise ValueError(
            f"{config.label} serves several counts and costs what the count it runs at costs: count one with "
            "config.at_count(n), or a running network's active counts with network_gmacs(model)"
        )
    n_tok, d, p = config.num_tokens, config.hidden_size, config.patch_size
    mlp_hidden = int(d * config.mlp_ratio)
    projections = 1 if config.attention == "conv" else 3  # conv only: v alone; else the packed qkv
    per_block_linear = projections * n_tok * d * d + n_tok * d * d + 2 * n_tok * d * mlp_hidden  # (qk)v, proj, fc1+fc2
    conv = 9 * n_tok * d if config.uses_depthwise_conv else 0  # depthwise 3×3 conv on v
    if config.attention == "full":
        per_block_attention = 2 * n_tok * n_tok * d  # q·kᵀ and attn·v, summed over heads
        per_block_extra = conv
    elif config.attention == "mediator":
        per_block_attention = 4 * config.mediators * n_tok * d  # two n×N interactions, each q·kᵀ and attn·v
        per_block_extra = conv + n_tok * d  # the conv, average pooling of q
    else:
        per_block_attention, per_block_extra = 0, conv
    parts: OrderedDict[str, int] = OrderedDict()
    parts["patch_embed"] = n_tok * p * p * config.in_channels * d
    parts["timestep_embed"] = FREQUENCY_EMBEDDING_SIZE * d + d * d
    parts["blocks.linear"] = config.depth * per_block_linear
    parts["blocks.adaLN"] = config.depth * 6 * d * d
    parts["blocks.attention"] = config.depth * per_block_attention
    parts["blocks.mediator_extra"] = config.depth * per_block_extra
    parts["final_layer"] = 2 * d * d + n_tok * d * p * p * config.out_channels
    return parts


def config_gmacs(config: ModelConfig) -> float:
    """Total GMACs ("GFLOPs" in the papers' tables) of one forward pass at batch 1."""
    return sum(macs_breakdown(config).values()) / 1e9


def layered_gmacs(configs: Mapping[int | None, ModelConfig], counts: Sequence[int | None]) -> float:
    """GMACs of one forward pass whose layer l is a block of the network of `counts[l]` (configs: count ->
    ModelConfig): the embedders and final layer once (the networks share them), then each block at its own cost."""
    breakdowns = {c: macs_breakdown(configs[c]) for c in set(counts)}
    outside = sum(macs for part, macs in breakdowns[counts[0]].items() if not part.startswith("blocks."))
    per_block = {
        c: sum(macs for part, macs in parts.items() if part.startswith("blocks.")) // configs[c].depth
        for c, parts in breakdowns.items()
    }
    return (outside + sum(per_block[c] for c in counts)) / 1e9


def network_gmacs(model: nn.Module) -> float:
    """GMACs of one forward pass of `model` as it runs now: for a network serving several counts, at the count
    each layer is set to (`use_count`), each layer costing what it costs in its count's own network."""
    config = model.config
    if not config.serves_several:
        return config_gmacs(config)
    counts = model.active_counts()
    if len(set(counts)) == 1:
        return config_gmacs(config.at_count(counts[0]))
    return layered_gmacs({c: config.at_count(c) for c in set(counts)}, counts)


def model_gmacs(
    name: str,
    *,
    input_size: int = 32,
    attention: str = "full",
    mediators: int | None = None,
    depthwise_conv: bool | None = None,
) -> float:
    """GMACs of a registry model, e.g. `model_gmacs("DiT-XL/2")` ≈ 118.6, `("DiT-XL/2", input_size=64)` ≈ 524.5."""
    return config_gmacs(
        make_config(
            name, input_size=input_size, attention=attention, mediators=mediators, depthwise_conv=depthwise_conv
        )
    )


# ---- measured count -------------------------------------------------------------------------------------


def _register_cpu_sdpa_formulas() -> None:
    """FlopCounterMode counts the CPU fused SDPA kernel as zero unless a formula is registered for it.

    The formulas are the library's own for the CUDA flash kernel (2·B·h·(Lq·Lk·d + Lq·Lk·dv) forward,
    twice that backward), which depend only on shapes and so hold for the CPU kernel too.
    """
    from torch.utils import flop_counter

    aten = torch.ops.aten
    registry = flop_counter.flop_registry
    cpu_forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    cpu_backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if cpu_forward is not None and cpu_forward.default not in registry and cpu_forward not in registry:

        @flop_counter.register_flop_formula(cpu_forward)
        def _cpu_sdpa_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    if cpu_backward is not None and cpu_backward.default not in registry and cpu_backward not in registry:

        @flop_counter.register_flop_formula(cpu_backward)
        def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def measured_macs(model: nn.Module, *, batch_size: int = 1, backward: bool = False) -> int:
    """MACs that torch.utils.flop_counter sees in one real forward (and backward) pass of `model`.

    Counts matmuls, convolutions and attention kernels (fused or explicit); elementwise work and pooling
    are invisible to it, so for mediator attention it misses the N·D pooling term of the analytic count.
    """
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_sdpa_formulas()
    config = model.config
    device = next(model.parameters()).device
    x = torch.randn(batch_size, config.in_channels, config.input_size, config.input_size, device=device)
    t = torch.full((batch_size,), 500.0, device=device)
    y = torch.zeros(batch_size, dtype=torch.long, device=device)
    if not backward:
        # Warm-up: mediator layers cache their resized position biases between steps without autograd, so
        # the steady state of sampling (what the papers count) excludes resizing them.
        with torch.no_grad():
            model(x, t, y)
    counter = FlopCounterMode(display=False)
    with counter:
        if backward:
            model(x, t, y).sum().backward()
        else:
            with torch.no_grad():
                model(x, t, y)
    return counter.get_total_flops() // 2  # the counter reports FLOPs = 2 × MACs
