"""Figures, one message each: redundancy across steps and layers (per layer and per head), its measures against
the noise level, singular-value spectra of kept maps, several tables side by side, attention maps, schedules, the
FID–GFLOPs trade-off and sample grids. Each function returns the figure and, given `path`, saves it as PNG and PDF
(atomically).

Curves drawn from a redundancy table carry a 95% band over samples: the t-interval of the mean over the recorded
samples, mean ± t·s/√n, from each row's mean, standard deviation and sample count (the table keeps running
statistics, not the samples). The noise axis of curves and heat maps is one of `AXES`: the sampling step, the noise
level σ/(α+σ), the log-SNR log(α²/σ²) or the process's own time, the only one that tables of different processes do
not share."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from analysis.collect import read_table, refuse_missing_values  # noqa: E402
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
# The measures read off each map's singular values (analysis/metrics.py): what a table keeps of the spectra.
RANK_METRICS = ("effective_rank", "stable_rank", "numerical_rank", "energy_rank_0.9", "energy_rank_0.99")
BAND_LEVEL = 0.95
EARLY, LATE = 0.7, 0.3  # the noise-level bands of "most redundant early in denoising" (as analysis/study/report.py)


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
    return _metric_rows(table, metric, head=-1, branch=branch)


def _metric_rows(table: pd.DataFrame, metric: str, head: int | None = -1, branch: str | None = None) -> pd.DataFrame:
    """One metric's rows: of one head (−1: the average over heads, the paper's score) or, with None, of every
    recorded head (the average left out)."""
    rows = table[table["metric"] == metric]
    rows = rows[rows["head"] == head] if head is not None else rows[rows["head"] >= 0]
    if branch is not None:
        rows = rows[rows["branch"] == branch]
    if rows.empty:
        which = "head-averaged rows" if head == -1 else ("per-head rows" if head is None else f"rows of head {head}")
        raise ValueError(f"no {which} for {metric!r} in the table")
    refuse_missing_values(rows, metric, "drawn")  # NaN cells would draw as an empty figure
    return rows


# ---- the 95% band over samples ------------------------------------------------------------------------------


def sample_band(mean, std, count, level: float = BAND_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """The t-interval of the mean over samples, mean ± t_{(1+level)/2, n−1}·s/√n, from a row's mean, sample
    standard deviation s and sample count n; NaN where n < 2, which has no interval. Its coverage is exact for
    normal samples (measured: 95.2% of 4000 simulated tables of 8, tests/test_views.py) and falls short for strongly
    skewed ones (log-normal with σ = 1: 89% at n = 32, 86% at n = 16), the price of a table that keeps running
    statistics, not samples."""
    from scipy import stats as scipy_stats

    mean, std, count = (np.asarray(v, dtype=np.float64) for v in (mean, std, count))
    usable = count >= 2
    critical = np.where(usable, scipy_stats.t.ppf(0.5 + level / 2, np.where(usable, count - 1, 1)), np.nan)
    margin = critical * std / np.sqrt(np.where(usable, count, 1))
    return mean - margin, mean + margin


def _pooled(rows: pd.DataFrame, by) -> pd.DataFrame:
    """Rows averaged within each group of `by`: the mean of their means, the mean of their standard deviations
    and the smallest sample count. The same samples are measured in every layer, head and branch, so the rows
    averaged are correlated; the mean of their standard deviations bounds the standard deviation over samples of
    their average from above (equal when they move together sample by sample), so a band from it is conservative.
    A group of one row keeps its own, exact values. Tables without a count column get no band."""
    counts = rows["count"] if "count" in rows else pd.Series(np.nan, index=rows.index)
    grouped = rows.assign(count=counts).groupby(by)
    return pd.DataFrame(
        {"mean": grouped["mean"].mean(), "std": grouped["std"].mean(), "count": grouped["count"].min()}
    ).sort_index()


def _band_label(pooled: pd.DataFrame) -> str:
    counts = pooled["count"].dropna()
    n = f", n = {int(counts.min())}" if len(counts) and counts.min() == counts.max() else ""
    return f"{BAND_LEVEL:.0%} interval of the mean over samples{n}"


def _draw_series(
    ax, pooled: pd.DataFrame, colour, label: str, band_label: str | None = None, floor=None, linestyle: str = "-"
) -> None:
    """A curve of `pooled` (indexed by the axis value) with its 95% band (`sample_band`), clipped below at `floor`
    where given (a log scale); with fewer than 3 points the points are marked and the band drawn as error bars (a
    line through one point draws nothing)."""
    low, high = sample_band(pooled["mean"], pooled["std"], pooled["count"])
    if floor is not None:
        low = np.maximum(low, floor)
    x, mean = pooled.index.to_numpy(dtype=np.float64), pooled["mean"].to_numpy()
    few = len(pooled) < 3
    (line,) = ax.plot(x, mean, color=colour, label=label, marker="o" if few else None, linestyle=linestyle)
    if not np.isfinite(low).any():
        return
    if few:
        ax.errorbar(x, mean, yerr=[mean - low, high - mean], color=line.get_color(), fmt="none", capsize=3)
    else:
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15, lw=0, label=band_label)


# ---- the noise axis -------------------------------------------------------------------------------------------

AXES = ("step", "noise", "logsnr", "t")


def log_snr(noise_level) -> np.ndarray:
    """log(α²/σ²) at noise level u = σ/(α+σ), the axis every table's rows are placed on (see
    mediator_models/sampling/steps.py): α/σ = (1 − u)/u, so log-SNR = 2·log((1 − u)/u) whatever the process. The
    samplers compute u from their process's own α and σ (Transport.alpha_sigma, GaussianDiffusion's ᾱ, a diffusers
    scheduler's), so nothing about the schedule is derived again here. Pure noise (u = 1) is −∞, data (u = 0) +∞."""
    u = np.asarray(noise_level, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return 2.0 * (np.log1p(-u) - np.log(u))


def check_axis(axis: str) -> None:
    if axis not in AXES:
        raise ValueError(
            f"unknown axis {axis!r}; choose step, noise (σ/(α+σ)), logsnr (log α²/σ², shared by every process) "
            "or t (the process's own time)"
        )


def axis_values(rows: pd.DataFrame, axis: str) -> np.ndarray:
    """The rows' positions on `axis`: the step, the noise level, the log-SNR or the model time (the time the
    network is given: SiT's t in [0, 1], 0 = noise; DiT's timestep, 999 = noise)."""
    check_axis(axis)
    column = {"step": "step", "noise": "noise_level", "logsnr": "noise_level", "t": "model_time"}[axis]
    if column not in rows:
        raise ValueError(f"the table has no {column} column, which the {axis} axis reads; record it again")
    values = rows[column].to_numpy(dtype=np.float64)
    return log_snr(values) if axis == "logsnr" else values


def _placed(rows: pd.DataFrame, axis: str) -> tuple[pd.DataFrame, int]:
    """The rows with their axis value as column "x", leaving out those at ±∞ (the pure-noise step on the
    log-SNR axis); also how many steps were left out."""
    x = axis_values(rows, axis)
    finite = np.isfinite(x)
    return rows.assign(x=x)[finite], int(rows.loc[~finite, "step"].nunique())


def _axis_label(rows: pd.DataFrame, axis: str, left_out: int = 0) -> str:
    label = {
        "step": "sampling step (0 = pure noise)",
        "noise": "noise level σ/(α+σ)  (1 = pure noise → 0 = data)",
        "logsnr": "log-SNR log(α²/σ²)  (noise → data)",
        "t": "model time, as the network sees it",
    }[axis]
    if axis == "t" and "clock" in rows and rows["clock"].notna().any():
        label = f"model time: {'; '.join(sorted(rows['clock'].dropna().unique()))}"
    if left_out:
        label += f"\n{left_out} step{'s' if left_out > 1 else ''} at infinite log-SNR (α = 0 or σ = 0) not drawn"
    return label


def _noise_first(ax, placed: pd.DataFrame, axis: str, span: tuple[float, float] | None = None) -> None:
    """Orient the x axis from noise (left) to data (right), as the paper reads sampling: over `span`, or over the
    whole noise level (1 → 0) on that axis, or over what is drawn."""
    if axis == "noise" and span is None:
        ax.set_xlim(1, 0)
        return
    x, levels = placed["x"].to_numpy(), placed["noise_level"].to_numpy()
    low, high = sorted(span if span is not None else ax.get_xlim())
    noise_on_the_right = x[levels.argmax()] > x[levels.argmin()] or (axis == "noise" and len(set(x)) == 1)
    ax.set_xlim((high, low) if noise_on_the_right else (low, high))


def _on_axis(placed: pd.DataFrame, axis: str, levels: Sequence[float]) -> np.ndarray:
    """Noise levels placed on `axis`: in closed form for the noise level and log-SNR, else read off the table's own
    (noise level, axis value) pairs, within the range the table spans."""
    levels = np.asarray(levels, dtype=np.float64)
    if axis == "noise":
        return levels
    if axis == "logsnr":
        return np.clip(log_snr(levels), placed["x"].min(), placed["x"].max())
    pairs = placed.groupby("noise_level")["x"].mean().sort_index()
    return np.interp(levels, pairs.index.to_numpy(), pairs.to_numpy())


def _shade_bands(ax, placed: pd.DataFrame, axis: str) -> None:
    """Grey the early (noise ≥ 0.7) and late (≤ 0.3) bands that the report compares."""
    early, late = _on_axis(placed, axis, [1.0, EARLY]), _on_axis(placed, axis, [LATE, 0.0])
    for (start, end), tone, text in (
        (early, "0.9", f"early band (noise ≥ {EARLY})"),
        (late, "0.95", f"late band (≤ {LATE})"),
    ):
        if start == end:
            continue  # the table does not reach this band
        ax.axvspan(start, end, color=tone, zorder=0)
        ax.text(start, 0.02, text, transform=ax.get_xaxis_transform(), fontsize=7, va="bottom", clip_on=True)


# ---- several tables -------------------------------------------------------------------------------------------


def process_clock(sidecar: Mapping) -> str | None:
    """The clock a table's model_time column reads, from its sidecar: the process's own time, which tables share
    only when their processes agree (None when the sidecar does not say). Written by `attnmed record` ("process";
    "scheduler" for diffusers pipelines) and by studies, which the reproduction pipeline always samples with SiT's
    linear interpolant (analysis/study/reproduce.py)."""
    from mediator_models.sampling.generation import ProcessConfig

    if "process" in sidecar:
        process = ProcessConfig(**sidecar["process"])
        if process.family == "SiT":
            return f"SiT t, {process.interpolant} interpolant (0 = noise)"
        diffusion = process.build()
        return _ddpm_clock(diffusion.num_timesteps, "linear", diffusion.betas[0], diffusion.betas[-1])
    if "scheduler" in sidecar:
        scheduler = sidecar["scheduler"]
        if "beta_schedule" in scheduler:  # DDPM-family schedulers: the clock is the timestep of ᾱ_t
            return _ddpm_clock(
                scheduler.get("num_train_timesteps", 1000),
                scheduler["beta_schedule"],
                scheduler.get("beta_start"),
                scheduler.get("beta_end"),
            )
        return f"{scheduler.get('_class_name', 'diffusers scheduler')} timestep, shift {scheduler.get('shift', 1.0)}"
    if "study" in sidecar:
        return "SiT t, linear interpolant (0 = noise)"
    return None


def _ddpm_clock(steps: int, schedule: str, start, end) -> str:
    betas = f" {float(start):g}–{float(end):g}" if schedule == "linear" and start is not None else ""
    return f"DDPM timestep, {int(steps)} {schedule} betas{betas} ({int(steps) - 1} = noise)"


def table_labels(paths: Sequence[str | Path]) -> list[str]:
    """Short distinct names for tables: their file stems, with as many parent folders as tell them apart."""
    paths = [Path(p) for p in paths]
    for depth in range(1, max(len(p.parts) for p in paths) + 1):
        labels = [str(Path(*p.with_suffix("").parts[-depth:])) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    raise ValueError(f"the same table is named twice: {[str(p) for p in paths]}")


def combine_tables(tables: Mapping[str, pd.DataFrame], clocks: Mapping[str, str | None] | None = None) -> pd.DataFrame:
    """Several redundancy tables as one, each row labelled with its table's name ("source") and the clock of its
    model time ("clock", see `process_clock`), so every figure can draw them together."""
    clocks = clocks or {}
    parts = [table.assign(source=name, clock=clocks.get(name)) for name, table in tables.items()]
    if not parts:
        raise ValueError("no tables to combine")
    return pd.concat(parts, ignore_index=True)


def read_tables(paths: Sequence[str | Path], labels: Sequence[str] | None = None) -> pd.DataFrame:
    """Read redundancy tables (`attnmed record`, studies) into one labelled table (`combine_tables`): each named
    by `labels` or by `table_labels`, with the clock its sidecar names."""
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} tables: give one label per table")
    labels = [_printable(label) for label in (labels if labels is not None else table_labels(paths))]
    if len(set(labels)) != len(labels):
        raise ValueError(f"the labels {labels} repeat a name; give each table its own")
    tables, clocks = {}, {}
    for label, path in zip(labels, paths):
        tables[label] = read_table(path)
        sidecar = Path(str(path) + ".json")
        clocks[label] = process_clock(json.loads(sidecar.read_text())) if sidecar.exists() else None
    return combine_tables(tables, clocks)


def _printable(name: str) -> str:
    """A name as text: bytes of a file name that are not UTF-8 (kept by Python as surrogates, which neither a table
    column nor a figure can hold) become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def sources(table: pd.DataFrame) -> list[str]:
    """The names of the tables combined in `table` (`combine_tables`), in their order; none for a plain table."""
    return list(dict.fromkeys(table["source"])) if "source" in table else []


def check_shared_axis(table: pd.DataFrame, axis: str) -> None:
    """Refuse to draw tables together on an axis they do not share: the step, noise level and log-SNR are one axis
    for every process, but the model time is each process's own clock (SiT's t runs from noise at 0, DiT's timestep
    from noise at 999)."""
    check_axis(axis)
    names = sources(table)
    if axis != "t" or len(names) < 2:
        return
    clocks = table.groupby("source", sort=False)["clock"].first().reindex(names)
    unknown = [name for name, clock in clocks.items() if not isinstance(clock, str)]
    if unknown:
        raise ValueError(
            f"cannot tell which process made {', '.join(unknown)} (no sidecar naming it), so whether its model time "
            "is the others' clock: draw the tables on --axis logsnr or --axis noise, which every process shares"
        )
    if clocks.nunique() > 1:
        described = "; ".join(f"{name}: {clock}" for name, clock in clocks.items())
        raise ValueError(
            f"the tables' model times are different clocks ({described}), so one t axis would place different "
            "noise levels together: draw them on --axis logsnr (log α²/σ²) or --axis noise, which every process "
            "shares"
        )


def network_name(model: str, attention: str, mediators) -> str:
    """A network's name in legends and titles: "SiT-T/2 full", "SiT-T/2 n=16", "SiT-T/2 conv"."""
    if attention == "full":
        return f"{model} full"
    return f"{model} n={int(mediators)}" if attention == "mediator" else f"{model} {attention}"


def _network_groups(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(name, rows) of each network, table by table, full attention first and then by mediator count; named
    after their table too when several are drawn."""
    several = len(sources(table)) > 1
    keys = (["source"] if several else []) + ["model", "attention", "mediators"]
    order = {name: index for index, name in enumerate(sources(table))}
    groups = []
    for key, part in table.groupby(keys, sort=False):
        *source, model, attention, mediators = key
        name = network_name(model, attention, mediators)
        rank = (order[source[0]] if several else 0, attention != "full", attention, mediators)
        groups.append((rank, f"{source[0]}: {name}" if several else name, part))
    return [(name, part) for _, name, part in sorted(groups, key=lambda group: group[0])]


def _line_styles(table: pd.DataFrame) -> dict[str | None, str]:
    """Solid for the first table, then dashed, dotted…: which table a line is from, beside its colour."""
    return {name: ("-", "--", ":", "-.")[index % 4] for index, name in enumerate(sources(table))}


def _line_style(styles: dict, rows: pd.DataFrame) -> str:
    return styles.get(rows["source"].iloc[0], "-") if "source" in rows else "-"


# ---- heat maps --------------------------------------------------------------------------------------------------

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


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges around sorted cell centres: halfway between neighbours, half a gap beyond the ends."""
    if len(centres) == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    middle = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - middle[0]], middle, [2 * centres[-1] - middle[-1]]])


def _draw_heat(ax, rows: pd.DataFrame, axis: str, limits: tuple[float, float] | None):
    """One network's rows of one metric and head as a layer (down) × axis (across, noise → data) grid of cells,
    each as wide as its step is on the axis; returns the mesh and how many steps were left off the axis."""
    placed, left_out = _placed(rows, axis)
    grid = placed.pivot_table(index="layer", columns="x", values="mean", aggfunc="mean").sort_index()
    layers = grid.index.to_numpy()
    edges = _edges(grid.columns.to_numpy(dtype=np.float64))
    vmin, vmax = limits if limits is not None else (None, None)
    mesh = ax.pcolormesh(edges, np.arange(len(layers) + 1) - 0.5, grid.to_numpy(), cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_ylim(len(layers) - 0.5, -0.5)  # layer 0 on top, as the network reads
    _noise_first(ax, placed, axis, span=(edges[0], edges[-1]))
    return mesh, left_out


def redundancy_heatmap(
    table: pd.DataFrame,
    metric: str = "jsd",
    title: str = "",
    path=None,
    limits: tuple[float, float] | None = None,
    axis: str = "step",
):
    """The paper's view: the head-averaged score per layer (rows) and sampling step (columns, noise → data), or
    along another of `AXES`. `limits` fixes the colour scale, so heat maps of several models can be read against
    each other."""
    rows = _head_average(table, metric)
    layers = rows["layer"].nunique()
    fig, ax = plt.subplots(figsize=(8, 0.35 * layers + 1.8))
    mesh, left_out = _draw_heat(ax, rows, axis, limits)
    fig.colorbar(mesh, ax=ax, label=METRIC_LABELS.get(metric, metric))
    ax.set_xlabel(_axis_label(rows, axis, left_out))
    ax.set_ylabel("layer")
    ax.set_title(title or f"{METRIC_LABELS.get(metric, metric)} per layer and step")
    save(fig, path)
    return fig


def _heat_panels(
    panels: Sequence[Sequence[tuple[str, pd.DataFrame]]],
    metric: str,
    axis: str,
    title: str,
    limits: tuple[float, float] | None = None,
):
    """A grid of heat maps (`panels`: rows of (title, rows) pairs) on one colour scale with one colour bar."""
    every = pd.concat([rows for row in panels for _, rows in row])
    limits = limits or (float(every["mean"].min()), float(every["mean"].max()))
    columns = max(len(row) for row in panels)
    layers = every["layer"].nunique()
    fig, axes = plt.subplots(
        len(panels),
        columns,
        figsize=(3.4 * columns + 1, (0.3 * layers + 1.3) * len(panels) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    mesh, left_out = None, 0
    for row_axes, row in zip(axes, panels):
        for ax, (name, rows) in zip(row_axes, row):
            mesh, dropped = _draw_heat(ax, rows, axis, limits)
            left_out = max(left_out, dropped)
            ax.set_title(name, fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in row_axes[len(row) :]:
            ax.axis("off")
        row_axes[0].set_ylabel("layer", fontsize=8)
    fig.supxlabel(_axis_label(every, axis, left_out), fontsize=9)
    fig.colorbar(mesh, ax=axes.ravel().tolist(), label=METRIC_LABELS.get(metric, metric), fraction=0.03, pad=0.02)
    fig.suptitle(title, fontsize=10)
    return fig


def redundancy_heatmaps(table: pd.DataFrame, metric: str = "jsd", axis: str = "step", title: str = "", path=None):
    """The head-averaged heat map of every network of every table in `table` (`read_tables`) on one colour scale:
    the paper's view, compared; one row per table."""
    check_shared_axis(table, axis)
    rows = _head_average(table, metric)
    networks = _network_groups(rows)
    by_table = [[(name, part) for name, part in networks if sources(part) == [source]] for source in sources(rows)]
    panels = by_table if len(by_table) > 1 else [networks]
    fig = _heat_panels(panels, metric, axis, title or f"{METRIC_LABELS.get(metric, metric)} per layer, compared")
    save(fig, path)
    return fig


def head_heatmaps(table: pd.DataFrame, metric: str = "jsd", axis: str = "step", title: str = "", path=None):
    """Per head: each network's score per layer and step for every recorded head (columns), and their average
    (last column, the paper's score), one network per row, all on one colour scale. Heads that specialise show
    as columns that differ; the average hides them."""
    check_shared_axis(table, axis)
    every = _metric_rows(table, metric, head=None)
    averaged = _head_average(table, metric)
    panels = []
    for name, part in _network_groups(pd.concat([every, averaged])):
        heads = sorted(h for h in part["head"].unique() if h >= 0)
        row = [(f"{name}, head {h}", part[part["head"] == h]) for h in heads]
        panels.append(row + [(f"{name}, heads averaged", part[part["head"] == -1])])
    fig = _heat_panels(panels, metric, axis, title or f"{METRIC_LABELS.get(metric, metric)} per head and layer")
    save(fig, path)
    return fig


# ---- curves -----------------------------------------------------------------------------------------------------


def redundancy_curves(table: pd.DataFrame, metric: str = "jsd", title: str = "", path=None, axis: str = "noise"):
    """One curve per layer of the head-averaged score of one network against the noise level (or another of
    `AXES`), each with its 95% band over samples: the t-interval of the mean over the recorded samples (exact per
    row: the recorder tracks the head average sample by sample; rows of several branches at one step are pooled
    conservatively, see `_pooled`)."""
    rows = _head_average(table, metric)
    placed, left_out = _placed(rows, axis)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    layers = sorted(placed["layer"].unique())
    palette = sns.color_palette("viridis", len(layers))
    for colour, layer in zip(palette, layers):
        pooled = _pooled(placed[placed["layer"] == layer], "x")
        band = _band_label(pooled) if layer == layers[0] else None
        _draw_series(ax, pooled, colour, f"layer {layer}", band)
    _noise_first(ax, placed, axis)
    _shade_bands(ax, placed, axis)
    ax.set_xlabel(_axis_label(rows, axis, left_out))
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(title or f"{METRIC_LABELS.get(metric, metric)} through sampling")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save(fig, path)
    return fig


def comparison_curves(table: pd.DataFrame, metric: str = "jsd", axis: str = "noise", title: str = "", path=None):
    """Several networks (of one table or of several, `read_tables`) against each other: one panel per layer, one
    line per network with its 95% band over samples (the t-interval of the mean; rows of several branches at one
    step are pooled conservatively, see `_pooled`). Layers a network lacks leave its line out of that panel."""
    check_shared_axis(table, axis)
    rows = _head_average(table, metric)
    placed, left_out = _placed(rows, axis)
    layers = sorted(placed["layer"].unique())
    networks, styles = _network_groups(placed), _line_styles(table)
    palette = dict(zip([name for name, _ in networks], sns.color_palette("tab10", len(networks))))
    fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers) + 2.4, 3.4), sharey=True, squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for name, part in networks:
            part = part[part["layer"] == layer]
            if not part.empty:
                _draw_series(ax, _pooled(part, "x"), palette[name], name, linestyle=_line_style(styles, part))
        _noise_first(ax, placed, axis)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel(METRIC_LABELS.get(metric, metric))
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.supxlabel(_axis_label(rows, axis, left_out), fontsize=9)
    fig.suptitle(
        title or f"{METRIC_LABELS.get(metric, metric)} through sampling; bands: 95% interval of the mean over samples",
        fontsize=10,
    )
    fig.tight_layout()
    save(fig, path)
    return fig


def measure_panels(
    table: pd.DataFrame,
    metrics: Sequence[str] = ("entropy", "effective_rank", "energy_rank_0.9"),
    title: str = "",
    path=None,
    axis: str = "noise",
):
    """Small multiples: each measure (averaged over layers, per network of every table in `table`) against the
    noise level (or another of `AXES`), with a conservative 95% band over samples (the t-interval of the mean,
    with the layers' mean standard deviation for the average's, see `_pooled`)."""
    check_shared_axis(table, axis)
    available = [m for m in metrics if m in set(table["metric"])]
    if not available:
        raise ValueError(f"none of {list(metrics)} is in the table")
    fig, axes = plt.subplots(1, len(available), figsize=(4.2 * len(available), 3.4), squeeze=False)
    left_out_anywhere, styles = 0, _line_styles(table)
    for ax, metric in zip(axes[0], available):
        placed, left_out = _placed(_head_average(table, metric), axis)
        for name, part in _network_groups(placed):
            _draw_series(ax, _pooled(part, "x"), None, name, linestyle=_line_style(styles, part))
        _noise_first(ax, placed, axis)
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        left_out_anywhere = max(left_out_anywhere, left_out)
    axes[0][0].legend(fontsize=7)
    fig.supxlabel(_axis_label(table, axis, left_out_anywhere), fontsize=9)
    fig.suptitle(title or "attention measures through sampling (mean over layers and heads; bands: 95% over samples)")
    fig.tight_layout()
    save(fig, path)
    return fig


def head_rank_curves(
    table: pd.DataFrame,
    metrics: Sequence[str] = RANK_METRICS,
    axis: str = "noise",
    layer: int | None = None,
    title: str = "",
    path=None,
):
    """What the table keeps of the maps' singular-value spectra: each rank measure (columns) per head (one line
    each, averaged over layers or of one `layer`) against the noise level, one network per row, with 95% bands over
    samples (the t-interval of the mean; averaged over layers conservatively, see `_pooled`). A table holds these
    scalars, not the spectra; `singular_value_spectra` draws the spectra of maps kept by `attnmed record
    --keep-maps`."""
    check_shared_axis(table, axis)
    available = [m for m in metrics if m in set(table["metric"])]
    if not available:
        raise ValueError(f"the table holds none of the rank measures {list(metrics)}; record it with `--metrics all`")
    rows = table[table["metric"].isin(available) & (table["head"] >= 0)]
    if layer is not None:
        rows = rows[rows["layer"] == layer]
        if rows.empty:
            raise ValueError(f"the table has no rows of layer {layer}; it holds {sorted(set(table['layer']))}")
    placed, left_out = _placed(rows, axis)
    networks = list(_network_groups(placed))
    fig, axes = plt.subplots(
        len(networks), len(available), figsize=(3.4 * len(available) + 1.4, 2.8 * len(networks) + 0.8), squeeze=False
    )
    for row_axes, (name, part) in zip(axes, networks):
        heads = sorted(part["head"].unique())
        palette = sns.color_palette("colorblind", len(heads))
        for ax, metric in zip(row_axes, available):
            for colour, head in zip(palette, heads):
                chosen = part[(part["metric"] == metric) & (part["head"] == head)]
                refuse_missing_values(chosen, metric, "drawn")
                _draw_series(ax, _pooled(chosen, "x"), colour, f"head {head}")
            _noise_first(ax, placed, axis)
            ax.set_title(f"{name}: {METRIC_LABELS.get(metric, metric)}", fontsize=8)
            ax.tick_params(labelsize=7)
        row_axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    where = f"layer {layer}" if layer is not None else "mean over layers"
    fig.supxlabel(_axis_label(placed, axis, left_out), fontsize=9)
    fig.suptitle(
        title or f"ranks of the attention maps per head ({where}; bands: 95% interval of the mean over samples)",
        fontsize=10,
    )
    fig.tight_layout()
    save(fig, path)
    return fig


# ---- kept maps ----------------------------------------------------------------------------------------------------


SPECTRUM_FLOOR = 1e-6  # below this a singular value is float noise of the map's null directions, not its spectrum


def read_kept_maps(folder: str | Path) -> list[dict]:
    """The maps `attnmed record --keep-maps` kept (folder `<table>-maps` beside the table), one payload per
    (network, step, layer) with the samples of all its parts (one per batch) joined along the sample axis."""
    import torch

    files = sorted(Path(folder).glob("maps_*_part*.pt"))
    if not files:
        raise FileNotFoundError(
            f"no kept maps in {folder}: record the table with `attnmed record --keep-maps STEP:LAYER ...`, which "
            "keeps them in <table>-maps beside it"
        )
    joined: dict[tuple, dict] = {}
    for file in files:
        payload = torch.load(file, weights_only=False)
        key = (payload["network"], payload["step"], payload["layer"])
        if key in joined:
            joined[key]["effective"] = torch.cat([joined[key]["effective"], payload["effective"]])
        else:
            joined[key] = dict(payload)
    return list(joined.values())


def singular_value_spectra(maps: Sequence[dict], title: str = "", path=None):
    """The singular values σ_1 ≥ σ_2 ≥ … of kept maps (`read_kept_maps`; for mediators, the N×N product map),
    computed with torch.linalg.svdvals: one panel per head, one row per (network, layer), one line per kept step
    coloured by its noise level, each the mean over the kept samples with its 95% band over samples (the
    t-interval of the mean). A map that needs few directions drops fast: what the rank measures summarise."""
    import torch

    if not maps:
        raise ValueError("no kept maps to draw")
    rows = list(dict.fromkeys((m.get("source"), m["network"], m["layer"]) for m in maps))
    columns = max(m["effective"].shape[1] for m in maps)
    fig, axes = plt.subplots(
        len(rows), columns, figsize=(3.0 * columns + 1.2, 2.7 * len(rows) + 0.8), sharey=True, squeeze=False
    )
    colours = plt.get_cmap("viridis_r")
    for row_axes, (source, network, layer) in zip(axes, rows):
        kept = sorted(
            (m for m in maps if (m.get("source"), m["network"], m["layer"]) == (source, network, layer)),
            key=lambda m: m["step"],
        )
        for payload in kept:
            values = torch.linalg.svdvals(payload["effective"].double()).numpy()  # (samples, heads, min(N, M))
            level = payload.get("noise_level", float("nan"))
            heads = payload.get("heads", list(range(values.shape[1])))
            for ax, head, spectrum in zip(row_axes, heads, values.transpose(1, 0, 2)):
                pooled = pd.DataFrame(
                    {"mean": spectrum.mean(0), "std": spectrum.std(0, ddof=1) if len(spectrum) > 1 else np.nan},
                    index=pd.Index(np.arange(1, spectrum.shape[1] + 1), name="k"),
                ).assign(count=len(spectrum))
                colour = colours(level) if np.isfinite(level) else None
                _draw_series(ax, pooled, colour, f"step {payload['step']}, noise {level:.2f}", floor=SPECTRUM_FLOOR)
                ax.set_title(f"{source + ': ' if source else ''}{network}, layer {layer}, head {head}", fontsize=7)
        for ax in row_axes:
            ax.set_yscale("log")
            ax.set_ylim(bottom=SPECTRUM_FLOOR)
            ax.tick_params(labelsize=7)
        row_axes[-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.supxlabel("index k of the singular value", fontsize=9)
    fig.supylabel("σ_k of the attention map", fontsize=9)
    samples = sorted({len(m["effective"]) for m in maps})
    fig.suptitle(
        title
        or f"singular-value spectra of the kept maps ({'/'.join(map(str, samples))} samples; bands: 95% interval of "
        "the mean over samples)",
        fontsize=10,
    )
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
    # the extractor that scored the run: "digits-cnn sha256 …" or "textures-cnn sha256 …"
    features = str(summary["extractor"].iloc[0]).split("-cnn")[0] if "extractor" in summary else "digits"
    ax.set_ylabel(f"FID ({features} features, {int(summary['num_samples'].iloc[0])} samples per cell)")
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
    one line per n (from `schedule.recovery_curve`). Low error at a step means n mediators could carry it. Where
    the curve carries each row's std and count (over samples), each line has its 95% band over samples (the
    t-interval of the mean)."""
    layers = sorted(curve["layer"].unique())
    banded = {"std", "count"} <= set(curve.columns)
    positive = curve.loc[curve["error"] > 0, "error"]
    floor = float(positive.min()) / 2 if len(positive) else None  # the log scale cannot show a band through 0
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.2), sharey=True, squeeze=False)
    for ax, layer in zip(axes[0], layers):
        part = curve[curve["layer"] == layer]
        for n, line in part.groupby("mediators"):
            (drawn,) = ax.plot(line["noise_level"], line["error"], marker=".", label=f"n = {n}")
            if banded:
                low, high = sample_band(line["error"], line["std"], line["count"])
                low = np.maximum(low, floor) if floor is not None else low
                ax.fill_between(line["noise_level"], low, high, color=drawn.get_color(), alpha=0.15, lw=0)
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


VIEWS = ("paper", "heads", "ranks", "spectra")


def redundancy_figures(
    table: pd.DataFrame,
    out_dir: str | Path,
    metric: str = "jsd",
    axis: str | None = None,
    views: Sequence[str] = ("paper",),
    maps: Sequence[dict] | None = None,
) -> list[Path]:
    """The figures of any redundancy table, or of several combined by `read_tables`; returns the paths written
    (PNG, each with a PDF beside it). `views`, any of `VIEWS`:

    - "paper": of one table, per network a heat map (one colour scale for all) and, for full attention, the
      per-layer curves, and the measures against the noise level; of several tables, all their heat maps in one
      figure, their networks' curves per layer in one figure, and the measures of all of them in one;
    - "heads": the heat map of every head ("redundancy_heads");
    - "ranks": the rank measures per head against the noise level ("ranks_by_head");
    - "spectra": the singular values of the kept `maps` (`read_kept_maps`; "spectra").

    `axis` (one of `AXES`) places the steps of every figure; by default heat maps by step and curves by noise level.
    Tables whose model times are different clocks are refused on the t axis (`check_shared_axis`)."""
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ValueError(f"unknown views {unknown}; choose among {', '.join(VIEWS)}")
    if axis is not None:
        check_shared_axis(table, axis)
    if "spectra" in views and not maps:
        raise ValueError("the spectra view draws kept maps: pass them (read_kept_maps), recorded with --keep-maps")
    if "ranks" in views and not set(RANK_METRICS) & set(table["metric"]):  # refused before anything is drawn
        raise ValueError(
            f"the ranks view draws {', '.join(RANK_METRICS)}; the table holds none: record it with `--metrics all`"
        )
    heat_axis, curve_axis = axis or "step", axis or "noise"
    out_dir = Path(out_dir)
    written = []

    def draw(name: str, figure, *args, **kwargs) -> None:
        figure(*args, path=out_dir / name, **kwargs)
        written.append((out_dir / name).with_suffix(".png"))

    if "paper" in views:
        rows = _head_average(table, metric)
        limits = (float(rows["mean"].min()), float(rows["mean"].max()))
        if len(sources(table)) > 1:
            draw("redundancy_heatmaps", redundancy_heatmaps, table, metric, heat_axis)
            draw("redundancy_curves", comparison_curves, table, metric, curve_axis)
        else:
            for (model, attention, mediators), part in table.groupby(["model", "attention", "mediators"]):
                label = network_label(attention, mediators)
                name = f"{model} {'full attention' if attention == 'full' else f'mediators n={int(mediators)}'}"
                title = heatmap_title(name, attention, metric)
                draw(
                    f"redundancy_heatmap_{label}",
                    redundancy_heatmap,
                    part,
                    metric,
                    title,
                    limits=limits,
                    axis=heat_axis,
                )
                if attention == "full":
                    draw(f"redundancy_curves_{label}", redundancy_curves, part, metric, axis=curve_axis)
        measured = [m for m in ("entropy", "effective_rank", "energy_rank_0.9") if m in set(table["metric"])]
        if measured:
            draw("measures_by_noise", measure_panels, table, measured, axis=curve_axis)
    if "heads" in views:
        draw("redundancy_heads", head_heatmaps, table, metric, heat_axis)
    if "ranks" in views:
        draw("ranks_by_head", head_rank_curves, table, axis=curve_axis)
    if "spectra" in views:
        draw("spectra", singular_value_spectra, maps)
    plt.close("all")
    return written
