"""The grafting study's figures and REPORT.md (analysis.study.grafting.study), from its run folder's tables."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from analysis import plots
from analysis.collect import read_table
from analysis.study.grafting.tables import differences, summarize
from analysis.study.report import real_floor
from mediator_models.storage.runfolder import atomic_write, atomic_write_json


def _interval(point: float, low: float, high: float, digits: int = 1) -> str:
    return f"{point:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def training_free_agreement(study) -> pd.DataFrame:
    """Per (count, layer), averaged over steps: the grafted network's measured training-free mixing error (first
    training seed, errors.json) beside the source's premise measure `recovery_pooled_n` on the same trajectories."""
    seed = study.config.train_seeds[0]
    rows = json.loads((study.run_dir / "graft" / f"seed{seed}" / "grafted" / "errors.json").read_text())["rows"]
    errors = pd.DataFrame(rows)
    errors = errors[(errors["head"] == -1) & (errors["metric"] == "mixing_error")]
    measured = errors.groupby(["mediators", "layer"])["mean"].mean().rename("measured")
    table = read_table(study.premise_path(seed))
    table = table[table["metric"].str.startswith("recovery_pooled_") & (table["head"] == -1)]
    table = table.assign(mediators=table["metric"].str.removeprefix("recovery_pooled_").astype(int))
    premise = table.groupby(["mediators", "layer"])["mean"].mean().rename("premise")
    return pd.concat([measured, premise], axis=1).reset_index()


def cost_rows(study) -> pd.DataFrame:
    """Seconds of work per network made (mean over training seeds), from timings.json: what each way costs."""
    timings = json.loads((study.run_dir / "timings.json").read_text())
    seeds = len(study.config.train_seeds)
    config = study.config
    rows = [
        ("full (the source)", "train full", f"{config.train_steps} steps × {config.batch_size} images"),
        (
            study.focus + " from scratch",
            f"train {study.focus}",
            f"{config.train_steps} steps × {config.batch_size} images",
        ),
        ("shared from scratch", "train shared", f"{config.train_steps} steps × {config.batch_size} images"),
        ("grafted (training-free)", "graft", f"copy, plus the error on {config.error_samples} trajectories"),
    ]
    for name, fraction in config.distilled.items():
        rows.append(
            (
                f"{name} ({fraction:.0%})",
                name,
                f"{config.layerwise_steps(fraction)} layer-wise steps × {config.batch_size} trajectories, then "
                f"{config.end_to_end_steps(fraction)} end-to-end steps × {config.batch_size} images",
            )
        )
    scratch = timings.get("train full", float("nan")) / seeds
    return pd.DataFrame(
        [
            {
                "network": label,
                "work": work,
                "seconds": timings.get(stage, float("nan")) / seeds,
                "share_of_training": timings.get(stage, float("nan")) / seeds / scratch,
            }
            for label, stage, work in rows
        ]
    )


def write_report(study, cells: pd.DataFrame, figures_dir: Path) -> Path:
    figures_dir.mkdir(parents=True, exist_ok=True)
    data = figures_dir / "data"
    data.mkdir(exist_ok=True)
    runs = study.runs()
    summary = summarize(cells, runs)
    table = differences(cells, study.comparisons())
    agreement = training_free_agreement(study)
    costs = cost_rows(study)
    for name, frame in (
        ("cells", cells),
        ("summary", summary),
        ("differences", table),
        ("agreement", agreement),
        ("costs", costs),
    ):
        atomic_write(data / f"{name}.csv", lambda handle, f=frame: f.to_csv(handle, index=False), binary=False)
    schedules = {}
    for path in sorted((study.run_dir / "schedules").glob("*.json")):
        schedules[path.stem] = json.loads(path.read_text())
    atomic_write_json(data / "schedules.json", schedules)
    extractor = study.extractor
    plots.claims_forest(
        table,
        path=figures_dir / "graft_forest.png",
        title="grafting study: paired differences over training seeds, 95% t-intervals (REPORT.md)",
    )
    plots.tradeoff(
        summary.assign(extractor=extractor.label),
        path=figures_dir / "graft_fid_vs_gflops.png",
        title="grafting study: FID against GFLOPs per image; bars: 95% t-intervals over training seeds",
    )
    floor, floor_sd, images = real_floor(study.config.data, study.config.image_size, cells)
    report = figures_dir / "REPORT.md"
    text = render(study, summary, table, agreement, costs, schedules, (floor, floor_sd, images))
    atomic_write(report, lambda handle: handle.write(text), binary=False)
    return report


def render(study, summary, table, agreement, costs, schedules, floor) -> str:
    config = study.config
    timings = json.loads((study.run_dir / "timings.json").read_text())
    fid = table[table["metric"] == "fid"]
    gflops = table[table["metric"] == "gflops_per_image"].set_index(["run", "baseline"])
    lines = [
        "# Mediators grafted onto a trained network, against mediators trained for themselves",
        "",
        f"{config.model} on the embedded {config.data} ({config.image_size}×{config.image_size}), every network "
        f"of {config.train_steps} steps at batch {config.batch_size} from scratch, at {len(config.train_seeds)} "
        f"training seeds {list(config.train_seeds)} (the unit of replication: every difference below is paired "
        f"within a training seed, and its interval is the 95% t-interval over seeds); one sampling seed, "
        f"{config.fid_samples} images per cell, SDE with {config.sampler_steps} steps; FID with the pinned "
        f"{study.extractor.label}. Real-data floor at {floor[2]} images: {floor[0]:.1f} ± {floor[1]:.1f} FID. "
        f"Run folder `{study.run_dir}`, {sum(timings.values()) / 60:.1f} minutes of stage time on this machine "
        "(2 CPU cores).",
        "",
        "## The networks, and the control each comparison isolates",
        "",
        "- **source**: full attention from scratch — the network a user already has; every mediator network below "
        "of the same seed starts from it or shares its data and recipe.",
        f"- **{study.focus}**: n = {config.focus} mediators from scratch (the paper's way: one network per count).",
        "- **shared**: one network holding each count's position biases and conv, trained from scratch with a "
        f"count drawn per step from {[*config.counts, 'full']}.",
        "- **grafted**: the source with mediators grafted on (every shared tensor copied, biases and conv zero), "
        "training-free.",
    ]
    for name, fraction in config.distilled.items():
        lines.append(
            f"- **{name}**: grafted, then distilled for {fraction:.0%} of the from-scratch steps: "
            f"{config.layerwise_steps(fraction)} layer-wise steps, then {config.end_to_end_steps(fraction)} "
            f"end-to-end steps (diffusion loss + {config.teacher_weight:g} × ‖student − source‖², lr "
            f"{config.distill_lr:g}) on the training data."
        )
    lines += [
        "",
        "Ways of making mediators are compared at one count against mediators from scratch (same count, same "
        "sampler, same noise: the way is the one difference) and against the source (what the mediators cost). "
        "The adaptive rule and the derived per-layer schedule run on one network each, the derived schedule "
        "fitted to the rule's measured GFLOPs on that seed, so the schedule is the one difference.",
        "",
        "## Results",
        "",
        "| run | what | FID (mean over seeds, 95% t) | FID∞ | GFLOPs per image |",
        "|---|---|---|---|---|",
    ]
    for row in summary.itertuples():
        lines.append(
            f"| {row.run} | {row.schedule} | {row.fid:.1f} [{row.fid_low:.1f}, {row.fid_high:.1f}] | "
            f"{row.fid_infinity:.1f} | {row.gflops_per_image:.4f} |"
        )
    lines += [
        "",
        "## Paired differences (run − baseline; below 0 the run is better)",
        "",
        "Holm-adjusted within the study's family of FID comparisons; a verdict needs the adjusted p below 0.05. "
        "`detectable`: the true difference this design finds with 80% power.",
        "",
        "| comparison | question | ΔFID [95% t] | per seed | Holm p | verdict | detectable | ΔGFLOPs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in fid.itertuples():
        cost = gflops.loc[(row.run, row.baseline)]
        lines.append(
            f"| {row.run} − {row.baseline} | {row.claim} | {_interval(row.difference, row.low, row.high)} | "
            f"{row.per_seed} | {row.p_holm:.3g} | {row.verdict} | {row.detectable:.1f} | "
            f"{cost['difference']:+.4f} |"
        )
    lines += ["", "![paired differences](graft_forest.png)", "", "![FID against GFLOPs](graft_fid_vs_gflops.png)", ""]
    lines += [
        "## What grafting costs",
        "",
        "Seconds of work per network (mean over training seeds) on this machine:",
        "",
    ]
    lines += ["| network | work | seconds | share of training the source |", "|---|---|---|---|"]
    for row in costs.itertuples():
        lines.append(f"| {row.network} | {row.work} | {row.seconds:.0f} | {row.share_of_training:.0%} |")
    lines += [
        "",
        "## Training-free error against the premise measure",
        "",
        f"Per count and layer, averaged over the {config.sampler_steps} steps on the same "
        f"{config.error_samples} trajectories (first training seed): the grafted layer's measured mixing error "
        "(before proj) and the source's `recovery_pooled_n`, which predicts it (a zero conv and zero biases make "
        "the grafted layer the pooled mediator form of the source's own queries and keys).",
        "",
        "| mediators | layer | measured | premise |",
        "|---|---|---|---|",
    ]
    for row in agreement.itertuples():
        lines.append(f"| {row.mediators} | {row.layer} | {row.measured:.4f} | {row.premise:.4f} |")
    lines += ["", "## The derived schedules", ""]
    for name, chosen in schedules.items():
        epsilon = "none fits" if chosen["epsilon"] is None else f"ε = {chosen['epsilon']:.3g}"
        lines.append(
            f"- {name}: {epsilon}, expected {chosen['expected_gflops']:.4f} GFLOPs per image within the rule's "
            f"{chosen['budget_gflops']:.4f}"
        )
    lines += [
        "",
        "## Limits",
        "",
        f"- A {config.model} trained for minutes on the embedded {config.data} stands in for DiT-XL/2 on ImageNet; "
        "the ranking of ways of making mediators is the finding, not the FID values.",
        "- One sampling seed per training seed: the interval is over training seeds, which carry most of the "
        "variance here (figures/paper-grid/REPORT.md).",
    ]
    return "\n".join(lines) + "\n"
