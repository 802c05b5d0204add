"""Redundancy between calls of one layer: how much its attention changes from one evaluation to the next, and
between the two halves of a guided batch. These are what DiTFastAttn exploits by reusing the previous step's
attention output and by sharing it across the guidance branches (arXiv 2406.08552), and what PAB reports as the
U-shaped step-to-step change of attention output (arXiv 2408.12588).

Each measure compares two `AttentionMaps` of the same samples and heads and returns one number per (sample, head):

- `output_rel_l1`: ‖O − O′‖₁ / ‖O′‖₁ for the attention outputs O = A·V (B, heads, N, d), O′ the earlier (or
  unconditional) one: DiTFastAttn's relative L1 error, here per head before proj;
- `output_cosine`: the cosine between the flattened outputs;
- `map_tv`: the mean over queries of the total variation ½‖p_i − p′_i‖₁ between the two maps' rows (0: the same
  distributions, 1: disjoint supports).

The recorder records them as `step_<measure>` (against the previous evaluation, from evaluation 1 on) and
`branch_<measure>` (conditional against unconditional, branch "cond-uncond").
"""

from __future__ import annotations

from typing import Callable

import torch

MEASURES = ("output_rel_l1", "output_cosine", "map_tv")
STEP_METRICS = tuple(f"step_{m}" for m in MEASURES)
BRANCH_METRICS = tuple(f"branch_{m}" for m in MEASURES)
RELATION_METRICS = STEP_METRICS + BRANCH_METRICS
_TINY = 1e-30


def output_change(now: torch.Tensor, before: torch.Tensor) -> dict[str, torch.Tensor]:
    """Relative L1 distance and cosine of two outputs (B, heads, N, d) -> (B, heads) each, in float64."""
    a, b = now.double().flatten(2), before.double().flatten(2)
    rel_l1 = (a - b).abs().sum(-1) / b.abs().sum(-1).clamp_min(_TINY)
    cosine = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(_TINY)
    return {"output_rel_l1": rel_l1, "output_cosine": cosine}


def map_total_variation(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Mean over queries of ½‖p_i − p′_i‖₁ for maps (..., N, M) -> (...)."""
    return 0.5 * (now.double() - before.double()).abs().sum(-1).mean(-1)


def relation_reducer(measures: tuple[str, ...]) -> Callable:
    """A pair reducer for the recorder: (maps, other maps) -> {measure: (B, heads)}, `measures` from MEASURES."""
    unknown = sorted(set(measures) - set(MEASURES))
    if unknown:
        raise ValueError(f"unknown measures between calls {unknown}; choose from {', '.join(MEASURES)}")

    def reduce(maps, other) -> dict[str, torch.Tensor]:
        out = {}
        if {"output_rel_l1", "output_cosine"} & set(measures):
            changes = output_change(maps.output(), other.output())
            out.update({name: value for name, value in changes.items() if name in measures})
        if "map_tv" in measures:
            out["map_tv"] = map_total_variation(maps.effective, other.effective)
        return out

    return reduce


def split_relation_metrics(metrics) -> tuple[tuple[str, ...], dict[str, Callable], dict[str, Callable]]:
    """(the one-map metrics, step reducers, branch reducers) of a metric list, for `record_attention`."""
    steps = tuple(m.removeprefix("step_") for m in metrics if m in STEP_METRICS)
    branches = tuple(m.removeprefix("branch_") for m in metrics if m in BRANCH_METRICS)
    rest = tuple(m for m in metrics if m not in RELATION_METRICS)
    return (
        rest,
        {"step_": relation_reducer(steps)} if steps else {},
        {"branch_": relation_reducer(branches)} if branches else {},
    )
