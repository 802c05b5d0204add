"""The redundancy atlas of a study's full-attention model (`attnmed atlas`): which recorded measure predicts what
removing a computation does, and what a plan built on them buys against the trained mediator networks.

On the full-attention network of a finished study (`attnmed reproduce`), in this order, each step resuming from
what the folder already holds:

1. tables: `attnmed record` with every measure (the spectra, the atlas's locality, sinks and null baselines, the
   changes between evaluations and between guidance branches, the premise measures), once with the study's own
   unguided sampler and once guided (share-cfg needs two branches);
2. grids: `attnmed intervene --grid` for each kind of intervention (mediator:16, rank:16, reuse-previous,
   window:2 on the unguided sampler; share-cfg guided), one cell per (single evaluation, layer) (reuse from the
   second evaluation on), each cell's damage
   the mean relative error of the final samples, and every measure of the table ranked by Spearman's ρ with it;
3. plans: `attnmed plan` from the unguided table (and once from the table with the grids' measured damage) within
   the GFLOPs per image of the trained static mediator networks, then `attnmed sample --plan` on the full network
   of every training seed, with the study's noise, so each plan's FID pairs with the study's own full-attention
   cell of that seed.

The report (atlas.md, atlas.csv, plans.csv) puts the plans (training-free, on the full network) beside the study's
trained static and derived mediator runs, each as its FID difference to full attention with the seed-level
t-interval (`analysis.quality.stats`), against its GFLOPs per image.

Every command runs as `attnmed COMMAND` in its own process, the path a user's command takes (its locks, folder
identities and refusals included). The folder belongs to one study and one atlas configuration (atlas.json).
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.study import rundata
from analysis.study.config import StudyConfig
from mediator_models.storage.runfolder import atomic_write, claim_identity

# kind -> (the --replace of its grid, whether its grid samples guided)
GRID_KINDS = {
    "mediator": ("mediator:16", False),
    "rank": ("rank:16", False),
    "reuse": ("reuse-previous", False),
    "window": ("window:2", False),
    "share-cfg": ("share-cfg", True),
}
# what `attnmed record` measures for the atlas: everything, and the premise at the study's counts
TABLE_METRICS = "all,atlas,changes"
# the grids whose measured damage a plan takes instead of the table's prediction (a plan's grids share one cut of
# the evaluations: reuse's grid starts at 1, so the table predicts reuse)
PLAN_GRIDS = ("mediator", "window")


@dataclass(frozen=True)
class AtlasConfig:
    """What fixes an atlas besides its study: samples per table and per grid cell, the guided scale, the static
    networks whose GFLOPs the plans are held to, and the images per plan cell (default: the study's)."""

    table_samples: int = 16
    grid_samples: int = 64
    cfg_scale: float = 1.5
    budgets_of: tuple[str, ...] = ("med16", "med64")
    plan_samples: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] atlas: {message}", flush=True)


def _cli(*argv) -> None:
    """Run one `attnmed` command in its own process, as a user's shell would (the CLI sits above this module)."""
    args = [str(a) for a in argv]
    done = subprocess.run([sys.executable, "-m", "analysis.cli", *args], check=False)
    if done.returncode:
        raise RuntimeError(f"attnmed {' '.join(args)} exited with {done.returncode}")


class Atlas:
    """One atlas: its study's run folder, its own folder and its configuration."""

    def __init__(self, study_dir: str | Path, out_dir: str | Path, config: AtlasConfig = AtlasConfig()) -> None:
        self.study_dir, self.out, self.config = Path(study_dir), Path(out_dir), config
        path = rundata.study_path(self.study_dir)
        if not path.exists():
            raise FileNotFoundError(f"{self.study_dir} holds no study.json: give the run folder of `attnmed reproduce`")
        self.study = StudyConfig.from_dict(json.loads(path.read_text()))
        if not rundata.results_path(self.study_dir).exists():
            raise FileNotFoundError(
                f"{self.study_dir} holds no results.csv yet: let `attnmed reproduce` finish the study first"
            )
        self.results = pd.read_csv(rundata.results_path(self.study_dir))
        self.differences = pd.read_csv(rundata.differences_path(self.study_dir))
        missing = [name for name in config.budgets_of if name not in set(self.results["run"])]
        if missing:
            raise ValueError(f"budgets_of names runs the study does not have: {missing}")

    # ---- what the study holds -----------------------------------------------------------------------------
    def full_checkpoint(self, seed: int) -> Path:
        return rundata.final_checkpoint(self.study_dir, seed, "full", self.study.train_steps)

    def sampler_args(self, guided: bool = False) -> list[str]:
        args = ["--sampler", "sde", "--seed", str(self.study.sample_seeds[0])]
        return args + (["--cfg-scale", str(self.config.cfg_scale)] if guided else [])

    @property
    def plan_samples(self) -> int:
        return self.config.plan_samples or self.study.fid_samples

    def identity(self) -> dict[str, Any]:
        return {"study": self.study.to_dict(), "study_key": self.study.key(), "atlas": self.config.to_dict()}

    # ---- the stages -----------------------------------------------------------------------------------------
    def run(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        claim_identity(
            self.out / "atlas.json",
            self.identity(),
            what="an atlas",
            fix="To continue it, repeat its settings; for another study or settings, choose another --out.",
        )
        tables = {guided: self.record(guided) for guided in (False, True)}
        grids = {kind: self.grid(kind, tables[guided]) for kind, (_, guided) in GRID_KINDS.items()}
        plans = self.plans(tables[False], grids)
        self.report(grids, plans)
        return self.out

    def record(self, guided: bool) -> Path:
        path = self.out / "tables" / ("guided.parquet" if guided else "unguided.parquet")
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        counts = self.study.mediator_counts
        premise = [f"recovery_{kind}_{n}" for kind in ("rank", "pooled", "bound") for n in counts]
        say(f"record {'guided' if guided else 'unguided'} table of full (seed 0)")
        _cli(
            "record",
            "--ckpt",
            self.full_checkpoint(self.study.train_seeds[0]),
            *self.sampler_args(guided),
            "--steps",
            self.study.sampler_steps,
            "--metrics",
            ",".join([TABLE_METRICS, *premise]),
            "--samples",
            self.config.table_samples,
            "--batch-size",
            self.config.table_samples,
            "--out",
            path,
        )
        return path

    def grid(self, kind: str, table: Path) -> Path:
        replace, guided = GRID_KINDS[kind]
        folder = self.out / "grids" / kind
        if (folder / "report.json").exists():
            return folder / "report.json"
        evaluations = self.study.sampler_steps  # SDE Euler–Maruyama: one evaluation per step
        first = 1 if replace == "reuse-previous" else 0  # reuse needs a previous evaluation
        windows = [f"{k}:{k + 1}" for k in range(first, evaluations)]
        say(f"grid {replace} over {len(windows)} evaluations × every layer")
        _cli(
            "intervene",
            "--ckpt",
            self.full_checkpoint(self.study.train_seeds[0]),
            *self.sampler_args(guided),
            "--sampler-steps",
            evaluations,
            "--replace",
            replace,
            "--grid",
            "--windows",
            *windows,
            "--layers",
            *range(self._depth()),
            "--samples",
            self.config.grid_samples,
            "--batch-size",
            min(64, self.config.grid_samples),
            "--table",
            table,
            "--out",
            folder,
        )
        return folder / "report.json"

    def _depth(self) -> int:
        from mediator_models.network.config import ModelConfig

        config = json.loads((self.out / "tables" / "unguided.parquet.json").read_text())["model"]
        return ModelConfig.from_dict(config).depth

    def budget(self, run: str) -> float:
        """The GFLOPs per image of one of the study's runs (the mean over its cells; they are all alike)."""
        rows = self.results[(self.results["run"] == run) & self.results["train_seed"].astype(str).str.isdigit()]
        return float(rows["gflops_per_image"].astype(float).mean())

    def plans(self, table: Path, grids: dict[str, Path]) -> dict[str, Path]:
        """Plans within each budget from the table alone and (the first budget) from the table with the grids;
        each sampled on every training seed's full network. Returns {plan name: plan JSON}."""
        sources = {"table": [table], "table+grids": [table, *(grids[k] for k in PLAN_GRIDS)]}
        made = {}
        for i, run in enumerate(self.config.budgets_of):
            for source, paths in sources.items():
                if source != "table" and i > 0:
                    continue
                name = f"plan-{source}-{run}"
                path = self.out / "plans" / f"{name}.json"
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    say(f"plan {name} within {self.budget(run):.4g} GFLOPs per image ({run}'s)")
                    _cli("plan", *paths, "--budget-gflops", repr(self.budget(run)), "--name", name, "--out", path)
                made[name] = path
        for name, path in made.items():
            for seed in self.study.train_seeds:
                folder = self.plan_folder(name, seed)
                sidecar = folder / "samples.json"
                if sidecar.exists() and json.loads(sidecar.read_text()).get("num_samples", 0) >= self.plan_samples:
                    continue
                say(f"sample {name} on full (training seed {seed}), {self.plan_samples} images")
                _cli(
                    "sample",
                    "--ckpt",
                    self.full_checkpoint(seed),
                    *self.sampler_args(),
                    "--steps",
                    self.study.sampler_steps,
                    "--plan",
                    path,
                    "--num-samples",
                    self.plan_samples,
                    "--batch-size",
                    250,
                    "--out",
                    folder,
                )
        return made

    def plan_folder(self, name: str, seed: int) -> Path:
        return self.out / "samples" / name / f"seed{seed}"

    # ---- the report -----------------------------------------------------------------------------------------
    def report(self, grids: dict[str, Path], plans: dict[str, Path]) -> None:
        correlations = correlation_rows(grids)
        atomic_write(self.out / "atlas.csv", lambda h: correlations.to_csv(h, index=False), binary=False)
        comparison = self.plan_rows(plans)
        atomic_write(self.out / "plans.csv", lambda h: comparison.to_csv(h, index=False), binary=False)
        text = atlas_markdown(self.study, self.config, grids, correlations, comparison, plans)
        atomic_write(self.out / "atlas.md", lambda h: h.write(text), binary=False)
        plan_figure(comparison, path=self.out / "plans_vs_schedules.png")
        say(f"wrote {self.out}/atlas.md")

    def plan_rows(self, plans: dict[str, Path]) -> pd.DataFrame:
        """Each plan's and each trained mediator run's FID difference to full attention, paired by training seed,
        with its t-interval, beside its GFLOPs per image."""
        from analysis.quality.stats import seed_level_difference
        from analysis.study.reproduce import Study

        study = Study(self.study, self.study_dir, self.out)
        extractor, reference = study.extractor, study.reference
        from analysis.quality.scores import fid

        sample_seed = self.study.sample_seeds[0]
        full_fid = {}
        for seed in self.study.train_seeds:
            own = study.features(rundata.sample_folder(self.study_dir, (seed, sample_seed), "full"), extractor)
            full_fid[seed] = fid(own[: self.plan_samples], reference)
        rows = []
        for name, path in plans.items():
            per_seed, gflops = [], []
            for seed in self.study.train_seeds:
                folder = self.plan_folder(name, seed)
                own = study.features(folder, extractor)
                per_seed.append(fid(own, reference) - full_fid[seed])
                gflops.append(json.loads((folder / "samples.json").read_text())["gflops_per_image"])
            difference = seed_level_difference(per_seed)
            plan = json.loads(Path(path).read_text())
            rows.append(
                {
                    "run": name,
                    "kind": "plan on the full network (training-free)",
                    "gflops_per_image": float(sum(gflops) / len(gflops)),
                    "expected_gflops_per_image": plan["gflops_per_image"]["expected"],
                    "fid_minus_full": difference.point,
                    "low": difference.low,
                    "high": difference.high,
                    "seeds": difference.seeds,
                    "per_seed": " ".join(f"{v:+.4g}" for v in per_seed),
                    "methods": _method_counts(plan),
                }
            )
        fids = self.differences[(self.differences["baseline"] == "full") & (self.differences["metric"] == "fid")]
        kinds = self.results.drop_duplicates("run").set_index("run")["kind"]
        for _, row in fids.iterrows():
            if kinds.get(row["run"]) not in ("static", "derived from redundancy"):
                continue
            rows.append(
                {
                    "run": row["run"],
                    "kind": f"trained mediator network(s), {kinds[row['run']]}",
                    "gflops_per_image": self.budget(row["run"]),
                    "expected_gflops_per_image": float("nan"),
                    "fid_minus_full": row["difference"],
                    "low": row["low"],
                    "high": row["high"],
                    "seeds": row["seeds"],
                    "per_seed": row["per_seed"],
                    "methods": "",
                }
            )
        full = self.budget("full")
        frame = pd.DataFrame(rows)
        frame.insert(3, "gflops_share_of_full", frame["gflops_per_image"] / full)
        return frame


def _method_counts(plan: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for cell in plan["cells"]:
        counts[cell["method"]] = counts.get(cell["method"], 0) + 1
    return " ".join(f"{method}×{n}" for method, n in sorted(counts.items()))


def correlation_rows(grids: dict[str, Path]) -> pd.DataFrame:
    """Every grid's measure–damage correlations as one table: kind, replacement, measure, ρ and its interval."""
    rows = []
    for kind, path in grids.items():
        report = json.loads(Path(path).read_text())
        damage = [cell["relative_error"]["mean"] for cell in report["cells"]]
        for row in report["correlations"] or []:
            rows.append(
                {
                    "kind": kind,
                    "replace": report["grid"]["replace"],
                    "cfg_scale": report["sampler"]["cfg_scale"],
                    "measure": row["measure"],
                    "rho": row["rho"],
                    "low": row["low"],
                    "high": row["high"],
                    "cells": row["cells"],
                    "damage_min": min(damage),
                    "damage_max": max(damage),
                }
            )
    return pd.DataFrame(rows)


def _interval(row) -> str:
    if row["low"] is None or (isinstance(row["low"], float) and math.isnan(row["low"])):
        return f"{row['rho']:+.3f}"
    return f"{row['rho']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]"


def atlas_markdown(study, config, grids, correlations, comparison, plans) -> str:
    """The atlas report: per kind of intervention the measures that order its damage best, then the plans beside
    the trained mediator runs."""
    lines = [
        "# The redundancy atlas of the study's full-attention network",
        "",
        f"Study: {study.model} on the {study.data}, {study.train_steps} training steps, SDE Euler–Maruyama "
        f"{study.sampler_steps} steps (study key {study.key()}); the full network of training seed "
        f"{study.train_seeds[0]} for the tables and grids.",
        "",
        "Each grid replaces one computation in one layer at one evaluation (every evaluation, reuse from the second "
        f"on; every layer; {config.grid_samples} samples from the study's noise); a cell's damage is the mean relative "
        "error ‖x − x_ref‖/‖x_ref‖ of the final samples. Per measure of the table recorded with the same sampler "
        f"({config.table_samples} samples; share-cfg: the guided table at cfg {config.cfg_scale}), Spearman's ρ "
        "with the damage over the cells, with a 95% percentile bootstrap interval over cells.",
        "",
        "## Which measure predicts the damage",
        "",
        "| kind | replacement | damage range | strongest measures: ρ [95% interval] |",
        "|---|---|---|---|",
    ]
    for kind in grids:
        part = correlations[correlations["kind"] == kind].dropna(subset=["rho"])
        if part.empty:
            continue
        top = part.reindex(part["rho"].abs().sort_values(ascending=False).index).head(3)
        strongest = "; ".join(f"{r['measure']} {_interval(r)}" for _, r in top.iterrows())
        first = part.iloc[0]
        lines.append(
            f"| {kind} | {first['replace']} | {first['damage_min']:.3g} – {first['damage_max']:.3g} | {strongest} |"
        )
    lines += [
        "",
        "atlas.csv holds every measure's ρ for every kind; grids/KIND/report.json the damage of every cell.",
        "",
        "## Plans against the trained mediator networks",
        "",
        "FID difference to full attention of the same training seed (the plans sample the full network itself with "
        "the study's noise, so each pairs with the study's full cell), mean over training seeds with the 95% "
        "t-interval, against GFLOPs per image (share of full attention's). Plans replace attention without "
        "training; the static and derived runs are trained mediator networks (derived: exploratory, fewer seeds).",
        "",
        "| run | kind | GFLOPs/img (share) | FID − full [95% CI] | seeds | methods |",
        "|---|---|---|---|---|---|",
    ]
    for _, row in comparison.iterrows():
        interval = f"{row['fid_minus_full']:+.2f} [{row['low']:+.2f}, {row['high']:+.2f}]"
        lines.append(
            f"| {row['run']} | {row['kind']} | {row['gflops_per_image']:.4g} ({row['gflops_share_of_full']:.0%}) | "
            f"{interval} | {row['seeds']} | {row['methods']} |"
        )
    lines += ["", "![plans against schedules](plans_vs_schedules.png)", ""]
    return "\n".join(lines)


def plan_figure(comparison: pd.DataFrame, path=None):
    """FID difference to full attention against the share of its GFLOPs: each run a marker with its seed-level 95%
    interval, plans and trained networks told apart by marker, each numbered with a key beside the plot."""
    import matplotlib.pyplot as plt

    from analysis.plots import save

    fig, (ax, key) = plt.subplots(1, 2, figsize=(10, 4.6), gridspec_kw={"width_ratios": [3, 1.8]})
    lines = []
    for number, row in enumerate(comparison.itertuples(), start=1):
        plan = row.kind.startswith("plan")
        colour = "tab:purple" if plan else ("tab:blue" if "static" in row.kind else "tab:orange")
        x, y = row.gflops_share_of_full, row.fid_minus_full
        if math.isfinite(row.low):
            ax.errorbar(x, y, yerr=[[y - row.low], [row.high - y]], color=colour, capsize=2, lw=0.8)
        ax.scatter(x, y, color=colour, marker="D" if plan else "o", s=28, zorder=3, edgecolor="white")
        ax.annotate(str(number), (x, y), xytext=(5, 4), textcoords="offset points", fontsize=7, color=colour)
        lines.append(f"{number:>2}  {row.run}  ({x:.0%}, {y:+.2f})")
    ax.axhline(0, color="0.3", lw=0.8, ls="--")
    ax.set_xlabel("GFLOPs per image, share of full attention's")
    ax.set_ylabel("FID − full attention (paired by training seed)")
    ax.set_title("plans on the full network against trained mediator networks; bars: 95% t-intervals", fontsize=9)
    handles = [
        plt.Line2D([], [], marker="D", ls="", color="tab:purple", label="plan (training-free)"),
        plt.Line2D([], [], marker="o", ls="", color="tab:blue", label="trained, static"),
        plt.Line2D([], [], marker="o", ls="", color="tab:orange", label="trained, derived (exploratory)"),
    ]
    ax.legend(handles=handles, fontsize=7, loc="best")
    key.axis("off")
    key.text(0, 1, "\n".join(lines), va="top", ha="left", fontsize=6.5, family="monospace", transform=key.transAxes)
    fig.tight_layout()
    save(fig, path)
    return fig
