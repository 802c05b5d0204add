"""What the study pipeline hands to its report: the runs it sampled (`Run`, `RunKind`) and everything it measured
of them (`StudyResults`).

A typed bundle, so the report renders what the pipeline held instead of calling back into the pipeline, and
selects runs by what they are (their kind), never by how their names happen to be spelled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:  # annotations only
    from analysis.study.config import StudyConfig
    from mediator_models.sampling.switching import MediatorSchedule


class RunKind(StrEnum):
    """What a sampling run is. The values are the words results.csv and the report carry in their kind column."""

    STATIC = "static"  # one network at every step: a mediator count or full attention
    ABLATION = "ablation"  # a variant that isolates the mediators from their block's depthwise conv
    ADAPTIVE = "adaptive (paper's rule)"  # switches networks per sample on the state's distance d_k
    DRIFT_ADAPTIVE = "adaptive on the drift (ours)"  # the same rule on the drift, the injected noise taken out
    CONTROL = "time-matched control"  # static switches at an adaptive run's median switch steps
    DERIVED = "derived from redundancy"  # a schedule derived from the full model's recorded redundancy

    @property
    def adaptive(self) -> bool:
        """Whether runs of this kind switch networks per sample (and so keep switch steps and distances)."""
        return self in (RunKind.ADAPTIVE, RunKind.DRIFT_ADAPTIVE)


@dataclass(frozen=True)
class Run:
    """One sampling run of a study, sampled once in every (training seed, sampling seed) cell.

    `name` keys its sample folder and its rows in results.csv; `schedule` is its label in the report. `base` (the
    trained variant it samples from) and `ratios` (the adaptive rule's ρ) say how the pipeline samples it: runs
    read back from a results table (`analysis.study.claims.runs_of`) leave them at their defaults.
    """

    name: str
    kind: RunKind
    schedule: str = ""
    base: int | str | None = None  # a mediator count, None for full attention, or an ablation's name
    ratios: tuple[float, ...] = ()
    control_of: str | None = None  # the adaptive run a time-matched control copies the switch steps of
    # Outside the claims family: sampled at the study's exploratory training seeds only, decided by no verdict.
    exploratory: bool = False


# (training seed, sampling seed, run name) -> the sample folder's samples.json
Sidecars = dict[tuple[int, int, str], dict[str, Any]]


@dataclass(frozen=True, eq=False)
class StudyResults:
    """Everything the report renders, as the pipeline produced it (nothing of it is read back from disk)."""

    config: StudyConfig
    preset: str
    run_dir: Path
    figures_dir: Path
    levels: list[float]  # the noise level of each network evaluation of the study's sampler
    adaptive_order: list[int | None]  # the adaptive rule's networks, fewest mediators first
    trained: list[str]  # every trained variant's name: the counts, full attention, then the ablations
    full_model: dict[str, Any]  # the full-attention model's config (provenance of the redundancy table)
    runs: list[Run]
    sidecars: Sidecars
    table: pd.DataFrame  # the recorded redundancy of the first training seed's models
    derived: dict[str, MediatorSchedule]
    expected_gflops: dict[str, float]  # per derived schedule, computed before sampling
    results: pd.DataFrame  # per-cell rows and per-run summaries (results.csv)
    differences: pd.DataFrame  # the paired comparisons with their verdicts (differences.csv)
    seconds: float  # stage time of the whole study on this machine
    # The claims family's paired differences at each point along training (along_training.csv; empty without)
    along: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)

    def runs_of_kind(self, *kinds: RunKind) -> list[Run]:
        """The runs of these kinds, in the study's order."""
        return [run for run in self.runs if run.kind in kinds]

    @property
    def adaptive_runs(self) -> list[Run]:
        """The runs that switch networks per sample, in the study's order."""
        return [run for run in self.runs if run.kind.adaptive]
