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
    """Replaces the chosen heads' output of the chosen full-attention layers at evaluations start..stop−1, or, built
    `from_cells`, each (evaluation, layer) of a plan with its own replacement.

    Use as a context manager around sampling, with `callback` as (or called from) the sampler's step callback:

        with AttentionIntervention(model, Replacement.parse("rank:4"), (10, 20), [3]) as intervention:
            generate(model, process, sampler, x_T, y, callback=intervention.callback, noise_fn=noise)

    The intervention is itself callable as that callback. `replaced` counts the (evaluation, layer) pairs replaced
    so far; `saved_gmacs_per_image`, the attention GMACs per image the replacements saved in the current sampling
    run, counted as they ran (`head_attention_macs` per head and batch row; share-cfg saves the unconditional rows).

    reuse-previous delivers what the layer delivered at the previous evaluation: the exact output when that
    evaluation was not replaced, else its replacement; over a run of reuse-previous evaluations, the output of the
    evaluation before the first.
    """

    def __init__(
        self,
        model,
        replacement: Replacement,
        steps: tuple[int, int],
        layers,
        heads=None,
    ):
        start, stop = steps
        cells = {(index, layer): replacement for index in range(start, stop) for layer in layers}
        self._setup(model, cells, heads)

    @classmethod
    def from_cells(cls, model, cells, heads=None) -> "AttentionIntervention":
        """{(evaluation, layer): Replacement} -> one intervention replacing each cell its own way (a plan)."""
        intervention = cls.__new__(cls)
        intervention._setup(model, dict(cells), heads)
        return intervention

    def _setup(self, model, cells: dict[tuple[int, int], Replacement], heads) -> None:
        self.model = model
        self.cells = {key: r for key, r in cells.items() if r.kind != "none"}
        self.layers = sorted({layer for _, layer in self.cells})
        self.heads = list(range(model.config.num_heads)) if heads is None else list(heads)
        # The evaluations whose delivered output a reuse-previous evaluation right after them takes.
        self._cached_at = {
            (index - 1, layer)
            for (index, layer), r in self.cells.items()
            if r.kind == "reuse-previous" and self._kind_at(index - 1, layer) != "reuse-previous"
        }
        self._full_head = head_attention_macs(Replacement("none"), model.config)
        self._head_macs = {r: head_attention_macs(r, model.config) for r in set(self.cells.values())}
        self.index: int | None = None
        self.images = 1
        self.replaced = 0
        self.saved_gmacs_per_image = 0.0
        self._previous: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def _kind_at(self, index: int, layer: int) -> str:
        replacement = self.cells.get((index, layer))
        return "none" if replacement is None else replacement.kind

    def callback(self, info: StepInfo) -> None:
        """The sampler's step callback: learns the evaluation index (it never switches networks)."""
        if info.index == 0:  # a new sampling run: nothing delivered before it may be reused
            self._previous.clear()
            self.saved_gmacs_per_image = 0.0
        self.index = info.index
        self.images = len(info.x)

    __call__ = callback

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
            if self.index is None:
                raise RuntimeError("the intervention does not know the step: pass intervention.callback to the sampler")
            replacement = self.cells.get((self.index, layer))
            caching = (self.index, layer) in self._cached_at
            if replacement is None and not caching:
                return None
            (x,) = inputs
            b, n, c = x.shape
            q, k, v = module.qkv(x).reshape(b, n, 3, module.num_heads, c // module.num_heads).permute(2, 0, 3, 1, 4)
            heads_out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d), as the module computes it
            if replacement is not None:
                chosen = [t[:, self.heads] for t in (q, k, v, heads_out)]
                heads_out[:, self.heads] = self._replaced(layer, replacement, *chosen)
                self.replaced += 1
                self._count_saving(replacement, rows=b)
            if caching:
                self._previous[layer] = heads_out[:, self.heads].clone()
            if replacement is None:
                return None  # the module's own output, bit for bit
            out = merge_heads(heads_out)
            if module.grid_size is not None:
                out = out + depthwise_conv_on_values(module.dwc, merge_heads(v), module.grid_size)
            return module.proj(out)

        return hook

    def _count_saving(self, replacement: Replacement, rows: int) -> None:
        if replacement.kind == "share-cfg":  # the unconditional half of the rows is not computed
            saved = (rows // 2) * self._full_head
        else:
            saved = rows * (self._full_head - self._head_macs[replacement])
        self.saved_gmacs_per_image += saved * len(self.heads) / self.images / 1e9

    def _replaced(self, layer: int, replacement: Replacement, q, k, v, exact) -> torch.Tensor:
        kind, size = replacement.kind, replacement.size
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
        report = _report(
            identity, job, config, reference, intervened, gflops, evaluations, sampler.cfg_scale != 1.0, loaded.data
        )
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


def _report(
    identity, job, config, reference, intervened, total_gmacs, evaluations, guided, data=None
) -> dict[str, Any]:
    from analysis.quality.stats import seed_level_difference

    ref, new = reference.double().flatten(1), intervened.double().flatten(1)
    errors = ((new - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-300)).tolist()
    distances, extractor = _feature_distances(config, reference, intervened, data)
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


def _feature_distances(config: ModelConfig, reference, intervened, data: str | None = None):
    """Per sample ‖f(x) − f(x_ref)‖ in the features of the pinned extractor of the data the model was trained on
    (`data`, from its checkpoint: the digits or the textures; a grey model that does not say is read as the
    digits), and the extractor's label; otherwise (None, why)."""
    from analysis.quality.features import PINNED_EXTRACTORS
    from mediator_models.sample import to_uint8

    if config.in_channels != 1:
        return None, (
            f"no perceptual distance: the model draws {config.in_channels}-channel outputs, and the pinned "
            "extractors read grey images"
        )
    data = data or "digits"
    if data not in PINNED_EXTRACTORS:
        return None, f"no perceptual distance: the model was trained on {data}, which no pinned extractor reads"
    extractor = PINNED_EXTRACTORS[data].pinned()  # at its own 16×16: features_of resizes what it reads
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


def step_windows(windows: tuple[str, ...], evaluations: int) -> list[tuple[int, int]]:
    """Windows of evaluations as (A, B) pairs: ('K',) cuts `evaluations` into K contiguous windows of near-equal
    length; otherwise each text is 'A:B' (evaluations A..B−1). Refusals name the setting `windows`."""
    if not windows:
        raise SettingError("windows", "names none; give a count K or windows A:B")
    if len(windows) == 1 and windows[0].strip().isdigit():
        count = int(windows[0])
        if not 1 <= count <= evaluations:
            raise SettingError(
                "windows", f"{count}: the sampler makes {evaluations} evaluations; give a count in 1..{evaluations}"
            )
        edges = [round(i * evaluations / count) for i in range(count + 1)]
        return list(zip(edges[:-1], edges[1:]))
    parsed = []
    for text in windows:
        try:
            parsed.append(parse_step_range(text))
        except SettingError as error:
            raise SettingError("windows", f"{error.reason} (one count K, or windows A:B)") from None
    if len(set(parsed)) != len(parsed):
        raise SettingError("windows", f"repeats a window: {list(windows)}")
    return parsed


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
        return step_windows(self.windows, evaluations)

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


# ---- plans: which computation each (window of evaluations, layer) runs ----------------------------------------
#
# A plan chooses, per cell (a window of evaluations A..B−1 and one layer, all its heads), one method among full
# attention and the replacements that save work: mediator:N, reuse-previous, share-cfg and window:R (rank:R is an
# oracle: finding the rank-R map costs an SVD). Each option has a predicted error and the attention GMACs per image
# it saves (`intervention_gmacs`, the count interventions use). Predictions come from an intervention grid's
# measured damage where one covers the cell and method (the better predictor: it is what removing the computation
# did), else from a redundancy table of the same model and sampler, head average (head −1) at the layer, averaged
# over the window's steps and over the guidance branches:
#     mediator:N      recovery_pooled_N        ‖Â·V − A·V‖_F / ‖A·V‖_F of the pooled mediator form
#     reuse-previous  step_output_rel_l1       relative L1 of the output to the previous evaluation's; over a window
#                                              the error at evaluation k is bounded by the sum from A to k (the
#                                              output of A−1 is delivered throughout), averaged over k
#     share-cfg       branch_output_rel_l1     relative L1 between the conditional and unconditional outputs
#     window:R        1 − local_mass_rR        the mass outside the window
# The two kinds of prediction are on different scales (damage: the final samples' relative error; the table: one
# layer's attention output), so a budget mixing them mixes scales; each cell says what predicted it.
#
# Every prediction assumes the cell's inputs are exact, as the table measured them; a plan's errors are summed, not
# compounded. reuse-previous in two adjacent windows of one layer would deliver an output reused twice, whose error
# nothing predicts, so no plan holds that: the window before a reuse computes its output.
#
# Two solvers. `greedy_plan` (DiTFastAttn's): per cell, from the cheapest method up, the first whose predicted
# error is within the budget E. `milp_plan`: the least summed predicted error with the run's GFLOPs per image within
# the budget G, exactly, as an integer program (scipy.optimize.milp, HiGHS): one binary per (cell, option), one
# option per cell, with the options another beats in both error and saving left out first.

FULL_METHOD = "full"
PLAN_FORMAT = 1
MILP_TIME_LIMIT_S = 120.0


@dataclass(frozen=True)
class PlanOption:
    """One method for one cell: its predicted error, the attention GMACs per image it saves, and what predicted it."""

    method: str
    error: float
    saved: float
    predicted_by: str


@dataclass(frozen=True)
class PlanCell:
    """Evaluations window[0]..window[1]−1 of one layer, and the options it may run (full attention first)."""

    window: tuple[int, int]
    layer: int
    options: tuple[PlanOption, ...]


def plan_replacement(method: str) -> Replacement:
    """'full' -> Replacement('none'); a replacement a plan may choose otherwise (setting `methods`)."""
    if method == FULL_METHOD:
        return Replacement("none")
    try:
        replacement = Replacement.parse(method)
    except SettingError:
        replacement = None
    if replacement is None or replacement.kind in ("none", "rank"):
        raise SettingError(
            "methods",
            f"takes full, mediator:N, reuse-previous, share-cfg or window:R; got {method!r}"
            + (" (rank:R needs the SVD of A, an oracle's cost: it saves nothing)" if method.startswith("rank") else ""),
        )
    return replacement


def _previous_cells(cells: list[PlanCell]) -> list[int | None]:
    """For each cell, the index of the cell of its layer whose window ends where its own starts, if any."""
    ending = {(cell.layer, cell.window[1]): i for i, cell in enumerate(cells)}
    return [ending.get((cell.layer, cell.window[0])) for cell in cells]


def greedy_plan(cells: list[PlanCell], budget_error: float) -> list[PlanOption]:
    """Per cell, in order of evaluations, the cheapest option (most GMACs saved; ties: the smaller error) whose
    predicted error is at most `budget_error`; reuse-previous is skipped right after a cell that reuses."""
    order = sorted(range(len(cells)), key=lambda i: (cells[i].window, cells[i].layer))
    previous = _previous_cells(cells)
    chosen: dict[int, PlanOption] = {}
    for i in order:
        before = chosen.get(previous[i]) if previous[i] is not None else None
        for option in sorted(cells[i].options, key=lambda o: (-o.saved, o.error)):
            if option.method == "reuse-previous" and before is not None and before.method == "reuse-previous":
                continue
            if option.error <= budget_error:
                chosen[i] = option
                break
        else:
            raise AssertionError("full attention (error 0) is always within a budget ≥ 0")
    return [chosen[i] for i in range(len(cells))]


def _undominated(options: tuple[PlanOption, ...]) -> list[PlanOption]:
    """The options no other option of the cell beats (error no larger, saving no smaller, one of them strictly, or
    both equal and listed earlier). Dropping the others leaves a plan's optimum as it is: swapping a beaten option
    for what beats it keeps the budget and the error; only an option that is not reuse-previous may beat another
    that is not, since a reuse in its place could break the rule on adjacent reuses."""

    def beats(a: PlanOption, b: PlanOption, a_first: bool) -> bool:
        if b.method != "reuse-previous" and a.method == "reuse-previous":
            return False
        no_worse = a.error <= b.error and a.saved >= b.saved
        return no_worse and (a.error < b.error or a.saved > b.saved or a_first)

    return [b for k, b in enumerate(options) if not any(beats(a, b, m < k) for m, a in enumerate(options) if m != k)]


def milp_plan(
    cells: list[PlanCell], full_gflops: float, budget_gflops: float, *, time_limit: float = MILP_TIME_LIMIT_S
) -> tuple[list[PlanOption], str]:
    """The options of least summed predicted error whose run costs at most `budget_gflops` per image (a run of
    full attention everywhere costs `full_gflops`), no layer reusing in adjacent windows. Within a cell, ties in
    error go to the option saving more. Returns the options and the solver's status (HiGHS proves optimality to a
    relative gap of 1e-4; past `time_limit` seconds it returns its best plan so far and says so). Refuses a budget
    below the cheapest plan (setting `budget_gflops`)."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    kept = [_undominated(cell.options) for cell in cells]
    variables = [(i, option) for i, options in enumerate(kept) for option in options]
    errors = np.array([option.error for _, option in variables])
    saved = np.array([option.saved for _, option in variables])
    count = len(variables)
    one_hot = coo_matrix((np.ones(count), ([i for i, _ in variables], range(count))), shape=(len(cells), count))
    constraints = [LinearConstraint(one_hot, 1, 1)]
    reuse = {i: c for c, (i, option) in enumerate(variables) if option.method == "reuse-previous"}
    pairs = [
        (reuse[i], reuse[before]) for i, before in enumerate(_previous_cells(cells)) if i in reuse and before in reuse
    ]
    if pairs:
        at = ([k for k in range(len(pairs)) for _ in range(2)], [c for pair in pairs for c in pair])
        adjacent = coo_matrix((np.ones(2 * len(pairs)), at), shape=(len(pairs), count))
        constraints.append(LinearConstraint(adjacent, -np.inf, 1))
    integrality, bounds, options = np.ones(count), Bounds(0, 1), {"time_limit": time_limit}
    # The run costs full − Σ saved·x ≤ G, i.e. Σ saved·x ≥ full − G.
    budget = LinearConstraint(saved[None, :], full_gflops - budget_gflops, np.inf)
    solution = milp(errors, integrality=integrality, bounds=bounds, constraints=[*constraints, budget], options=options)
    if solution.x is None:
        cheapest = milp(-saved, integrality=integrality, bounds=bounds, constraints=constraints, options=options)
        least = full_gflops + float(cheapest.fun) if cheapest.x is not None else math.nan
        raise SettingError(
            "budget_gflops",
            f"is {budget_gflops:.6g} GFLOPs per image, below the cheapest plan the options allow ({least:.6g}; full "
            f"attention everywhere costs {full_gflops:.6g}): raise it, or allow cheaper methods",
        )
    chosen = [option for (_, option), on in zip(variables, np.round(solution.x).astype(bool)) if on]
    gap = getattr(solution, "mip_gap", None)
    gap_text = "" if gap is None else f", relative gap {gap:.1e}"
    status = f"optimal{gap_text}" if solution.status == 0 else f"not proven optimal: {solution.message}{gap_text}"
    return chosen, status


# ---- predictions from a table and from grids ---------------------------------------------------------------------

_PREDICTOR = {"mediator": "recovery_pooled_{}", "window": "local_mass_r{}"}
STEP_RELATION, BRANCH_RELATION = "step_output_rel_l1", "branch_output_rel_l1"


def _metric_of(replacement: Replacement) -> str:
    if replacement.kind in _PREDICTOR:
        return _PREDICTOR[replacement.kind].format(replacement.size)
    return STEP_RELATION if replacement.kind == "reuse-previous" else BRANCH_RELATION


def table_methods(table) -> list[str]:
    """The plan methods a redundancy table predicts: mediator:N per recovery_pooled_N and window:R per local_mass_rR
    it holds (smallest first), then reuse-previous and share-cfg where it holds the step and branch relations."""
    metrics = set(table["metric"])

    def sizes(pattern: str) -> list[int]:
        return sorted(int(m.group(1)) for m in map(re.compile(pattern).fullmatch, metrics) if m is not None)

    methods = [f"mediator:{n}" for n in sizes(r"recovery_pooled_([0-9]+)")]
    methods += [f"window:{r}" for r in sizes(r"local_mass_r([0-9]+)")]
    relations = (("reuse-previous", STEP_RELATION), ("share-cfg", BRANCH_RELATION))
    return methods + [method for method, metric in relations if metric in metrics]


def table_predictions(table, windows, layers, methods) -> dict[tuple[int, int, int, str], tuple[float, str]]:
    """{(A, B, layer, method): (predicted error, what predicted it)} from a redundancy table (see above); cells
    where the table lacks a step of the window are left out."""
    rows = table[table["head"] == -1]
    predictions = {}
    for method in methods:
        replacement = plan_replacement(method)
        metric = _metric_of(replacement)
        part = rows[rows["metric"] == metric]
        part = (
            part[part["branch"] == "cond-uncond"]
            if replacement.kind == "share-cfg"
            else part[part["branch"] != "cond-uncond"]
        )
        values = part.groupby(["layer", "step"])["mean"].mean().to_dict()  # averaged over the guidance branches
        for start, stop in windows:
            for layer in layers:
                steps = [values.get((layer, step), math.nan) for step in range(start, stop)]
                if not steps or not all(math.isfinite(v) for v in steps):
                    continue
                if replacement.kind == "reuse-previous":  # evaluation A−1's output delivered at A..k: Σ bound
                    running, bounds = 0.0, []
                    for value in steps:
                        running += value
                        bounds.append(running)
                    error = sum(bounds) / len(bounds)
                elif replacement.kind == "window":
                    error = 1.0 - sum(steps) / len(steps)
                else:
                    error = sum(steps) / len(steps)
                by = f"table {'1 − ' if replacement.kind == 'window' else ''}{metric}"
                predictions[(start, stop, layer, method)] = (max(error, 0.0), by)
    return predictions


def grid_predictions(report: dict[str, Any], where: str) -> dict[tuple[int, int, int, str], tuple[float, str]]:
    """{(A, B, layer, method): (measured damage, what measured it)} of an intervention grid's report."""
    method = report["grid"]["replace"]
    plan_replacement(method)
    return {
        (*cell["window"], cell["layer"], method): (float(cell["relative_error"]["mean"]), f"grid damage {where}")
        for cell in report["cells"]
    }


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _differing(theirs: dict, ours: dict) -> str:
    return ", ".join(
        f"{k} {theirs.get(k)!r} ≠ {ours.get(k)!r}"
        for k in dict.fromkeys([*theirs, *ours])
        if theirs.get(k) != ours.get(k)
    )


@dataclass
class _Source:
    path: Path
    kind: str  # table | grid
    model: ModelConfig
    process: Any
    sampler: SamplerConfig
    weights: str | None
    content: Any  # the table, or the grid's report


def _read_source(path: str | Path) -> _Source:
    """A redundancy table (with the sidecar `attnmed record` writes) or an intervention grid's report.json."""
    import json

    from analysis.collect import read_table, table_model
    from mediator_models.sampling.generation import ProcessConfig

    path = Path(path)
    if path.suffix in (".parquet", ".csv"):
        table = read_table(path)
        sidecar = json.loads(Path(str(path) + ".json").read_text()) if Path(str(path) + ".json").exists() else {}
        model = table_model(path)
        if "sampler" not in sidecar:
            raise ValueError(
                f"{path}: its sidecar names no sampler, and a plan is made for one; record the table with `attnmed "
                "record`, whose sidecar names it",
            )
        process = ProcessConfig(**sidecar.get("process", {"family": model.family}))
        return _Source(
            path, "table", model, process, SamplerConfig(**sidecar["sampler"]), sidecar.get("weights"), table
        )
    if not path.is_file():
        raise FileNotFoundError(f"no table or grid report at {path}")
    try:
        report = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        report, reason = None, str(error)
    else:
        reason = "it holds no grid's 'cells'"
    if not isinstance(report, dict) or "cells" not in report or "grid" not in report:
        raise ValueError(
            f"{path} is neither a redundancy table (.parquet, .csv) nor an intervention grid's report.json "
            f"(`attnmed intervene --grid`): {reason}",
        )
    if report["grid"].get("heads") is not None:
        raise ValueError(
            f"{path} replaced heads {report['grid']['heads']} only; a plan replaces every head of a layer: run the "
            "grid without --heads",
        )
    model = ModelConfig.from_dict(report["model"])
    process = ProcessConfig(**report["process"])
    return _Source(path, "grid", model, process, SamplerConfig(**report["sampler"]), report.get("weights"), report)


def make_plan(
    sources,
    *,
    budget_error: float | None = None,
    budget_gflops: float | None = None,
    methods=None,
    windows=None,
    name: str | None = None,
) -> dict[str, Any]:
    """A plan (a JSON-ready dict) from redundancy tables and/or intervention grids of one model and sampler, within
    an error budget (greedy) or a GFLOPs budget (exact). Each refusal names its setting."""
    from mediator_models.network.flops import config_gmacs

    if (budget_error is None) == (budget_gflops is None):
        raise SettingError("budget_error", "or --budget-gflops: give exactly one budget")
    if budget_error is not None and not (math.isfinite(budget_error) and budget_error >= 0):
        raise SettingError("budget_error", f"must be a finite error ≥ 0, got {budget_error!r}")
    if budget_gflops is not None and not (math.isfinite(budget_gflops) and budget_gflops > 0):
        raise SettingError("budget_gflops", f"must be a positive number of GFLOPs per image, got {budget_gflops!r}")
    if not sources:
        raise ValueError("a plan needs a source: give a redundancy table or intervention grid reports")
    read = [_read_source(path) for path in sources]
    first = read[0]
    for other in read[1:]:
        for what, theirs, ours in (
            ("model", other.model.to_dict(), first.model.to_dict()),
            ("process", other.process.to_dict(), first.process.to_dict()),
            ("sampler", other.sampler.to_dict(), first.sampler.to_dict()),
        ):
            if theirs != ours:
                raise ValueError(
                    f"{other.path} and {first.path} are of another {what} ({_differing(theirs, ours)}); a plan is made "
                    "for one model and sampler",
                )
    tables = [s for s in read if s.kind == "table"]
    grids = [s for s in read if s.kind == "grid"]
    if len(tables) > 1:
        raise ValueError(f"{len(tables)} tables given; give one (and any intervention grids)")
    config, process, sampler = first.model, first.process, first.sampler
    if config.attention != "full":
        raise ValueError(f"{first.path} is of {config.label}; plans replace full attention")
    if sampler.adaptive:
        raise ValueError(f"{first.path} was made with dopri5, whose evaluations vary: plans need fixed steps")
    levels = evaluation_levels(process, sampler)
    evaluations = len(levels)
    if tables:
        read_grid_table(tables[0].path, config, evaluations)  # refuses a table of other networks or step counts
    if grids:
        if windows is not None:
            raise SettingError("windows", "comes from the grids' windows when grids are given: drop it")
        cut = sorted({tuple(cell["window"]) for cell in grids[0].content["cells"]})
        for grid in grids[1:]:
            theirs = sorted({tuple(cell["window"]) for cell in grid.content["cells"]})
            if theirs != cut:
                raise ValueError(f"{grid.path} has the windows {theirs}, {grids[0].path} {cut}: give grids of one cut")
    else:
        cut = step_windows(tuple(windows) if windows else (str(evaluations),), evaluations)
        for a, b in cut:
            if b > evaluations:
                raise SettingError("windows", f"{a}:{b} lies outside this sampler's evaluations 0..{evaluations - 1}")
    cut = sorted(cut)
    for (a, b), (c, d) in zip(cut, cut[1:]):
        if c < b:
            raise SettingError("windows", f"{a}:{b} and {c}:{d} overlap; a plan's windows must not")
    layers = list(range(config.depth))
    predictions = table_predictions(tables[0].content, cut, layers, table_methods(tables[0].content)) if tables else {}
    grid_methods = []
    for grid in grids:
        predictions.update(grid_predictions(grid.content, str(grid.path)))  # measured damage where there is some
        grid_methods.append(grid.content["grid"]["replace"])
    available = list(dict.fromkeys([*(table_methods(tables[0].content) if tables else []), *grid_methods]))
    guided = sampler.cfg_scale != 1.0
    if methods is None:
        methods = [m for m in available if guided or m != "share-cfg"]
    methods = [m for m in dict.fromkeys(methods) if m != FULL_METHOD]
    for method in methods:
        replacement = plan_replacement(method)
        if method not in available:
            fix = f"record {_metric_of(replacement)} in the table" + (
                " (--metrics changes)" if replacement.kind in ("reuse-previous", "share-cfg") else ""
            )
            raise SettingError(
                "methods",
                f"{method}: no source predicts it; {fix}, or run `attnmed intervene --grid --replace {method}`",
            )
        if replacement.kind == "share-cfg" and not guided:
            raise SettingError(
                "methods", "share-cfg shares between guidance branches, but the sampler is unguided (cfg scale 1)"
            )
        if replacement.kind == "mediator":
            side = math.isqrt(replacement.size)
            if side * side != replacement.size or replacement.size > config.num_tokens:
                raise SettingError("methods", f"{method} needs a perfect square count of at most {config.num_tokens}")
    full_gflops = config_gmacs(config) * evaluations * (2 if guided else 1)
    cells = []
    for start, stop in cut:
        for layer in layers:
            options = [PlanOption(FULL_METHOD, 0.0, 0.0, "exact")]
            for method in methods:
                key = (start, stop, layer, method)
                if key not in predictions or (method == "reuse-previous" and start == 0):
                    continue
                error, by = predictions[key]
                saved = intervention_gmacs(config, plan_replacement(method), stop - start, 1, config.num_heads, guided)
                options.append(PlanOption(method, error, saved["saved"], by))
            cells.append(PlanCell((start, stop), layer, tuple(options)))
    if budget_error is not None:
        chosen, status = greedy_plan(cells, budget_error), "greedy"
        solver = "greedy (DiTFastAttn): per cell, the cheapest method whose predicted error is within the budget"
    else:
        chosen, status = milp_plan(cells, full_gflops, budget_gflops)
        solver = "milp (scipy.optimize.milp, HiGHS): the least summed predicted error within the GFLOPs budget"
    saved_total = sum(option.saved for option in chosen)
    used: dict[str, int] = {}
    for option in chosen:
        used[option.method] = used.get(option.method, 0) + 1
    budget = {"error": budget_error} if budget_error is not None else {"gflops": budget_gflops}
    return {
        "plan": "attnmed plan",
        "format": PLAN_FORMAT,
        "name": name
        or ("plan error ≤ " + f"{budget_error:g}" if budget_error is not None else f"plan ≤ {budget_gflops:g} GFLOPs"),
        "sources": [
            {
                "path": str(s.path),
                "sha256": _sha256(s.path),
                "kind": s.kind,
                **({"replace": s.content["grid"]["replace"]} if s.kind == "grid" else {}),
            }
            for s in read
        ],
        "budget": budget,
        "solver": solver,
        "solver_status": status,
        "model": config.to_dict(),
        "process": process.to_dict(),
        "sampler": sampler.to_dict(),
        "weights": first.weights,
        "evaluations": evaluations,
        "methods": [FULL_METHOD, *methods],
        "cells": [
            {
                "steps": list(cell.window),
                "noise_levels": [levels[cell.window[0]], levels[cell.window[1] - 1]],
                "layer": cell.layer,
                "method": option.method,
                "predicted_error": option.error,
                "predicted_by": option.predicted_by,
                "gflops_saved": option.saved,
            }
            for cell, option in zip(cells, chosen)
        ],
        "methods_used": used,
        "predicted_error": {"sum": sum(o.error for o in chosen), "max": max((o.error for o in chosen), default=0.0)},
        "gflops_per_image": {"full": full_gflops, "expected": full_gflops - saved_total, "saved": saved_total},
        "gflops_note": "per image, guidance's two rows counted; attention matrix products as `attnmed flops` counts them",
    }


def check_plan_target(out: str | Path, sources=()) -> None:
    """Refuse, before any work, a plan file that is a folder or one of the plan's sources (setting `out`)."""
    out = Path(out)
    if out.is_dir():
        raise SettingError("out", f"{out} is a folder; name the plan file, e.g. {out / 'plan.json'}")
    if out.exists() and out.resolve() in {Path(s).resolve() for s in sources}:
        raise SettingError("out", f"{out} is one of the plan's sources; name another file")


def write_plan(plan: dict[str, Any], out: str | Path, sources=()) -> Path:
    """Write `plan` to `out` atomically (`check_plan_target` first)."""
    check_plan_target(out, sources)
    return atomic_write_json(out, plan)


def load_plan(path: str | Path) -> dict[str, Any]:
    """A plan written by `attnmed plan`, its cells checked (setting `plan`)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise SettingError("plan", f"{path}: no plan file there; make one with `attnmed plan`")
    try:
        plan = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SettingError("plan", f"{path} is not a plan JSON (from `attnmed plan`): {error}") from None
    if not isinstance(plan, dict) or plan.get("plan") != "attnmed plan" or not isinstance(plan.get("cells"), list):
        raise SettingError("plan", f"{path} is not a plan JSON (from `attnmed plan`)")
    if plan.get("format") != PLAN_FORMAT:
        raise SettingError("plan", f"{path} has plan format {plan.get('format')!r}; this attnmed reads {PLAN_FORMAT}")
    try:
        for cell in plan["cells"]:
            start, stop = (int(v) for v in cell["steps"])
            plan_replacement(cell["method"])
            int(cell["layer"])
            if not 0 <= start < stop:
                raise ValueError(f"steps {start}:{stop}")
    except SettingError as error:
        raise SettingError("plan", f"{path} has a cell method that {error.reason}") from None
    except (KeyError, TypeError, ValueError) as error:
        raise SettingError("plan", f"{path} has a malformed cell ({error}); remake it with `attnmed plan`") from None
    plan["source"] = str(path)
    return plan


def check_plan(plan: dict[str, Any], config: ModelConfig, process, sampler: SamplerConfig) -> int:
    """Refuse a plan made for another model config, process or sampler (setting `plan`); returns its evaluations."""
    where = plan.get("source", "the plan")
    theirs, ours = plan["model"], config.to_dict()
    if theirs != ours:
        raise SettingError(
            "plan",
            f"{where} was made for {ModelConfig.from_dict(theirs).label}, not this checkpoint's {config.label} "
            f"({_differing(theirs, ours)}); make a plan from a table or grid of this checkpoint",
        )
    if plan["process"] != process.to_dict():
        raise SettingError(
            "plan", f"{where} was made for another process ({_differing(plan['process'], process.to_dict())})"
        )
    made = SamplerConfig(**plan["sampler"])
    fields = ("kind", "method", "steps")
    if any(getattr(made, f) != getattr(sampler, f) for f in fields) or (made.cfg_scale != 1.0) != (
        sampler.cfg_scale != 1.0
    ):
        raise SettingError(
            "plan",
            f"{where} was made for the sampler {made.describe()}, this run samples {sampler.describe()}: its cells "
            "are evaluations of that sampler; sample with the plan's sampler settings, or make a plan for this one",
        )
    evaluations = len(evaluation_levels(process, sampler))
    if evaluations != plan["evaluations"]:
        raise SettingError(
            "plan", f"{where} covers {plan['evaluations']} evaluations, this sampler makes {evaluations}"
        )
    seen = set()
    for cell in plan["cells"]:
        start, stop = cell["steps"]
        if stop > evaluations or not 0 <= cell["layer"] < config.depth:
            raise SettingError(
                "plan", f"{where} has a cell {start}:{stop} of layer {cell['layer']} outside this model and sampler"
            )
        keys = {(i, cell["layer"]) for i in range(start, stop)}
        if keys & seen:
            raise SettingError("plan", f"{where} gives layer {cell['layer']} two methods at evaluations {start}:{stop}")
        seen |= keys
        if cell["method"] == "reuse-previous" and start == 0:
            raise SettingError("plan", f"{where} reuses at evaluation 0, where nothing came before")
        if cell["method"] == "share-cfg" and sampler.cfg_scale == 1.0:
            raise SettingError("plan", f"{where} shares between guidance branches, but this run is unguided")
    return evaluations


def plan_intervention(model, plan: dict[str, Any]) -> AttentionIntervention:
    """The hooks that execute `plan` on `model` (its cells other than full attention)."""
    cells = {}
    for cell in plan["cells"]:
        replacement = plan_replacement(cell["method"])
        for index in range(*cell["steps"]):
            cells[(index, cell["layer"])] = replacement
    return AttentionIntervention.from_cells(model, cells)


def plan_description(plan: dict[str, Any]) -> dict[str, Any]:
    """What samples.json records of the plan that made its samples."""
    source = plan.get("source")
    return {
        "name": plan["name"],
        "plan": source,
        "plan_sha256": _sha256(Path(source)) if source else None,
        "budget": plan["budget"],
        "methods_used": plan["methods_used"],
        "expected_gflops_per_image": plan["gflops_per_image"]["expected"],
    }


def format_plan(plan: dict[str, Any]) -> str:
    """The plan in a few lines: what it uses, its predicted error and its cost; the cells as a table when small."""
    g = plan["gflops_per_image"]
    lines = [
        f"{plan['name']}: {plan['solver']} ({plan['solver_status']})",
        "methods used (cells): " + ", ".join(f"{m} {n}" for m, n in sorted(plan["methods_used"].items())),
        f"predicted error: sum {plan['predicted_error']['sum']:.4g}, largest {plan['predicted_error']['max']:.4g}",
        f"expected GFLOPs per image {g['expected']:.6g} (full attention {g['full']:.6g}, saved {g['saved']:.4g})",
    ]
    windows = sorted({tuple(cell["steps"]) for cell in plan["cells"]})
    if len(windows) <= 32:
        by_cell = {(tuple(cell["steps"]), cell["layer"]): cell["method"] for cell in plan["cells"]}
        layers = sorted({cell["layer"] for cell in plan["cells"]})
        width = max([len(m) for m in by_cell.values()] + [5])
        lines.append(f"{'window':>9}  " + "  ".join(f"{'L' + str(layer):<{width}}" for layer in layers))
        for window in windows:
            label = f"{window[0]}:{window[1]}"
            methods = "  ".join(f"{by_cell.get((window, layer), '-'):<{width}}" for layer in layers)
            lines.append(f"{label:>9}  {methods}")
    return "\n".join(lines)
