"""`attnmed reproduce`: the paper's study end to end on the embedded digits, on a CPU.

Stages, each a function of plain inputs writing its outputs atomically under a run folder keyed by the
study's configuration, and skipped when its outputs exist (so an interrupted run resumes where it stopped):

    train     a full-attention model and mediator models of one small config
    record    redundancy over sampling for each model (the recorder, all metrics)
    schedule  schedules derived from the full model's measured rank and JSD; the paper's adaptive rule
    sample    full attention, each static count, the adaptive rule at several ρ, the derived schedules
    evaluate  FID / KID / precision / recall against the held-out digits; GFLOPs per image actually spent
    report    figures and REPORT.md
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.collect import CollectionConfig, collect_redundancy, read_table, write_table
from analysis.metrics import ALL_METRICS, recovery_metrics
from analysis.quality.features import PINNED_EXTRACTORS, DigitsExtractor
from analysis.quality.scores import Reference, all_metrics, fid_infinity
from analysis.quality.stats import per_seed_differences, seed_level_difference
from analysis.schedule import (
    Rule,
    derive_recovery_schedule,
    derive_schedule,
    per_step_statistic,
    schedule_gflops,
    schedule_within_budget,
)
from analysis.study import rundata
from analysis.study.claims import CLAIM_ORDER, cell_rows, cell_values, decide, run_summaries, with_run_summaries
from analysis.study.config import ABLATIONS, PRESETS, StudyConfig, ablation_model
from analysis.study.results import Run, RunKind, Sidecars, StudyResults
from mediator_models.data import EMBEDDED
from mediator_models.sample import LoadedModel, load_for_sampling, sample_to_folder
from mediator_models.sampling.generation import ProcessConfig, SamplerConfig
from mediator_models.sampling.switching import AdaptiveSwitch, MediatorSchedule, count_label, evaluation_levels
from mediator_models.storage.runfolder import (
    FolderLock,
    atomic_write,
    atomic_write_json,
    check_creatable,
    clean_stale_temporaries,
)

__all__ = ["ABLATIONS", "PRESETS", "Study", "StudyConfig", "ablation_model", "run_study", "time_matched_schedule"]


@dataclass
class Study:
    """The pipeline of one study in its run folder: each stage a method, each writing where `rundata` says."""

    config: StudyConfig
    run_dir: Path
    figures_dir: Path
    preset: str = "default"

    def say(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def timed(self, stage: str, work, *args):
        """Run a stage and remember how long its work took (a stage skipped as done keeps its first time)."""
        path = rundata.timings_path(self.run_dir)
        timings = json.loads(path.read_text()) if path.exists() else {}
        start = time.time()
        result = work(*args)
        timings[stage] = max(timings.get(stage, 0.0), time.time() - start)
        atomic_write_json(path, timings)
        return result

    def total_seconds(self) -> float:
        path = rundata.timings_path(self.run_dir)
        return sum(json.loads(path.read_text()).values()) if path.exists() else 0.0

    # ---- names ------------------------------------------------------------------------------------------------
    @property
    def variants(self) -> list[int | None]:
        """Mediator counts, then None for full attention."""
        return [*self.config.mediator_counts, None]

    @property
    def ablation_count(self) -> int:
        """The mediator count the ablations are built at: the middle one (16 of 4/16/64)."""
        counts = self.config.mediator_counts
        return counts[len(counts) // 2]

    @property
    def ablations(self) -> dict[str, str]:
        """The ablation variants: their names (which key the models beside the counts) -> their kind in ABLATIONS."""
        names = {"noconv": f"med{self.ablation_count}-noconv", "full-conv": "full-conv", "conv": "conv"}
        return {names[kind]: kind for kind in self.config.ablations}

    @property
    def trained(self) -> list[int | None | str]:
        """Every trained variant: the counts, full attention, then the ablations."""
        return [*self.variants, *self.ablations]

    @property
    def family(self) -> set[str]:
        """The trained variants of the claims family, trained and sampled at every training seed: the family's
        counts, full attention, and full attention with the conv where the study has it."""
        counts = self.config.family_counts or self.config.mediator_counts
        names = {self.variant_name(c) for c in counts} | {self.variant_name(None)}
        return names | ({"full-conv"} if "full-conv" in self.config.ablations else set())

    def seeds_of(self, variant: int | None | str) -> tuple[int, ...]:
        """The training seeds a variant is trained at: all for the claims family, the exploratory ones otherwise."""
        return self.config.train_seeds if self.variant_name(variant) in self.family else self.exploratory_seeds

    @property
    def exploratory_seeds(self) -> tuple[int, ...]:
        return self.config.exploratory_train_seeds

    @property
    def adaptive_order(self) -> list[int | None]:
        """The adaptive rule's networks, fewest mediators first: the paper's trio where set."""
        return list(self.config.adaptive_counts) or self.variants

    @staticmethod
    def variant_name(count: int | None | str) -> str:
        if isinstance(count, str):
            return count
        return "full" if count is None else f"med{count}"

    @property
    def sampler(self) -> SamplerConfig:
        return SamplerConfig(kind="sde", steps=self.config.sampler_steps)

    @property
    def process(self) -> ProcessConfig:
        return ProcessConfig("SiT")

    @functools.cached_property
    def levels(self) -> list[float]:
        """The noise level of each network evaluation of the study's sampler (a dry run, made once)."""
        return evaluation_levels(self.process, self.sampler)

    # ---- stage 1: train ---------------------------------------------------------------------------------------
    def train_all(self) -> dict[int, dict[int | None, Path]]:
        """Final checkpoints per training seed and variant."""
        paths: dict[int, dict[int | None, Path]] = {}
        for seed in self.config.train_seeds:
            paths[seed] = {}
            for count in self.trained:
                if seed not in self.seeds_of(count):
                    continue
                out = rundata.train_folder(self.run_dir, seed, self.variant_name(count))
                final = rundata.final_checkpoint(self.run_dir, seed, self.variant_name(count), self.config.train_steps)
                if isinstance(count, str):
                    attention, mediators, conv = ablation_model(self.ablations[count], self.ablation_count)
                else:
                    attention, mediators, conv = ("full" if count is None else "mediator"), count, None
                if not final.exists():
                    self.say(f"train {self.variant_name(count)} (seed {seed}) for {self.config.train_steps} steps")
                    rundata.train_variant(
                        self.config,
                        seed,
                        out,
                        attention=attention,
                        mediators=mediators,
                        depthwise_conv=conv,
                        ckpt_every=self.config.checkpoint_every,
                        # the points along training are sampled from their checkpoints: keep every one
                        keep_checkpoints=None if self.config.along_training else 2,
                    )
                paths[seed][count] = final
        return paths

    def load(self, checkpoints: dict[int, dict[int | None, Path]]) -> dict[int, dict[int | None, LoadedModel]]:
        return {
            seed: {count: load_for_sampling(path) for count, path in by_count.items()}
            for seed, by_count in checkpoints.items()
        }

    # ---- stage 2: record --------------------------------------------------------------------------------------
    def record_all(self, models: dict[int | None, LoadedModel]) -> pd.DataFrame:
        """Redundancy of the first training seed's models (the measurement the schedules are derived from)."""
        tables = []
        depth = next(iter(models.values())).model.config.depth
        last = self.config.sampler_steps - 1
        keep = [(step, depth // 2) for step in (0, last // 4, last // 2, last)]
        for count in self.variants:
            loaded = models[count]
            path = rundata.record_table_path(self.run_dir, self.variant_name(count))
            if not path.exists():
                self.say(f"record redundancy of {self.variant_name(count)} over {self.config.record_samples} samples")
                metrics = ALL_METRICS
                if self.config.premise and count is None:
                    metrics += recovery_metrics(self.config.mediator_counts)
                collection = CollectionConfig(
                    samples=self.config.record_samples,
                    batch_size=min(32, self.config.record_samples),
                    seed=self.config.sample_seeds[0],
                    metrics=metrics,
                )
                table = collect_redundancy(
                    loaded.model,
                    loaded.process,
                    self.sampler,
                    collection,
                    state_path=path.with_suffix(".state.pt"),
                    keep_maps=keep,
                    keep_dir=rundata.kept_maps_folder(self.run_dir),
                )
                write_table(
                    table,
                    path,
                    {
                        "checkpoint": loaded.source,
                        "weights": loaded.weights,
                        "model": loaded.model.config.to_dict(),
                        "process": loaded.process.to_dict(),
                        "collection": collection.to_dict(),
                        "sampler": self.sampler.to_dict(),
                    },
                )
                path.with_suffix(".state.pt").unlink(missing_ok=True)
            tables.append(read_table(path))
        return pd.concat(tables, ignore_index=True)

    # ---- stage 3: schedules -----------------------------------------------------------------------------------
    def schedules(self, table: pd.DataFrame, configs: dict) -> dict[str, MediatorSchedule]:
        """Schedules derived from the full model's measurements: the rank rule; the premise rule (the fewest
        mediators whose rank-n map keeps every layer's A·V within ε); the rank rule within the FLOPs of a static
        count; and, for the default study only, JSD thresholds at the series' own quantiles (which cut any
        series into equal thirds of steps, so they carry no information: kept to reproduce the first run)."""
        full = table[table["attention"] == "full"]
        available = self.variants
        derived = {
            "derived-rank0.9": derive_schedule(
                full, available, Rule("energy_rank", tau=0.9), name="derived: rank τ=0.9"
            ),
            "derived-rank0.99": derive_schedule(
                full, available, Rule("energy_rank", tau=0.99), name="derived: rank τ=0.99"
            ),
        }
        if self.config.jsd_quantiles:
            jsd = per_step_statistic(full, "jsd")["value"]
            thresholds = tuple(float(jsd.quantile(q)) for q in self.config.jsd_quantiles)
            derived["derived-jsd"] = derive_schedule(
                full, available, Rule("jsd", thresholds=thresholds[: len(available) - 1]), name="derived: JSD quantiles"
            )
        for epsilon in self.config.recovery_thresholds:
            derived[f"derived-recovery{epsilon:g}"] = derive_recovery_schedule(full, available, epsilon)
        for count in self.config.budget_of:
            budget = schedule_gflops(MediatorSchedule.constant(count), self.levels, configs)
            schedule, _ = schedule_within_budget(full, available, configs, budget, tau=0.99)
            schedule.name = f"derived: rank τ=0.99 within static n={count}'s GFLOPs"
            derived[f"derived-budget{count}"] = schedule
        folder = rundata.schedules_folder(self.run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for name, schedule in derived.items():
            schedule.save(folder / f"{name}.json")
        return derived

    # ---- stage 4: sample --------------------------------------------------------------------------------------
    def runs(self, derived: dict[str, MediatorSchedule]) -> list[Run]:
        """Every sampling run of the study, in the order they are sampled and reported; those outside the claims
        family marked exploratory."""
        return [dataclasses.replace(run, exploratory=self.is_exploratory(run)) for run in self._runs(derived)]

    def is_exploratory(self, run: Run) -> bool:
        """Whether a run lies outside the claims family: a static or ablation run of a variant outside it, or any
        schedule, in a study that runs those at fewer seeds."""
        if not self.config.exploratory_seeds:
            return False
        return run.kind not in (RunKind.STATIC, RunKind.ABLATION) or self.variant_name(run.base) not in self.family

    def seeds_of_run(self, run: Run) -> tuple[int, ...]:
        return self.exploratory_seeds if run.exploratory else self.config.train_seeds

    def _runs(self, derived: dict[str, MediatorSchedule]) -> list[Run]:
        runs = [
            Run(self.variant_name(c), RunKind.STATIC, MediatorSchedule.constant(c).name, base=c) for c in self.variants
        ]
        runs += [Run(name, RunKind.ABLATION, ABLATIONS[kind], base=name) for name, kind in self.ablations.items()]
        order = self.adaptive_order
        # The networks are named where the study chose them (the paper's trio); the default study's labels stay
        # as its committed run has them.
        trio = f" ({'/'.join(map(count_label, order))})" if self.config.adaptive_counts else ""
        rules = [(ratios, RunKind.ADAPTIVE) for ratios in self.config.adaptive_ratios]
        rules += [(ratios, RunKind.DRIFT_ADAPTIVE) for ratios in self.config.adaptive_drift_ratios]
        for ratios, kind in rules:
            rho = "/".join(f"{r:g}" for r in ratios)
            on_drift = kind is RunKind.DRIFT_ADAPTIVE
            name = ("adaptive-drift-" if on_drift else "adaptive-") + "-".join(f"{r:g}" for r in ratios)
            label = f"{'drift-adaptive' if on_drift else 'adaptive'} ρ={rho}{trio}"
            runs.append(Run(name, kind, label, base=order[0], ratios=tuple(ratios)))
            if self.config.time_matched_controls and not on_drift:
                label = f"static at the median switch steps of ρ={rho}"
                runs.append(Run(f"control-{name}", RunKind.CONTROL, label, base=order[0], control_of=name))
        runs += [Run(name, RunKind.DERIVED, schedule.name, base=self.variants[0]) for name, schedule in derived.items()]
        return runs

    def sampling_of(
        self,
        run: Run,
        models: dict[int | None | str, LoadedModel],
        derived: dict[str, MediatorSchedule],
        sidecars: Sidecars,
        cell: tuple[int, int],
    ) -> tuple[Callable | None, dict]:
        """The step callback that makes a run's schedule happen on one training seed's models (None: its base
        model throughout), and the schedule its sidecar records. Made afresh per cell: the adaptive rule keeps
        per-sample traces."""
        networks = {count: loaded.model for count, loaded in models.items()}
        if run.kind.adaptive:
            statistic = "drift" if run.kind is RunKind.DRIFT_ADAPTIVE else "state"
            return AdaptiveSwitch([networks[c] for c in self.adaptive_order], run.ratios, statistic=statistic), {}
        if run.kind is RunKind.DERIVED:
            schedule = derived[run.name]
        elif run.kind is RunKind.CONTROL:  # its switch steps come from the adaptive run sampled before it
            source = sidecars[(*cell, run.control_of)]
            schedule = time_matched_schedule(source, self.adaptive_order, self.levels, f"control of {run.control_of}")
            networks = {c: networks[c] for c in self.adaptive_order}
        else:
            return None, {}
        return schedule.callback(networks), schedule.to_dict()

    def sample_all(self, models: dict[int, dict[int | None | str, LoadedModel]], runs: list[Run], derived) -> Sidecars:
        """Every run in every cell; sampling seed r gives every run of every training seed the same noise."""
        sidecars: Sidecars = {}
        for cell in self.config.cells:
            train_seed, sample_seed = cell
            for run in runs:
                if train_seed not in self.seeds_of_run(run):
                    continue
                out = rundata.sample_folder(self.run_dir, cell, run.name)
                if not rundata.sidecar_path(out).exists():
                    callback, schedule = self.sampling_of(run, models[train_seed], derived, sidecars, cell)
                    self.say(
                        f"sample {self.config.fid_samples} images: {run.schedule} (training seed {train_seed}, "
                        f"sampling seed {sample_seed})"
                    )
                    sample_to_folder(
                        models[train_seed][run.base],
                        out,
                        num_samples=self.config.fid_samples,
                        sampler=self.sampler,
                        batch_size=125,
                        seed=sample_seed,
                        callback=callback,
                        schedule={"name": run.schedule, **schedule},
                    )
                sidecars[(train_seed, sample_seed, run.name)] = rundata.read_sidecar(out)
        return sidecars

    def along_runs(self, runs: list[Run]) -> list[Run]:
        """The claims family's single-network runs, sampled again from their checkpoints along training."""
        return [
            r for r in runs if r.kind in (RunKind.STATIC, RunKind.ABLATION) and self.variant_name(r.base) in self.family
        ]

    def sample_along(self, runs: list[Run]) -> None:
        """The claims family at every point along training: `along_samples` images per cell from the EMA weights
        of the checkpoint at that step, with the noise of the final runs' first images."""
        for step in self.config.along_steps:
            for cell in self.config.cells:
                for run in self.along_runs(runs):
                    out = rundata.along_folder(self.run_dir, cell, run.name, step)
                    if rundata.sidecar_path(out).exists():
                        continue
                    name = self.variant_name(run.base)
                    loaded = load_for_sampling(rundata.final_checkpoint(self.run_dir, cell[0], name, step))
                    self.say(
                        f"sample {self.config.along_samples} images: {name} at step {step} (training seed {cell[0]}, "
                        f"sampling seed {cell[1]})"
                    )
                    sample_to_folder(
                        loaded,
                        out,
                        num_samples=self.config.along_samples,
                        sampler=self.sampler,
                        batch_size=125,
                        seed=cell[1],
                        schedule={"name": run.schedule, "train_step": step},
                    )

    # ---- stage 5: evaluate ------------------------------------------------------------------------------------
    @functools.cached_property
    def extractor(self) -> DigitsExtractor:
        """The pinned extractor of the study's data (its sha256 checked at load)."""
        return PINNED_EXTRACTORS[self.config.data].pinned(self.config.image_size)

    @functools.cached_property
    def reference(self) -> Reference:
        """The held-out images of the study's data, as the extractor sees them."""
        heldout = EMBEDDED[self.config.data]("heldout", self.config.image_size)
        return Reference.from_features(self.extractor.features_of(heldout))

    def features(self, folder: Path, extractor: DigitsExtractor) -> np.ndarray:
        """The pinned extractor's features of a sample folder, cached beside it under the extractor's hash."""
        path = rundata.features_path(folder, extractor.sha256)
        if not path.exists():
            features = extractor.features_of(folder / "samples.npz")
            atomic_write(path, lambda handle: np.save(handle, features))
        return np.load(path)

    def evaluate_all(self, runs: list[Run], sidecars: Sidecars) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Per-cell metrics, summaries with intervals, and paired differences (results.csv, differences.csv)."""
        results_path, differences_path = rundata.results_path(self.run_dir), rundata.differences_path(self.run_dir)
        if results_path.exists() and differences_path.exists():
            results, differences = pd.read_csv(results_path), pd.read_csv(differences_path)
            if "p_holm" not in differences:  # decided by the earlier bootstrap: decide again from the cells
                results = with_run_summaries(results, runs)
                differences = decide(cell_rows(results), runs, self.variant_name(None))
                atomic_write(results_path, lambda handle: results.to_csv(handle, index=False), binary=False)
                atomic_write(differences_path, lambda handle: differences.to_csv(handle, index=False), binary=False)
            return results, differences
        extractor, reference = self.extractor, self.reference
        rows = []
        for cell in self.config.cells:
            for run in runs:
                if cell[0] not in self.seeds_of_run(run):
                    continue
                self.say(f"evaluate {run.name} (training seed {cell[0]}, sampling seed {cell[1]})")
                own = self.features(rundata.sample_folder(self.run_dir, cell, run.name), extractor)
                sidecar = sidecars[(*cell, run.name)]
                rows.append(
                    {
                        "run": run.name,
                        "schedule": run.schedule,
                        "kind": run.kind.value,
                        "exploratory": run.exploratory,
                        "train_seed": cell[0],
                        "sample_seed": cell[1],
                        **all_metrics(own, reference, self.config.kid_subset_size),
                        # FID free of its 1/N bias, where there are images enough to extrapolate from
                        "fid_infinity": fid_infinity(own, reference) if len(own) >= 20 else float("nan"),
                        "gflops_per_image": sidecar["gflops_per_image"],
                        "nfe": sidecar["nfe_per_image"],
                        "seconds_per_image": sidecar.get("seconds_per_image"),
                        "num_samples": sidecar["num_samples"],
                    }
                )
        cells = pd.DataFrame(rows)
        summary, differences = run_summaries(cells, runs), decide(cells, runs, self.variant_name(None))
        common = {
            "model": self.config.model,
            "sampler": f"SDE Euler–Maruyama, {self.config.sampler_steps} steps",
            "cfg": 1.0,
            "extractor": extractor.label,
            "extractor_sha256": extractor.sha256,
            "num_reference": len(reference.features),
        }
        results = pd.concat([cells, summary], ignore_index=True).assign(**common)
        atomic_write(results_path, lambda handle: results.to_csv(handle, index=False), binary=False)
        atomic_write(differences_path, lambda handle: differences.to_csv(handle, index=False), binary=False)
        return results, differences

    def evaluate_along(self, runs: list[Run], results: pd.DataFrame) -> pd.DataFrame:
        """The claims family's paired differences at every point along training, the final step included (FID and
        the bias-free FID∞; the points before the last score `along_samples` images, the last `fid_samples`).
        Descriptive: no verdicts, no multiplicity adjustment (along_training.csv)."""
        path = rundata.along_path(self.run_dir)
        if not self.config.along_training:
            return pd.DataFrame()
        if path.exists():  # tables written before the duplicate full-conv − full rows were dropped keep them
            return pd.read_csv(path).drop_duplicates(["run", "baseline", "step", "metric"], ignore_index=True)
        family = self.along_runs(runs)
        rows = []
        for step in self.config.along_steps:
            for cell in self.config.cells:
                for run in family:
                    self.say(f"evaluate {run.name} at step {step} (training seed {cell[0]}, sampling seed {cell[1]})")
                    own = self.features(rundata.along_folder(self.run_dir, cell, run.name, step), self.extractor)
                    rows.append(
                        {
                            "run": run.name,
                            "train_seed": cell[0],
                            "sample_seed": cell[1],
                            "step": step,
                            "fid": all_metrics(own, self.reference, self.config.kid_subset_size)["fid"],
                            "fid_infinity": fid_infinity(own, self.reference) if len(own) >= 20 else float("nan"),
                            "num_samples": len(own),
                        }
                    )
        final = cell_rows(results)
        final = final[final["run"].isin([r.name for r in family])]
        cells = pd.concat(
            [
                pd.DataFrame(rows),
                final[["run", "train_seed", "sample_seed", "fid", "fid_infinity", "num_samples"]].assign(
                    step=self.config.train_steps
                ),
            ],
            ignore_index=True,
        )
        along = along_differences(cells, decide(cell_rows(results), runs, self.variant_name(None)))
        atomic_write(path, lambda handle: along.to_csv(handle, index=False), binary=False)
        return along


# The claims whose differences are followed along training: those between the claims family's single networks.
ALONG_CLAIMS = CLAIM_ORDER[:3]


def along_differences(cells: pd.DataFrame, differences: pd.DataFrame) -> pd.DataFrame:
    """For every comparison of `ALONG_CLAIMS` in `differences` (one network against one), its paired seed-level
    difference at each training step of `cells` (run, train_seed, sample_seed, step, fid, fid_infinity,
    num_samples), on FID and FID∞."""
    pairs = differences[differences["claim"].isin(ALONG_CLAIMS) & (differences["metric"] == "fid")]
    pairs = pairs.drop_duplicates(["run", "baseline"])  # full-conv − full is both a quality row and the conv's part
    rows = []
    for pair in pairs.itertuples():
        for step, at in cells.groupby("step"):
            for metric in ("fid", "fid_infinity"):
                values = {run: cell_values(group, metric) for run, group in at.groupby("run")}
                if pair.run not in values or pair.baseline not in values:
                    continue
                per_seed = per_seed_differences(values[pair.run], [(1.0, values[pair.baseline])])
                difference = seed_level_difference(list(per_seed.values()))
                rows.append(
                    {
                        "claim": pair.claim,
                        "run": pair.run,
                        "baseline": pair.baseline,
                        "step": int(step),
                        "metric": metric,
                        "difference": difference.point,
                        "low": difference.low,
                        "high": difference.high,
                        "seeds": difference.seeds,
                        "per_seed": " ".join(f"{v:+.4g}" for v in difference.per_seed),
                        "num_samples": int(at[at["run"] == pair.run]["num_samples"].iloc[0]),
                    }
                )
    return pd.DataFrame(rows)


def time_matched_schedule(sidecar: dict, order: list[int | None], levels: list[float], name: str) -> MediatorSchedule:
    """A static schedule that switches every sample where an adaptive run switched its median sample.

    Move i happens at the median over samples of the evaluation index of their i-th move (a sample that never
    made it counts as moving after the last step); the boundary sits halfway between that evaluation's level and
    the previous one. Same networks, about the same cost: what is left of a difference is per-sample timing."""
    samples = sidecar["per_sample"]
    boundaries = []
    for move in range(len(order) - 1):
        steps = sorted(s["switch_steps"][move] if len(s["switch_steps"]) > move else len(levels) for s in samples)
        step = steps[(len(steps) - 1) // 2]  # the lower median: a step the rule actually chose
        boundaries.append(0.0 if step >= len(levels) else (levels[step - 1] + levels[step]) / 2)
    return MediatorSchedule.from_boundaries(order, boundaries, name)


def run_study(
    preset: str = "default",
    run_root: str | Path = "runs",
    figures_dir: str | Path | None = None,
    config: StudyConfig | None = None,
) -> Path:
    """Run (or resume) the whole study; returns the path of REPORT.md.

    Figures, tables and the report go to `<run folder>/report/`; `figures_dir` publishes them there instead
    (the committed reference run lives in figures/ and is rewritten only when it is named explicitly).
    """
    if config is None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        config = PRESETS[preset]
    run_dir = rundata.run_folder(run_root, preset, config.key())
    if figures_dir is not None:  # named before the study's hour of work, not after it
        check_creatable(figures_dir, "--figures")
    with FolderLock(run_dir, "attnmed reproduce", flag="--runs"):
        clean_stale_temporaries(run_dir)
        atomic_write_json(rundata.study_path(run_dir), config.to_dict())
        return _run_study_locked(preset, config, run_dir, Path(figures_dir) if figures_dir else run_dir / "report")


def _run_study_locked(preset: str, config: StudyConfig, run_dir: Path, figures_dir: Path) -> Path:
    from analysis.study.report import write_figures_and_report

    study = Study(config, run_dir, figures_dir, preset)
    study.say(f"study {preset} in {run_dir}; figures and report into {figures_dir}")
    torch.manual_seed(0)
    models = study.load(study.timed("train", study.train_all))
    first = models[config.train_seeds[0]]
    table = study.timed("record", study.record_all, first)
    configs = {count: first[count].model.config for count in study.variants}
    derived = study.schedules(table, configs)
    runs = study.runs(derived)
    sidecars = study.timed("sample", study.sample_all, models, runs, derived)
    study.timed("sample along training", study.sample_along, runs)
    results, differences = study.timed("evaluate", study.evaluate_all, runs, sidecars)
    along = study.timed("evaluate along training", study.evaluate_along, runs, results)
    expected = {name: schedule_gflops(s, study.levels, configs) for name, s in derived.items()}
    bundle = StudyResults(
        config=config,
        preset=preset,
        run_dir=run_dir,
        figures_dir=figures_dir,
        levels=study.levels,
        adaptive_order=study.adaptive_order,
        trained=[study.variant_name(c) for c in study.trained],
        full_model=first[None].model.config.to_dict(),
        runs=runs,
        sidecars=sidecars,
        table=table,
        derived=derived,
        expected_gflops=expected,
        results=results,
        differences=differences,
        seconds=study.total_seconds(),
        along=along,
    )
    report = write_figures_and_report(bundle)
    study.say(f"report: {report}")
    return report
