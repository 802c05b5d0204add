"""Figures, one message each: redundancy across steps and layers, its measures against the noise level,
attention maps, schedules, the FID–GFLOPs trade-off and sample grids. Each function returns the figure and,
given `path`, saves it as PNG and PDF (atomically)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from analysis.collect import refuse_missing_values  # noqa: E402
from mediator_models.sampling.switching import MediatorSchedule, count_label  # noqa: E402
from mediator_models.storage.runfolder import atomic_write  # noqa: E402

METRIC_LABELS = {
    "jsd": "JSD between query rows (bits)",
    "entropy": "attention entropy / log N",
    "cosine": "mean cosine between query rows",
    "effective_rank": "effective rank",
    "stable_rank": "stable rank",
    "numerical_rank": "numerical rank",
    "energy_rank_0.9": "energy rank (τ = 0.9)",
    "energy_rank_0.99": "energy rank (τ = 0.99)",
}


def save(fig, path: str | Path | None) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No creation date in the PDF and no software stamp in the PNG: the same figure gives the same bytes, so a
    # republished run changes only the files whose content changed.
    stamps = {".pdf": {"CreationDate": None}, ".png": {"Software": None}}
    for suffix in (".png", ".pdf"):
        atomic_write(
            path.with_suffix(suffix),
            lambda handle: fig.savefig(
                handle, format=suffix[1:], dpi=150, bbox_inches="tight", metadata=stamps[suffix]
            ),
        )


def _head_average(table: pd.DataFrame, metric: str, branch: str | None = None) -> pd.DataFrame:
    rows = table[(table["metric"] == metric) & (table["head"] == -1)]
    if branch is not None:
        rows = rows[rows["branch"] == branch]
    if rows.empty:
        raise ValueError(f"no head-averaged rows for {metric!r} in the table")
    refuse_missing_values(rows, metric, "drawn")  # NaN cells would draw as an empty figure
    return rows


# What a low or high value of each score means for redundancy, for the heat maps' titles.
REDUNDANT_WHEN = {"jsd": "low", "cosine": "high", **{m: "low" for m in METRIC_LABELS if "rank" in m}}


def heatmap_title(name: str, attention: str, metric: str) -> str:
    """ "SiT-S/2 full attention: JSD between queries per layer and step (low = redundant; …)"."""
    if metric == "jsd":
        what = "JSD between queries" if attention == "full" else "JSD of the product map"
    else:
        what = METRIC_LABELS.get(metric, metric) + ("" if attention == "full" else " of the product map")
    reading = f"{REDUNDANT_WHEN[metric]} = redundant; " if metric in REDUNDANT_WHEN else ""
    return f"{name}: {what} per layer and step ({reading}shared colour scale)"


def redundancy_heatmap(
    table: pd.DataFrame, metric: str = "jsd", title: str = "", path=None, limits: tuple[float, float] | None = None
):
    """The paper's view: the head-averaged score per layer (rows) and sampling step (columns, noise → data).
    `limits` fixes the colour scale, so heat maps of several models can be read against each other."""
    rows = _head_average(table, metric)
    grid = rows.pivot_table(index="layer", columns="step", values="mean", aggfunc="mean").sort_index()
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(grid) + 1.8))
    vmin, vmax = limits if limits is not None else (None, None)
    sns.heatmap(
        grid, ax=ax, cmap="viridis", vmin=vmin, vmax=vmax, cbar_kws={"label": METRIC_LABELS.get(metric, metric)}
    )
    steps = grid.columns.to_numpy()
    ticks = np.linspace(0, len(steps) - 1, min(6, len(steps))).round().astype(int)
    ax.set_xticks(ticks + 0.5, [str(steps[t]) for t in ticks], rotation=0)
    ax.set_xlabel("sampling step (0 = pure noise)")
    ax.set_ylabel("layer")
    ax.set_title(title or f"{METRIC_LABELS.get(metric, metric)} per layer and step")
    save(fig, path)
    return fig


def redundancy_curves(table: pd.DataFrame, metric: str = "jsd", title: str = "", path=None):
    """One curve per layer of the head-averaged score against the noise level, with ±1 std over samples."""
    rows = _head_average(table, metric)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    layers = sorted(rows["layer"].unique())
    palette = sns.color_palette("viridis", len(layers))
    ax.axvspan(1.0, 0.7, color="0.9", zorder=0)
    ax.axvspan(0.3, 0.0, color="0.95", zorder=0)
    ax.text(0.985, 0.02, "early band (noise ≥ 0.7)", transform=ax.get_xaxis_transform(), fontsize=7, va="bottom")
    ax.text(0.29, 0.02, "late band (≤ 0.3)", transform=ax.get_xaxis_transform(), fontsize=7, va="bottom")
    for colour, layer in zip(palette, layers):
        part = rows[rows["layer"] == layer].groupby("noise_level")[["mean", "std"]].mean().sort_index()
        few = len(part) < 3  # a line through one point draws nothing: mark the points
        ax.plot(part.index, part["mean"], color=colour, label=f"layer {layer}", marker="o" if few else None)
        if few:
            ax.errorbar(part.index, part["mean"], yerr=part["std"], color=colour, fmt="none", capsize=3)
        ax.fill_between(
            part.index,
            part["mean"] - part["std"],
            part["mean"] + part["std"],
            color=colour,
            alpha=0.12,
            label="±1 std over samples" if layer == layers[0] else None,
        )
    ax.set_xlim(1, 0)
    ax.set_xlabel("noise level σ/(α+σ)  (1 = pure noise → 0 = data)")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(title or f"{METRIC_LABELS.get(metric, metric)} through sampling")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save(fig, path)
    return fig


def measure_panels(
    table: pd.DataFrame,
    metrics: Sequence[str] = ("entropy", "effective_rank", "energy_rank_0.9"),
    title: str = "",
    path=None,
):
    """Small multiples: each measure (layer-averaged, per model) against the noise level."""
    available = [m for m in metrics if m in set(table["metric"])]
    if not available:
        raise ValueError(f"none of {list(metrics)} is in the table")
    fig, axes = plt.subplots(1, len(available), figsize=(4.2 * len(available), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], available):
        rows = _head_average(table, metric)
        for label, part in rows.groupby(["model", "attention", "mediators"]):
            curve = part.groupby("noise_level")["mean"].mean().sort_index()
            name = f"{label[0]} {'full' if label[1] == 'full' else f'n={label[2]}'}"
            ax.plot(curve.index, curve.values, label=name)
        ax.set_xlim(1, 0)
        ax.set_xlabel("noise level (1 = noise)")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title or "attention measures through sampling (mean over layers and heads)")
    fig.tight_layout()
    save(fig, path)
    return fig


def attention_grid(maps: Sequence[dict], head: int = 0, path=None, title: str = ""):
    """Kept maps (from the recorder's keep_maps): one row per network, one column per step; sample 0, one head."""
    networks = list(dict.fromkeys(m["network"] for m in maps))
    rows = [[m for m in maps if m["network"] == name] for name in networks]
    columns = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.3 * columns, 2.5 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row_axes, row in zip(axes, rows):
        for ax, payload in zip(row_axes, row):
            ax.axis("on")
            image = ax.imshow(payload["effective"][0, head].float().numpy(), cmap="magma", interpolation="nearest")
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
            ax.set_title(f"step {payload['step']}, noise {payload.get('noise_level', float('nan')):.2f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        kind = "product map" if row[0]["kind"] == "mediator" else "full map"
        row_axes[0].set_ylabel(f"{row[0]['network']}\n{kind}", fontsize=8)
    fig.suptitle(
        title or f"attention maps of layer {maps[0]['layer']}, head {head}: rows of each map are queries, columns keys"
    )
    fig.tight_layout()
    save(fig, path)
    return fig


def schedule_diagram(
    schedules: Sequence[MediatorSchedule], gflops: Sequence[float] | None = None, path=None, title: str = ""
):
    """Each schedule as a bar over the noise level, coloured by mediator count."""
    counts = sorted(
        {i.mediators for s in schedules for i in s.intervals}, key=lambda c: float("inf") if c is None else c
    )
    colours = dict(zip(counts, sns.color_palette("crest", len(counts))))
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(schedules) + 1.4))
    for row, schedule in enumerate(schedules):
        for interval in schedule.intervals:
            ax.barh(
                row,
                interval.high - interval.low,
                left=interval.low,
                color=colours[interval.mediators],
                edgecolor="white",
            )
            ax.text(
                (interval.high + interval.low) / 2,
                row,
                count_label(interval.mediators),
                ha="center",
                va="center",
                fontsize=7,
                color="white",
            )
    labels = [
        s.name + (f"  ({g:.3g} GFLOPs)" if gflops is not None else "")
        for s, g in zip(schedules, gflops if gflops is not None else [None] * len(schedules))
    ]
    ax.set_yticks(range(len(schedules)), labels, fontsize=8)
    ax.set_xlim(1, 0)
    ax.set_xlabel("noise level (1 = pure noise → 0 = data)")
    ax.set_title(title or "mediator schedules")
    save(fig, path)
    return fig


def tradeoff(results: pd.DataFrame, path=None, title: str = ""):
    """FID against GFLOPs per image: each run a numbered marker with its 95% interval over training seeds (summary
    rows: train_seed == "all"), the static runs joined as the frontier a schedule has to beat, and the numbers
    explained in a key beside the plot, so no label overprints another."""
    summary = results[results["train_seed"].astype(str) == "all"] if "train_seed" in results else results
    summary = summary.sort_values(["gflops_per_image", "fid"]).reset_index(drop=True)
    fig, (ax, key) = plt.subplots(1, 2, figsize=(10.5, 5.2), gridspec_kw={"width_ratios": [3, 1.7]})
    kinds = sorted(summary["kind"].unique())
    colours = dict(zip(kinds, sns.color_palette("tab10", len(kinds))))
    static = summary[summary["kind"] == "static"].sort_values("gflops_per_image")
    if len(static) > 1:
        ax.plot(static["gflops_per_image"], static["fid"], color="0.6", lw=1, zorder=1, label="static frontier")
    lines = []
    span = summary["gflops_per_image"].max() - summary["gflops_per_image"].min() or 1.0
    crowded: dict[tuple, int] = {}  # runs that fall close together get their numbers stacked above, with leaders
    for number, row in enumerate(summary.itertuples(), start=1):
        colour = colours[row.kind]
        if hasattr(row, "fid_low") and np.isfinite(row.fid_low):
            low, high = max(0.0, row.fid - row.fid_low), max(0.0, row.fid_high - row.fid)
            ax.errorbar(row.gflops_per_image, row.fid, yerr=[[low], [high]], color=colour, capsize=2, lw=0.8, zorder=2)
        ax.scatter(row.gflops_per_image, row.fid, s=30, color=colour, edgecolor="white", zorder=3)
        spot = (round(row.gflops_per_image / (0.05 * span)), round(row.fid / 3.0))
        stacked = crowded.get(spot, 0)
        crowded[spot] = stacked + 1
        ax.annotate(
            str(number),
            (row.gflops_per_image, row.fid),
            xytext=(0, 9 + 9 * stacked),
            textcoords="offset points",
            ha="center",
            fontsize=6.5,
            color=colour,
            weight="bold",
            arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.4} if stacked else None,
            bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.85},
            zorder=4,
        )
        lines.append((number, row.schedule, row.kind, row.gflops_per_image, row.fid))
    ax.set_xlabel("GFLOPs per image (forward MACs × network evaluations)")
    ax.set_ylabel(f"FID (digits features, {int(summary['num_samples'].iloc[0])} samples per cell)")
    ax.set_title(title or "quality against cost (lower left is better); bars: each run's own 95% interval", fontsize=9)
    handles = [plt.Line2D([], [], marker="o", ls="", color=colours[k], label=k) for k in kinds]
    if len(static) > 1:
        handles.append(plt.Line2D([], [], color="0.6", label="static frontier"))
    ax.legend(handles=handles, fontsize=7, loc="upper right")
    key.axis("off")
    text = "\n".join(f"{n:>2}  {name}  ({gflops:.2f} GF, FID {fid:.1f})" for n, name, _, gflops, fid in lines)
    key.text(0, 1, text, va="top", ha="left", fontsize=6.5, family="monospace", transform=key.transAxes)
    fig.tight_layout()
    save(fig, path)
    return fig


def _seed_values(text) -> list[float]:
    return [float(v) for v in str(text).split()] if isinstance(text, str) and text.strip() else []


def claims_forest(differences: pd.DataFrame, metric: str = "fid", path=None, title: str = ""):
    """The claims family as paired differences: one row per claim (run − baseline), its point estimate and
    seed-level 95% interval, each training seed's own difference as a dot, coloured by verdict; rows in the
    report's order, separated by claim. Rows that are aliases of another (no own test) are left out."""
    rows = differences[(differences["metric"] == metric) & (differences["verdict"] != "–")].reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(8.5, 0.28 * len(rows) + 1.6))
    if rows.empty:  # a study too small to compare anything (the quick preset's toy budgets)
        ax.axis("off")
        ax.text(0.5, 0.5, f"no {metric} comparisons of their own to draw", ha="center", va="center")
        save(fig, path)
        return fig
    colour = {"holds": "tab:green", "fails": "tab:red"}
    labels, previous = [], None
    for index, row in rows.iterrows():
        y = -index
        tone = next((c for word, c in colour.items() if str(row["verdict"]).startswith(word)), "0.35")
        ax.plot([row["low"], row["high"]], [y, y], color=tone, lw=1.6)
        ax.scatter([row["difference"]], [y], color=tone, s=22, zorder=3)
        seeds = _seed_values(row.get("per_seed"))
        ax.scatter(seeds, [y] * len(seeds), color=tone, s=9, marker="|", zorder=3)
        if row["claim"] != previous and index:
            ax.axhline(y + 0.5, color="0.85", lw=0.6)
        previous = row["claim"]
        labels.append(f"{row['run']} − {row['baseline']}")
    ax.axvline(0, color="0.3", lw=0.8, ls="--")
    ax.set_yticks([-i for i in range(len(rows))], labels, fontsize=6.5)
    ax.set_xlabel(f"paired difference in {metric.upper()} (run − baseline; below 0: the run is better)")
    handles = [plt.Line2D([], [], color=c, marker="o", label=w) for w, c in colour.items()]
    handles.append(plt.Line2D([], [], color="0.35", marker="o", label="no verdict"))
    handles.append(plt.Line2D([], [], color="0.35", marker="|", ls="", label="one training seed"))
    ax.legend(handles=handles, fontsize=7, loc="lower right")
    ax.set_title(title or "the claims family: seed-level 95% intervals, Holm-adjusted verdicts (REPORT.md)", fontsize=9)
    fig.tight_layout()
    save(fig, path)
    return fig


def along_training(along: pd.DataFrame, metric: str = "fid_infinity", path=None, title: str = ""):
    """Each claim's paired difference against the training step (rows of along_training.csv): one panel per
    comparison, the point estimate with its seed-level 95% interval and each training seed's own difference."""
    rows = along[along["metric"] == metric]
    pairs = list(rows.groupby(["claim", "run", "baseline"], sort=False))
    fig, axes = plt.subplots(1, len(pairs), figsize=(2.7 * len(pairs) + 0.6, 3.0), sharey=True, squeeze=False)
    for ax, ((claim, run, baseline), group) in zip(axes[0], pairs):
        group = group.sort_values("step")
        ax.axhline(0, color="0.3", lw=0.8, ls="--")
        ax.fill_between(group["step"], group["low"], group["high"], color="tab:blue", alpha=0.18, lw=0)
        ax.plot(group["step"], group["difference"], color="tab:blue", marker="o", ms=4)
        for step, seeds in zip(group["step"], group["per_seed"]):
            values = _seed_values(seeds)
            ax.scatter([step] * len(values), values, color="0.35", s=8, marker="_", zorder=3)
        ax.set_title(f"{run} − {baseline}", fontsize=8)
        ax.set_xlabel("training step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel(f"paired difference in {'FID∞' if metric == 'fid_infinity' else metric.upper()}", fontsize=8)
    fig.suptitle(
        title or "the claims along training: point, 95% seed-level interval (band), training seeds (ticks)", fontsize=9
    )
    fig.tight_layout()
    save(fig, path)
    return fig


def sample_grid(images: np.ndarray, columns: int = 8, path=None, title: str = ""):
    """uint8 images (N, H, W, 3) in a grid."""
    n = len(images)
    rows = int(np.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 0.9, rows * 0.9 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image in zip(axes.flat, images):
        ax.imshow(image, interpolation="nearest")
    fig.suptitle(title, fontsize=9)
    save(fig, path)
    return fig


def recovery_curves(curve: pd.DataFrame, kind: str = "rank", path=None, title: str = ""):
    """The premise: relative error of A·V through a rank-n map against the noise level, one panel per layer,
    one line per n (from `schedule.recovery_curve`). Low error at a step means n mediators could carry it."""
    layers = sorted(curve["layer"].unique())
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.2), sharey=True, squeeze=False)
    for ax, layer in zip(axes[0], layers):
        part = curve[curve["layer"] == layer]
        for n, line in part.groupby("mediators"):
            ax.plot(line["noise_level"], line["error"], marker=".", label=f"n = {n}")
        ax.set_xlim(1, 0)
        ax.set_yscale("log")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("noise level (1 = noise → 0 = data)")
    axes[0][0].set_ylabel("‖(A − Â)V‖ / ‖AV‖")
    axes[0][-1].legend(fontsize=8)
    what = "rank-n truncation of A" if kind == "rank" else "pooled-query mediator form (ours)"
    fig.suptitle(title or f"How much of the attention output a {what} keeps (full-attention model)")
    save(fig, path)
    return fig


def switch_histograms(switches: pd.DataFrame, levels: Sequence[float], path=None, title: str = ""):
    """Per adaptive run, the histogram over samples of the evaluation at which each move happened (one colour
    per move; "never" at the right). A rule that reads each sample spreads its moves; one that reads the clock
    stacks them on one step."""
    runs = list(dict.fromkeys(switches["run"]))
    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 1.6 * len(runs) + 0.8), sharex=True, squeeze=False)
    never = len(levels)
    for ax, run in zip(axes[:, 0], runs):
        part = switches[switches["run"] == run]
        for move, rows in part.groupby("move"):
            steps = rows["step"].fillna(never)
            ax.hist(steps, bins=np.arange(-0.5, never + 1.5), alpha=0.6, label=f"move {move + 1}")
        ax.set_ylabel("samples")
        ax.set_title(run, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    ticks = list(range(0, never, max(1, never // 8))) + [never]
    axes[-1, 0].set_xticks(ticks, [f"{k}\n{levels[k]:.2f}" for k in ticks[:-1]] + ["never"])
    axes[-1, 0].set_xlabel("evaluation index (noise level below)")
    fig.suptitle(title or "When each sample switched networks")
    save(fig, path)
    return fig


def distance_traces(distances: pd.DataFrame, path=None, title: str = ""):
    """The adaptive rule's step distance d_k against the noise level, split into the injected noise and the
    drift (the network's move), median over samples with the 10–90% band: what the switch reacts to."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for part_name, colour in (("state", "black"), ("noise", "tab:blue"), ("drift", "tab:orange")):
        grouped = distances.groupby("noise_level")[part_name]
        levels = np.array(sorted(distances["noise_level"].unique(), reverse=True))
        median = grouped.median().reindex(levels)
        low, high = grouped.quantile(0.1).reindex(levels), grouped.quantile(0.9).reindex(levels)
        label = {
            "state": "d_k on the state (the paper)",
            "noise": "injected noise √(2w)·dW",
            "drift": "drift part (ours)",
        }[part_name]
        ax.plot(levels, median, color=colour, label=label)
        ax.fill_between(levels, low, high, color=colour, alpha=0.15)
    ax.set_xlim(1, 0)
    ax.set_xlabel("noise level (1 = noise → 0 = data)")
    ax.set_ylabel("mean |Δ| per element")
    ax.legend(fontsize=8)
    ax.set_title(title or "What the adaptive rule's distance is made of (SDE sampler)")
    save(fig, path)
    return fig


def network_label(attention: str, mediators) -> str:
    """File-name label of a model in a table: "full" or "med16"."""
    return "full" if attention == "full" else f"med{int(mediators)}"


def redundancy_figures(table: pd.DataFrame, out_dir: str | Path, metric: str = "jsd") -> list[Path]:
    """The paper-style figures of any redundancy table: per model a heat map (one colour scale for all models)
    and, for full attention, the per-layer curves; and the measures against the noise level. Returns the paths
    written (PNG, each with a PDF beside it)."""
    out_dir = Path(out_dir)
    rows = _head_average(table, metric)
    limits = (float(rows["mean"].min()), float(rows["mean"].max()))
    written = []
    for (model, attention, mediators), part in table.groupby(["model", "attention", "mediators"]):
        label = network_label(attention, mediators)
        name = f"{model} {'full attention' if attention == 'full' else f'mediators n={int(mediators)}'}"
        path = out_dir / f"redundancy_heatmap_{label}"
        redundancy_heatmap(part, metric, heatmap_title(name, attention, metric), path, limits=limits)
        written.append(path.with_suffix(".png"))
        if attention == "full":
            path = out_dir / f"redundancy_curves_{label}"
            redundancy_curves(part, metric, path=path)
            written.append(path.with_suffix(".png"))
    measured = [m for m in ("entropy", "effective_rank", "energy_rank_0.9") if m in set(table["metric"])]
    if measured:
        path = out_dir / "measures_by_noise"
        measure_panels(table, measured, path=path)
        written.append(path.with_suffix(".png"))
    plt.close("all")
    return written
