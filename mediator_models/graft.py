"""Grafting: mediator networks made from a trained full-attention one, without training from scratch.

Mediator attention uses the same qkv and proj as full attention, and its mediators are pooled queries, not learned
tokens; only its position-bias tables and its depthwise conv on V are new. A grafted network copies every shared
tensor bit for bit and sets what mediators add to zero. With zero biases and a zero conv, layer by layer it computes

    out = proj(softmax(s·Q·Tᵀ)·softmax(s·T·Kᵀ)·V),   T = the queries average-pooled to √n×√n,

which is exactly the mediator form that the premise measure `recovery_pooled_N` (analysis/metrics.py) builds from a
full-attention layer: the zero conv adds exactly 0 (so nothing of the source's A·V is replaced by a local term),
and zero biases leave both softmaxes as the measure has them. This is the training-free network closest to its
source that the mediator block can express without fitting anything.

The error it makes is measured here on the source network's own activations along its sampling trajectories:
each layer's input is handed to the grafted layer, and the two layers' outputs are compared, per head before proj
(`mixing_error`, which equals `recovery_pooled_N` up to float rounding) and after proj (`output_error`, what the
block adds to its residual stream, which no premise measure predicts: proj mixes the heads and adds its bias).

`distill_layers` then fits each grafted attention layer (qkv, proj, biases, conv) to its source layer's output on
the source's activations along sampling trajectories; everything outside attention stays the source's. End-to-end
distillation follows on training's own loop (`mediator_models.train.train`: exact resume, progress, DDP): the
whole network starts from the layer-distilled one and learns the diffusion loss plus the source's prediction at
its own inputs (`TeacherTarget`), on the training set or, data-free, on the source's own samples
(`write_teacher_samples`). `prediction_error` measures what both stages are for: the network's error against its
source on held-out trajectories.

`graft_shared` makes one network serving several counts instead (`ModelConfig.mediators` a tuple, full attention
possibly among them): the source's tensors once, and zero bias tables for each count; its distillation fits one
count per step, drawn as training draws it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from mediator_models.network.attention import split_heads
from mediator_models.network.config import ModelConfig, check_mediator_count
from mediator_models.network.dit import DiffusionTransformer
from mediator_models.recording.recorder import RunningStats
from mediator_models.sample import load_for_sampling
from mediator_models.sampling.generation import ProcessConfig, SamplerConfig, default_sampler, generate
from mediator_models.sampling.steps import start_batch
from mediator_models.sampling.switching import evaluation_levels
from mediator_models.storage.checkpoints import atomic_save, checkpoint_checksum, read_checkpoint
from mediator_models.storage.distributed import all_ranks_agree, init_distributed, locked_folder
from mediator_models.storage.errors import SettingError
from mediator_models.storage.runfolder import atomic_write_json, claim_identity, clean_stale_temporaries
from mediator_models.train import TrainConfig, checkpoint_paths, drawn_count, train, truncate_log

# What a mediator layer has beyond full attention (names as in MediatorAttention), all set to zero on grafting.
MEDIATOR_TENSORS = ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias", "dwc.weight", "dwc.bias")
ERROR_METRICS = ("mixing_error", "output_error")
_TINY = 1e-30


def graft_config(source: ModelConfig, mediators: int) -> ModelConfig:
    """The mediator variant of `source`: the same network with n mediators (and the mediator block's conv)."""
    if source.attention != "full":
        raise ValueError(
            f"grafting needs a full-attention source network; {source.label} has {source.attention_label} "
            "attention already"
        )
    check_mediator_count(mediators, source.num_tokens)
    return source.replace(attention="mediator", mediators=mediators, depthwise_conv=None)


def shared_graft_config(source: ModelConfig, counts) -> ModelConfig:
    """The variant of `source` serving several counts (None: full attention, which then computes as the source):
    the mediator block's conv for the mediator counts, and for full attention too where the source had it."""
    graft_config(source, next(c for c in counts if c is not None))  # refuses a source that is no full attention
    return source.replace(
        attention="mediator", mediators=tuple(counts), depthwise_conv=True if source.uses_depthwise_conv else None
    )


# A shared network's per-count tables, e.g. blocks.3.attn.biases.16.an_bias: new, and zero on grafting.
_COUNT_TABLE = re.compile(r"attn\.biases\.\d+\.[a-z]{2}_bias$")


def graft(source: DiffusionTransformer, mediators: int) -> DiffusionTransformer:
    """A mediator network with `source`'s tensors copied exactly and the mediators' own ones zero.

    A source with the "full + conv" ablation's conv keeps that conv (a shared tensor). Any tensor of the source
    that has no place in the mediator network, or a shape that disagrees, is refused by name.
    """
    return _grafted(source, graft_config(source.config, mediators))


def graft_shared(source: DiffusionTransformer, counts) -> DiffusionTransformer:
    """One network serving every count of `counts` (None: full attention), with `source`'s tensors copied exactly
    (once: qkv, proj, the MLPs and embedders serve every count) and every count's bias tables, and a conv the
    source lacks, zero. At each count it holds exactly the tensors `graft(source, count)` holds."""
    return _grafted(source, shared_graft_config(source.config, counts))


def _grafted(source: DiffusionTransformer, config: ModelConfig) -> DiffusionTransformer:
    target = DiffusionTransformer(config).to(next(source.parameters()).device)
    own, theirs = target.state_dict(), source.state_dict()
    unplaced = [k for k in theirs if k not in own]
    if unplaced:
        raise ValueError(f"{source.config.label} holds tensors a mediator network has no place for: {unplaced[:4]}")
    weights = {}
    for key, slot in own.items():
        if key in theirs:
            if theirs[key].shape != slot.shape:
                raise ValueError(
                    f"{key}: the source has {tuple(theirs[key].shape)}, the mediator network {tuple(slot.shape)}"
                )
            weights[key] = theirs[key].detach().clone()
        elif key.endswith(tuple("attn." + name for name in MEDIATOR_TENSORS)) or _COUNT_TABLE.search(key):
            weights[key] = torch.zeros_like(slot)
        else:
            raise ValueError(f"{key} of {config.label} has no counterpart in {source.config.label}")
    target.load_state_dict(weights, strict=True)
    return target.eval()


def grafted_checkpoint(model: DiffusionTransformer, process: ProcessConfig, provenance: dict[str, Any]) -> dict:
    """A checkpoint as training writes one ("model", "ema", "model_config", "process", a checksum): grafted
    weights are both the raw and the EMA ones. `provenance` says what was grafted from (kept as "graft")."""
    weights = model.state_dict()
    state = {
        "model": weights,
        "ema": weights,
        "model_config": model.config.to_dict(),
        "process": process.to_dict(),
        "step": 0,
        "graft": provenance,
    }
    state["checksum"] = checkpoint_checksum(state)
    return state


# ---- the training-free error ---------------------------------------------------------------------------------


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """‖approx − exact‖_F / ‖exact‖_F over the last two axes, in float64."""
    approx, exact = approx.double(), exact.double()
    return ((approx - exact).square().sum((-2, -1)) / exact.square().sum((-2, -1)).clamp_min(_TINY)).sqrt()


def _proj_input_and_output(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What an attention module hands to its proj (B, N, C), and its output (B, N, C), for input x."""
    seen = []
    handle = module.proj.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        output = module(x)
    finally:
        handle.remove()
    return seen[0], output


@torch.no_grad()
def training_free_errors(
    source: DiffusionTransformer,
    grafted: Mapping[int, DiffusionTransformer],
    process: ProcessConfig,
    sampler: SamplerConfig,
    *,
    samples: int,
    batch_size: int = 8,
    seed: int = 0,
    classes: list[int] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Per (mediator count, step, layer, head, metric): the mean and std over samples of each grafted layer's
    relative error against the source layer, on the source's own activations along its sampling trajectories
    (sample i drawn as `attnmed record` and `attnmed sample` draw it). `mixing_error` is per head, before proj
    (head −1: the mean over heads, as in redundancy tables); `output_error` is after proj (head −1 only). Each
    row of a guided batch (conditional and unconditional halves) counts as a sample."""
    if sampler.adaptive:
        raise SettingError(
            "method", "dopri5 picks its steps per batch; measure along a fixed-step sampler (euler, heun)"
        )
    device = next(source.parameters()).device
    heads = source.config.num_heads
    stats: dict[tuple, RunningStats] = {}
    levels: dict[int, float] = {}
    step = [0]
    source_mixing: dict[int, torch.Tensor] = {}

    def add(key: tuple, values: torch.Tensor) -> None:
        if key not in stats:
            stats[key] = RunningStats(values.shape[-1])
        stats[key].add(values)

    def on_step(info) -> None:
        step[0] = info.index
        levels.setdefault(info.index, info.noise_level)

    def keep_mixing(layer):
        return lambda _, args: source_mixing.__setitem__(layer, args[0])

    def compare(layer):
        def hook(_, args, output):
            exact = split_heads(source_mixing.pop(layer), heads)
            for count, model in grafted.items():
                mixing, out = _proj_input_and_output(model.attention_modules()[layer], args[0])
                per_head = _relative_error(split_heads(mixing, heads), exact)  # (B, heads)
                add((count, step[0], layer, "mixing_error"), torch.cat([per_head, per_head.mean(-1, keepdim=True)], -1))
                add((count, step[0], layer, "output_error"), _relative_error(out, output)[:, None])

        return hook

    handles = []
    for layer, module in enumerate(source.attention_modules()):
        handles.append(module.proj.register_forward_pre_hook(keep_mixing(layer)))
        handles.append(module.register_forward_hook(compare(layer)))
    bar = None
    if progress:
        from mediator_models.progress import progress_bar

        bar = progress_bar(samples, f"graft error {source.config.label} {sampler.describe()}")
    try:
        for start in range(0, samples, batch_size):
            indices = list(range(start, min(start + batch_size, samples)))
            x_T, y, noise = start_batch(indices, seed, source.config, classes, device)
            generate(source, process, sampler, x_T, y, callback=on_step, noise_fn=noise)
            if bar is not None:
                bar.update(len(indices))
    finally:
        for handle in handles:
            handle.remove()
        if bar is not None:
            bar.close()
    rows = []
    for (count, index, layer, metric), values in sorted(stats.items()):
        labels = [*range(heads), -1] if metric == "mixing_error" else [-1]
        for head, mean, std in zip(labels, values.mean().tolist(), values.std().tolist()):
            rows.append(
                {
                    "mediators": count,
                    "step": index,
                    "noise_level": levels[index],
                    "layer": layer,
                    "head": head,
                    "metric": metric,
                    "mean": mean,
                    "std": std,
                    "count": values.count,
                }
            )
    return rows


NOISE_BANDS = ((1.0, 2 / 3), (2 / 3, 1 / 3), (1 / 3, 0.0))


def format_error_table(rows: list[dict[str, Any]]) -> str:
    """Per mediator count and layer, the head-mean errors averaged over the steps, overall and within each third
    of the noise axis (1 = pure noise): `mixing (output)`."""
    means: dict[tuple, list[float]] = {}
    for row in rows:
        if row["head"] != -1:
            continue
        bands = [b for b, (high, low) in enumerate(NOISE_BANDS) if low <= row["noise_level"] <= high][:1]
        for band in ["all", *bands]:
            means.setdefault((row["mediators"], row["layer"], band, row["metric"]), []).append(row["mean"])
    header = ["mediators", "layer", "all steps"] + [f"noise {h:.2f}–{lo:.2f}" for h, lo in NOISE_BANDS]
    lines = ["training-free relative error per layer: mixing (per head, before proj) and, in brackets, output"]
    lines.append("  ".join(f"{h:>18}" if i > 1 else f"{h:>9}" for i, h in enumerate(header)))
    for count, layer in sorted({(k[0], k[1]) for k in means}):
        cells = []
        for band in ["all", *range(len(NOISE_BANDS))]:
            mixing, output = (means.get((count, layer, band, m)) for m in ERROR_METRICS)
            cells.append(f"{sum(mixing) / len(mixing):.4f} ({sum(output) / len(output):.4f})" if mixing else "-")
        lines.append(f"{count:>9}  {layer:>9}  " + "  ".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


# ---- the job: graft from a checkpoint into a folder ----------------------------------------------------------


SHARED_CHECKPOINT = "shared.pt"
END_TO_END = "end_to_end"  # DIR/end_to_end/med{n}/ (or shared/): the end-to-end runs, training run folders
TEACHER_SAMPLES = "teacher_samples"  # DIR/teacher_samples/: the source's own samples, the data-free training set
DEFAULT_DISTILL_LR = 3e-4  # measured on a small trained SiT: see the README's grafting section
# The sampling seed's streams: the errors are measured on `seed`, held out from what distillation sees.
LAYER_STREAM, SAMPLE_STREAM = 1, 2


@dataclass
class GraftResult:
    checkpoints: dict[int, Path]  # mediator count -> DIR/med{n}.pt (empty with shared=True)
    errors: list[dict[str, Any]]  # rows of `training_free_errors` (empty when no samples were measured)
    shared: Path | None = None  # DIR/shared.pt: the one network serving every count (shared=True)
    # Mediator count (or "shared") -> the end-to-end run's final checkpoint (with end_to_end_steps)
    end_to_end: dict[int | str, Path] = dataclasses.field(default_factory=dict)
    # Rows {"mediators", "stage" (grafted | layers | end_to_end), "prediction_error"} of `prediction_error` on the
    # held-out trajectories, for each stage run (with distillation and samples)
    stages: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        return [*self.checkpoints.values(), *([self.shared] if self.shared else []), *self.end_to_end.values()]


def _check_counts(mediators, num_tokens: int, shared: bool = False) -> list[int | None]:
    counts = [None if n == "full" else n for n in mediators]
    if not counts:
        raise SettingError("mediators", "names no count; give one or more perfect squares, e.g. 4 16 64")
    repeated = sorted({"full" if n is None else n for n in counts if counts.count(n) > 1}, key=str)
    if repeated:
        raise SettingError("mediators", f"names {repeated} more than once; name each count once")
    if None in counts and not shared:
        raise SettingError(
            "mediators",
            "names full attention, which is the source itself: drop 'full', or graft one network serving every count "
            "with --shared (there full attention is one of its counts)",
        )
    if shared and len([n for n in counts if n is not None]) < (1 if None in counts else 2):
        raise SettingError(
            "mediators", "names one count: a shared network serves two or more (e.g. 4 16 64 full); drop --shared"
        )
    for count in counts:
        if count is None:
            continue
        try:
            check_mediator_count(count, num_tokens)
        except ValueError as error:
            raise SettingError("mediators", f"{count}: {error}") from None
    return counts


def graft_to_folder(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    mediators: list[int],
    *,
    model_name: str | None = None,
    input_size: int | None = None,
    use_ema: bool = True,
    numerics: str = "dit",
    sampler: SamplerConfig | Mapping[str, Any] | None = None,
    samples: int = 8,
    batch_size: int = 8,
    seed: int = 0,
    classes: list[int] | None = None,
    distill_steps: int = 0,
    distill_lr: float = DEFAULT_DISTILL_LR,
    end_to_end_steps: int = 0,
    end_to_end_lr: float = 1e-4,
    end_to_end_ema_decay: float | None = None,
    teacher_weight: float = 10.0,
    data: str | None = None,
    data_free: bool = False,
    teacher_samples: int = 1024,
    save_every: int = 50,
    device: torch.device | str = "cpu",
    progress: bool = True,
    shared: bool = False,
) -> GraftResult:
    """Graft one mediator network per count from a full-attention checkpoint (ours, an official DiT/SiT file with
    `model_name`, or a diffusers DiT folder, loaded by `load_for_sampling`) into out_dir/med{n}.pt, each loading
    strictly like any mediator checkpoint, and measure their training-free errors on `samples` trajectories of
    `sampler` (a SamplerConfig, or changes to the source family's default sampler, which runs 50 steps here)
    into out_dir/errors.json. With `shared`, one network serving every count (None or "full" among them: full
    attention) goes to out_dir/shared.pt instead.

    Then, with `distill_steps`, each file's attention layers are fitted to the source's layer by layer
    (`distill_layers`, in place); with `end_to_end_steps`, the whole network is trained from there by `train`
    into out_dir/end_to_end/med{n}/ on the diffusion loss plus `teacher_weight` times the squared error against
    the source's prediction, at `end_to_end_lr` and with `batch_size` images per step, on `data` (as `train
    --data` takes it; default the data the source was trained on, as its checkpoint records) or, `data_free`, on
    `teacher_samples` samples the source draws with `sampler` (out_dir/teacher_samples/); its EMA decay by default
    averages over about a tenth of the run (1 − 10/steps, at most 0.9999). With `samples`, the
    network of each stage run is scored by `prediction_error` on the held-out trajectories (`GraftResult.stages`,
    out_dir/stages.json). Every stage resumes where a killed run stopped: run the same call again.

    The folder is locked while grafting and belongs to one configuration (graft.json): the same command again
    remakes the same files; another source, count list or measurement is refused. Under torchrun the end-to-end
    runs are data-parallel; rank 0 does the rest while the other ranks wait."""
    for name, value, least in (
        ("samples", samples, 0),
        ("batch_size", batch_size, 1),
        ("distill_steps", distill_steps, 0),
        ("end_to_end_steps", end_to_end_steps, 0),
        ("teacher_samples", teacher_samples, 1),
        ("save_every", save_every, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise SettingError(name, f"must be a whole number of at least {least}, got {value!r}")
    for name, value in (("distill_lr", distill_lr), ("end_to_end_lr", end_to_end_lr)):
        if not (math.isfinite(value) and value > 0):
            raise SettingError(name, f"must be a positive number, got {value!r}")
    if not (math.isfinite(teacher_weight) and teacher_weight >= 0):
        raise SettingError("teacher_weight", f"must be 0 or positive, got {teacher_weight!r}")
    if end_to_end_ema_decay is None:  # an EMA over about a tenth of the run (0.9999, the papers', from 100K steps)
        end_to_end_ema_decay = min(0.9999, max(0.0, 1 - 10 / max(end_to_end_steps, 1)))
    if not 0.0 <= end_to_end_ema_decay < 1.0:
        raise SettingError("end_to_end_ema_decay", f"must lie in [0, 1), got {end_to_end_ema_decay!r}")
    if data_free and data is not None:
        raise SettingError("data_free", f"trains on the source's own samples, but data {data!r} is named too: drop one")
    if not end_to_end_steps and (data_free or data is not None):
        raise SettingError(
            "data_free" if data_free else "data", "applies to end-to-end distillation only: add --end-to-end-steps N"
        )
    env = init_distributed()
    if env.world_size > 1:
        device = env.device
    loaded = load_for_sampling(
        checkpoint, model_name=model_name, input_size=input_size, use_ema=use_ema, device=device, numerics=numerics
    )
    source = loaded.model
    if source.config.attention != "full":
        raise ValueError(
            f"{checkpoint} holds {source.config.label}; grafting needs a full-attention network to start from"
        )
    counts = _check_counts(mediators, source.config.num_tokens, shared)
    wrong = [c for c in classes or () if not 0 <= c < source.config.num_classes]
    if wrong:
        raise SettingError(
            "classes", f"{wrong} out of range: the model knows labels 0..{source.config.num_classes - 1}"
        )
    if not isinstance(sampler, SamplerConfig):
        sampler = default_sampler(loaded.process.family, **{"steps": 50, **(sampler or {})})
    sampler.check(loaded.process.family, source.config.in_channels)
    if sampler.adaptive:
        raise SettingError(
            "method", "dopri5 picks its steps per batch; measure along a fixed-step sampler (euler, heun)"
        )
    out = Path(out_dir)
    training_data = _end_to_end_data(checkpoint, source.config, data, data_free, out) if end_to_end_steps else None
    identity = {
        "source": loaded.source,
        "source_weights": loaded.weights,
        "model": source.config.to_dict(),
        "process": loaded.process.to_dict(),
        "mediators": counts,
        "sampler": sampler.to_dict(),
        "samples": samples,
        "seed": seed,
        "classes": classes,
    }
    if distill_steps:
        identity["distill"] = {"steps": distill_steps, "lr": distill_lr, "batch_size": batch_size}
    if end_to_end_steps:
        identity["end_to_end"] = {
            "steps": end_to_end_steps,
            "lr": end_to_end_lr,
            "ema_decay": end_to_end_ema_decay,
            "teacher_weight": teacher_weight,
            "batch_size": batch_size,
            "data": "data-free" if data_free else training_data["data"],
            **({"teacher_samples": teacher_samples} if data_free else {}),
        }
    if shared:
        identity["shared"] = True
    if shared:
        paths = {tuple(counts): out / SHARED_CHECKPOINT}
    else:
        paths = {count: out / f"med{count}.pt" for count in counts}
    runs = {key: out / END_TO_END / _run_name(key) for key in paths}
    with locked_folder(out, "attnmed graft", env):
        failure, rows, grafted = None, [], {}
        if env.is_main:
            try:
                rows, grafted = _graft_and_distill_layers(
                    source,
                    loaded,
                    out,
                    identity,
                    paths,
                    counts,
                    shared,
                    sampler,
                    samples,
                    batch_size,
                    seed,
                    classes,
                    distill_steps,
                    distill_lr,
                    save_every,
                    progress,
                    runs,
                )
                if data_free:
                    write_teacher_samples(
                        source,
                        loaded.process,
                        sampler,
                        out / TEACHER_SAMPLES,
                        count=teacher_samples,
                        batch_size=batch_size,
                        seed=seed + SAMPLE_STREAM,
                        classes=classes,
                        progress=progress,
                    )
            except BaseException as error:  # tell the other ranks before raising
                failure = error
        if not all_ranks_agree(failure is None):
            raise failure if failure is not None else RuntimeError("rank 0 could not graft; see its message")
        finals = {}
        for key, path in paths.items() if end_to_end_steps else ():
            network = shared_graft_config(source.config, key) if shared else graft_config(source.config, key)
            config = TrainConfig(
                model=network.name,
                attention=network.attention,
                mediators=network.mediators,
                depthwise_conv=network.depthwise_conv,
                **(
                    {}
                    if loaded.process.family == "DiT"
                    else {"interpolant": loaded.process.interpolant, "prediction": loaded.process.prediction}
                ),
                **training_data["train"],
                global_batch_size=batch_size,
                steps=end_to_end_steps,
                lr=end_to_end_lr,
                ema_decay=end_to_end_ema_decay,
                class_dropout_prob=network.class_dropout_prob,
                seed=seed,
                log_every=min(50, end_to_end_steps),
                ckpt_every=save_every,
                out=str(runs[key]),
                progress=progress,
                init=str(path),
                teacher={
                    "checkpoint": str(checkpoint),
                    "model_name": model_name,
                    "input_size": input_size,
                    "use_ema": use_ema,
                    "numerics": numerics,
                },
                teacher_weight=teacher_weight,
            )
            train(config, resume=bool(checkpoint_paths(runs[key])))
            finals[key] = checkpoint_paths(runs[key])[-1]
        stages = []
        if env.is_main and samples and (distill_steps or end_to_end_steps):
            stages = _score_stages(
                source,
                loaded.process,
                sampler,
                out,
                grafted,
                paths,
                finals,
                distill_steps,
                samples,
                batch_size,
                seed,
                classes,
                device,
            )
    end_to_end = {("shared" if shared else key): path for key, path in finals.items()}
    if shared:
        return GraftResult({}, rows, shared=paths[tuple(counts)], end_to_end=end_to_end, stages=stages)
    return GraftResult(paths, rows, end_to_end=end_to_end, stages=stages)


def _run_name(key) -> str:
    return "shared" if isinstance(key, tuple) else f"med{key}"


def _graft_and_distill_layers(
    source,
    loaded,
    out,
    identity,
    paths,
    counts,
    shared,
    sampler,
    samples,
    batch_size,
    seed,
    classes,
    distill_steps,
    distill_lr,
    save_every,
    progress,
    runs,
) -> tuple[list[dict[str, Any]], dict]:
    """The grafted files (kept while a distillation of them is under way), their training-free errors and their
    layer-wise distillation; returns the error rows and the grafted networks by key."""
    fix = "To remake those networks, repeat their settings; to graft this configuration, choose another --out."
    claim_identity(out / "graft.json", identity, what="grafted networks", fix=fix, ignore=("source",))
    clean_stale_temporaries(out)
    if shared:
        network = graft_shared(source, counts)
        grafted = {c: network.at_count(c) for c in counts if c is not None}  # full attention is the source
        networks = {tuple(counts): network}
    else:
        grafted = {count: graft(source, count) for count in counts}
        networks = grafted
    for key, path in paths.items():
        if (distill_steps or key in runs and checkpoint_paths(runs[key])) and path.exists():
            continue  # a distillation under way: its checkpoint is where it resumes from
        provenance = {"source": loaded.source, "source_weights": loaded.weights, "mediators": key}
        if shared:
            provenance["mediators"] = list(key)
        atomic_save(grafted_checkpoint(networks[key], loaded.process, provenance), path)
    rows = []
    if samples and (out / "errors.json").exists():  # measured by an earlier start of this very configuration
        rows = json.loads((out / "errors.json").read_text())["rows"]
    elif samples:
        rows = training_free_errors(
            source,
            grafted,
            loaded.process,
            sampler,
            samples=samples,
            batch_size=batch_size,
            seed=seed,
            classes=classes,
            progress=progress,
        )
        atomic_write_json(out / "errors.json", {**identity, "rows": rows})
    for key in paths if distill_steps else ():
        distill_layers(
            source,
            paths[key],
            loaded.process,
            sampler,
            steps=distill_steps,
            lr=distill_lr,
            batch_size=batch_size,
            seed=seed,
            classes=classes,
            save_every=save_every,
            progress=progress,
        )
    return rows, networks


def _end_to_end_data(checkpoint, config: ModelConfig, data: str | None, data_free: bool, out: Path) -> dict:
    """What end-to-end training reads: {"data": a name for graft.json, "train": the TrainConfig fields}."""
    if data_free:
        return {"data": "data-free", "train": {"data": str(out / TEACHER_SAMPLES), "flip": False}}
    if data is None:
        recorded = {}
        if Path(checkpoint).is_file():
            recorded = read_checkpoint(checkpoint).get("args") or {}
        if not recorded.get("data"):
            raise SettingError(
                "data",
                f"is needed: {checkpoint} does not record the data it was trained on. Name it (what `attnmed train "
                "--data` takes: digits, an ImageFolder tree or a latent cache), or distil on the source's own "
                "samples with --data-free",
            )
        fields = {"data": recorded["data"], "image_size": recorded.get("image_size"), "vae": recorded.get("vae")}
        return {"data": recorded["data"], "train": fields}
    if (Path(data) / "meta.json").exists():  # a latent cache knows its own image size
        return {"data": data, "train": {"data": data}}
    if config.in_channels == 4:
        raise SettingError(
            "data",
            f"names images, but {config.label} works on SD-VAE latents: cache them first (`attnmed cache-latents`) "
            "and name the cache",
        )
    return {"data": data, "train": {"data": data, "image_size": config.input_size}}


@torch.no_grad()
def write_teacher_samples(
    source: DiffusionTransformer,
    process: ProcessConfig,
    sampler: SamplerConfig,
    out_dir: Path,
    *,
    count: int,
    batch_size: int = 8,
    seed: int = 0,
    classes: list[int] | None = None,
    progress: bool = False,
) -> Path:
    """`count` samples of `source` (sample i with its label drawn as `attnmed sample` draws sample i of `seed`),
    stored as a latent cache (`mediator_models.data.load_latent_cache` reads it, so `train --data` does): chunks
    written as they are made, finished by meta.json, so a killed run makes only the missing ones. Each sample's
    "mirrored twin" is the sample itself: a flip never makes a latent the source did not draw."""
    if (out_dir / "meta.json").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out_dir)
    device = next(source.parameters()).device
    done = sum(torch.load(c)["labels"].numel() for c in sorted(out_dir.glob("chunk-*.pt")))
    bar = None
    if progress and done < count:
        from mediator_models.progress import progress_bar

        bar = progress_bar(count, f"teacher samples {source.config.label}", initial=done)
    try:
        for start in range(done, count, batch_size):
            indices = list(range(start, min(start + batch_size, count)))
            x_T, y, noise = start_batch(indices, seed, source.config, classes, device)
            images, _ = generate(source, process, sampler, x_T, y, noise_fn=noise)
            chunk = {"latents": torch.stack([images, images], dim=1).cpu(), "labels": y.cpu()}
            atomic_save(chunk, out_dir / f"chunk-{start:09d}.pt")
            if bar is not None:
                bar.update(len(indices))
    finally:
        if bar is not None:
            bar.close()
    config = source.config
    latent = config.in_channels == 4  # SD-VAE latents: the images they encode are 8× their side
    meta = {
        "num_images": count,
        "num_classes": config.num_classes,
        "classes": None,
        "image_size": config.input_size * (8 if latent else 1),
        "scale": None,
        "description": f"{count} samples of {config.label} ({sampler.describe()}, seed {seed})",
    }
    atomic_write_json(out_dir / "meta.json", meta)
    return out_dir


@torch.no_grad()
def prediction_error(
    student: torch.nn.Module,
    teacher: DiffusionTransformer,
    process: ProcessConfig,
    sampler: SamplerConfig,
    *,
    samples: int,
    batch_size: int = 8,
    seed: int = 0,
    classes: list[int] | None = None,
) -> float:
    """The student's relative error ‖student(x, t, y) − teacher(x, t, y)‖ / ‖teacher(x, t, y)‖ against the
    teacher, at every evaluation of the teacher's sampling trajectories of samples 0 … samples − 1 of `seed`
    (held out from distillation, which draws from other streams), averaged over samples and evaluations."""
    device = next(teacher.parameters()).device
    errors = []

    def compare(_, args, output):
        x, t, y = args
        difference = (student(x, t, y) - output).double().flatten(1).norm(dim=1)
        errors.append(difference / output.double().flatten(1).norm(dim=1).clamp_min(_TINY))

    handle = teacher.register_forward_hook(compare)
    try:
        for start in range(0, samples, batch_size):
            indices = list(range(start, min(start + batch_size, samples)))
            x_T, y, noise = start_batch(indices, seed, teacher.config, classes, device)
            generate(teacher, process, sampler, x_T, y, noise_fn=noise)
    finally:
        handle.remove()
    return float(torch.cat(errors).mean())


def _score_stages(
    source, process, sampler, out, grafted, paths, finals, distill_steps, samples, batch_size, seed, classes, device
) -> list[dict[str, Any]]:
    """`prediction_error` of each stage's network(s) on the held-out trajectories, into out/stages.json."""
    if (out / "stages.json").exists():
        return json.loads((out / "stages.json").read_text())["rows"]
    stages = {key: {"grafted": network} for key, network in grafted.items()}
    for key, path in paths.items():
        if distill_steps:
            stages[key]["layers"] = _sampled_network(path, device)
        if key in finals:
            stages[key]["end_to_end"] = _sampled_network(finals[key], device)
    rows = []
    for key, networks in stages.items():
        for count in key if isinstance(key, tuple) else (key,):
            if count is None:
                continue  # a shared network's full attention: the source's own tensors only before end to end
            for stage, network in networks.items():
                student = network.at_count(count) if network.config.serves_several else network
                error = prediction_error(
                    student,
                    source,
                    process,
                    sampler,
                    samples=samples,
                    batch_size=batch_size,
                    seed=seed,
                    classes=classes,
                )
                rows.append({"mediators": count, "stage": stage, "prediction_error": error})
    atomic_write_json(out / "stages.json", {"rows": rows})
    return rows


def _sampled_network(path: Path, device) -> DiffusionTransformer:
    """The network a checkpoint samples with (its EMA weights), whole: a shared network with all of its counts."""
    state = read_checkpoint(path)
    network = DiffusionTransformer(ModelConfig.from_dict(state["model_config"]))
    network.load_state_dict(state["ema"], strict=True)
    return network.to(device).eval()


def format_stage_table(rows: list[dict[str, Any]]) -> str:
    """Per mediator count, the held-out prediction error of each stage (grafted, layer-wise, end to end)."""
    names = {"grafted": "training-free", "layers": "layer-wise", "end_to_end": "end to end"}
    lines = ["relative error of the prediction against the source on held-out trajectories"]
    for count in dict.fromkeys(r["mediators"] for r in rows):
        cells = [f"{names[r['stage']]} {r['prediction_error']:.4f}" for r in rows if r["mediators"] == count]
        lines.append(f"{count:>9} mediators: " + ", ".join(cells))
    return "\n".join(lines)


# ---- layer-wise distillation ---------------------------------------------------------------------------------


def _squared_relative_error(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ‖approx − exact‖² / ‖exact‖² over (N, C): each layer weighs alike, whatever its scale."""
    return ((approx - exact).square().sum((-2, -1)) / exact.square().sum((-2, -1)).clamp_min(_TINY)).mean()


def _distill_step(
    source: DiffusionTransformer,
    student: DiffusionTransformer,
    opt: torch.optim.Optimizer,
    process: ProcessConfig,
    sampler: SamplerConfig,
    indices: list[int],
    seed: int,
    classes: list[int] | None,
    evaluations: int,
) -> float:
    """One optimizer step: the source samples the trajectories `indices`, and at every evaluation each student
    attention layer is fitted to its source layer's output on the source layer's input. Gradients are taken
    evaluation by evaluation (only one evaluation's activations are held), then one step is made."""
    device = next(source.parameters()).device
    student_layers = student.attention_modules()
    total, evaluations = [0.0], evaluations * len(student_layers)

    def fit(layer):
        def hook(_, args, output):
            with torch.enable_grad():
                loss = _squared_relative_error(student_layers[layer](args[0].detach()), output.detach())
                (loss / evaluations).backward()
            total[0] += float(loss) / evaluations

        return hook

    handles = [m.register_forward_hook(fit(i)) for i, m in enumerate(source.attention_modules())]
    opt.zero_grad(set_to_none=True)
    try:
        x_T, y, noise = start_batch(indices, seed, source.config, classes, device)
        generate(source, process, sampler, x_T, y, noise_fn=noise)
    finally:
        for handle in handles:
            handle.remove()
    opt.step()
    return total[0]


def distill_layers(
    source: DiffusionTransformer,
    checkpoint: Path,
    process: ProcessConfig,
    sampler: SamplerConfig,
    *,
    steps: int,
    lr: float = DEFAULT_DISTILL_LR,
    batch_size: int = 8,
    seed: int = 0,
    classes: list[int] | None = None,
    save_every: int = 50,
    progress: bool = False,
) -> Path:
    """Fit the attention layers of the grafted network in `checkpoint` to the source's, layer by layer, for
    `steps` AdamW steps (the rest of the network stays the source's, bit for bit). Step s fits trajectories
    s·batch … (s+1)·batch − 1, drawn from the sampling seed + 1 (not those the errors are measured on), so a run
    resumed from the checkpoint saved every `save_every` steps (and at the end) reaches the same weights as one
    never stopped. A network serving several counts fits one count per step, drawn from (seed, step) as training
    draws it (logged as "mediators")."""
    state = read_checkpoint(checkpoint)
    student = DiffusionTransformer(ModelConfig.from_dict(state["model_config"])).to(next(source.parameters()).device)
    student.load_state_dict(state["model"], strict=True)
    student.eval().requires_grad_(False)  # only the attention layers run, and they have no dropout
    trained = [p for m in student.attention_modules() for p in m.parameters()]
    for parameter in trained:
        parameter.requires_grad_(True)
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    done = state["step"]
    if done:
        opt.load_state_dict(state["opt"])
    bar = None
    if progress and done < steps:
        from mediator_models.progress import progress_bar

        bar = progress_bar(steps, f"distill {student.config.label}", initial=done)
    log = checkpoint.with_suffix(".log.jsonl")
    truncate_log(log, done)  # steps logged after the checkpoint a resume starts from are made again
    evaluations = len(evaluation_levels(process, sampler))
    try:
        while done < steps:
            indices = list(range(done * batch_size, (done + 1) * batch_size))
            record = {"step": done + 1}
            if student.config.serves_several:
                count = drawn_count(student.config.counts, seed + LAYER_STREAM, done)
                student.use_count(count)
                record["mediators"] = "full" if count is None else count
            loss = _distill_step(
                source, student, opt, process, sampler, indices, seed + LAYER_STREAM, classes, evaluations
            )
            done += 1
            with log.open("a") as handle:
                handle.write(json.dumps({**record, "loss": loss}) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
            if done % save_every == 0 or done == steps:
                weights = student.state_dict()
                state.update(model=weights, ema=weights, step=done, opt=opt.state_dict())
                state.pop("checksum")
                state["checksum"] = checkpoint_checksum(state)
                atomic_save(state, checkpoint)
    finally:
        if bar is not None:
            bar.close()
    return checkpoint


def mean_error(rows: list[dict[str, Any]], mediators: int, metric: str = "mixing_error") -> float:
    """The head-mean error of one count averaged over every layer and step (one number per count)."""
    values = [r["mean"] for r in rows if r["mediators"] == mediators and r["metric"] == metric and r["head"] == -1]
    return sum(values) / len(values) if values else math.nan
