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


def run_intervention(loaded, sampler: SamplerConfig, job: InterventionConfig, out_dir, *, progress: bool = True):
    """Draw samples 0..job.samples−1 unmodified and with the replacement, write `report.json` in `out_dir` and
    return it. The folder is locked while the job runs and belongs to one configuration (`intervention.json`):
    another configuration is refused naming what differs; the same one runs again and rewrites the report."""
    config = loaded.model.config
    evaluations = check_intervention(config, loaded.process, sampler, job)
    out = Path(out_dir)
    identity = {
        "checkpoint": loaded.source,
        "weights": loaded.weights,
        "model": config.to_dict(),
        "process": loaded.process.to_dict(),
        "sampler": sampler.to_dict(),
        "intervention": job.to_dict(),
    }
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
    model, config = loaded.model, loaded.model.config
    device = next(model.parameters()).device
    classes = list(job.classes) if job.classes else None
    bar = None
    if progress:
        from mediator_models.progress import progress_bar

        bar = progress_bar(job.samples, f"intervene {job.replace} {sampler.describe()}")
    references, intervened, costs = [], [], []
    for first in range(0, job.samples, job.batch_size):
        indices = list(range(first, min(first + job.batch_size, job.samples)))
        x_T, y, noise = start_batch(indices, job.seed, config, classes, device)
        plain, caller = generate(model, loaded.process, sampler, x_T, y, noise_fn=noise)  # as `attnmed sample`
        x_T, y, noise = start_batch(indices, job.seed, config, classes, device)
        with AttentionIntervention(model, job.replacement, job.steps, job.layers, job.heads) as intervention:
            changed, _ = generate(
                model, loaded.process, sampler, x_T, y, callback=intervention.callback, noise_fn=noise
            )
        references.append(plain.cpu())
        intervened.append(changed.cpu())
        costs.append(caller.gflops.cpu())
        if bar is not None:
            bar.update(len(indices))
    if bar is not None:
        bar.close()
    return torch.cat(references), torch.cat(intervened), float(torch.cat(costs).mean())


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
