"""The non-attention layers of DiT/SiT, with the public checkpoints' parameter names.

Names and shapes follow facebookresearch/DiT `models.py` (and timm's PatchEmbed and Mlp, which it uses), so
official checkpoints load strictly: `x_embedder.proj`, `t_embedder.mlp.{0,2}`, `y_embedder.embedding_table`,
`mlp.fc1`, `mlp.fc2`, `adaLN_modulation.1`, `final_layer.linear`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x (B, N, D), shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches -> tokens, as timm's PatchEmbed (a strided conv named `proj`)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, N, D), tokens in row-major order of the patch grid
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar (possibly fractional) timesteps -> vectors: sinusoidal features then a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: int = 0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: int = 0) -> torch.Tensor:
        """GLIDE's embedding: [cos(t·f), sin(t·f)] with f = max_period^(-i/(half − freq_shift)), i < half.
        t (B,) -> (B, dim). DiT uses freq_shift 0; diffusers' DiT port uses 1 (`downscale_freq_shift`)."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; row `num_classes` is the null class used for classifier-free guidance.

    The null row exists only when class dropout is on, exactly as in the public code (so a model trained
    without dropout has `num_classes` rows and cannot be guided).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class Mlp(nn.Module):
    """timm's Mlp as DiT uses it: fc1 -> tanh-GELU -> fc2 (no dropout)."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a linear map from tokens to p·p·C_out patch values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x (B, N, D), c (B, D) -> (B, N, p·p·C_out)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ---- fixed 2-D sin-cos position embedding (MAE's, as DiT stores it in the frozen `pos_embed`) ----------------


def sincos_pos_embed_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim): [sin(p·ω), cos(p·ω)] with ω_i = 10000^(-2i/embed_dim)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size², embed_dim) table; the first half of the width encodes the column, the second the row.

    MAE builds the grid with `np.meshgrid(grid_w, grid_h)` (w first) and encodes grid[0] in the first half,
    so the first half varies along the width. Kept exactly, since the public checkpoints store this table.
    """
    coords = np.arange(grid_size, dtype=np.float32)
    grid_w, grid_h = np.meshgrid(coords, coords)  # grid_w[i, j] = j, the column index
    emb_first = sincos_pos_embed_1d(embed_dim // 2, grid_w)
    emb_second = sincos_pos_embed_1d(embed_dim // 2, grid_h)
    return np.concatenate([emb_first, emb_second], axis=1)
