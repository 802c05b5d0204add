"""The attention recorder: attaches to models, hands each post-softmax map to reducers, keeps running stats.

    with record_attention(model, reducers) as recorder:
        generate(model, process, sampler, x_T, y, callback=recorder.callback)
    recorder.rows()   # one row per (network, step, layer, head, branch, metric): mean, std, count

While attached, every attention module also computes its maps explicitly and calls the recorder with them
(`AttentionMaps`: full attention's N×N map, or mediator attention's two maps and their product). The
sampler's step callback tells the recorder which step and noise level it is at. Reducers are plain callables
from `AttentionMaps` to {metric: (batch, heads) tensor} supplied by the caller (analysis.metrics), so this
package never imports analysis. Maps are reduced inside the hook; only the (step, layer) pairs named in
`keep_maps` are written to disk. Parameters, names and outputs are untouched, and detaching restores the
fused attention path.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from mediator_models.network.attention import AttentionMaps
from mediator_models.sampling.steps import StepInfo
from mediator_models.storage.checkpoints import atomic_save
from mediator_models.storage.errors import SettingError

Reducer = Callable[[AttentionMaps], Mapping[str, torch.Tensor]]


class RunningStats:
    """Per-column count, mean and sum of squared deviations in float64 (Chan et al.'s pairwise update):
    the mean and standard deviation over samples without keeping the samples, and without the cancellation
    of a sum-of-squares formula."""

    def __init__(self, columns: int):
        self.count = 0
        self.mean_ = torch.zeros(columns, dtype=torch.float64)
        self.m2 = torch.zeros(columns, dtype=torch.float64)

    def add(self, values: torch.Tensor) -> None:
        values = values.detach().double().cpu()  # (samples, columns)
        n = values.shape[0]
        batch_mean = values.mean(0)
        batch_m2 = ((values - batch_mean) ** 2).sum(0)
        total = self.count + n
        delta = batch_mean - self.mean_
        self.mean_ = self.mean_ + delta * n / total
        self.m2 = self.m2 + batch_m2 + delta**2 * self.count * n / total
        self.count = total

    def mean(self) -> torch.Tensor:
        return self.mean_

    def std(self) -> torch.Tensor:
        """Sample standard deviation over the samples (0 for a single sample)."""
        if self.count < 2:
            return torch.zeros_like(self.m2)
        return (self.m2 / (self.count - 1)).clamp_min(0).sqrt()

    def merge(self, other: "RunningStats") -> None:
        """Add another accumulator's samples (Chan et al.'s parallel combination)."""
        total = self.count + other.count
        if other.count == 0:
            return
        delta = other.mean_ - self.mean_
        self.mean_ = self.mean_ + delta * other.count / total
        self.m2 = self.m2 + other.m2 + delta**2 * self.count * other.count / total
        self.count = total

    def state(self) -> dict:
        return {"count": self.count, "mean": self.mean_, "m2": self.m2}

    @classmethod
    def from_state(cls, state: dict) -> "RunningStats":
        stats = cls(len(state["mean"]))
        stats.count, stats.mean_, stats.m2 = state["count"], state["mean"], state["m2"]
        return stats


def _as_named_models(models) -> dict[str, nn.Module]:
    if isinstance(models, nn.Module):
        return {getattr(getattr(models, "config", None), "label", type(models).__name__): models}
    if isinstance(models, Mapping):
        return dict(models)
    return {getattr(m.config, "label", str(i)): m for i, m in enumerate(models)}


PairReducer = Callable[[AttentionMaps, AttentionMaps], Mapping[str, torch.Tensor]]

# What the maps and their reductions hold per entry of an N×M map while a group is reduced: the scores and the
# softmax in float32 (8), and for the spectral measures a float64 copy with its SVD factors (24). Measured against
# the recorder's peak memory in benchmarks/recorder_memory.py.
MAP_ENTRY_BYTES = 32
DEFAULT_MAP_MEMORY = 2**30  # 1 GiB: the embedded studies' layers fit whole, so their tables are unchanged


class AttentionRecorder:
    """Collects reduced attention statistics per (network, step, layer, head, branch, metric).

    `branch` is "cond" / "uncond" for the two halves of a classifier-free-guidance batch, else "all".
    `heads` restricts the reduction to some heads; `layers` attaches only to some layers (the others keep
    the fused, faster path). `map_memory` bounds, in bytes, the maps and their reductions held at once: a layer's
    maps are computed and reduced a few (sample, head) maps at a time, `MAP_ENTRY_BYTES` per entry of each N×M
    map (None: the whole layer at once).

    Redundancy between calls: `step_reducers` compare each layer's maps with the same layer's at the previous
    evaluation of the same samples (recorded from evaluation 1 on, per branch), `branch_reducers` the conditional
    half of a guided batch with its unconditional twin (recorded under branch "cond-uncond"). Both take
    (maps, other maps) and return {metric: (B, heads)}; the previous evaluation is kept as its queries, keys and
    values (or mediator maps), so its maps are recomputed within the same memory bound.
    """

    def __init__(
        self,
        models,
        reducers: Reducer | Mapping[str, Reducer],
        *,
        layers: Iterable[int] | None = None,
        heads: Iterable[int] | None = None,
        keep_maps: Iterable[tuple[int, int]] | None = None,
        keep_dir: str | Path | None = None,
        guided_halves: tuple[str, str] = ("cond", "uncond"),
        map_memory: int | None = DEFAULT_MAP_MEMORY,
        step_reducers: Mapping[str, PairReducer] | None = None,
        branch_reducers: Mapping[str, PairReducer] | None = None,
    ):
        if map_memory is not None and (not isinstance(map_memory, int) or map_memory < 1):
            raise SettingError("map_memory", f"is a number of bytes of at least 1, got {map_memory!r}")
        self.map_memory = map_memory
        self.step_reducers = dict(step_reducers or {})
        self.branch_reducers = dict(branch_reducers or {})
        # (network, layer, branch) -> (step, maps) of the previous evaluation, for the step reducers
        self._previous: dict[tuple, tuple[int, AttentionMaps]] = {}
        self.models = _as_named_models(models)
        self.reducers = {"": reducers} if callable(reducers) else dict(reducers)
        self.layers = None if layers is None else _selection(layers, "layers")
        self.heads = None if heads is None else _selection(heads, "heads")
        self.keep_maps = set()
        for pair in keep_maps or ():
            if (
                not isinstance(pair, (tuple, list))
                or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pair)
            ):
                raise SettingError("keep_maps", f"takes (step, layer) pairs of whole numbers ≥ 0, got {pair!r}")
            self.keep_maps.add(tuple(pair))
        if self.keep_maps and keep_dir is None:
            raise ValueError("keep_maps needs keep_dir, the folder to write the kept maps to")
        self.keep_dir = Path(keep_dir) if keep_dir is not None else None
        # Which half of a doubled (guided) batch is which: attnmed and DiTPipeline put the conditional half first,
        # PixArt and SD3 pipelines the unconditional one.
        self.guided_halves = guided_halves
        self._detach_foreign: list = []
        self.stats: dict[tuple, RunningStats] = {}
        self.step_meta: dict[int, dict[str, float]] = {}
        self.current: StepInfo | None = None
        self._saved = defaultdict(int)
        self._attached: list[nn.Module] = []

    # ---- attaching ----------------------------------------------------------------------------------------
    def attach(self) -> "AttentionRecorder":
        self.check_selection()
        for name, model in self.models.items():
            if not hasattr(model, "attention_modules"):  # a diffusers transformer: wrap its attention processors
                from mediator_models.recording import diffusers as diffusers_recording

                self._detach_foreign.append(
                    diffusers_recording.attach(model, lambda layer, name=name: self._observer(name, layer), self.layers)
                )
                continue
            modules = model.attention_modules()
            for layer in range(len(modules)) if self.layers is None else self.layers:
                module = modules[layer]
                if module.map_observer is not None:
                    raise RuntimeError(f"layer {layer} of {name} is already being observed; detach the other recorder")
                module.map_observer = self._observer(name, layer)
                self._attached.append(module)
        return self

    def check_selection(self) -> None:
        """Refuse layers, heads and kept maps the models do not have, before any sampling starts."""
        for name, model in self.models.items():
            if hasattr(model, "attention_modules"):
                if getattr(getattr(model, "config", None), "attention", None) == "conv":
                    raise ValueError(
                        f"{name} mixes tokens with a depthwise conv only (the no-attention ablation): "
                        "it has no attention maps to record"
                    )
                modules = model.attention_modules()
                depth, heads = len(modules), modules[0].num_heads
            else:
                from mediator_models.recording import diffusers as diffusers_recording

                depth, heads = len(diffusers_recording.recordable_layers(model)), diffusers_recording.num_heads(model)
            wrong = [layer for layer in self.layers or () if layer >= depth]
            if wrong:
                raise SettingError("layers", f"{wrong} do not exist in {name}: it has layers 0..{depth - 1}")
            wrong = [head for head in self.heads or () if head >= heads]
            if wrong:
                raise SettingError("heads", f"{wrong} do not exist in {name}: it has heads 0..{heads - 1}")
            recorded = range(depth) if self.layers is None else self.layers
            wrong = sorted(pair for pair in self.keep_maps if pair[1] not in recorded)
            if wrong:
                raise SettingError(
                    "keep_maps",
                    f"{wrong}: those layers are not recorded in {name} (recorded: {list(recorded)}); kept maps come "
                    "from recorded layers only",
                )

    def detach(self) -> None:
        for module in self._attached:
            module.map_observer = None
        self._attached.clear()
        for detach in self._detach_foreign:
            detach()
        self._detach_foreign.clear()

    # ---- the sampler side ---------------------------------------------------------------------------------
    def callback(self, info: StepInfo) -> None:
        """Pass as the sampler's step callback (it never switches networks).

        Rows are keyed by evaluation index, so every batch must evaluate index k at the same noise level
        (true of every fixed-step sampler); an adaptive solver (dopri5) that does not is refused here.
        """
        self.current = info
        meta = self.step_meta.setdefault(
            info.index, {"noise_level": info.noise_level, "model_time": float(info.model_time.float().mean())}
        )
        if abs(meta["noise_level"] - info.noise_level) > 1e-6:
            raise ValueError(
                f"evaluation {info.index} fell at noise level {info.noise_level:.4f} here and {meta['noise_level']:.4f} "
                "in an earlier batch, so one row would mix noise levels: record with a fixed-step sampler (the SDE, "
                "or the ODE with --method euler or heun), not an adaptive one (dopri5)"
            )

    def _observer(self, network: str, layer: int):
        def observe(maps: AttentionMaps) -> None:
            if self.current is None:
                raise RuntimeError("the recorder does not know the step: pass recorder.callback to the sampler")
            self._record(network, layer, maps)

        return observe

    def _record(self, network: str, layer: int, maps: AttentionMaps) -> None:
        step = self.current.index
        batch = len(self.current.x)
        if self.heads is not None:
            maps = maps.select(heads=self.heads)
        total = _batch_size(maps)
        halves = [("all", slice(None))]
        if total == 2 * batch:  # classifier-free guidance: the doubled batch's halves, in the pipeline's order
            halves = [(self.guided_halves[0], slice(0, batch)), (self.guided_halves[1], slice(batch, total))]
        parts = {}
        for branch, rows in halves:
            part = parts[branch] = maps.select(rows)
            for prefix, reducer in self.reducers.items():
                self._add(network, step, layer, branch, prefix, self._reduce_in_chunks(reducer, part))
            if self.step_reducers:
                previous = self._previous.get((network, layer, branch))
                if previous is not None and previous[0] == step - 1 and previous[1].shape == part.shape:
                    for prefix, reducer in self.step_reducers.items():
                        self._add(
                            network, step, layer, branch, prefix, self._reduce_in_chunks(reducer, part, previous[1])
                        )
                self._previous[(network, layer, branch)] = (step, part.detached())
        if self.branch_reducers and len(halves) == 2:
            cond, uncond = parts["cond"], parts["uncond"]
            for prefix, reducer in self.branch_reducers.items():
                self._add(network, step, layer, "cond-uncond", prefix, self._reduce_in_chunks(reducer, cond, uncond))
        if (step, layer) in self.keep_maps:
            self._keep(network, step, layer, maps)

    def _add(self, network: str, step: int, layer: int, branch: str, prefix: str, measured: dict) -> None:
        for metric, values in measured.items():
            # The head average is tracked per sample too, so its std over samples is exact.
            values = torch.cat([values, values.mean(-1, keepdim=True)], dim=-1)
            key = (network, step, layer, branch, prefix + metric)
            if key not in self.stats:
                self.stats[key] = RunningStats(values.shape[-1])
            self.stats[key].add(values)

    def _reduce_in_chunks(self, reducer, maps: AttentionMaps, *others: AttentionMaps) -> dict[str, torch.Tensor]:
        """reducer(maps, *others), {metric: (B, heads)}, computed over groups of (sample, head) maps that fit
        `map_memory` (the same samples and heads of each). Every measure is one number per map, so the groups'
        results put together are the whole layer's."""
        batch, heads, n, m = maps.shape
        if self.map_memory is None:
            return reducer(maps, *others)
        per_map = n * m * MAP_ENTRY_BYTES * (1 + len(others))
        fitting = self.map_memory // per_map
        if fitting < 1:
            raise SettingError(
                "map_memory",
                f"is {_bytes(self.map_memory)}, but one {n}×{m} map and its reductions need about {_bytes(per_map)}: "
                f"allow at least {_bytes(per_map)}, or record fewer tokens",
            )
        if fitting >= batch * heads:
            return reducer(maps, *others)
        head_step = min(heads, fitting)
        row_step = max(1, fitting // heads) if head_step == heads else 1
        blocks: dict[str, list[torch.Tensor]] = {}
        for start in range(0, batch, row_step):
            rows = slice(start, min(start + row_step, batch))
            pieces: dict[str, list[torch.Tensor]] = {}
            for first in range(0, heads, head_step):
                chosen = list(range(first, min(first + head_step, heads)))
                picked = None if head_step == heads else chosen
                measured = reducer(*(each.select(rows, picked) for each in (maps, *others)))
                for metric, values in measured.items():
                    pieces.setdefault(metric, []).append(values)
            for metric, parts in pieces.items():
                blocks.setdefault(metric, []).append(torch.cat(parts, dim=-1))
        return {metric: torch.cat(parts, dim=0) for metric, parts in blocks.items()}

    def _keep(self, network: str, step: int, layer: int, maps: AttentionMaps) -> None:
        safe = re.sub(r"[^A-Za-z0-9]+", "-", network).strip("-")
        key = (safe, step, layer)
        payload = {
            "kind": maps.kind,
            "effective": maps.effective.detach().cpu(),
            "network": network,
            "step": step,
            "layer": layer,
            # which heads the maps hold, in the order of their head axis (ascending, whatever order was asked)
            "heads": list(self.heads) if self.heads is not None else list(range(maps.effective.shape[1])),
            **self.step_meta.get(step, {}),
        }
        if maps.kind == "mediator":
            payload["query_to_mediator"] = maps.query_to_mediator.detach().cpu()
            payload["mediator_to_key"] = maps.mediator_to_key.detach().cpu()
        atomic_save(
            payload, self.keep_dir / f"maps_{safe}_step{step:04d}_layer{layer:02d}_part{self._saved[key]:03d}.pt"
        )
        self._saved[key] += 1

    # ---- results ------------------------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        """One plain dict per (network, step, layer, head, branch, metric) with the mean, the standard deviation
        over samples and the sample count. Head −1 is the average over the recorded heads (the paper's score)."""
        out = []
        for (network, step, layer, branch, metric), stats in sorted(self.stats.items(), key=lambda kv: kv[0]):
            meta = self.step_meta.get(step, {"noise_level": math.nan, "model_time": math.nan})
            heads = self.heads if self.heads is not None else list(range(len(stats.mean_) - 1))
            for head, mean, std in zip([*heads, -1], stats.mean().tolist(), stats.std().tolist()):
                out.append(
                    {
                        "network": network,
                        "step": step,
                        "noise_level": meta["noise_level"],
                        "model_time": meta["model_time"],
                        "layer": layer,
                        "head": head,
                        "branch": branch,
                        "metric": metric,
                        "mean": mean,
                        "std": std,
                        "count": stats.count,
                    }
                )
        return out

    def state_dict(self) -> dict:
        """Everything collected so far, for resuming a collection."""
        return {
            "stats": {k: v.state() for k, v in self.stats.items()},
            "step_meta": self.step_meta,
            "saved": dict(self._saved),
        }

    def merge_state_dict(self, state: dict) -> None:
        """Add the statistics another recorder collected on other samples (another rank's)."""
        for key, values in state["stats"].items():
            other = RunningStats.from_state(values)
            if key in self.stats:
                self.stats[key].merge(other)
            else:
                self.stats[key] = other
        for step, meta in state["step_meta"].items():
            self.step_meta.setdefault(step, meta)

    def load_state_dict(self, state: dict) -> None:
        self.stats = {k: RunningStats.from_state(v) for k, v in state["stats"].items()}
        self.step_meta = dict(state["step_meta"])
        self._saved = defaultdict(int, state.get("saved", {}))


@contextlib.contextmanager
def record_attention(
    models,
    reducers,
    layers=None,
    heads=None,
    keep_maps=None,
    keep_dir=None,
    guided_halves=("cond", "uncond"),
    map_memory: int | None = None,
    step_reducers=None,
    branch_reducers=None,
) -> Iterator[AttentionRecorder]:
    """Attach a recorder for the duration of the block; the models are restored on exit, even on errors.
    Models are attnmed's or diffusers transformers (DiT, PixArt, SD3; see mediator_models.recording.diffusers).

    `layers` and `heads` select what is recorded; both are kept in ascending order whatever order they are given
    in (`heads=[3, 1]` records heads 1 and 3, in that order), in the reducers' maps, the table's labels and the
    kept-map files, each of which also stores the head indices its maps hold under "heads"."""
    recorder = AttentionRecorder(
        models,
        reducers,
        layers=layers,
        heads=heads,
        keep_maps=keep_maps,
        keep_dir=keep_dir,
        guided_halves=guided_halves,
        map_memory=DEFAULT_MAP_MEMORY if map_memory is None else map_memory,
        step_reducers=step_reducers,
        branch_reducers=branch_reducers,
    )
    recorder.attach()
    try:
        yield recorder
    finally:
        recorder.detach()


def _selection(values: Iterable[int], what: str) -> list[int]:
    """A non-empty list of distinct indices ≥ 0 (−1 is reserved for the head average in tables); `what` is the
    setting ("layers" or "heads")."""
    values = list(values)
    if not values:
        raise SettingError(what, f"was given without values; name at least one, or leave it unset to record all {what}")
    bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if bad:
        raise SettingError(
            what,
            f"takes indices from 0 up, got {bad}"
            + (" (−1 is the head average in tables, recorded always)" if what == "heads" else ""),
        )
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise SettingError(what, f"names {repeated} more than once; name each once")
    return sorted(values)


def _batch_size(maps: AttentionMaps) -> int:
    return maps.shape[0]


def _bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count} B"
