"""Interventions: sample with one attention computation replaced at chosen evaluations, layers and heads, and
measure how far the final samples move from the unmodified run.

A redundancy measure claims that some computation can go; an intervention removes it and looks. The replaced
computation is each chosen head's output O = A·V (before `proj`, and before the depthwise conv of a
"full + conv" model, which stays as it is):

    none            O, unchanged (the samples are the unmodified ones, bit for bit)
    rank:R          A_R·V, A_R the truncated SVD of A at rank R (what `recovery_rank_R` measures)
    mediator:N      softmax(s·Q·Tᵀ)·softmax(s·T·Kᵀ)·V, T the queries pooled to N tokens, s = d^-1/2
                    (the form `recovery_pooled_N` measures, built from this very layer without training)
    reuse-previous  the output this head delivered at the previous evaluation (DiTFastAttn's step reuse; over
                    a range A..B−1 every evaluation delivers evaluation A−1's output)
    share-cfg       the unconditional half of a guided batch takes the conditional half's output
    window:R        softmax over the keys within Chebyshev radius R of the query on the token grid only

The replacement is a forward hook on each chosen `FullAttention`: on the evaluations it replaces, it recomputes
q, k, v from the module's input and returns the module's output with the chosen heads' O replaced; elsewhere
it leaves the output alone. The hooks come off on exit, errors included. The evaluation index comes from the
sampler's step callback, as the recorder's does. Sample i starts from the noise and label `attnmed sample`
and `attnmed record` give it (`start_batch`), and is drawn twice: unmodified and with the replacement.

A grid of interventions (`run_intervention_grid`, `attnmed intervene --grid`) replaces one layer over one window
of evaluations per cell, and ranks the measures of a redundancy table of the same model by how well they
predict each cell's damage (Spearman's ρ over the cells, with a bootstrap interval).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mediator_models.network.attention import (
    FullAttention,
    depthwise_conv_on_values,
    explicit_maps,
    merge_heads,
    pool_tokens,
)
from mediator_models.network.config import ModelConfig
from mediator_models.network.flops import macs_breakdown
from mediator_models.sampling.generation import SamplerConfig, generate
from mediator_models.sampling.steps import StepInfo, start_batch
from mediator_models.sampling.switching import evaluation_levels
from mediator_models.storage.errors import SettingError
from mediator_models.storage.runfolder import FolderLock, atomic_write_json, claim_identity

REPLACEMENT_FORMS = "none, rank:R, mediator:N, reuse-previous, share-cfg or window:R"
_SIZED = re.compile(r"^(rank|mediator|window):([0-9]+)$")


@dataclass(frozen=True)
class Replacement:
    """What replaces the chosen heads' output: `kind` with its `size` (rank R, mediator count N, radius R)."""

    kind: str  # none | rank | mediator | reuse-previous | share-cfg | window
    size: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Replacement":
        """'rank:16' -> Replacement('rank', 16); refuses anything else naming the forms (setting `replace`)."""
        if text in ("none", "reuse-previous", "share-cfg"):
            return cls(text)
        match = _SIZED.match(text)
        if match is None:
            raise SettingError("replace", f"takes {REPLACEMENT_FORMS}; got {text!r}")
        kind, size = match.group(1), int(match.group(2))
        if kind in ("rank", "mediator") and size < 1:
            raise SettingError("replace", f"{kind}:N needs N ≥ 1, got {text!r}")
        return cls(kind, size)

    @property
    def label(self) -> str:
        return self.kind if self.size is None else f"{self.kind}:{self.size}"


def parse_step_range(text: str) -> tuple[int, int]:
    """'A:B' -> (A, B), the evaluations A..B−1 (setting `step_range`, the `--steps` flag of `attnmed intervene`)."""
    match = re.fullmatch(r"\s*([0-9]+)\s*:\s*([0-9]+)\s*", text)
    if match is None:
        raise SettingError("step_range", f"takes A:B (evaluations A..B−1, from 0), got {text!r}")
    start, stop = int(match.group(1)), int(match.group(2))
    if stop <= start:
        raise SettingError("step_range", f"{text} is empty: B must exceed A (A:B replaces evaluations A..B−1)")
    return start, stop


# ---- the replaced head outputs (pure functions of one layer's q, k, v) -------------------------------------


def truncated_rank_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int) -> torch.Tensor:
    """A_R·V for A = softmax(s·Q·Kᵀ) and A_R its truncated SVD at rank R (float64 decomposition).
    q, k, v (..., N, d) -> (..., N, d). A rank at or above N gives A·V up to rounding."""
    maps = explicit_maps(q, k, None).double()
    u, sigma, wh = torch.linalg.svd(maps, full_matrices=False)
    r = min(rank, sigma.shape[-1])
    approx = (u[..., :r] * sigma[..., None, :r]) @ wh[..., :r, :]
    return (approx @ v.double()).to(v.dtype)


def pooled_mediator_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, count: int) -> torch.Tensor:
    """softmax(s·Q·Tᵀ)·(softmax(s·T·Kᵀ)·V), T the queries average-pooled to `count` tokens on the grid: the
    form `analysis.metrics.pooled_recovery_errors` measures. q, k, v (..., N, d) -> (..., N, d)."""
    tokens, scale = q.shape[-2], q.shape[-1] ** -0.5
    mediators = pool_tokens(q, math.isqrt(tokens), math.isqrt(count))
    gathered = (scale * mediators @ k.transpose(-2, -1)).softmax(-1) @ v
    return (scale * q @ mediators.transpose(-2, -1)).softmax(-1) @ gathered


def window_mask(grid: int, radius: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, N) bool, True where key j lies within Chebyshev radius `radius` of query i on the g×g token grid
    (tokens in row-major order)."""
    positions = torch.arange(grid * grid, device=device)
    rows, cols = positions // grid, positions % grid
    near = lambda axis: (axis[:, None] - axis[None, :]).abs() <= radius  # noqa: E731
    return near(rows) & near(cols)


def window_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, radius: int) -> torch.Tensor:
    """Attention renormalised over each query's window of keys (`window_mask`). q, k, v (..., N, d) -> (..., N, d)."""
    mask = window_mask(math.isqrt(q.shape[-2]), radius, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---- the hook -------------------------------------------------------------------------------------------


class AttentionIntervention:
    """Replaces the chosen heads' output of the chosen full-attention layers at evaluations start..stop−1.

    Use as a context manager around sampling, with `callback` as (or called from) the sampler's step callback:

        with AttentionIntervention(model, Replacement.parse("rank:4"), (10, 20), [3]) as intervention:
            generate(model, process, sampler, x_T, y, callback=intervention.callback, noise_fn=noise)

    `replaced` counts the (evaluation, layer) pairs replaced so far.
    """

    def __init__(
        self,
        model,
        replacement: Replacement,
        steps: tuple[int, int],
        layers,
        heads=None,
    ):
        self.model, self.replacement = model, replacement
        self.start, self.stop = steps
        self.layers = list(layers)
        self.heads = list(range(model.config.num_heads)) if heads is None else list(heads)
        self.index: int | None = None
        self.replaced = 0
        self._previous: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def callback(self, info: StepInfo) -> None:
        """The sampler's step callback: learns the evaluation index (it never switches networks)."""
        if info.index == 0:  # a new sampling run: nothing delivered before it may be reused
            self._previous.clear()
        self.index = info.index

    def __enter__(self) -> "AttentionIntervention":
        modules = self.model.attention_modules()
        try:
            for layer in self.layers:
                self._handles.append(modules[layer].register_forward_hook(self._hook(layer)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._previous.clear()

    def _hook(self, layer: int):
        def hook(module: FullAttention, inputs, output):
            if self.replacement.kind == "none":
                return None
            if self.index is None:
                raise RuntimeError("the intervention does not know the step: pass intervention.callback to the sampler")
            replacing = self.start <= self.index < self.stop
            caching = self.replacement.kind == "reuse-previous" and self.index == self.start - 1
            if not (replacing or caching):
                return None
            (x,) = inputs
            b, n, c = x.shape
            q, k, v = module.qkv(x).reshape(b, n, 3, module.num_heads, c // module.num_heads).permute(2, 0, 3, 1, 4)
            heads_out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d), as the module computes it
            if caching:
                self._previous[layer] = heads_out[:, self.heads].clone()
                return None
            chosen = [t[:, self.heads] for t in (q, k, v, heads_out)]
            heads_out[:, self.heads] = self._replaced(layer, *chosen)
            self.replaced += 1
            out = merge_heads(heads_out)
            if module.grid_size is not None:
                out = out + depthwise_conv_on_values(module.dwc, merge_heads(v), module.grid_size)
            return module.proj(out)

        return hook

    def _replaced(self, layer: int, q, k, v, exact) -> torch.Tensor:
        kind, size = self.replacement.kind, self.replacement.size
        if kind == "rank":
            return truncated_rank_output(q, k, v, size)
        if kind == "mediator":
            return pooled_mediator_output(q, k, v, size)
        if kind == "window":
            return window_output(q, k, v, size)
        if kind == "reuse-previous":
            return self._previous[layer]
        if kind == "share-cfg":  # guided batches are [conditional; unconditional] (steps.guided)
            half = len(exact) // 2
            return torch.cat([exact[:half], exact[:half]])
        raise AssertionError(kind)


# ---- what a replacement costs -----------------------------------------------------------------------------


def head_attention_macs(replacement: Replacement, config: ModelConfig) -> int:
    """MACs of one head's attention output for one batch row of one layer, under `replacement`.

    Full attention costs what `mediator_models.network.flops` counts (blocks.attention per layer and head:
    2·N²·d, the products Q·Kᵀ and A·V). The replacements, counted the same way (matrix products only; softmax,
    masks and the SVD's own cost are not counted):
        rank:R          2·r·N·d, r = min(R, N): applying the factors, Wᵀ·V then (U·S)·(WᵀV); finding them (an
                        SVD, O(N³)) is an oracle's cost and not counted: the measure asks whether a rank-R map
                        would do, not how to get it
        mediator:N      4·N_m·N·d + N·d: two N_m×N interactions and the pooling of the queries (flops.py's count)
        reuse-previous  0
        window:R        2·W·d, W = (Σ_i w_i)² the (query, key) pairs within the windows, w_i the keys within
                        radius R of grid row i (fewer at the border)
        share-cfg       full attention per row; the unconditional rows cost nothing (`intervention_gmacs`)
    """
    tokens, head_dim = config.num_tokens, config.hidden_size // config.num_heads
    full = macs_breakdown(config)["blocks.attention"] // (config.depth * config.num_heads)
    kind, size = replacement.kind, replacement.size
    if kind in ("none", "share-cfg"):
        return full
    if kind == "rank":
        return 2 * min(size, tokens) * tokens * head_dim
    if kind == "mediator":
        return 4 * size * tokens * head_dim + tokens * head_dim
    if kind == "reuse-previous":
        return 0
    if kind == "window":
        g = config.grid_size
        per_axis = sum(min(i + size, g - 1) - max(i - size, 0) + 1 for i in range(g))
        return 2 * per_axis**2 * head_dim
    raise AssertionError(kind)


def intervention_gmacs(
    config: ModelConfig, replacement: Replacement, evaluations: int, layers: int, heads: int, guided: bool
) -> dict[str, float]:
    """Per image: the GMACs the replaced (evaluation, layer, head) slots cost with full attention, with the
    replacement, and the difference. A guided evaluation runs two rows per image (conditional, unconditional);
    share-cfg computes the conditional one only."""
    full_head = head_attention_macs(Replacement("none"), config)
    rows = 2 if guided else 1
    slots = evaluations * layers * heads
    full = rows * full_head * slots
    if replacement.kind == "share-cfg":
        replaced = full_head * slots
    else:
        replaced = rows * head_attention_macs(replacement, config) * slots
    return {"attention_full": full / 1e9, "attention_replaced": replaced / 1e9, "saved": (full - replaced) / 1e9}


# ---- the command's job ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InterventionConfig:
    """One intervention run: the replacement, where it applies, and the samples it is measured on."""

    replace: str
    steps: tuple[int, int]
    layers: tuple[int, ...]
    heads: tuple[int, ...] | None = None
    samples: int = 16
    batch_size: int = 8
    seed: int = 0
    classes: tuple[int, ...] | None = None

    @property
    def replacement(self) -> Replacement:
        return Replacement.parse(self.replace)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def check_intervention(model_config: ModelConfig, process, sampler: SamplerConfig, job: InterventionConfig) -> int:
    """Refuse, before any work, what cannot be intervened on; each message names its setting. Returns the number
    of evaluations the sampler makes."""
    replacement = job.replacement
    if model_config.attention != "full":
        raise SettingError(
            "ckpt",
            f"holds {model_config.label}, with {model_config.attention} attention; interventions replace full "
            "attention: give a full-attention model",
        )
    sampler.check(process.family, model_config.in_channels)
    if sampler.adaptive:
        raise SettingError(
            "method", "dopri5 picks its evaluations per batch, so an evaluation range means nothing: use euler or heun"
        )
    for setting, value in (("samples", job.samples), ("batch_size", job.batch_size)):
        if not isinstance(value, int) or value < 1:
            raise SettingError(setting, f"must be at least 1, got {value!r}")
    if job.classes is not None:
        wrong = [c for c in job.classes if not 0 <= c < model_config.num_classes]
        if wrong or not job.classes:
            raise SettingError("classes", f"must name labels in 0..{model_config.num_classes - 1}, got {job.classes}")
    evaluations = len(evaluation_levels(process, sampler))
    start, stop = job.steps
    if not 0 <= start < stop <= evaluations:
        raise SettingError(
            "step_range",
            f"{start}:{stop} lies outside this sampler's evaluations 0..{evaluations - 1}; give A:B with "
            f"0 ≤ A < B ≤ {evaluations}",
        )
    _check_indices("layers", job.layers, model_config.depth, "layers")
    if job.heads is not None:
        _check_indices("heads", job.heads, model_config.num_heads, "heads per layer")
    tokens = model_config.num_tokens
    if replacement.kind == "mediator":
        side = math.isqrt(replacement.size)
        if side * side != replacement.size or replacement.size > tokens:
            raise SettingError(
                "replace", f"mediator:{replacement.size} needs a perfect square count of at most {tokens} (the tokens)"
            )
    if replacement.kind == "reuse-previous" and start == 0:
        raise SettingError("step_range", "starts at 0, where reuse-previous has no previous evaluation: start at 1")
    if replacement.kind == "share-cfg" and sampler.cfg_scale == 1.0:
        raise SettingError("replace", "share-cfg shares between guidance branches: set --cfg-scale above 1")
    return evaluations


def _check_indices(setting: str, values, count: int, what: str) -> None:
    if not values:
        raise SettingError(setting, "names none; give at least one")
    wrong = sorted({v for v in values if not 0 <= v < count})
    if wrong:
        raise SettingError(setting, f"{wrong} do not exist: the model has {what} 0..{count - 1}")
    if len(set(values)) != len(values):
        raise SettingError(setting, f"repeats an index: {list(values)}")


def _identity(loaded, sampler: SamplerConfig, **job) -> dict[str, Any]:
    """What fixes an intervention folder's contents: the weights, the model, its process, the sampler, the job."""
    return {
        "checkpoint": loaded.source,
        "weights": loaded.weights,
        "model": loaded.model.config.to_dict(),
        "process": loaded.process.to_dict(),
        "sampler": sampler.to_dict(),
        **job,
    }


def run_intervention(loaded, sampler: SamplerConfig, job: InterventionConfig, out_dir, *, progress: bool = True):
    """Draw samples 0..job.samples−1 unmodified and with the replacement, write `report.json` in `out_dir` and
    return it. The folder is locked while the job runs and belongs to one configuration (`intervention.json`):
    another configuration is refused naming what differs; the same one runs again and rewrites the report."""
    config = loaded.model.config
    evaluations = check_intervention(config, loaded.process, sampler, job)
    out = Path(out_dir)
    identity = _identity(loaded, sampler, intervention=job.to_dict())
    with FolderLock(out, "attnmed intervene"):
        claim_identity(
            out / "intervention.json",
            identity,
            what="an intervention",
            fix="To rerun it, repeat its settings; for another intervention, choose another --out.",
            ignore=("checkpoint",),
        )
        reference, intervened, gflops = _paired_samples(loaded, sampler, job, progress)
        report = _report(identity, job, config, reference, intervened, gflops, evaluations, sampler.cfg_scale != 1.0)
        atomic_write_json(out / "report.json", report)
    return report


def _paired_samples(loaded, sampler, job: InterventionConfig, progress: bool):
    """(reference, intervened) final samples (S, C, H, W) and the unmodified run's GMACs per image."""
    bar = None
    if progress:
        from mediator_models.progress import progress_bar

        bar = progress_bar(2 * job.samples, f"intervene {job.replace} {sampler.describe()} (samples drawn twice)")
    try:
        reference, gmacs = _samples(loaded, sampler, job, replaced=False, bar=bar)
        intervened, _ = _samples(loaded, sampler, job, replaced=True, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    return reference, intervened, gmacs


def _samples(loaded, sampler, job: InterventionConfig, *, replaced: bool, bar=None) -> tuple[torch.Tensor, float]:
    """Final samples 0..job.samples−1 (S, C, H, W), drawn as `attnmed sample` draws them (`replaced` False) or
    with job's replacement, and the run's GMACs per image. `bar` advances by one per sample drawn."""
    model, config = loaded.model, loaded.model.config
    device = next(model.parameters()).device
    classes = list(job.classes) if job.classes else None
    finals, costs = [], []
    for first in range(0, job.samples, job.batch_size):
        indices = list(range(first, min(first + job.batch_size, job.samples)))
        x_T, y, noise = start_batch(indices, job.seed, config, classes, device)
        if replaced:
            with AttentionIntervention(model, job.replacement, job.steps, job.layers, job.heads) as intervention:
                final, caller = generate(
                    model, loaded.process, sampler, x_T, y, callback=intervention.callback, noise_fn=noise
                )
        else:
            final, caller = generate(model, loaded.process, sampler, x_T, y, noise_fn=noise)
        finals.append(final.cpu())
        costs.append(caller.gflops.cpu())
        if bar is not None:
            bar.update(len(indices))
    return torch.cat(finals), float(torch.cat(costs).mean())


def _report(identity, job, config, reference, intervened, total_gmacs, evaluations, guided) -> dict[str, Any]:
    from analysis.quality.stats import seed_level_difference

    ref, new = reference.double().flatten(1), intervened.double().flatten(1)
    errors = ((new - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-300)).tolist()
    distances, extractor = _feature_distances(config, reference, intervened)
    per_sample = [{"index": i, "relative_error": e} for i, e in enumerate(errors)]
    if distances is not None:
        for row, distance in zip(per_sample, distances):
            row["feature_distance"] = distance

    def summary(values):
        interval = seed_level_difference(values)
        return {"mean": interval.point, "low": interval.low, "high": interval.high, "samples": len(values)}

    replacement = job.replacement
    heads = config.num_heads if job.heads is None else len(job.heads)
    start, stop = job.steps
    gmacs = intervention_gmacs(config, replacement, stop - start, len(job.layers), heads, guided)
    gmacs.update(per_image=total_gmacs, saved_share=gmacs["saved"] / total_gmacs if total_gmacs else None)
    return {
        **identity,
        "evaluations": evaluations,
        "relative_error": summary(errors),
        "feature_distance": None if distances is None else {**summary(distances), "extractor": extractor},
        "feature_distance_note": extractor if distances is None else None,
        "gflops": gmacs,
        "per_sample": per_sample,
    }


def _feature_distances(config: ModelConfig, reference, intervened) -> tuple[list[float] | None, str]:
    """Per sample ‖f(x) − f(x_ref)‖ in the pinned digits extractor's 128 features, for models drawing grey images
    (the digits); otherwise (None, why)."""
    if config.in_channels != 1:
        return None, (
            f"no perceptual distance: the model draws {config.in_channels}-channel outputs, and the pinned "
            "extractor reads grey digits"
        )
    from analysis.quality.features import DigitsExtractor
    from mediator_models.sample import to_uint8

    extractor = DigitsExtractor.pinned()
    images = torch.from_numpy(to_uint8(torch.cat([reference, intervened])))  # (2S, H, W, 3), ≥ 2 images
    features = torch.from_numpy(extractor.features_of(images))
    ref, new = features.chunk(2)
    return (new - ref).norm(dim=1).tolist(), extractor.label


def format_report(report: dict[str, Any]) -> str:
    """The report as a short table: one line per sample, then the means with their 95% intervals and the cost."""
    has_features = report["feature_distance"] is not None
    lines = [f"{'sample':>6}  {'rel. error':>10}" + (f"  {'feature dist.':>13}" if has_features else "")]
    for row in report["per_sample"]:
        line = f"{row['index']:>6}  {row['relative_error']:>10.4g}"
        lines.append(line + (f"  {row['feature_distance']:>13.4g}" if has_features else ""))

    def interval(name, values):
        return f"{name}: {values['mean']:.4g} (95% CI {values['low']:.4g} … {values['high']:.4g}, {values['samples']} samples)"

    lines.append(interval("relative error ‖x − x_ref‖/‖x_ref‖", report["relative_error"]))
    if has_features:
        lines.append(
            interval(f"feature distance ({report['feature_distance']['extractor']})", report["feature_distance"])
        )
    else:
        lines.append(report["feature_distance_note"])
    g = report["gflops"]
    share = "" if g["saved_share"] is None else f" ({g['saved_share']:.2%} of {g['per_image']:.4g} per image)"
    lines.append(
        f"GFLOPs per image: replaced attention {g['attention_full']:.4g} -> {g['attention_replaced']:.4g}, "
        f"saved {g['saved']:.4g}{share}"
    )
    return "\n".join(lines)


# ---- a grid of interventions: which recorded measure predicts the damage -----------------------------------
#
# Each cell of the grid replaces one layer over one window of evaluations, and its damage is the mean relative
# error of the final samples against the unmodified run (drawn once for the whole grid). Each measure of a
# redundancy table of the same model and sampler is read per cell as its head-average (head −1) at that layer,
# averaged over the window's steps; the Spearman rank correlation between measure and damage over the cells says
# how well the measure orders the computations by what removing them costs, whatever its scale or sign.
#
# The interval is a percentile bootstrap over cells rather than Fisher's z: z's variance for Spearman's ρ
# (about 1.06/(n − 3)) assumes a bivariate-normal-like pair and is poor for a few dozen cells and for ρ near ±1,
# where the damage of a grid often puts it; resampling cells assumes nothing about the pair's distribution. It
# treats the cells as exchangeable draws, which neighbouring windows and layers are only roughly, and it holds
# each cell's damage fixed, so the sampling noise of the damage (its own t-interval, per cell) is not in it.

BOOTSTRAP_REPLICATES = 2000
MIN_CELLS_FOR_CORRELATION = 3


@dataclass(frozen=True)
class GridConfig:
    """A grid of interventions: `replace` in one layer of `layers` at a time, over one window of `windows` at a
    time. A window is 'A:B' (evaluations A..B−1), or the grid takes one count 'K': the evaluations cut into K
    contiguous windows of near-equal length."""

    replace: str
    windows: tuple[str, ...]
    layers: tuple[int, ...]
    heads: tuple[int, ...] | None = None
    samples: int = 16
    batch_size: int = 8
    seed: int = 0
    classes: tuple[int, ...] | None = None

    def step_windows(self, evaluations: int) -> list[tuple[int, int]]:
        """The windows as (A, B) pairs for a sampler making `evaluations` evaluations (setting `windows`)."""
        if not self.windows:
            raise SettingError("windows", "names none; give a count K or windows A:B")
        if len(self.windows) == 1 and self.windows[0].strip().isdigit():
            count = int(self.windows[0])
            if not 1 <= count <= evaluations:
                raise SettingError(
                    "windows", f"{count}: the sampler makes {evaluations} evaluations; give a count in 1..{evaluations}"
                )
            edges = [round(i * evaluations / count) for i in range(count + 1)]
            return list(zip(edges[:-1], edges[1:]))
        windows = []
        for text in self.windows:
            try:
                windows.append(parse_step_range(text))
            except SettingError as error:
                raise SettingError("windows", f"{error.reason} (one count K, or windows A:B)") from None
        if len(set(windows)) != len(windows):
            raise SettingError("windows", f"repeats a window: {list(self.windows)}")
        return windows

    def cell_job(self, window: tuple[int, int], layer: int) -> InterventionConfig:
        return InterventionConfig(
            self.replace, window, (layer,), self.heads, self.samples, self.batch_size, self.seed, self.classes
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def check_grid(model_config: ModelConfig, process, sampler: SamplerConfig, grid: GridConfig):
    """Refuse, before any work, a grid with a cell that cannot be intervened on (naming the setting; a window's
    fault names `windows`). Returns (evaluations, windows)."""
    evaluations = len(evaluation_levels(process, sampler)) if not sampler.adaptive else 0
    windows = grid.step_windows(evaluations) if evaluations else [(0, 1)]  # dopri5 is refused just below
    _check_indices("layers", grid.layers, model_config.depth, "layers")
    for window in windows:
        try:
            check_intervention(model_config, process, sampler, grid.cell_job(window, grid.layers[0]))
        except SettingError as error:
            if error.setting != "step_range":
                raise
            named = f"{window[0]}:{window[1]}"
            reason = error.reason if error.reason.startswith(named) else f"{named} {error.reason}"
            raise SettingError("windows", reason) from None
    return evaluations, windows


def read_grid_table(path: str | Path, model_config: ModelConfig, evaluations: int):
    """The redundancy table at `path` if it was recorded from this model (its sidecar's "model") over as many
    evaluations as this sampler makes; otherwise refuses in one line (setting `table`)."""
    from analysis.collect import read_table, table_model

    table = read_table(path)
    recorded = table_model(path)
    if recorded != model_config:
        theirs, ours = recorded.to_dict(), model_config.to_dict()
        differ = [
            f"{k} {theirs.get(k)!r} ≠ {ours.get(k)!r}"
            for k in dict.fromkeys([*theirs, *ours])
            if theirs.get(k) != ours.get(k)
        ]
        raise SettingError(
            "table",
            f"{path} was recorded from {recorded.label}, not this checkpoint's {model_config.label} (its sidecar's "
            f"model differs: {', '.join(differ)}); record a table of this checkpoint with `attnmed record`",
        )
    networks = sorted(set(table["network"]))
    if len(networks) != 1:
        raise SettingError("table", f"{path} holds the networks {networks}; give a table of this one model")
    steps = int(table["step"].max()) + 1 if len(table) else 0
    if steps != evaluations:
        raise SettingError(
            "table",
            f"{path} covers {steps} evaluations, this sampler makes {evaluations}: record it with the same sampler "
            "and --sampler-steps",
        )
    return table


def cell_measures(table, windows, layers) -> dict[str, dict[tuple[int, int, int], float]]:
    """{measure: {(A, B, layer): value}}: each metric of the table (named 'metric (branch)' off branch "all"),
    its head average (head −1) at the layer, averaged over the steps A..B−1 the table has. Cells the table does
    not cover are left out."""
    rows = table[table["head"] == -1]
    measures: dict[str, dict[tuple[int, int, int], float]] = {}
    for (metric, branch), part in rows.groupby(["metric", "branch"], sort=True):
        name = metric if branch == "all" else f"{metric} ({branch})"
        values = {}
        for start, stop in windows:
            inside = part[(part["step"] >= start) & (part["step"] < stop)]
            by_layer = inside.groupby("layer")["mean"].mean()
            for layer in layers:
                value = by_layer.get(layer)
                if value is not None and math.isfinite(value):
                    values[(start, stop, layer)] = float(value)
        measures[name] = values
    return measures


def spearman(x, y) -> float:
    """Spearman's ρ: the Pearson correlation of the ranks (ties take their average rank); nan where either
    side is constant. x, y (..., n) -> (...)."""
    import numpy as np
    from scipy.stats import rankdata

    rx, ry = rankdata(np.asarray(x, float), axis=-1), rankdata(np.asarray(y, float), axis=-1)
    rx, ry = rx - rx.mean(-1, keepdims=True), ry - ry.mean(-1, keepdims=True)
    denominator = np.sqrt((rx**2).sum(-1) * (ry**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rx * ry).sum(-1) / denominator
    return np.where(denominator > 0, rho, np.nan) if rho.ndim else (float(rho) if denominator > 0 else math.nan)


def measure_damage_correlations(
    measures: dict[str, dict[tuple[int, int, int], float]],
    damage: dict[tuple[int, int, int], float],
    *,
    replicates: int = BOOTSTRAP_REPLICATES,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per measure: Spearman's ρ between it and the damage over the cells both have, with its 95% percentile
    bootstrap interval over cells, sorted by |ρ| (measures without a ρ last, with the reason)."""
    import numpy as np

    generator = np.random.default_rng(seed)
    results = []
    for name, values in measures.items():
        cells = [cell for cell in damage if cell in values]
        x = np.array([values[c] for c in cells])
        y = np.array([damage[c] for c in cells])
        row: dict[str, Any] = {"measure": name, "cells": len(cells), "rho": None, "low": None, "high": None}
        if len(cells) < MIN_CELLS_FOR_CORRELATION:
            row["note"] = f"{len(cells)} cells with values; a rank correlation needs {MIN_CELLS_FOR_CORRELATION}"
        elif math.isnan(rho := spearman(x, y)):
            row["note"] = "constant over the cells (or the damage is): no ranking"
        else:
            picks = generator.integers(0, len(cells), size=(replicates, len(cells)))
            resampled = spearman(x[picks], y[picks])
            resampled = resampled[~np.isnan(resampled)]  # a resample of tied cells ranks nothing
            low, high = np.quantile(resampled, [0.025, 0.975]) if len(resampled) else (math.nan, math.nan)
            row.update(rho=float(rho), low=float(low), high=float(high))
        results.append(row)
    return sorted(results, key=lambda r: (r["rho"] is None, -abs(r["rho"] or 0.0), r["measure"]))


def run_intervention_grid(
    loaded, sampler: SamplerConfig, grid: GridConfig, out_dir, table_path=None, *, progress: bool = True
):
    """Draw samples 0..grid.samples−1 unmodified once and then with the replacement in each (window, layer)
    cell; with a redundancy table of the same model and sampler, correlate each of its measures with the damage.
    Writes `report.json` in `out_dir` (locked, one grid configuration per folder) and returns it."""
    config = loaded.model.config
    evaluations, windows = check_grid(config, loaded.process, sampler, grid)
    table = None if table_path is None else read_grid_table(table_path, config, evaluations)
    out = Path(out_dir)
    identity = _identity(loaded, sampler, grid=grid.to_dict(), table=None if table_path is None else str(table_path))
    guided = sampler.cfg_scale != 1.0
    heads = config.num_heads if grid.heads is None else len(grid.heads)
    with FolderLock(out, "attnmed intervene --grid"):
        claim_identity(
            out / "intervention.json",
            identity,
            what="an intervention grid",
            fix="To rerun it, repeat its settings; for another grid, choose another --out.",
            ignore=("checkpoint", "table"),
        )
        bar = None
        if progress:
            from mediator_models.progress import progress_bar

            cells = len(windows) * len(grid.layers)
            bar = progress_bar(grid.samples * (1 + cells), f"intervene grid {grid.replace} {sampler.describe()}")
        try:
            first = grid.cell_job(windows[0], grid.layers[0])
            reference, total_gmacs = _samples(loaded, sampler, first, replaced=False, bar=bar)
            ref = reference.double().flatten(1)
            cells, damage = [], {}
            for start, stop in windows:
                for layer in grid.layers:
                    job = grid.cell_job((start, stop), layer)
                    new = _samples(loaded, sampler, job, replaced=True, bar=bar)[0].double().flatten(1)
                    errors = ((new - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-300)).tolist()
                    gmacs = intervention_gmacs(config, job.replacement, stop - start, 1, heads, guided)
                    cells.append(
                        {
                            "window": [start, stop],
                            "layer": layer,
                            "relative_error": _interval(errors),
                            "gflops_saved": gmacs["saved"],
                            "relative_errors": errors,
                        }
                    )
                    damage[(start, stop, layer)] = cells[-1]["relative_error"]["mean"]
        finally:
            if bar is not None:
                bar.close()
        report = {
            **identity,
            "evaluations": evaluations,
            "gflops_per_image": total_gmacs,
            "damage": "mean over samples of ‖x − x_ref‖/‖x_ref‖ of the final samples",
            "cells": cells,
            "correlations": None,
        }
        if table is not None:
            measures = cell_measures(table, windows, grid.layers)
            for cell in cells:
                key = (*cell["window"], cell["layer"])
                cell["measures"] = {name: values[key] for name, values in measures.items() if key in values}
            report["correlations"] = measure_damage_correlations(measures, damage)
            report["interval"] = (
                f"95% percentile bootstrap over cells ({BOOTSTRAP_REPLICATES} replicates): it assumes nothing about "
                "how measure and damage are distributed, which Fisher's z would; each cell's damage is held fixed"
            )
        atomic_write_json(out / "report.json", report)
    return report


def _interval(values: list[float]) -> dict[str, Any]:
    from analysis.quality.stats import seed_level_difference

    interval = seed_level_difference(values)
    return {"mean": interval.point, "low": interval.low, "high": interval.high, "samples": len(values)}


def format_grid_report(report: dict[str, Any]) -> str:
    """The grid as two short tables: the damage per (window, layer) cell, then each measure's rank correlation
    with the damage, strongest first: which measure to trust for planning."""
    lines = [f"{'window':>9}  {'layer':>5}  {'rel. error':>10}  {'95% CI':^23}  {'GFLOPs saved':>12}"]
    for cell in report["cells"]:
        error = cell["relative_error"]
        window = f"{cell['window'][0]}:{cell['window'][1]}"
        interval = f"{error['low']:.4g} … {error['high']:.4g}"
        lines.append(
            f"{window:>9}  {cell['layer']:>5}  {error['mean']:>10.4g}  {interval:^23}  {cell['gflops_saved']:>12.4g}"
        )
    if report["correlations"] is None:
        lines.append("the damage only: give --table, a redundancy table of this model, to rank its measures")
        return "\n".join(lines)
    lines.append("Spearman ρ of each measure with the damage over the cells (95% interval: bootstrap over cells):")
    width = max([7, *(len(r["measure"]) for r in report["correlations"])])
    lines.append(f"{'measure':<{width}}  {'rho':>7}  {'95% CI':>17}  {'cells':>5}")
    for row in report["correlations"]:
        if row["rho"] is None:
            lines.append(f"{row['measure']:<{width}}  {'—':>7}  {'':>17}  {row['cells']:>5}  {row['note']}")
        else:
            interval = f"{row['low']:.3f} … {row['high']:.3f}"
            lines.append(f"{row['measure']:<{width}}  {row['rho']:>7.3f}  {interval:>17}  {row['cells']:>5}")
    return "\n".join(lines)
