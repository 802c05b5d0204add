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
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mediator_models.data import digits
from mediator_models.runfolder import FolderLock, atomic_write, atomic_write_json, clean_stale_temporaries
from mediator_models.sample import LoadedModel, load_for_sampling, sample_to_folder
from mediator_models.sampling import ProcessConfig, SamplerConfig
from mediator_models.switching import AdaptiveSwitch, MediatorSchedule, evaluation_levels
from mediator_models.train import TrainConfig, checkpoint_paths, train

from .collect import CollectionConfig, collect_redundancy, read_table, write_table
from .evaluate import Extractor, compute_metrics, results_table
from .metrics import ALL_METRICS
from .schedule import Rule, derive_schedule, per_step_statistic, schedule_gflops


@dataclass(frozen=True)
class StudyConfig:
    """Everything that fixes a study's results (its hash names the run folder)."""

    model: str = "SiT-T/2"
    image_size: int = 16
    mediator_counts: tuple[int, ...] = (4, 16)
    train_steps: int = 1200
    batch_size: int = 32
    lr: float = 1e-3
    ema_decay: float = 0.99  # short CPU runs: at 0.999 the initial weights still hold 30% of the EMA after 1200 steps
    sampler_steps: int = 50
    record_samples: int = 32
    fid_samples: int = 500
    adaptive_ratios: tuple[tuple[float, ...], ...] = ((1.0, 0.9), (1.0, 0.7), (1.0, 0.5))
    jsd_quantiles: tuple[float, ...] = (0.33, 0.66)
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS = {
    # Every stage at toy budgets: a smoke test of the pipeline (the tests run it), numbers meaningless.
    "quick": StudyConfig(train_steps=60, batch_size=16, sampler_steps=12, record_samples=4, fid_samples=64,
                         adaptive_ratios=((1.0, 0.7),)),  # fmt: skip
    # The demo: long enough that the trends are real, under 30 minutes on 2 CPU cores.
    "default": StudyConfig(),
}


@dataclass
class Study:
    config: StudyConfig
    run_dir: Path
    figures_dir: Path

    def say(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def timed(self, stage: str, work, *args):
        """Run a stage and remember how long its work took (a stage skipped as done keeps its first time)."""
        path = self.run_dir / "timings.json"
        timings = json.loads(path.read_text()) if path.exists() else {}
        start = time.time()
        result = work(*args)
        timings[stage] = max(timings.get(stage, 0.0), time.time() - start)
        atomic_write_json(path, timings)
        return result

    def total_seconds(self) -> float:
        path = self.run_dir / "timings.json"
        return sum(json.loads(path.read_text()).values()) if path.exists() else 0.0

    # ---- names ------------------------------------------------------------------------------------------------
    @property
    def variants(self) -> list[int | None]:
        """Mediator counts, then None for full attention."""
        return [*self.config.mediator_counts, None]

    @staticmethod
    def variant_name(count: int | None) -> str:
        return "full" if count is None else f"med{count}"

    @property
    def sampler(self) -> SamplerConfig:
        return SamplerConfig(kind="sde", steps=self.config.sampler_steps)

    @property
    def process(self) -> ProcessConfig:
        return ProcessConfig("SiT")

    # ---- stage 1: train ---------------------------------------------------------------------------------------
    def train_all(self) -> dict[int | None, Path]:
        paths = {}
        for count in self.variants:
            out = self.run_dir / "train" / self.variant_name(count)
            final = out / "checkpoints" / f"{self.config.train_steps:07d}.pt"
            if not final.exists():
                self.say(f"train {self.variant_name(count)} for {self.config.train_steps} steps")
                cfg = TrainConfig(model=self.config.model, attention="full" if count is None else "mediator",
                                  mediators=count, data="digits", image_size=self.config.image_size,
                                  global_batch_size=self.config.batch_size, steps=self.config.train_steps,
                                  lr=self.config.lr, ema_decay=self.config.ema_decay, seed=self.config.seed,
                                  log_every=50, ckpt_every=max(50, self.config.train_steps // 5), out=str(out))  # fmt: skip
                train(cfg, resume=bool(checkpoint_paths(out)))
            paths[count] = final
        return paths

    def load(self, checkpoints: dict[int | None, Path]) -> dict[int | None, LoadedModel]:
        return {count: load_for_sampling(path) for count, path in checkpoints.items()}

    # ---- stage 2: record --------------------------------------------------------------------------------------
    def record_all(self, models: dict[int | None, LoadedModel]) -> pd.DataFrame:
        tables = []
        depth = next(iter(models.values())).model.config.depth
        last = self.config.sampler_steps - 1
        keep = [(step, depth // 2) for step in (0, last // 4, last // 2, last)]
        for count, loaded in models.items():
            path = self.run_dir / "record" / f"{self.variant_name(count)}.parquet"
            if not path.exists():
                self.say(f"record redundancy of {self.variant_name(count)} over {self.config.record_samples} samples")
                collection = CollectionConfig(samples=self.config.record_samples, batch_size=min(32, self.config.record_samples),
                                              seed=self.config.seed, metrics=ALL_METRICS)  # fmt: skip
                table = collect_redundancy(loaded.model, loaded.process, self.sampler, collection,
                                           state_path=path.with_suffix(".state.pt"), keep_maps=keep,
                                           keep_dir=self.run_dir / "record" / "maps")  # fmt: skip
                write_table(table, path, {"checkpoint": loaded.source, "collection": collection.to_dict(),
                                          "sampler": self.sampler.to_dict()})  # fmt: skip
                path.with_suffix(".state.pt").unlink(missing_ok=True)
            tables.append(read_table(path))
        return pd.concat(tables, ignore_index=True)

    # ---- stage 3: schedules -----------------------------------------------------------------------------------
    def schedules(self, table: pd.DataFrame) -> dict[str, MediatorSchedule]:
        full = table[table["attention"] == "full"]
        available = self.variants
        jsd = per_step_statistic(full, "jsd")["value"]
        thresholds = tuple(float(jsd.quantile(q)) for q in self.config.jsd_quantiles)
        derived = {
            "derived-rank0.9": derive_schedule(full, available, Rule("energy_rank", tau=0.9), name="derived: rank τ=0.9"),
            "derived-rank0.99": derive_schedule(full, available, Rule("energy_rank", tau=0.99), name="derived: rank τ=0.99"),
            "derived-jsd": derive_schedule(full, available, Rule("jsd", thresholds=thresholds[: len(available) - 1]),
                                           name="derived: JSD quantiles"),  # fmt: skip
        }
        folder = self.run_dir / "schedules"
        folder.mkdir(parents=True, exist_ok=True)
        for name, schedule in derived.items():
            schedule.save(folder / f"{name}.json")
        return derived

    # ---- stage 4: sample --------------------------------------------------------------------------------------
    def runs(self, models: dict[int | None, LoadedModel], derived: dict[str, MediatorSchedule]) -> list[dict[str, Any]]:
        """Every sampling run of the study: (name, kind, callback factory, schedule description)."""
        networks = {count: loaded.model for count, loaded in models.items()}
        runs = [{"name": self.variant_name(c), "kind": "static", "schedule": MediatorSchedule.constant(c).name,
                 "callback": None, "base": c} for c in self.variants]  # fmt: skip
        ordered = [networks[c] for c in self.variants]  # fewest mediators first, full attention last
        for ratios in self.config.adaptive_ratios:
            label = "adaptive ρ=" + "/".join(f"{r:g}" for r in ratios)
            runs.append({"name": "adaptive-" + "-".join(f"{r:g}" for r in ratios), "kind": "adaptive (paper's rule)",
                         "schedule": label, "callback": AdaptiveSwitch(ordered, ratios), "base": self.variants[0]})  # fmt: skip
        for name, schedule in derived.items():
            runs.append({"name": name, "kind": "derived from redundancy", "schedule": schedule.name,
                         "callback": schedule.callback(networks), "base": self.variants[0],
                         "schedule_data": schedule.to_dict()})  # fmt: skip
        return runs

    def sample_all(self, models, runs) -> dict[str, dict]:
        sidecars = {}
        for run in runs:
            out = self.run_dir / "samples" / run["name"]
            if not (out / "samples.json").exists():
                self.say(f"sample {self.config.fid_samples} images: {run['schedule']}")
                sample_to_folder(models[run["base"]], out, num_samples=self.config.fid_samples, sampler=self.sampler,
                                 batch_size=100, seed=self.config.seed + 1, callback=run["callback"],
                                 schedule={"name": run["schedule"], **run.get("schedule_data", {})})  # fmt: skip
            sidecars[run["name"]] = json.loads((out / "samples.json").read_text())
        return sidecars

    # ---- stage 5: evaluate ------------------------------------------------------------------------------------
    def evaluate_all(self, runs, sidecars) -> pd.DataFrame:
        path = self.run_dir / "results.csv"
        if path.exists():
            return pd.read_csv(path)
        extractor = Extractor.digits(self.config.image_size)
        reference = digits("heldout", self.config.image_size)
        rows = []
        for run in runs:
            self.say(f"evaluate {run['name']}")
            metrics = compute_metrics(self.run_dir / "samples" / run["name"] / "samples.npz", reference, extractor)
            sidecar = sidecars[run["name"]]
            rows.append({**metrics, "model": self.config.model, "attention": run["name"], "schedule": run["schedule"],
                         "kind": run["kind"], "sampler": "SDE Euler–Maruyama", "steps": self.config.sampler_steps,
                         "cfg": 1.0, "gflops_per_image": sidecar["gflops_per_image"], "nfe": sidecar["nfe_per_image"]})  # fmt: skip
        table = results_table(rows)
        table["kind"] = [r["kind"] for r in rows]
        atomic_write(path, lambda handle: table.to_csv(handle, index=False), binary=False)
        return table


def run_study(preset: str = "default", run_root: str | Path = "runs", figures_dir: str | Path | None = None,
              config: StudyConfig | None = None) -> Path:
    """Run (or resume) the whole study; returns the path of REPORT.md.

    Figures, tables and the report go to `<run folder>/report/`; `figures_dir` publishes them there instead
    (the committed reference run lives in figures/ and is rewritten only when it is named explicitly).
    """
    if config is None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        config = PRESETS[preset]
    run_dir = Path(run_root) / f"reproduce-{preset}-{config.key()}"
    with FolderLock(run_dir, "attnmed reproduce", flag="--runs"):
        clean_stale_temporaries(run_dir)
        atomic_write_json(run_dir / "study.json", config.to_dict())
        return _run_study_locked(preset, config, run_dir, Path(figures_dir) if figures_dir else run_dir / "report")


def _run_study_locked(preset: str, config: StudyConfig, run_dir: Path, figures_dir: Path) -> Path:
    from .report import write_figures_and_report

    study = Study(config, run_dir, figures_dir)
    study.say(f"study {preset} in {run_dir}; figures and report into {figures_dir}")
    torch.manual_seed(config.seed)
    models = study.load(study.timed("train", study.train_all))
    table = study.timed("record", study.record_all, models)
    derived = study.schedules(table)
    runs = study.runs(models, derived)
    sidecars = study.timed("sample", study.sample_all, models, runs)
    results = study.timed("evaluate", study.evaluate_all, runs, sidecars)
    levels = evaluation_levels(study.process, study.sampler)
    configs = {count: loaded.model.config for count, loaded in models.items()}
    expected = {name: schedule_gflops(s, levels, configs) for name, s in derived.items()}
    report = write_figures_and_report(study, models, table, derived, expected, results, study.total_seconds())
    study.say(f"report: {report}")
    return report


def load_kept_maps(run_dir: Path) -> list[dict]:
    return [torch.load(p, weights_only=False) for p in sorted((run_dir / "record" / "maps").glob("*_part000.pt"))]


def sample_images(run_dir: Path, name: str, count: int = 32) -> np.ndarray:
    with np.load(run_dir / "samples" / name / "samples.npz") as data:
        return data["arr_0"][:count]


def training_summary(run_dir: Path, variants: list[int | None]) -> dict[str, dict]:
    summary = {}
    for count in variants:
        name = Study.variant_name(count)
        log = run_dir / "train" / name / "log.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        records = [r for r in records if "event" not in r]  # resume events carry no loss
        summary[name] = {"final_loss": records[-1]["loss"] if records else None,
                         "steps_per_sec": float(np.mean([r["steps_per_sec"] for r in records])) if records else None}  # fmt: skip
    return summary

