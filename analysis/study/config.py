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
    # The design that can decide the quality claim: seeds before variants, data with detail at the token grid,
    # and FID along training.
    data: str = "digits"  # "digits" or "textures" (mediator_models.data), scored by its own pinned extractor
    # The claims family: the counts trained and sampled at every training seed with full attention and (when the
    # study has the ablation) full-conv. Empty: every count. Everything else is exploratory: it runs at the first
    # `exploratory_seeds` training seeds only (0: at all of them) and is decided by no verdict.
    family_counts: tuple[int, ...] = ()
    exploratory_seeds: int = 0
    along_training: tuple[float, ...] = ()  # fractions of training at which the claims family is sampled again
    along_samples: int = 500  # images per cell at those points (FID and its bias-free FID∞)

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
        if self.data not in ("digits", "textures"):
            raise ValueError(f"unknown study data {self.data!r}; choose 'digits' or 'textures'")
        if set(self.family_counts) - set(self.mediator_counts):
            raise ValueError(f"family_counts {self.family_counts} must be among mediator_counts {self.mediator_counts}")
        if not 0 <= self.exploratory_seeds <= len(self.train_seeds):
            raise ValueError(f"exploratory_seeds must be 0 to {len(self.train_seeds)}, got {self.exploratory_seeds}")
        for fraction in self.along_training:
            if not 0 < fraction < 1 or abs(fraction * self.train_steps - round(fraction * self.train_steps)) > 1e-9:
                raise ValueError(
                    f"along_training fraction {fraction} must lie in (0, 1) and fall on a whole step of "
                    f"{self.train_steps}"
                )

    def key(self) -> str:
        data = dataclasses.asdict(self)
        for name in _ADDED_LATER:
            if data[name] == _UNSET[name]:
                del data[name]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StudyConfig":
        """The configuration a run folder's study.json holds (JSON lists back to tuples; options added since
        it was written take their defaults, which leave its key as it was)."""

        def frozen(value):
            return tuple(frozen(v) for v in value) if isinstance(value, list) else value

        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"study.json names settings this attnmed does not know: {unknown}; update attnmed")
        return cls(**{name: frozen(value) for name, value in data.items()})

    @property
    def cells(self) -> list[tuple[int, int]]:
        """(training seed, sampling seed) pairs: the replicates every comparison is paired over."""
        return [(t, r) for t in self.train_seeds for r in self.sample_seeds]

    @property
    def exploratory_train_seeds(self) -> tuple[int, ...]:
        """The training seeds of runs outside the claims family."""
        return self.train_seeds[: self.exploratory_seeds] if self.exploratory_seeds else self.train_seeds

    @property
    def along_steps(self) -> tuple[int, ...]:
        """The training steps at which the claims family is sampled again (the final step not among them)."""
        return tuple(round(fraction * self.train_steps) for fraction in self.along_training)

    @property
    def checkpoint_every(self) -> int:
        """The period of training checkpoints: every point along training falls on one."""
        import math

        return math.gcd(self.train_steps, *self.along_steps) if self.along_steps else max(50, self.train_steps // 4)


_ADDED_LATER = (
    "ablations",
    "adaptive_counts",
    "adaptive_drift_ratios",
    "time_matched_controls",
    "premise",
    "recovery_thresholds",
    "budget_of",
    "data",
    "family_counts",
    "exploratory_seeds",
    "along_training",
    "along_samples",
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
    # The demo: full attention, n = 4 and 16, and full attention with the mediators' conv (the conv-matched control of
    # the quality claim), three training seeds each, one sampling seed of 500 images per cell, 25 SDE steps; sized
    # for under 30 minutes on 2 CPU cores (240 training steps at batch 32, about 5 epochs of the digits).
    "default": StudyConfig(
        train_steps=240,
        ema_decay=0.98,  # 240 steps: the EMA keeps under 1% of the initial weights
        sampler_steps=25,
        fid_samples=500,
        sample_seeds=(0,),
        ablations=("full-conv",),
    ),
    # The paper's token grid: 16×16 = 256 tokens (patch 1) on the native-resolution textures, the paper's counts
    # 4/16/64. Seeds before variants: the claims family (full, full-conv, n = 16 and 64) at 5 training seeds with
    # 1000 images per cell, sampled again from the checkpoints at 25/50/75% of training (500 images); n = 4, the
    # ablations, the adaptive trio, time-matched controls, the rule on the drift and the derived schedules at 2
    # seeds, exploratory. What was shrunk to fit about 90 minutes on 2 CPU cores: the width (SiT-XT, 64 wide,
    # half of SiT-T), the training (280 steps at batch 32, about 2 epochs) and the sampler (10 SDE steps).
    "paper-grid": StudyConfig(
        model="SiT-XT/1",
        data="textures",
        mediator_counts=(4, 16, 64),
        family_counts=(16, 64),
        exploratory_seeds=2,
        train_steps=280,
        ema_decay=0.95,  # 280 steps: at 0.99 the first checkpoint (70 steps) would still hold half its initial weights
        sampler_steps=10,
        record_samples=16,
        fid_samples=1000,
        along_training=(0.25, 0.5, 0.75),
        along_samples=500,
        train_seeds=(0, 1, 2, 3, 4),
        sample_seeds=(0,),
        adaptive_ratios=((1.0, 0.9), (0.9, 0.8)),
        jsd_quantiles=(),
        ablations=("noconv", "full-conv", "conv"),
        adaptive_counts=(4, 16, 64),
        adaptive_drift_ratios=((0.9, 0.8),),
        time_matched_controls=True,
        premise=True,
        recovery_thresholds=(0.1,),
        budget_of=(16,),
    ),
}
