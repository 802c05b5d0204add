"""Self-attention for DiT/SiT blocks: full softmax attention and attention with mediators (arXiv 2408.05710).

Both modules compute their output with the fused `F.scaled_dot_product_attention`. Setting
`module.map_observer` to a callable asks for the maps as well: the module then also computes the explicit
post-softmax maps softmax(QKᵀ/√d + B) and hands them to the observer as an `AttentionMaps`, while the output
stays the fused one, bit for bit. This is how the recorder (instrument.py) attaches without touching
parameter names or outputs.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mediator_models.network.config import check_mediator_count

_MAP_TENSORS = ("full", "query_to_mediator", "mediator_to_key", "values", "queries", "keys")


class AttentionMaps:
    """Post-softmax attention of one layer for one forward pass.

    Full attention fills `full` (B, heads, N, N), or hands over its `queries` and `keys` and lets `full` be
    computed when first read: an observer that reads the maps a few heads at a time (`select`) then never holds
    all of them, so its memory is bounded whatever N is. Mediator attention fills `query_to_mediator`
    (B, heads, N, n) and `mediator_to_key` (B, heads, n, N); their product is the N×N map (rank ≤ n) that replaces
    full attention, computed on demand because it costs N² memory.

    `values` (B, heads, N, d) are what the map mixes, for measures of the output A·V (how much of it a
    cheaper map recovers); full attention also hands over its `queries` and `keys` (B, heads, N, d), from which
    the mediator form of the same layer can be built. Observers that only look at maps ignore them.
    """

    def __init__(
        self,
        kind: str,
        full: Optional[torch.Tensor] = None,
        query_to_mediator: Optional[torch.Tensor] = None,
        mediator_to_key: Optional[torch.Tensor] = None,
        values: Optional[torch.Tensor] = None,
        queries: Optional[torch.Tensor] = None,
        keys: Optional[torch.Tensor] = None,
    ):
        self.kind = kind
        self._full = full
        self.query_to_mediator, self.mediator_to_key = query_to_mediator, mediator_to_key
        self.values, self.queries, self.keys = values, queries, keys

    @property
    def full(self) -> Optional[torch.Tensor]:
        """Full attention's maps softmax(q·kᵀ/√d), from the queries and keys if they were not handed over
        (computed as `softmax_attention` computes them, so the values are the same bit for bit)."""
        if self._full is None and self.kind == "full" and self.queries is not None and self.keys is not None:
            self._full = explicit_maps(self.queries, self.keys, None)
        return self._full

    @property
    def effective(self) -> torch.Tensor:
        """The N×N map through which values reach queries: full attention, or the product of both maps."""
        if self.kind == "full":
            return self.full
        return self.query_to_mediator @ self.mediator_to_key

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, heads, N, M) of the effective map, without computing it."""
        if self.kind == "full":
            if self._full is not None:
                return tuple(self._full.shape)
            return (*self.queries.shape[:-1], self.keys.shape[-2])
        return (*self.query_to_mediator.shape[:-1], self.mediator_to_key.shape[-1])

    def effective_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Some query rows of the effective map, (B, heads, R, M) for index (B, heads, R) of query positions, each
        map its own rows. From the queries and keys (or the query-to-mediator rows) when the N×N map is not held,
        so only R·M entries are computed: how measures that average over queries sample them at large N."""

        def rows_of(tensor: torch.Tensor) -> torch.Tensor:  # (B, heads, N, X) -> (B, heads, R, X)
            return tensor.gather(2, index[..., None].expand(-1, -1, -1, tensor.shape[-1]))

        if self.kind == "full" and self._full is None and self.queries is not None and self.keys is not None:
            return explicit_maps(rows_of(self.queries), self.keys, None)
        if self.kind == "full":
            return rows_of(self.full)
        return rows_of(self.query_to_mediator) @ self.mediator_to_key

    def row_source(self) -> torch.Tensor:
        """The tensor whose rows make the effective map's rows (queries, query-to-mediator maps, or the map): what
        seeds a reproducible draw of query rows without computing the map."""
        if self.kind == "full":
            return self.queries if self.queries is not None else self.full  # the same rows, map computed or not
        return self.query_to_mediator

    def output(self) -> torch.Tensor:
        """What the maps deliver, per head: A·V (B, heads, N, d), through the fused kernel for full attention
        handed its queries and keys (no N×N map), through the n×N maps for mediators (before conv and proj)."""
        if self.kind == "full" and self._full is None and self.queries is not None:
            return F.scaled_dot_product_attention(self.queries, self.keys, self.values)
        if self.kind == "full":
            return self.full @ self.values
        return self.query_to_mediator @ (self.mediator_to_key @ self.values)

    def detached(self) -> "AttentionMaps":
        """The same maps, cut from the autograd graph (to be kept beyond the forward pass)."""
        stored = {"full": self._full, **{name: getattr(self, name) for name in _MAP_TENSORS[1:]}}
        return AttentionMaps(self.kind, **{k: None if t is None else t.detach() for k, t in stored.items()})

    def select(self, rows: slice | list[int] = slice(None), heads: list[int] | None = None) -> "AttentionMaps":
        """The same maps (and values, queries, keys) for some batch rows and heads; maps not yet computed stay
        so, and are computed for these rows and heads only."""

        def pick(tensor):
            if tensor is None:
                return None
            tensor = tensor[rows]
            return tensor if heads is None else tensor[:, heads]

        stored = {"full": self._full, **{name: getattr(self, name) for name in _MAP_TENSORS[1:]}}
        return AttentionMaps(self.kind, **{name: pick(tensor) for name, tensor in stored.items()})


MapObserver = Callable[[AttentionMaps], None]


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, C) -> (B, heads, L, C / heads)."""
    b, length, c = x.shape
    return x.reshape(b, length, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d) -> (B, L, heads·d)."""
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)


def softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, observe: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q·kᵀ/√d + bias)·v through the fused kernel, and, when observed, the post-softmax map.

    The output always comes from the fused kernel, so observing a layer never perturbs what it computes
    (a sampling trajectory recorded is bit for bit the trajectory unrecorded); the map is computed beside
    it, explicitly, only when asked for.
    """
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return out, explicit_maps(q, k, bias) if observe else None


def explicit_maps(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(q·kᵀ/√d + bias), the post-softmax map, computed explicitly."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1)


def depthwise_conv_on_values(dwc: nn.Conv2d, v: torch.Tensor, grid_size: int) -> torch.Tensor:
    """The mediator block's local term: a depthwise 3×3 conv on v (B, N, C) seen as a g×g image, computed in
    channels-last layout ((B, N, C) is already that, so nothing is copied). Returns (B, N, C)."""
    b, n, c = v.shape
    if n != grid_size * grid_size:
        raise ValueError(
            f"this layer was built for a {grid_size}×{grid_size} grid ({grid_size**2} tokens) but got "
            f"{n} tokens; rebuild the model at the input size you run it at"
        )
    return dwc(v.reshape(b, grid_size, grid_size, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, n, c)


def pool_tokens(tokens: torch.Tensor, grid_size: int, side: int) -> torch.Tensor:
    """Tokens (..., N, C) seen as a g×g image, adaptively average-pooled to side×side -> (..., side², C): how
    mediators are made from queries. (A matmul with the pooling matrix is 2-6× faster on this CPU, but it spends
    n·N·C multiply-adds where averaging spends N·C additions, and the FLOP counts follow the arithmetic of the
    operation, docs/reference.md; so the pooling stays a mean.)"""
    *lead, _, c = tokens.shape
    flat = tokens.reshape(-1, grid_size * grid_size, c)
    b, g = len(flat), grid_size
    if g % side == 0:  # equal windows: a reshaped mean, without transposing the tokens into an image
        cell = g // side
        pooled = flat.reshape(b, side, cell, side, cell, c).mean(dim=(2, 4)).reshape(b, side * side, c)
    else:
        pooled = F.adaptive_avg_pool2d(flat.transpose(1, 2).reshape(b, c, g, g), side).flatten(2).transpose(1, 2)
    return pooled.reshape(*lead, side * side, c)


class FullAttention(nn.Module):
    """Multi-head self-attention as timm's `Attention` (packed `qkv` with bias, then `proj`).

    With `grid_size` given it also adds the mediator block's depthwise 3×3 conv on v before `proj` (the ablation
    "full attention + conv", which isolates what the conv contributes)."""

    def __init__(self, dim: int, num_heads: int, grid_size: int | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.grid_size = grid_size
        if grid_size is not None:
            self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.map_observer: MapObserver | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, N, C) -> (B, N, C)
        dwc = self.dwc if self.grid_size is not None else None
        return full_attention(x, self.qkv, self.proj, self.num_heads, dwc, self.grid_size, self.map_observer)


def full_attention(
    x: torch.Tensor,
    qkv: nn.Linear,
    proj: nn.Linear,
    num_heads: int,
    dwc: nn.Conv2d | None,
    grid_size: int | None,
    observer: MapObserver | None,
) -> torch.Tensor:
    """proj(softmax(q·kᵀ/√d)·v [+ dwc(v)]) for x (B, N, C): what `FullAttention` computes, and a network serving
    several counts at full attention (one function, so the two agree bit for bit)."""
    b, n, c = x.shape
    q, k, v = qkv(x).reshape(b, n, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
    out, _ = softmax_attention(q, k, v, None, observe=False)
    if observer is not None:  # the maps are computed when (and as far as) the observer reads them
        observer(AttentionMaps(kind="full", values=v, queries=q, keys=k))
    out = merge_heads(out)
    if dwc is not None:
        out = out + depthwise_conv_on_values(dwc, merge_heads(v), grid_size)
    return proj(out)


class ConvMixing(nn.Module):
    """The ablation "no attention": the mediator block's depthwise 3×3 conv alone, out = proj(dwc(v)) with
    v = Linear(x). It has no attention maps, so the recorder does not attach to it."""

    def __init__(self, dim: int, grid_size: int):
        super().__init__()
        self.grid_size = grid_size
        self.v = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(depthwise_conv_on_values(self.dwc, self.v(x), self.grid_size))


class PositionBiasTables:
    """The position-bias tables of one mediator count (docs/reference.md §6), and the biases B_tk (n×N) and
    B_qt (N×n) built from them: a 7×7 table per (head, mediator) resized bilinearly to the grid, plus a per-row
    and a per-column table. A mixin: `MediatorAttention` holds its tables on itself, as the public checkpoints
    name them (`attn.an_bias`, ...); a network serving several counts holds one `MediatorBiases` per count."""

    num_heads: int
    grid_size: int
    mediators: int

    def _make_tables(self, num_heads: int, grid_size: int, mediators: int) -> None:
        check_mediator_count(mediators, grid_size * grid_size)
        self.num_heads, self.grid_size, self.mediators = num_heads, grid_size, mediators
        self.pool_size = math.isqrt(mediators)
        g = grid_size
        # Names and shapes as in the public checkpoints: a = mediator ("agent"), n = token, h/w = row/column.
        self.an_bias = nn.Parameter(torch.zeros(num_heads, mediators, 7, 7))
        self.na_bias = nn.Parameter(torch.zeros(num_heads, mediators, 7, 7))
        self.ah_bias = nn.Parameter(torch.zeros(1, num_heads, mediators, g, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, num_heads, mediators, 1, g))
        self.ha_bias = nn.Parameter(torch.zeros(1, num_heads, g, 1, mediators))
        self.wa_bias = nn.Parameter(torch.zeros(1, num_heads, 1, g, mediators))
        for table in self._bias_tables():
            nn.init.trunc_normal_(table, std=0.02)
        self._bias_cache: tuple | None = None

    def _bias_tables(self) -> tuple[torch.Tensor, ...]:
        return (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias)

    def position_biases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_tk (1, heads, n, N), B_qt (1, heads, N, n)); they depend on the parameters only.

        Without autograd (sampling, recording) the result is cached until a table changes, so a sampling
        run resizes the tables once per layer rather than once per step.
        """
        tables = self._bias_tables()
        if torch.is_grad_enabled() and any(t.requires_grad for t in tables):
            return self._compute_position_biases()
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in tables)
        if self._bias_cache is None or self._bias_cache[0] != key:
            self._bias_cache = (key, self._compute_position_biases())
        return self._bias_cache[1]

    def _compute_position_biases(self) -> tuple[torch.Tensor, torch.Tensor]:
        g, heads, n = self.grid_size, self.num_heads, self.mediators
        # Bilinear resize of the 7×7 tables (align_corners=False, no antialias) as R·table·Rᵀ: the same
        # numbers as F.interpolate, several times faster on CPU for these many small images.
        resize = bilinear_resize_matrix(self.an_bias.shape[-1], g, self.an_bias.device, self.an_bias.dtype)
        gather = resize @ self.an_bias @ resize.T + self.ah_bias[0] + self.aw_bias[0]  # (heads, n, g, g)
        read = (resize @ self.na_bias @ resize.T).flatten(2).transpose(1, 2)  # (heads, N, n)
        read = read + (self.ha_bias + self.wa_bias).reshape(heads, g * g, n)
        return gather.reshape(1, heads, n, g * g).contiguous(), read.unsqueeze(0).contiguous()

    def pool_queries(self, q: torch.Tensor) -> torch.Tensor:
        """Mediators: q (B, N, C) seen as a g×g image, adaptively average-pooled to √n×√n -> (B, n, C)."""
        return pool_tokens(q, self.grid_size, self.pool_size)


class MediatorBiases(PositionBiasTables, nn.Module):
    """The position-bias tables of one count of a network serving several (`MultiCountAttention`)."""

    def __init__(self, num_heads: int, grid_size: int, mediators: int):
        super().__init__()
        self._make_tables(num_heads, grid_size, mediators)


class MediatorAttention(PositionBiasTables, nn.Module):
    """Attention through n mediator tokens (docs/reference.md §6), computing what the public module computes.

    Per head, with T the queries average-pooled to a √n×√n grid and s = head_dim^-1/2:
        V_m = softmax(s·T·Kᵀ + B_tk)·V            mediators gather from all keys   (n×N map)
        O   = softmax(s·Q·Tᵀ + B_qt)·V_m          queries read from the mediators  (N×n map)
        out = proj(O + dwc3×3(V))
    The position biases B_tk (n×N) and B_qt (N×n) are a 7×7 table per (head, mediator) resized bilinearly to
    the grid, plus a per-row and a per-column table. Cost per head: 4·n·N·d instead of 2·N²·d.
    """

    def __init__(self, dim: int, num_heads: int, grid_size: int, mediators: int, depthwise_conv: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        check_mediator_count(mediators, grid_size * grid_size)
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        if depthwise_conv:  # off only in the ablation "mediators without the conv"
            self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.depthwise_conv = depthwise_conv
        self._make_tables(num_heads, grid_size, mediators)
        self.map_observer: MapObserver | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, N, C) -> (B, N, C), N = grid_size²
        dwc = self.dwc if self.depthwise_conv else None
        return mediator_attention(x, self.qkv, self.proj, self, dwc, self.map_observer)


def mediator_attention(
    x: torch.Tensor,
    qkv: nn.Linear,
    proj: nn.Linear,
    tables: PositionBiasTables,
    dwc: nn.Conv2d | None,
    observer: MapObserver | None,
) -> torch.Tensor:
    """proj(softmax(s·Q·Tᵀ + B_qt)·softmax(s·T·Kᵀ + B_tk)·V [+ dwc(V)]) for x (B, N, C), with the count, grid and
    biases of `tables`: what `MediatorAttention` computes, and a network serving several counts at that count."""
    b, n_tokens, c = x.shape
    g = tables.grid_size
    if n_tokens != g * g:
        raise ValueError(
            f"this mediator attention was built for a {g}×{g} grid ({g * g} tokens) but got {n_tokens} tokens; "
            "rebuild the model at the input size you run it at"
        )
    q, k, v = qkv(x).reshape(b, n_tokens, 3, c).unbind(2)  # each (B, N, C)
    mediators = tables.pool_queries(q)  # (B, n, C)
    heads = tables.num_heads
    q_h, k_h, v_h, m_h = (split_heads(t, heads) for t in (q, k, v, mediators))
    gather_bias, read_bias = tables.position_biases()
    observe = observer is not None
    mediator_values, gather_weights = softmax_attention(m_h, k_h, v_h, gather_bias, observe)  # (B,h,n,d)
    out, read_weights = softmax_attention(q_h, m_h, mediator_values, read_bias, observe)  # (B,h,N,d)
    if observe:
        observer(
            AttentionMaps(kind="mediator", query_to_mediator=read_weights, mediator_to_key=gather_weights, values=v_h)
        )
    out = merge_heads(out)
    if dwc is not None:
        out = out + depthwise_conv_on_values(dwc, v, g)
    return proj(out)


class MultiCountAttention(nn.Module):
    """One attention layer serving several mediator counts (and, with None among them, full attention) from one
    qkv, one proj and one depthwise conv; each count has its own position-bias tables (`biases["16"]`: the
    tables of 16 mediators, named and shaped as a single-count layer's). `active` is the count it runs at.

    The conv is shared, not one per count: it is the block's local term on V (a 3×3 neighbourhood, whatever the
    count), like qkv and proj a property of the tokens and not of the mediators, and one conv trained under every
    count is what lets a count the network was not sampled at much keep the local detail the others learned.
    Full attention runs it only when `full_uses_conv` (a source that had it, `depthwise_conv=True`).

    At count n it computes what `MediatorAttention` with the same tensors computes, at full attention what
    `FullAttention` computes, bit for bit (the same functions run). Observers: `map_observer` sees every count;
    `count_observers[n]`, set through `for_count(n).map_observer`, only count n (and takes precedence), which lets
    the recorder name each count's maps under its own network.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: int,
        counts: tuple[int | None, ...],
        mediator_conv: bool = True,
        full_uses_conv: bool = False,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.grid_size = grid_size
        self.counts = tuple(counts)
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.mediator_conv = mediator_conv
        self.full_uses_conv = full_uses_conv and None in self.counts
        if mediator_conv or self.full_uses_conv:
            self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.biases = nn.ModuleDict(
            {str(n): MediatorBiases(num_heads, grid_size, n) for n in self.counts if n is not None}
        )
        self.active: int | None = self.counts[0]
        self.map_observer: MapObserver | None = None
        self.count_observers: dict[int | None, MapObserver] = {}

    def _check_served(self, count: int | None) -> None:
        if count not in self.counts:
            served = ", ".join("full" if c is None else str(c) for c in self.counts)
            raise ValueError(f"this layer serves the counts {served}, not {'full' if count is None else count}")

    def use_count(self, count: int | None) -> None:
        self._check_served(count)
        self.active = count

    def for_count(self, count: int | None) -> "CountAttention":
        """This layer as the network of `count` sees it (its own observer slot; calls run at that count)."""
        self._check_served(count)
        return CountAttention(self, count)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, N, C) -> (B, N, C), at the active count
        count = self.active
        observer = self.count_observers.get(count, self.map_observer)
        if count is None:
            dwc = self.dwc if self.full_uses_conv else None
            return full_attention(x, self.qkv, self.proj, self.num_heads, dwc, self.grid_size, observer)
        dwc = self.dwc if self.mediator_conv else None
        return mediator_attention(x, self.qkv, self.proj, self.biases[str(count)], dwc, observer)


class CountAttention:
    """One count of a `MultiCountAttention` layer, as the attention module of that count's network: what the
    recorder attaches to (`map_observer` is that count's observer slot) and what a caller may run (at that
    count, the layer's own count restored afterwards). It holds no tensors; `proj` and `qkv` are the layer's."""

    def __init__(self, layer: MultiCountAttention, count: int | None):
        self.layer, self.count = layer, count
        self.num_heads = layer.num_heads
        self.qkv, self.proj = layer.qkv, layer.proj

    @property
    def map_observer(self) -> MapObserver | None:
        return self.layer.count_observers.get(self.count)

    @map_observer.setter
    def map_observer(self, observer: MapObserver | None) -> None:
        if observer is None:
            self.layer.count_observers.pop(self.count, None)
        else:
            self.layer.count_observers[self.count] = observer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        own = self.layer.active
        self.layer.active = self.count
        try:
            return self.layer(x)
        finally:
            self.layer.active = own


@functools.lru_cache(maxsize=64)
def _bilinear_resize_matrix_cpu(src: int, dst: int) -> torch.Tensor:
    scale = src / dst
    matrix = torch.zeros(dst, src, dtype=torch.float64)
    for i in range(dst):
        centre = max((i + 0.5) * scale - 0.5, 0.0)  # half-pixel centres, clamped as F.interpolate does
        low = min(int(centre), src - 1)
        high = min(low + 1, src - 1)
        frac = centre - low
        matrix[i, low] += 1 - frac
        matrix[i, high] += frac
    return matrix


def bilinear_resize_matrix(src: int, dst: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """R (dst, src) such that R·T·Rᵀ is F.interpolate(T, (dst, dst), mode="bilinear") for T (..., src, src)."""
    return _bilinear_resize_matrix_cpu(src, dst).to(device=device, dtype=dtype)
