"""The configuration of a reproduction study (`StudyConfig`), its presets and its ablations.

Apart from the pipeline (analysis.study.reproduce) so that what the pipeline hands to the report
(analysis.study.results) can name the configuration without importing the pipeline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StudyConfig:
    """Everything that fixes a study's results (its hash names the run folder)."""

    model: str = "SiT-T/2"
    image_size: int = 16
    mediator_counts: tuple[int, ...] = (4, 16)
    train_steps: int = 800
    batch_size: int = 32
    lr: float = 1e-3
    ema_decay: float = 0.99  # short CPU runs: at 0.999 the initial weights still hold 45% of the EMA after 800 steps
    sampler_steps: int = 50
    record_samples: int = 32
    fid_samples: int = 250
    adaptive_ratios: tuple[tuple[float, ...], ...] = ((1.0, 0.9), (1.0, 0.7))
    jsd_quantiles: tuple[float, ...] = (0.33, 0.66)
    train_seeds: tuple[int, ...] = (0, 1, 2)  # each model is trained once per seed
    sample_seeds: tuple[int, ...] = (0, 1)  # each trained model is sampled once per seed (same noise for every run)
    bootstrap_replicates: int = 200  # unused since intervals are seed-level; kept so run-folder keys stay
    kid_subset_size: int = 100
    # Options of the paper-grid study (ablations, the adaptive trio, controls, the premise). While unset they
    # leave the key as it was, so the run folders of studies made before they existed keep their names (see `key`).
    ablations: tuple[str, ...] = ()  # ABLATIONS: mediators without the conv, full attention with it, the conv alone
    # the adaptive rule's networks, fewest first (empty: counts, then full)
    adaptive_counts: tuple[int | None, ...] = ()
    adaptive_drift_ratios: tuple[tuple[float, ...], ...] = ()  # the rule on the drift (ours), at these ρ
    time_matched_controls: bool = False  # each adaptive run beside a static schedule switching at its median steps
    premise: bool = False  # record how much of A·V rank-n and pooled mediator maps recover (full attention)
    recovery_thresholds: tuple[float, ...] = ()  # schedules from the premise: largest relative error allowed
    budget_of: tuple[int, ...] = ()  # schedules from the rank rule within the GFLOPs of these static counts

    def __post_init__(self) -> None:
        networks = len(self.adaptive_counts) or len(self.mediator_counts) + 1
        for ratios in (*self.adaptive_ratios, *self.adaptive_drift_ratios):
            if len(ratios) != networks - 1:
                raise ValueError(
                    f"the adaptive rule switches between {networks} networks, so each ρ needs "
                    f"{networks - 1} values; got {ratios}"
                )
        unknown = set(self.ablations) - set(ABLATIONS)
        if unknown:
            raise ValueError(f"unknown ablations {sorted(unknown)}; choose from {sorted(ABLATIONS)}")
        if self.time_matched_controls and not self.adaptive_ratios:
            raise ValueError("time-matched controls copy adaptive runs: give adaptive_ratios too")
        if self.recovery_thresholds and not self.premise:
            raise ValueError("schedules from the premise (recovery_thresholds) need premise=True to record it")

    def key(self) -> str:
        data = dataclasses.asdict(self)
        for name in _ADDED_LATER:
            if data[name] == _UNSET[name]:
                del data[name]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def cells(self) -> list[tuple[int, int]]:
        """(training seed, sampling seed) pairs: the replicates every comparison is paired over."""
        return [(t, r) for t in self.train_seeds for r in self.sample_seeds]


_ADDED_LATER = (
    "ablations",
    "adaptive_counts",
    "adaptive_drift_ratios",
    "time_matched_controls",
    "premise",
    "recovery_thresholds",
    "budget_of",
)
_UNSET = {field.name: field.default for field in dataclasses.fields(StudyConfig) if field.name in _ADDED_LATER}

# The ablations that isolate the mediators from the depthwise conv of their block (at the middle count n).
ABLATIONS = {
    "noconv": "mediators without the depthwise conv",
    "full-conv": "full attention with the mediators' depthwise conv",
    "conv": "no attention: the depthwise conv alone",
}


def ablation_model(name: str, count: int) -> tuple[str, int | None, bool | None]:
    """(attention, mediators, depthwise_conv) of an ablation variant (see ABLATIONS)."""
    if name == "noconv":
        return "mediator", count, False
    if name == "full-conv":
        return "full", None, True
    if name == "conv":
        return "conv", None, None
    raise ValueError(f"unknown ablation {name!r}; choose from {sorted(ABLATIONS)}")


PRESETS = {
    # Every stage at toy budgets: a smoke test of the pipeline (the tests run it), numbers meaningless.
    "quick": StudyConfig(
        train_steps=60,
        batch_size=16,
        sampler_steps=12,
        record_samples=4,
        fid_samples=64,
        adaptive_ratios=((1.0, 0.7),),
        train_seeds=(0, 1),
        sample_seeds=(0,),
        bootstrap_replicates=50,
        kid_subset_size=32,
    ),
    # The demo: three training seeds × two sampling seeds, sized to finish in about 40 minutes on 2 CPU cores.
    "default": StudyConfig(),
    # The paper's token grid: 16×16 = 256 tokens (patch 1 on the 16-px digits), the paper's counts 4/16/64 and its
    # adaptive trio, the ablations, time-matched controls, the rule on the drift, and schedules from the premise
    # measure and from a FLOPs budget (no JSD quantiles: they cut any series into thirds). Two training seeds ×
    # one sampling seed, 25 SDE steps, sized for about 90 minutes on 2 CPU cores.
    "paper-grid": StudyConfig(
        model="SiT-T/1",
        mediator_counts=(4, 16, 64),
        train_steps=500,
        sampler_steps=25,
        record_samples=16,
        fid_samples=200,
        train_seeds=(0, 1),
        sample_seeds=(0,),
        adaptive_ratios=((1.0, 0.9), (0.9, 0.8), (0.8, 0.6)),
        jsd_quantiles=(),
        ablations=("noconv", "full-conv", "conv"),
        adaptive_counts=(4, 16, 64),
        adaptive_drift_ratios=((0.9, 0.8),),
        time_matched_controls=True,
        premise=True,
        recovery_thresholds=(0.1, 0.2),
        budget_of=(16,),
    ),
}
