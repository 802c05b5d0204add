"""Deriving mediator schedules from measured redundancy, and calibrating the paper's rule to a budget.

A redundancy table (analysis.collect) gives, per sampling step, how many directions each attention map
really uses (its energy rank) and how alike its queries attend (JSD). `derive_schedule` turns that into a
schedule: at each step the smallest available mediator count that the maps' rank fits in, or fewer
mediators where the JSD score says queries attend alike; then it merges steps into few monotone intervals
(never more mediators at a noisier step, the paper's premise). Every schedule reports its expected GFLOPs
per image before anything is sampled.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch

from analysis.collect import refuse_missing_values
from analysis.metrics import RECOVERY_KINDS
from mediator_models.network.flops import config_gmacs
from mediator_models.sampling.generation import ProcessConfig, SamplerConfig, generate
from mediator_models.sampling.steps import start_batch
from mediator_models.sampling.switching import AdaptiveSwitch, Interval, MediatorSchedule, count_label
from mediator_models.storage.errors import SettingError

AGGREGATES = ("mean", "max", "quantile")


def per_step_statistic(
    table: pd.DataFrame, metric: str, aggregate: str = "mean", quantile: float = 0.9, branch: str | None = None
) -> pd.DataFrame:
    """One value per step: `metric`'s sample mean, aggregated over layers and heads (head rows only).

    Returns columns step, noise_level, value, sorted from noise to data.
    """
    if aggregate not in AGGREGATES:
        raise SettingError("aggregate", f"is {aggregate!r}; choose one of {', '.join(AGGREGATES)}")
    rows = table[(table["metric"] == metric) & (table["head"] >= 0)]
    if branch is not None:
        rows = rows[rows["branch"] == branch]
    if rows.empty:
        raise ValueError(f"the table has no rows for metric {metric!r}; {_how_to_record(table, metric)}")
    refuse_missing_values(rows, metric)
    grouped = rows.groupby(["step", "noise_level"])["mean"]
    if aggregate == "mean":
        values = grouped.mean()
    elif aggregate == "max":
        values = grouped.max()
    else:
        values = grouped.quantile(quantile)
    return values.rename("value").reset_index().sort_values("noise_level", ascending=False, ignore_index=True)


def _how_to_record(table: pd.DataFrame, metric: str) -> str:
    """Advice for a metric a table lacks that names what can actually produce it."""
    if metric.startswith("energy_rank_"):
        recorded = sorted(m for m in set(table["metric"]) if m.startswith("energy_rank_"))
        if recorded:
            taus = ", ".join(m.removeprefix("energy_rank_") for m in recorded)
            return f"this table holds energy ranks at τ = {taus} only"
        return "record the model with the singular-value ranks (`--metrics all`), which hold τ = 0.9 and 0.99"
    return "record it (`--metrics all` records every measure but the premise measures)"


def _refuse_unrecorded_tau(table: pd.DataFrame, rule: Rule) -> None:
    """The rank rule at a τ the table did not record is a wrong setting, not a wrong table."""
    taus = sorted(m.removeprefix("energy_rank_") for m in set(table["metric"]) if m.startswith("energy_rank_"))
    if rule.kind == "energy_rank" and taus and rule.metric not in set(table["metric"]):
        raise SettingError("tau", f"is {rule.tau:g}, but this table holds energy ranks at τ = {', '.join(taus)} only")


@dataclass(frozen=True)
class Rule:
    """How to turn per-step measurements into mediator counts.

    kind "energy_rank": the smallest available n ≥ the maps' energy rank at τ (0.9 or 0.99);
    kind "jsd": the JSD score against ascending `thresholds`, one per available count after the first:
    below thresholds[0] use the smallest count, below thresholds[1] the next, and so on.
    """

    kind: str = "energy_rank"
    tau: float = 0.9
    aggregate: str = "mean"
    thresholds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        ascending = all(a < b for a, b in zip(self.thresholds, self.thresholds[1:]))
        if self.kind == "jsd" and not ascending:
            # Descending thresholds would let the middle counts never be chosen, silently.
            raise SettingError(
                "thresholds", f"must rise strictly, one per count after the first; got {list(self.thresholds)}"
            )

    @property
    def metric(self) -> str:
        return f"energy_rank_{self.tau:g}" if self.kind == "energy_rank" else "jsd"

    def describe(self) -> str:
        if self.kind == "energy_rank":
            return f"energy rank τ={self.tau:g} ({self.aggregate} over layers and heads)"
        return f"JSD thresholds {list(self.thresholds)} ({self.aggregate})"


def counts_per_step(values: Sequence[float], available: Sequence[int | None], rule: Rule) -> list[int | None]:
    """Mediator count (None: full attention) for each step's measured value."""
    ordered = sorted((c for c in available if c is not None))
    has_full = None in available
    out: list[int | None] = []
    for value in values:
        if rule.kind == "energy_rank":
            fitting = [c for c in ordered if c >= value]
            out.append(fitting[0] if fitting else (None if has_full else ordered[-1]))
        elif rule.kind == "jsd":
            choices = ordered + ([None] if has_full else [])
            if len(rule.thresholds) != len(choices) - 1:
                raise SettingError(
                    "thresholds",
                    f"gives {len(rule.thresholds)} JSD thresholds, but {len(choices)} counts need {len(choices) - 1} "
                    "(one per count after the first)",
                )
            index = next((i for i, t in enumerate(rule.thresholds) if value < t), len(rule.thresholds))
            out.append(choices[index])
        else:
            raise ValueError(f"unknown rule {rule.kind!r}; choose 'energy_rank' or 'jsd'")
    return out


def _rank_of(count: int | None) -> float:
    return float("inf") if count is None else float(count)


def monotone_intervals(levels: Sequence[float], counts: Sequence[int | None], name: str) -> MediatorSchedule:
    """Intervals from per-step counts (levels from noise to data): counts only grow as noise falls (a running
    maximum), equal neighbours merge, and boundaries sit halfway between the steps where the count changes."""
    merged: list[list] = []  # [count, level of first step, level of last step]
    running: int | None = counts[0]  # None is full attention, so the running maximum starts at the first count
    for level, count in zip(levels, counts):
        if _rank_of(count) > _rank_of(running):
            running = count
        if merged and merged[-1][0] == running:
            merged[-1][2] = level
        else:
            merged.append([running, level, level])
    edges = [1.0] + [(merged[i][2] + merged[i + 1][1]) / 2 for i in range(len(merged) - 1)] + [0.0]
    return MediatorSchedule([Interval(edges[i], edges[i + 1], m[0]) for i, m in enumerate(merged)], name)


def derive_schedule(
    table: pd.DataFrame, available: Sequence[int | None], rule: Rule = Rule(), name: str | None = None
) -> MediatorSchedule:
    """A schedule from a redundancy table recorded on a full-attention model (see module docstring)."""
    steps = per_step_statistic(table, rule.metric, rule.aggregate)
    counts = counts_per_step(steps["value"].tolist(), available, rule)
    return monotone_intervals(steps["noise_level"].tolist(), counts, name or f"derived: {rule.describe()}")


def recovery_curve(table: pd.DataFrame, kind: str = "rank") -> pd.DataFrame:
    """The premise measure per step, layer and mediator count: the relative error of A·V through a rank-n map
    ("rank": the truncated SVD of A; "pooled": the mediator form from the layer's own pooled queries; "bound": the
    least error any rank-n map can reach, from the output's own SVD), averaged
    over heads and samples. Columns step, noise_level, layer, mediators, error; from noise to data."""
    if kind not in RECOVERY_KINDS:
        raise SettingError("recovery_kind", f"is {kind!r}; choose one of {', '.join(RECOVERY_KINDS)}")
    prefix = f"recovery_{kind}_"
    rows = table[table["metric"].str.startswith(prefix) & (table["head"] == -1)]
    if rows.empty:
        raise ValueError(
            f"the table has no {prefix}N rows; record a full-attention model with the premise measures "
            f"(`attnmed record --metrics cheap,{prefix}4,{prefix}16` or a study with premise=True)"
        )
    refuse_missing_values(rows, f"{prefix}N")
    curve = rows.assign(mediators=rows["metric"].str.removeprefix(prefix).astype(int), error=rows["mean"])
    curve = curve[["step", "noise_level", "layer", "mediators", "error"]]
    return curve.sort_values(["noise_level", "layer", "mediators"], ascending=[False, True, True], ignore_index=True)


def derive_recovery_schedule(
    table: pd.DataFrame, available: Sequence[int | None], epsilon: float, kind: str = "rank", name: str | None = None
) -> MediatorSchedule:
    """At each step the fewest available mediators whose rank-n map keeps A·V within relative error `epsilon` in
    every layer (the worst layer decides: the networks switch whole, not per layer); full attention where no count
    does. Steps merge into monotone intervals as in `derive_schedule`. An absolute threshold: a step gets more
    mediators only where the measured maps need them, not because it falls in some quantile of the series."""
    curve, counts = _checked_recovery_curve(table, available, epsilon, kind)
    worst = curve.groupby(["step", "noise_level", "mediators"])["error"].max().reset_index()
    levels, chosen = [], []
    for (step, level), part in worst.groupby(["step", "noise_level"]):
        levels.append(level)
        chosen.append(_fewest_within(part.set_index("mediators")["error"], counts, available, epsilon))
    order = sorted(range(len(levels)), key=lambda i: -levels[i])
    label = name or f"derived: {kind}-n keeps A·V within {epsilon:g} in every layer"
    return monotone_intervals([levels[i] for i in order], [chosen[i] for i in order], label)


def _checked_recovery_curve(
    table: pd.DataFrame, available: Sequence[int | None], epsilon: float, kind: str
) -> tuple[pd.DataFrame, list[int]]:
    """The recovery curve and the available mediator counts, refusing an ε outside (0, 1) or counts not measured."""
    if not 0 < epsilon < 1:
        raise SettingError("epsilon", f"is a relative error in (0, 1), got {epsilon}")
    curve = recovery_curve(table, kind)
    counts = sorted(c for c in available if c is not None)
    missing = sorted(set(counts) - set(curve["mediators"]))
    if missing:
        raise ValueError(f"the table has no recovery measure for n = {missing}; record it with those counts")
    return curve, counts


def _fewest_within(error: pd.Series, counts: Sequence[int], available: Sequence[int | None], epsilon: float):
    """The fewest of `counts` whose error (indexed by count) is within ε; full attention where none is (the largest
    count where full attention is not available)."""
    fitting = [c for c in counts if error[c] <= epsilon]
    return fitting[0] if fitting else (None if None in available else counts[-1])


def derive_layer_recovery_schedule(
    table: pd.DataFrame,
    available: Sequence[int | None],
    epsilon: float,
    kind: str = "rank",
    depth: int | None = None,
    name: str | None = None,
) -> MediatorSchedule:
    """A per-layer schedule: at each step each layer gets the fewest available mediators whose rank-n (or pooled)
    map keeps its own A·V within relative error `epsilon` (full attention where none does). Per layer the counts
    only grow as noise falls (a running maximum, as `monotone_intervals`); steps where no layer changes merge,
    and boundaries sit halfway between steps. Each interval's "mediators" is its most common count (ties: the
    fewest mediators), the other layers are listed under "layers". With `depth`, the table must cover every layer."""
    curve, counts = _checked_recovery_curve(table, available, epsilon, kind)
    layers = sorted(int(layer) for layer in curve["layer"].unique())
    if depth is not None and layers != list(range(depth)):
        raise ValueError(
            f"the table holds the recovery measure for layers {layers}, but the model has {depth} (0 to "
            f"{depth - 1}); a per-layer schedule needs every layer: record without --layers"
        )
    # A guided table holds both branches: a layer's count must keep the worse of the two within ε.
    curve = curve.groupby(["step", "noise_level", "layer", "mediators"])["error"].max().reset_index()
    chosen: dict[tuple[float, int], int | None] = {}
    for (step, level, layer), part in curve.groupby(["step", "noise_level", "layer"]):
        chosen[(level, int(layer))] = _fewest_within(part.set_index("mediators")["error"], counts, available, epsilon)
    levels = sorted({level for level, _ in chosen}, reverse=True)
    per_step = []  # per step from noise to data, the count of each layer after its running maximum
    running = {layer: chosen[(levels[0], layer)] for layer in layers}
    for level in levels:
        for layer in layers:
            if _rank_of(chosen[(level, layer)]) > _rank_of(running[layer]):
                running[layer] = chosen[(level, layer)]
        per_step.append(tuple(running[layer] for layer in layers))
    merged: list[list] = []  # [counts per layer, level of first step, level of last step]
    for level, layer_counts in zip(levels, per_step):
        if merged and merged[-1][0] == layer_counts:
            merged[-1][2] = level
        else:
            merged.append([layer_counts, level, level])
    edges = [1.0] + [(merged[i][2] + merged[i + 1][1]) / 2 for i in range(len(merged) - 1)] + [0.0]
    intervals = []
    for i, (layer_counts, _, _) in enumerate(merged):
        frequency = {c: layer_counts.count(c) for c in layer_counts}
        common = max(frequency, key=lambda c: (frequency[c], -_rank_of(c)))
        intervals.append(Interval(edges[i], edges[i + 1], common, dict(zip(layers, layer_counts))))
    label = name or f"derived per layer: {kind}-n keeps each layer's A·V within {epsilon:g}"
    return MediatorSchedule(intervals, label)


def schedule_gflops(schedule: MediatorSchedule, levels: Sequence[float], configs: dict, cfg: bool = False) -> float:
    """Expected GFLOPs per image of `schedule` over a sampler's evaluation levels; configs: count -> ModelConfig."""
    return schedule.expected_gflops(levels, configs, cfg)


def table_gflops(schedule: MediatorSchedule, table: pd.DataFrame, configs: dict) -> float:
    """Expected GFLOPs per image of `schedule` on the evaluation grid a table was recorded on (its noise level
    per step), doubled when the table holds guided (cond/uncond) rows."""
    levels = table.groupby("step")["noise_level"].first().sort_index().tolist()
    guided = {"cond", "uncond"} <= set(table["branch"])
    return schedule_gflops(schedule, levels, configs, cfg=guided)


def schedule_within_budget(
    table: pd.DataFrame,
    available: Sequence[int | None],
    configs: dict,
    budget_gflops: float,
    tau: float = 0.99,
    aggregate: str = "mean",
) -> tuple[MediatorSchedule, float]:
    """A monotone schedule within a FLOPs budget that keeps the maps' rank where it can.

    Starts from the energy-rank rule at τ (each step gets the smallest count that fits its measured rank), then,
    while the expected GFLOPs per image exceed `budget_gflops`, lowers the count of one step, always the first
    step of its interval (so counts never fall as noise falls), choosing the step whose measured rank is least
    exceeded by the smaller count (ties: the noisiest step). Returns (schedule, GFLOPs). Full attention counts as
    holding any rank.
    """
    steps = per_step_statistic(table, f"energy_rank_{tau:g}", aggregate)
    levels, need = steps["noise_level"].tolist(), steps["value"].tolist()
    choices = sorted(c for c in available if c is not None) + ([None] if None in available else [])
    gmacs = {c: config_gmacs(configs[c]) for c in choices}
    factor = 2 if {"cond", "uncond"} <= set(table["branch"]) else 1
    index = [choices.index(c) for c in counts_per_step(need, available, Rule("energy_rank", tau=tau))]
    for k in range(1, len(index)):  # the running maximum: never fewer mediators at a less noisy step
        index[k] = max(index[k], index[k - 1])

    def deficit(k: int, i: int) -> float:
        return 0.0 if choices[i] is None else max(0.0, need[k] - choices[i])

    cost = factor * sum(gmacs[choices[i]] for i in index)
    while cost > budget_gflops + 1e-9:
        candidates = [k for k in range(len(index)) if index[k] > 0 and (k == 0 or index[k - 1] < index[k])]
        if not candidates:
            floor = factor * gmacs[choices[0]] * len(index)
            raise ValueError(
                f"no schedule of {[count_label(c) for c in choices]} fits {budget_gflops:.4g} GFLOPs per "
                f"image; the cheapest (n={choices[0]} throughout) costs {floor:.4g}"
            )
        k = min(candidates, key=lambda k: (deficit(k, index[k] - 1) - deficit(k, index[k]), -levels[k]))
        cost -= factor * (gmacs[choices[index[k]]] - gmacs[choices[index[k] - 1]])
        index[k] -= 1
    name = f"derived: rank τ={tau:g} within {budget_gflops:.4g} GFLOPs"
    return monotone_intervals(levels, [choices[i] for i in index], name), cost


RULES = ("energy-rank", "jsd", "budget", "recovery")


@dataclass
class DerivedSchedule:
    """A schedule derived from a table, with its expected cost and the static networks' costs beside it."""

    schedule: MediatorSchedule
    gflops: float  # expected GFLOPs per image on the table's evaluation grid
    static_gflops: dict[int | None, float]  # each count used throughout
    steps: int  # evaluations in the table's grid


def full_attention_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the one full-attention network a table holds; schedules are derived from a full model's maps."""
    full = table[table["attention"] == "full"]
    if full.empty:
        raise ValueError("the table holds no full-attention rows; schedules are derived from a full model's maps")
    if full["network"].nunique() > 1:
        raise ValueError(
            f"the table holds several full-attention networks ({sorted(full['network'].unique())}); "
            "record one model per table"
        )
    return full


def schedule_from_table(
    table: pd.DataFrame,
    counts: Sequence[int | None],
    base_config,
    rule: str = "energy-rank",
    *,
    tau: float = 0.9,
    thresholds: Sequence[float] = (),
    epsilon: float = 0.1,
    recovery_kind: str = "rank",
    budget_gflops: float | None = None,
    aggregate: str = "mean",
    name: str | None = None,
    per_layer: bool = False,
) -> DerivedSchedule:
    """One of the `RULES` applied to the full-attention rows of a recorded table (`attnmed schedule`).

    energy-rank: the smallest count holding the maps' energy rank at τ; jsd: ascending thresholds on the JSD
    score; budget: the rank rule lowered until it fits `budget_gflops`; recovery: the fewest mediators whose
    rank-n (or pooled) map keeps every layer's A·V within `epsilon`, or with `per_layer` each layer its own
    fewest (`derive_layer_recovery_schedule`). `base_config` is the recorded model's ModelConfig: each count's
    network differs from it in its attention only.
    """
    if rule not in RULES:
        raise SettingError("rule", f"is {rule!r}; choose one of {', '.join(RULES)}")
    if per_layer and rule != "recovery":
        raise SettingError(
            "per_layer",
            f"works with the recovery rule only (the per-layer premise measure), not {rule!r}: add --rule recovery",
        )
    full = full_attention_rows(table)
    configs = {c: base_config.replace(attention="full" if c is None else "mediator", mediators=c) for c in counts}
    if rule == "budget":
        if budget_gflops is None:
            raise SettingError("budget_gflops", "is needed by the budget rule: the GFLOPs per image to fit within")
        schedule, cost = schedule_within_budget(full, counts, configs, budget_gflops, tau, aggregate)
    else:
        if rule == "recovery" and per_layer:
            schedule = derive_layer_recovery_schedule(full, counts, epsilon, recovery_kind, base_config.depth)
        elif rule == "recovery":
            schedule = derive_recovery_schedule(full, counts, epsilon, recovery_kind)
        else:
            kind = "energy_rank" if rule == "energy-rank" else "jsd"
            chosen = Rule(kind, tau=tau, aggregate=aggregate, thresholds=tuple(thresholds))
            _refuse_unrecorded_tau(full, chosen)
            schedule = derive_schedule(full, counts, chosen)
        cost = table_gflops(schedule, full, configs)
    if name:
        schedule.name = name
    static = {c: table_gflops(MediatorSchedule.constant(c), full, configs) for c in counts}
    return DerivedSchedule(schedule, cost, static, full["step"].nunique())


def adaptive_gflops(
    networks: Sequence[torch.nn.Module],
    ratios: Sequence[float],
    process: ProcessConfig,
    sampler: SamplerConfig,
    samples: int = 8,
    seed: int = 0,
    warmup: int = 3,
    distance: str = "l1",
) -> tuple[float, list[list[int]]]:
    """Mean GFLOPs per image of the paper's rule with `ratios`, measured on `samples` trajectories, and the
    evaluation index of each sample's switches."""
    switch = AdaptiveSwitch(networks, ratios, warmup=warmup, distance=distance)
    x_T, y, noise = start_batch(
        list(range(samples)), seed, networks[0].config, None, next(networks[0].parameters()).device
    )
    _, caller = generate(networks[0], process, sampler, x_T, y, callback=switch, noise_fn=noise)
    return float(caller.gflops.mean()), [list(s) for s in switch.switch_steps]


def calibrate_adaptive(
    networks: Sequence[torch.nn.Module],
    process: ProcessConfig,
    sampler: SamplerConfig,
    budget_gflops: float,
    grid: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2),
    samples: int = 8,
    seed: int = 0,
) -> dict:
    """The ratios ρ (non-increasing, from `grid`) whose measured cost is the highest within `budget_gflops`:
    as many mediators as the budget allows. Returns {"ratios", "gflops", "candidates"}."""
    candidates = []
    for ratios in itertools.product(grid, repeat=len(networks) - 1):
        if any(a < b for a, b in zip(ratios, ratios[1:])):
            continue
        gflops, _ = adaptive_gflops(networks, ratios, process, sampler, samples, seed)
        candidates.append({"ratios": list(ratios), "gflops": gflops})
    within = [c for c in candidates if c["gflops"] <= budget_gflops + 1e-9]
    if not within:
        cheapest = min(candidates, key=lambda c: c["gflops"])
        raise ValueError(
            f"no ratios in the grid meet {budget_gflops:.4g} GFLOPs per image; the cheapest costs "
            f"{cheapest['gflops']:.4g} with ρ = {cheapest['ratios']}"
        )
    best = max(within, key=lambda c: (c["gflops"], c["ratios"]))
    return {**best, "candidates": candidates}
