"""`attnmed graft-study`: mediators on a model you already have, against mediators trained for themselves.

One study on the 256-token grid of the paper-grid preset, paired per training seed (the unit of replication).
For every training seed s, from the same data and the same training recipe:

    source        full attention trained from scratch (the network a user already has)
    scratch       mediators n trained from scratch (the paper's way: one network per count)
    shared        one network serving every count and full attention, trained from scratch (a count drawn per step)
    grafted       the source with mediators grafted on, training-free (`attnmed graft --shared`)
    distilled f   the grafted network distilled for a fraction f of the from-scratch steps: a short layer-wise stage,
                  then end to end on the diffusion loss plus the source's prediction (`graft --distill-steps
                  --end-to-end-steps`)

Every network samples the same noise (one sampling seed, `fid_samples` images per cell); the shared and the most
distilled networks also sample the paper's adaptive rule over their counts, and a per-step, per-layer schedule
derived from the source's own premise measure (`recovery_pooled_N`, the error a grafted layer makes training-free)
at the adaptive rule's measured GFLOPs. Each comparison is a paired difference over training seeds with its
t-interval (analysis.quality.stats), Holm-adjusted within the study's family; the report names the control each
difference isolates. Stages resume where a killed run stopped (each writes atomically and is skipped when done).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis.collect import CollectionConfig, collect_redundancy, read_table, write_table
from analysis.quality.features import PINNED_EXTRACTORS
from analysis.quality.scores import Reference, all_metrics, fid_infinity
from analysis.schedule import derive_layer_recovery_schedule, schedule_gflops
from analysis.study import rundata
from analysis.study.grafting.report import write_report
from analysis.study.grafting.tables import Comparison
from mediator_models.data import EMBEDDED
from mediator_models.graft import SHARED_CHECKPOINT, graft_to_folder
from mediator_models.sample import load_for_sampling, sample_to_folder
from mediator_models.sampling.generation import ProcessConfig, SamplerConfig
from mediator_models.sampling.switching import (
    AdaptiveSwitch,
    MediatorSchedule,
    count_configs,
    count_label,
    evaluation_levels,
)
from mediator_models.storage.runfolder import FolderLock, atomic_write, atomic_write_json, check_creatable


@dataclass(frozen=True)
class GraftStudyConfig:
    """Everything that fixes a grafting study's results (its hash names the run folder)."""

    model: str = "SiT-XT/1"
    data: str = "textures"
    image_size: int = 16
    train_steps: int = 280
    batch_size: int = 32
    lr: float = 1e-3
    ema_decay: float = 0.95
    sampler_steps: int = 10
    fid_samples: int = 1000
    train_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    sample_seed: int = 0
    counts: tuple[int, ...] = (4, 16, 64)  # the mediator counts the shared and grafted networks serve (and full)
    focus: int = 16  # the static count every way of making mediators is compared at
    distill_fractions: tuple[float, ...] = (0.1, 0.25)  # end-to-end steps as a share of the from-scratch steps
    layerwise_share: float = 0.25  # layer-wise steps (batch_size trajectories each) per end-to-end step
    teacher_weight: float = 10.0
    distill_lr: float = 3e-4  # end to end: a tenth of the way from the source, at a third of its learning rate
    adaptive_ratios: tuple[float, ...] = (1.0, 0.9)  # the paper's rule over `counts`, fewest first
    premise_samples: int = 8  # trajectories the source's premise measure (the derived schedule's input) is taken on
    error_samples: int = 8  # trajectories the grafted networks' training-free error is measured on
    kid_subset_size: int = 100

    def __post_init__(self) -> None:
        if self.focus not in self.counts:
            raise ValueError(f"focus {self.focus} must be one of the counts {self.counts}")
        if len(self.adaptive_ratios) != len(self.counts) - 1:
            raise ValueError(f"the adaptive rule over {len(self.counts)} counts needs {len(self.counts) - 1} ratios")
        if len(self.train_seeds) < 2:
            raise ValueError("paired intervals need at least two training seeds")
        for fraction in self.distill_fractions:
            if not 0 < fraction <= 1:
                raise ValueError(f"distill fraction {fraction} must lie in (0, 1]")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def end_to_end_steps(self, fraction: float) -> int:
        return max(1, round(fraction * self.train_steps))

    def layerwise_steps(self, fraction: float) -> int:
        return max(1, round(self.layerwise_share * self.end_to_end_steps(fraction)))

    @property
    def distilled(self) -> dict[str, float]:
        """{network name: fraction} of the distilled networks, least distilled first."""
        return {f"distill{round(100 * f)}": f for f in sorted(self.distill_fractions)}

    @property
    def scheduled_on(self) -> tuple[str, ...]:
        """The networks serving every count that sample the adaptive rule and the derived schedule."""
        return ("shared", list(self.distilled)[-1])


GRAFT_PRESETS = {
    # The paper-grid preset's models, data, training and sampler (analysis.study.config), five training seeds.
    "paper-grid": GraftStudyConfig(),
    # Every stage at toy budgets: a smoke test of the pipeline (the tests run it), numbers meaningless.
    "quick": GraftStudyConfig(
        model="SiT-XT/2",
        data="digits",
        train_steps=8,
        batch_size=8,
        sampler_steps=4,
        fid_samples=24,
        train_seeds=(0, 1),
        counts=(4, 16),
        focus=4,
        distill_fractions=(0.5,),
        adaptive_ratios=(1.0,),
        premise_samples=2,
        error_samples=2,
        kid_subset_size=8,
    ),
}


class GraftStudy:
    """The pipeline of one grafting study in its run folder."""

    def __init__(self, config: GraftStudyConfig, run_dir: Path):
        self.config = config
        self.run_dir = Path(run_dir)

    def say(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def timed(self, stage: str, work, *args, **kwargs):
        """Run `work` and add its seconds to the stage's total (timings.json; a skipped stage adds ~0)."""
        path = rundata.timings_path(self.run_dir)
        timings = json.loads(path.read_text()) if path.exists() else {}
        start = time.time()
        result = work(*args, **kwargs)
        timings[stage] = timings.get(stage, 0.0) + time.time() - start
        atomic_write_json(path, timings)
        return result

    # ---- names ------------------------------------------------------------------------------------------------
    @property
    def all_counts(self) -> list[int | None]:
        return [*self.config.counts, None]

    @property
    def focus(self) -> str:
        return f"med{self.config.focus}"

    @property
    def sampler(self) -> SamplerConfig:
        return SamplerConfig(kind="sde", steps=self.config.sampler_steps)

    @property
    def process(self) -> ProcessConfig:
        return ProcessConfig("SiT")

    @functools.cached_property
    def levels(self) -> list[float]:
        return evaluation_levels(self.process, self.sampler)

    def runs(self) -> dict[str, str]:
        """{run name: what it samples}, in the order sampled and reported."""
        n = self.config.focus
        runs = {"full": "the source: full attention trained from scratch", self.focus: f"n = {n} trained from scratch"}
        runs[f"grafted-{self.focus}"] = f"the source grafted, training-free, at n = {n}"
        for name, fraction in self.config.distilled.items():
            runs[f"{name}-{self.focus}"] = f"grafted and distilled ({fraction:.0%} of the training steps), n = {n}"
        runs[f"shared-{self.focus}"] = f"one network for every count, trained from scratch, at n = {n}"
        runs["shared-full"] = "one network for every count, trained from scratch, at full attention"
        trio = "/".join(map(count_label, self.config.counts))
        for network in self.config.scheduled_on:
            runs[f"{network}-adaptive"] = f"{network}: the paper's adaptive rule over {trio}"
            runs[f"{network}-derived"] = f"{network}: per-layer schedule from the premise at the rule's GFLOPs"
        return runs

    def comparisons(self) -> list[Comparison]:
        focus = self.focus
        rows = [
            Comparison(f"{way}-{focus}", focus, f"{way} against mediators trained for themselves")
            for way in ("grafted", *self.config.distilled, "shared")
        ]
        rows += [
            Comparison(run, "full", "what mediators cost against the source")
            for run in (focus, f"grafted-{focus}", *(f"{d}-{focus}" for d in self.config.distilled))
        ]
        rows.append(Comparison("shared-full", "full", "what serving every count costs full attention"))
        rows += [
            Comparison(
                f"{network}-derived",
                f"{network}-adaptive",
                "the derived schedule against the paper's rule, same network, same GFLOPs budget",
            )
            for network in self.config.scheduled_on
        ]
        return rows

    # ---- stage 1: train ---------------------------------------------------------------------------------------
    def trained(self, seed: int, name: str) -> Path:
        """The final checkpoint of a network trained from scratch (source: full; scratch: the focus count; shared:
        every count and full attention), trained now unless done."""
        attention, mediators = {
            "full": ("full", None),
            self.focus: ("mediator", self.config.focus),
            "shared": ("mediator", tuple(self.all_counts)),
        }[name]
        out = rundata.train_folder(self.run_dir, seed, name)
        final = rundata.final_checkpoint(self.run_dir, seed, name, self.config.train_steps)
        if not final.exists():
            self.say(f"train {name} (seed {seed}) for {self.config.train_steps} steps")
            rundata.train_variant(
                self.config,
                seed,
                out,
                attention=attention,
                mediators=mediators,
                ckpt_every=max(1, self.config.train_steps // 4),
                keep_checkpoints=2,
                progress=False,
            )
        return final

    # ---- stage 2: graft and distill ---------------------------------------------------------------------------
    def grafted(self, seed: int, source: Path, fraction: float | None = None) -> Path:
        """The source grafted into one network serving every count (training-free, or distilled for `fraction`
        of the training steps): the checkpoint to sample."""
        name = "grafted" if fraction is None else f"distill{round(100 * fraction)}"
        out = self.run_dir / "graft" / f"seed{seed}" / name
        distill = {}
        if fraction is not None:
            distill = {
                "distill_steps": self.config.layerwise_steps(fraction),
                "end_to_end_steps": self.config.end_to_end_steps(fraction),
                "end_to_end_lr": self.config.distill_lr,
                "teacher_weight": self.config.teacher_weight,
            }
        if fraction is None:
            made, measured = out / SHARED_CHECKPOINT, not self.config.error_samples or (out / "errors.json").exists()
        else:
            made = out / "end_to_end" / "shared" / "checkpoints" / f"{self.config.end_to_end_steps(fraction):07d}.pt"
            measured = True
        if made.exists() and measured:  # done by an earlier start (graft_to_folder would remake the same file)
            return made
        self.say(f"graft {name} from the source (seed {seed})")
        result = graft_to_folder(
            source,
            out,
            [*self.config.counts, "full"],
            shared=True,
            sampler=self.sampler,
            samples=self.config.error_samples if fraction is None else 0,
            batch_size=self.config.batch_size if fraction is not None else 8,
            # training-free: the errors along the trajectories the premise is recorded on; distilled: the
            # training seed's own stream of trajectories and images
            seed=self.config.sample_seed if fraction is None else seed,
            progress=False,
            **distill,
        )
        return result.end_to_end["shared"] if fraction is not None else result.shared

    # ---- stage 3: the source's premise measure, and the derived schedule ----------------------------------------
    def premise_path(self, seed: int) -> Path:
        return self.run_dir / "record" / f"seed{seed}-full.parquet"

    def premise(self, seed: int, source: Path) -> pd.DataFrame:
        """The source's premise measure per (step, layer, count) on `premise_samples` trajectories."""
        path = self.premise_path(seed)
        if not path.exists():
            self.say(f"record the premise measure of the source (seed {seed})")
            loaded = load_for_sampling(source)
            collection = CollectionConfig(
                samples=self.config.premise_samples,
                batch_size=self.config.premise_samples,
                seed=self.config.sample_seed,
                metrics=tuple(f"recovery_pooled_{n}" for n in self.config.counts),
            )
            table = collect_redundancy(loaded.model, loaded.process, self.sampler, collection)
            write_table(table, path, {"checkpoint": loaded.source, "collection": collection.to_dict()})
        return read_table(path)

    def derived_schedule(self, seed: int, network: str, premise: pd.DataFrame, budget: float, configs) -> dict:
        """The per-layer premise schedule with the smallest error threshold whose expected GFLOPs fit `budget`
        (the adaptive rule's measured cost on this seed): as many mediators as the rule's budget allows."""
        path = self.run_dir / "schedules" / f"seed{seed}-{network}.json"
        if path.exists():
            return json.loads(path.read_text())
        depth = next(iter(configs.values())).depth
        chosen = None
        for epsilon in np.geomspace(0.005, 0.95, 60):
            schedule = derive_layer_recovery_schedule(premise, self.all_counts, float(epsilon), "pooled", depth)
            gflops = schedule_gflops(schedule, self.levels, configs)
            if gflops <= budget + 1e-9:
                chosen = {"epsilon": float(epsilon), "expected_gflops": gflops, "schedule": schedule.to_dict()}
                break
        if chosen is None:
            cheapest = MediatorSchedule.constant(self.config.counts[0])
            chosen = {
                "epsilon": None,
                "expected_gflops": schedule_gflops(cheapest, self.levels, configs),
                "schedule": cheapest.to_dict(),
                "note": "no threshold fits the budget: the fewest mediators throughout",
            }
        chosen["budget_gflops"] = budget
        atomic_write_json(path, chosen)
        return chosen

    # ---- stage 4: sample --------------------------------------------------------------------------------------
    def sample(self, seed: int, run: str, checkpoint: Path, flags=None, callback=None, schedule=None) -> dict:
        """Sample one cell of `run` from `checkpoint` (loaded with `flags`: the count of a shared network); with
        `callback`, a function of the loaded model making the sampler's step callback. Returns its sidecar."""
        out = rundata.sample_folder(self.run_dir, (seed, self.config.sample_seed), run)
        if not rundata.sidecar_path(out).exists():
            self.say(f"sample {self.config.fid_samples} images: {run} (training seed {seed})")
            loaded = load_for_sampling(checkpoint, **(flags or {}))
            made = callback(loaded) if callback else None
            self.timed(
                "sample",
                sample_to_folder,
                loaded,
                out,
                num_samples=self.config.fid_samples,
                sampler=self.sampler,
                batch_size=125,
                seed=self.config.sample_seed,
                callback=made,
                schedule={"name": self.runs()[run], **(schedule or {})},
                progress=False,
            )
        return rundata.read_sidecar(out)

    def seed_runs(self, seed: int) -> dict[str, dict]:
        """Train, graft, distill and sample everything of one training seed; {run: sidecar}."""
        focus = self.config.focus
        source = self.timed("train full", self.trained, seed, "full")
        networks = {
            self.focus: self.timed(f"train {self.focus}", self.trained, seed, self.focus),
            "shared": self.timed("train shared", self.trained, seed, "shared"),
            "grafted": self.timed("graft", self.grafted, seed, source),
        }
        for name, fraction in self.config.distilled.items():
            networks[name] = self.timed(name, self.grafted, seed, source, fraction)
        sidecars = {
            "full": self.sample(seed, "full", source),
            self.focus: self.sample(seed, self.focus, networks[self.focus]),
        }
        for name in ("grafted", *self.config.distilled, "shared"):
            run = f"{name}-{self.focus}"
            sidecars[run] = self.sample(seed, run, networks[name], {"mediators": focus})
        sidecars["shared-full"] = self.sample(seed, "shared-full", networks["shared"], {"attention": "full"})
        premise = self.timed("record premise", self.premise, seed, source)
        for network in self.config.scheduled_on:
            first = self.config.counts[0]

            def adaptive(loaded):
                views = loaded.model.network.count_views()
                return AdaptiveSwitch([views[c] for c in self.config.counts], self.config.adaptive_ratios)

            rule = {"ratios": list(self.config.adaptive_ratios), "counts": list(self.config.counts)}
            sidecars[f"{network}-adaptive"] = self.sample(
                seed, f"{network}-adaptive", networks[network], {"mediators": first}, adaptive, rule
            )
            loaded = load_for_sampling(networks[network], mediators=first)
            configs = count_configs(loaded.model.network)
            budget = sidecars[f"{network}-adaptive"]["gflops_per_image"]
            derived = self.derived_schedule(seed, network, premise, budget, configs)
            schedule = MediatorSchedule.from_dict(derived["schedule"])
            sidecars[f"{network}-derived"] = self.sample(
                seed,
                f"{network}-derived",
                networks[network],
                {"mediators": first},
                lambda loaded: schedule.callback(loaded.model.network),
                {**schedule.to_dict(), "epsilon": derived["epsilon"]},
            )
        return sidecars

    # ---- stage 5: evaluate ------------------------------------------------------------------------------------
    @functools.cached_property
    def extractor(self):
        return PINNED_EXTRACTORS[self.config.data].pinned(self.config.image_size)

    @functools.cached_property
    def reference(self) -> Reference:
        return Reference.from_features(
            self.extractor.features_of(EMBEDDED[self.config.data]("heldout", self.config.image_size))
        )

    def evaluate(self, sidecars: dict[int, dict[str, dict]]) -> pd.DataFrame:
        """Per-cell metrics of every run (cells.csv)."""
        path = self.run_dir / "cells.csv"
        if path.exists():
            return pd.read_csv(path)
        rows = []
        for seed, runs in sidecars.items():
            for run, sidecar in runs.items():
                folder = rundata.sample_folder(self.run_dir, (seed, self.config.sample_seed), run)
                features_path = rundata.features_path(folder, self.extractor.sha256)
                if not features_path.exists():
                    features = self.extractor.features_of(folder / "samples.npz")
                    atomic_write(features_path, lambda handle, f=features: np.save(handle, f))
                own = np.load(features_path)
                rows.append(
                    {
                        "run": run,
                        "train_seed": seed,
                        "sample_seed": self.config.sample_seed,
                        **all_metrics(own, self.reference, self.config.kid_subset_size),
                        "fid_infinity": fid_infinity(own, self.reference) if len(own) >= 20 else float("nan"),
                        "gflops_per_image": sidecar["gflops_per_image"],
                        "seconds_per_image": sidecar.get("seconds_per_image"),
                        "num_samples": sidecar["num_samples"],
                    }
                )
        cells = pd.DataFrame(rows)
        atomic_write(path, lambda handle: cells.to_csv(handle, index=False), binary=False)
        return cells


def run_graft_study(
    preset: str = "paper-grid",
    run_root: str | Path = "runs",
    figures_dir: str | Path | None = None,
    config: GraftStudyConfig | None = None,
) -> Path:
    """Run (or resume) the grafting study; returns the path of its REPORT.md (in `figures_dir`, by default the
    run folder's report/)."""
    if config is None:
        if preset not in GRAFT_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(GRAFT_PRESETS)}")
        config = GRAFT_PRESETS[preset]
    run_dir = Path(run_root) / f"graft-{preset}-{config.key()}"
    if figures_dir is not None:
        check_creatable(figures_dir, "--figures")
    with FolderLock(run_dir, "attnmed graft-study", flag="--runs"):
        atomic_write_json(run_dir / "study.json", config.to_dict())
        study = GraftStudy(config, run_dir)
        study.say(f"grafting study {preset} in {run_dir}")
        torch.manual_seed(0)
        sidecars = {seed: study.seed_runs(seed) for seed in config.train_seeds}
        cells = study.timed("evaluate", study.evaluate, sidecars)
        report = write_report(study, cells, Path(figures_dir) if figures_dir else run_dir / "report")
    study.say(f"report: {report}")
    return report
