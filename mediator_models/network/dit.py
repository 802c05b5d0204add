"""The diffusion transformer (DiT / SiT, with full or mediator attention) and `build_model`.

Reads top to bottom like the public DiT `models.py`: block, model, guidance, initialisation, builder.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from mediator_models.network.attention import (
    ConvMixing,
    CountAttention,
    FullAttention,
    MediatorAttention,
    MultiCountAttention,
)
from mediator_models.network.config import ModelConfig, make_config
from mediator_models.network.layers import (
    FinalLayer,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    modulate,
    sincos_pos_embed_2d,
)


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning on c = t_emb + y_emb."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        conv = config.uses_depthwise_conv
        if config.serves_several:
            # depthwise_conv: None gives each kind its own default (mediators the conv, full attention none);
            # True gives every count the conv, False none (see ModelConfig.at_count).
            self.attn = MultiCountAttention(
                d,
                config.num_heads,
                config.grid_size,
                config.mediators,
                mediator_conv=conv,
                full_uses_conv=bool(config.depthwise_conv),
            )
        elif config.attention == "mediator":
            self.attn = MediatorAttention(d, config.num_heads, config.grid_size, config.mediators, depthwise_conv=conv)
        elif config.attention == "conv":
            self.attn = ConvMixing(d, config.grid_size)
        else:
            self.attn = FullAttention(d, config.num_heads, config.grid_size if conv else None)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=config.mlp_norm_eps)
        self.mlp = Mlp(d, int(d * config.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x (B, N, D), c (B, D) -> (B, N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class DiffusionTransformer(nn.Module):
    """DiT / SiT backbone. `model(x, t, y)`: x (B, C, H, W), t (B,) float, y (B,) long -> prediction.

    DiT returns all `out_channels` (the noise and, when learn_sigma, the variance interpolation); SiT returns
    only the first `in_channels`, as the public SiT does. The model knows nothing of time conventions: t is
    whatever the process feeds it (DiT: integer steps 0..999; SiT: t in [0, 1]).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads
        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, config.in_channels, config.hidden_size)
        self.t_embedder = TimestepEmbedder(config.hidden_size, freq_shift=config.timestep_freq_shift)
        self.y_embedder = LabelEmbedder(config.num_classes, config.hidden_size, config.class_dropout_prob)
        # Fixed sin-cos embedding, stored as a frozen parameter because the public checkpoints hold it.
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, config.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(config) for _ in range(config.depth)])
        self.final_layer = FinalLayer(config.hidden_size, config.patch_size, config.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, sin-cos positions, N(0, 0.02) embedders, adaLN-Zero."""

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        self.reset_pos_embed()
        w = self.x_embedder.proj.weight.data  # like nn.Linear, not nn.Conv2d
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def reset_pos_embed(self) -> None:
        """(Re)compute the fixed position table for the configured grid (also used after a resolution change)."""
        table = sincos_pos_embed_2d(self.config.hidden_size, self.config.grid_size)
        with torch.no_grad():
            self.pos_embed.copy_(torch.from_numpy(table).float().unsqueeze(0))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p·p·C) -> (B, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        g = self.config.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x (B, C, H, W), t (B,), y (B,) -> (B, C_out, H, W)
        expected = (self.in_channels, self.config.input_size, self.config.input_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{self.config.label} expects inputs of shape (B, {', '.join(map(str, expected))}), "
                f"got {tuple(x.shape)}; build the model with the input_size/in_channels of your data"
            )
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (B, D)
        for block in self.blocks:
            x = block(x, c)
        x = self.unpatchify(self.final_layer(x, c))  # (B, out_channels, H, W)
        if self.config.family == "SiT" and self.config.learn_sigma:
            x = x[:, : self.in_channels]
        return x

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, guided_channels: int | None = None
    ) -> torch.Tensor:
        """Classifier-free guidance on a batch whose second half repeats the first with null labels.

        Only the first half of `x` is used (both halves are evaluated on it), as in the public code. By default
        guidance applies to all predicted channels (the standard form: ε̂ = ε_u + s·(ε_c − ε_u) on every
        channel of the noise/velocity). The public DiT/SiT code guides only the first 3 channels "for exact
        reproducibility"; pass `guided_channels=3` to reproduce its numbers bit for bit. The learned-variance
        channels are never guided.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        n_guided = self.in_channels if guided_channels is None else guided_channels
        eps, rest = out[:, :n_guided], out[:, n_guided:]
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)

    def attention_modules(self) -> list[nn.Module]:
        """The attention module of each block, in depth order (where the recorder attaches)."""
        return [block.attn for block in self.blocks]

    # ---- a network serving several counts -----------------------------------------------------------------
    def _layer_counts(self, counts: int | None | Sequence[int | None]) -> tuple[int | None, ...]:
        """One count for every layer, or one per layer, checked against the counts the network serves."""
        depth = self.config.depth
        layer_counts = tuple(counts) if isinstance(counts, (tuple, list)) else (counts,) * depth
        if len(layer_counts) != depth:
            raise ValueError(f"{len(layer_counts)} per-layer counts given for {depth} layers; give one per layer")
        for count in set(layer_counts):
            self.config.at_count(count)  # refuses a count not served, naming those that are
        return layer_counts

    def active_counts(self) -> tuple[int | None, ...]:
        """The count each layer runs at (None: full attention)."""
        if not self.config.serves_several:
            return (self.config.counts[0],) * self.config.depth
        return tuple(block.attn.active for block in self.blocks)

    def use_count(self, counts: int | None | Sequence[int | None]) -> "DiffusionTransformer":
        """Run every layer at `counts` from now on (one count, or one per layer; None: full attention)."""
        layer_counts = self._layer_counts(counts)
        if self.config.serves_several:
            for block, count in zip(self.blocks, layer_counts):
                block.attn.use_count(count)
        return self

    @contextmanager
    def counting(self, counts: int | None | Sequence[int | None]) -> Iterator["DiffusionTransformer"]:
        """Run at `counts` inside the block; the counts in force before are restored afterwards, whatever happens."""
        before = self.active_counts()
        self.use_count(counts)
        try:
            yield self
        finally:
            self.use_count(before)

    def at_count(self, counts: int | None | Sequence[int | None]) -> nn.Module:
        """The network of `counts` (one count, or one per layer): a `CountView` of a network serving several,
        or this network itself for the one count it is."""
        layer_counts = self._layer_counts(counts)
        if not self.config.serves_several:
            return self
        return CountView(self, layer_counts)

    def count_views(self) -> dict[int | None, nn.Module]:
        """{count: the network of that count} for every count served, in the config's order."""
        return {count: self.at_count(count) for count in self.config.counts}


class CountView(nn.Module):
    """A network serving several counts, seen as the network of some counts (one for every layer, or one per
    layer). Each call runs the shared network at those counts and restores the counts it had; it holds no tensors
    of its own. For one count its `config` is that count's single-count config, so its FLOPs and label, and the
    recorder's name for its maps, are those of that count's network; `attention_modules` are that count's
    observer slots of the shared layers."""

    def __init__(self, network: DiffusionTransformer, layer_counts: Sequence[int | None]):
        super().__init__()
        self.network = network
        self.layer_counts = tuple(layer_counts)
        uniform = len(set(self.layer_counts)) == 1
        self.count = self.layer_counts[0] if uniform else None
        self.config = network.config.at_count(self.count) if uniform else network.config
        self.uniform = uniform

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.network.counting(self.layer_counts):
            return self.network(x, t, y)

    def forward_with_cfg(self, x, t, y, cfg_scale: float, guided_channels: int | None = None) -> torch.Tensor:
        with self.network.counting(self.layer_counts):
            return self.network.forward_with_cfg(x, t, y, cfg_scale, guided_channels)

    def attention_modules(self) -> list[CountAttention]:
        return [block.attn.for_count(c) for block, c in zip(self.network.blocks, self.layer_counts)]


def build_model(
    name: str,
    *,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    class_dropout_prob: float = 0.1,
    attention: str = "full",
    mediators: int | tuple[int | None, ...] | None = None,
    depthwise_conv: bool | None = None,
) -> DiffusionTransformer:
    """Build a registry model, e.g. `build_model("SiT-S/2", attention="mediator", mediators=16)`.

    `input_size` is the spatial side of the model's input (32 for 256-px images through the SD VAE).
    Wrap the call in `torch.device("meta")` to inspect a large config without allocating its weights.
    """
    config = make_config(
        name,
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        class_dropout_prob=class_dropout_prob,
        attention=attention,
        mediators=mediators,
        depthwise_conv=depthwise_conv,
    )
    return DiffusionTransformer(config)


def model_from_config(config: ModelConfig | dict) -> DiffusionTransformer:
    """Rebuild the network a checkpoint's saved config describes."""
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    return DiffusionTransformer(config)
