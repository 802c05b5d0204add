"""The claims a study decides, computed from its per-cell results (results.csv) alone.

A comparison is (run, baseline as {run: weight}, baseline label, claim). Each is decided per metric by the
seed-level paired t-interval of `analysis.quality.stats`, all of a report's comparisons and metrics form one
family adjusted by Holm, and a verdict needs ≥ 3 training seeds. Runs that drew exactly the same images (two
names for one schedule) are tested once, under the first name, and the others are listed as its aliases.

`redecide` applies this to a published data folder (figures/data, figures/paper-grid/data): it rewrites
differences.csv and the report's verdict-bearing sections from the committed per-cell rows.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.quality.stats import (
    KID_EXCLUSION,
    MIN_SEEDS_FOR_VERDICT,
    VERDICT_METRICS,
    holm,
    per_seed_differences,
    seed_level_difference,
    seed_verdict,
)
from analysis.study.results import Run, RunKind
from mediator_models.storage.runfolder import atomic_write, atomic_write_text

METRICS = ("fid", "kid", "precision", "recall")
# docs/reference.md §3: SiT-S/2, 400K iterations, no guidance, SDE 250 steps (secondary summary of the paper).
PAPER_FID = {None: 58.61, 4: 57.67, 16: 54.55, 64: 53.57}
_VERDICT_WORDS = re.compile(r" \((holds|reverses|unresolved)\)")
# The claims family in the order of importance: the control that differs from a mediator model in its attention
# only is full attention with the same depthwise conv.
CLAIM_ORDER = (
    "mediators vs full attention with the same conv",
    "quality vs full attention",
    "the conv's part: full attention with vs without it",
    "the conv's part: mediators with vs without it",
    "the mediators' part: mediators + conv vs the conv alone",
    "dynamic vs static frontier at equal FLOPs",
    "per-sample switching vs the same switch steps for every sample",
)


def cell_values(rows: pd.DataFrame, metric: str) -> dict[tuple[int, int], float]:
    """{(training seed, sampling seed): value} of one run's per-cell rows: what paired differences pair."""
    return {(int(r.train_seed), int(r.sample_seed)): float(getattr(r, metric)) for r in rows.itertuples()}


def cell_rows(results: pd.DataFrame) -> pd.DataFrame:
    """The per-cell rows of a results table (summary rows have train_seed "all")."""
    cells = results[results["train_seed"].astype(str) != "all"].copy()
    cells["train_seed"] = cells["train_seed"].astype(int)
    cells["sample_seed"] = cells["sample_seed"].astype(int)
    return cells


def runs_of(results: pd.DataFrame) -> list[Run]:
    """The runs of a results table in its order, as `comparisons` needs them."""
    runs = []
    for row in results.drop_duplicates("run").itertuples():
        kind = RunKind(row.kind)
        control_of = row.run.removeprefix("control-") if kind is RunKind.CONTROL else None
        exploratory = str(getattr(row, "exploratory", False)) == "True"  # absent from tables made before it existed
        runs.append(Run(row.run, kind, row.schedule, control_of=control_of, exploratory=exploratory))
    return runs


def aliases(cells: pd.DataFrame, runs: list[Run]) -> dict[str, str]:
    """{run: the earlier run it duplicates} for runs whose every cell scored exactly the same on every metric:
    they drew the same images (a derived schedule that is a static one, two rules giving one schedule)."""
    signature = {}
    found = {}
    for run in runs:
        own = cells[cells["run"] == run.name].sort_values(["train_seed", "sample_seed"])
        key = tuple(np.round(own[list(METRICS)].to_numpy(dtype=float), 12).ravel())
        if key in signature:
            found[run.name] = signature[key]
        else:
            signature[key] = run.name
    return found


def comparisons(runs: list[Run], cells: pd.DataFrame, full: str) -> list[tuple[str, dict[str, float], str, str]]:
    """(run, baseline as {run: weight}, baseline label, claim) for every comparison the report decides on.

    Every mediator run is compared with full attention carrying the same depthwise conv where the study trained
    it (the paper's quality claim with everything but the attention held fixed), and every run with full
    attention (the claim as the paper states it). The conv's own share, the mediators' share, and every dynamic
    schedule against the static frontier at its own cost (the two static runs whose costs bracket it, weighted
    linearly in GFLOPs, so neither side spends more; a run cheaper or dearer than every static run is compared
    with the nearest one)."""
    cost = cells.groupby("run")["gflops_per_image"].mean()
    names = {r.name for r in runs}
    static = sorted((r.name for r in runs if r.kind is RunKind.STATIC), key=lambda s: cost[s])
    pairs = []
    if f"{full}-conv" in names:
        pairs += [
            (r.name, {f"{full}-conv": 1.0}, f"{full}-conv", "mediators vs full attention with the same conv")
            for r in runs
            if r.kind is RunKind.STATIC and r.name != full
        ]
        pairs.append((f"{full}-conv", {full: 1.0}, full, "the conv's part: full attention with vs without it"))
    pairs += [(r.name, {full: 1.0}, full, "quality vs full attention") for r in runs if r.name != full]
    for run in runs:  # what each component adds: the run with it against the run without it
        if run.kind is RunKind.ABLATION and run.name.endswith("-noconv"):
            with_conv = run.name.removesuffix("-noconv")
            pairs.append((with_conv, {run.name: 1.0}, run.name, "the conv's part: mediators with vs without it"))
        if run.kind is RunKind.ABLATION and run.name == "conv":
            for other in sorted(n for n in names if n.startswith("med") and n.endswith("-noconv")):
                claim = "the mediators' part: mediators + conv vs the conv alone"
                pairs.append((other.removesuffix("-noconv"), {"conv": 1.0}, "conv", claim))
        if run.kind is RunKind.CONTROL:
            claim = "per-sample switching vs the same switch steps for every sample"
            pairs.append((run.control_of, {run.name: 1.0}, run.name, claim))
    for run in runs:
        if run.kind in (RunKind.STATIC, RunKind.ABLATION):
            continue
        spent = cost[run.name]
        below = [s for s in static if cost[s] <= spent * (1 + 1e-9)]
        above = [s for s in static if cost[s] > spent * (1 + 1e-9)]
        if below and above and cost[below[-1]] < spent * (1 - 1e-9):
            low, high = below[-1], above[0]
            weight = (cost[high] - spent) / (cost[high] - cost[low])
            baseline = {low: weight, high: 1 - weight}
            label = f"{low}/{high} at {spent:.3g} GFLOPs"
        else:
            nearest = below[-1] if below else above[0]
            baseline, label = {nearest: 1.0}, nearest
        pairs.append((run.name, baseline, label, "dynamic vs static frontier at equal FLOPs"))
    return pairs


def decide(cells: pd.DataFrame, runs: list[Run], full: str) -> pd.DataFrame:
    """One row per comparison and metric: the seed-level difference, its 95% t-interval, p-values (raw and
    Holm-adjusted over the report's family: every distinct comparison on FID, precision and recall), the
    minimum detectable difference at 80% power, and the verdict. KID rows carry numbers but no verdict.

    A comparison is paired over the cells its runs share. One that involves an exploratory run (sampled at fewer
    training seeds, outside the claims family) carries its numbers but takes no part in the family or the
    verdicts."""
    duplicate_of = aliases(cells, runs)
    exploratory = {run.name for run in runs if run.exploratory}
    values = {metric: {run: cell_values(group, metric) for run, group in cells.groupby("run")} for metric in METRICS}
    rows, seen = [], set()
    for name, weights, label, claim in comparisons(runs, cells, full):
        canonical = (
            duplicate_of.get(name, name),
            tuple(sorted((duplicate_of.get(b, b), w) for b, w in weights.items())),
        )
        same_images = len(weights) == 1 and duplicate_of.get(name, name) == duplicate_of.get(
            next(iter(weights)), next(iter(weights))
        )
        repeated = canonical in seen
        seen.add(canonical)
        shared = set.intersection(*(set(values["fid"][run]) for run in (name, *weights)))
        outside = any(run in exploratory for run in (name, *weights))
        for metric in METRICS:
            own = {cell: v for cell, v in values[metric][name].items() if cell in shared}
            baseline = [
                (w, {cell: v for cell, v in values[metric][b].items() if cell in shared}) for b, w in weights.items()
            ]
            difference = seed_level_difference(list(per_seed_differences(own, baseline).values()))
            tested = metric in VERDICT_METRICS and not repeated and not same_images and not outside
            rows.append(
                {
                    "run": name,
                    "baseline": label,
                    "claim": claim,
                    "metric": metric,
                    "difference": difference.point,
                    "low": difference.low,
                    "high": difference.high,
                    "p_value": difference.p_value if tested else np.nan,
                    "seeds": difference.seeds,
                    "per_seed": " ".join(f"{v:+.4g}" for v in difference.per_seed),
                    "detectable": difference.detectable,
                    "note": (
                        "exploratory: outside the claims family, fewer training seeds, no verdict"
                        if outside
                        else "same images as its baseline (one schedule)"
                        if same_images
                        else "tested once under its first name"
                        if repeated
                        else "reported only: " + "KID takes no part in the verdicts"
                        if metric == "kid"
                        else ""
                    ),
                }
            )
    decisions = pd.DataFrame(rows)
    decisions["p_holm"] = holm(decisions["p_value"].to_numpy())
    decisions["verdict"] = [
        "–" if np.isnan(row.p_value) else seed_verdict(_difference_of(row), row.p_holm, row.metric)
        for row in decisions.itertuples()
    ]
    decisions["family_size"] = int(decisions["p_value"].notna().sum())
    order = {claim: i for i, claim in enumerate(CLAIM_ORDER)}
    decisions["_order"] = decisions["claim"].map(order).fillna(len(order))
    return decisions.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)


def _difference_of(row):
    from analysis.quality.stats import SeedLevelDifference

    per_seed = tuple(float(v) for v in row.per_seed.split())
    return SeedLevelDifference(row.difference, row.low, row.high, row.p_value, row.detectable, per_seed)


def run_summaries(cells: pd.DataFrame, runs: list[Run]) -> pd.DataFrame:
    """Per run: the mean over training seeds of each metric (each seed's mean over its sampling seeds), with the
    seed-level 95% t-interval, and the mean cost."""
    rows = []
    for run in runs:
        own = cells[cells["run"] == run.name]
        row = {
            "run": run.name,
            "schedule": run.schedule,
            "kind": run.kind.value,
            "exploratory": run.exploratory,
            "train_seed": "all",
            "sample_seed": "all",
            "gflops_per_image": own["gflops_per_image"].mean(),
            "nfe": own["nfe"].mean(),
            "seconds_per_image": own["seconds_per_image"].mean(),
            "num_samples": int(own["num_samples"].iloc[0]),
            "kid_std": own["kid_std"].mean(),
        }
        for metric in METRICS + (("fid_infinity",) if "fid_infinity" in own else ()):
            per_seed = own.groupby("train_seed")[metric].mean().to_numpy()
            interval = seed_level_difference(per_seed)
            row.update({metric: interval.point, f"{metric}_low": interval.low, f"{metric}_high": interval.high})
        rows.append(row)
    return pd.DataFrame(rows)


def with_run_summaries(results: pd.DataFrame, runs: list[Run]) -> pd.DataFrame:
    """A results table whose summary rows are (re)computed from its per-cell rows by `run_summaries`."""
    cells = results[results["train_seed"].astype(str) != "all"]
    common = results.iloc[0][["model", "sampler", "cfg", "extractor", "extractor_sha256", "num_reference"]]
    summary = run_summaries(cell_rows(results), runs).assign(**common.to_dict())
    return pd.concat([cells, summary], ignore_index=True)


# ---- rendering ---------------------------------------------------------------------------------------------


def _number(value: float, signed: bool = True) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{value:+.3g}" if signed else f"{value:.3g}"


def interval_text(row) -> str:
    return f"{_number(row.difference)} [{_number(row.low)}, {_number(row.high)}]"


def method_paragraph(decisions: pd.DataFrame, floor: tuple[float, float, int] | None) -> str:
    seeds = int(decisions["seeds"].max())
    family = int(decisions["family_size"].iloc[0])
    text = (
        f"**Statistics.** The unit of replication is the training seed ({seeds} here). Each comparison is paired "
        "(the runs share noise and labels sample for sample); per training seed the paired difference is averaged "
        "over its sampling seeds, which carries the sampling-seed and image noise into it, and the interval is the "
        f"95% t-interval over training seeds ({seeds - 1} degrees of freedom; its coverage measured by simulation "
        "in tests/test_stats.py and benchmarks/RESULTS.md). The p-values of the report's family "
        f"({family} tests: every distinct comparison on FID, precision and recall) are adjusted by Holm's method. "
        f"A claim *holds* or *fails* only with ≥ {MIN_SEEDS_FOR_VERDICT} training seeds and a Holm-adjusted "
        "p < 0.05, on the side its point estimate lies; otherwise the numbers stand without a verdict. "
        "*Detectable at 80%* is the true difference this design would detect with 80% power. " + KID_EXCLUSION
    )
    if seeds < MIN_SEEDS_FOR_VERDICT:
        text += f" With {seeds} training seeds no verdict is possible: the numbers are shown, nothing is decided."
    if floor is not None:
        mean, sd, count = floor
        text += (
            f" **Real-data floor:** real training images against the same reference score FID {mean:.2f} ± {sd:.2f} "
            f"at {count} images (20 draws): that much of every FID below is finite-sample bias, not model error."
        )
    return text


def decisions_table(decisions: pd.DataFrame) -> list[str]:
    lines = [
        "| claim | run | baseline | FID | precision | recall | KID (no verdict) | FID detectable at 80% | verdicts (FID, precision, recall) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (claim, run, baseline), group in decisions.groupby(["claim", "run", "baseline"], sort=False):
        by_metric = group.set_index("metric")
        verdicts = ", ".join(by_metric.loc[m, "verdict"] for m in VERDICT_METRICS)
        note = by_metric.loc["fid", "note"]
        if note:
            verdicts = f"{verdicts} ({note})" if verdicts.strip("–, ") else note
        cells = [
            interval_text(by_metric.loc[m].to_frame().T.itertuples().__next__())
            for m in ("fid", "precision", "recall", "kid")
        ]
        lines.append(
            f"| {claim} | {run} | {baseline} | {' | '.join(cells)} | {_number(by_metric.loc['fid', 'detectable'], False)} | {verdicts} |"
        )
    return lines


def results_table(summary: pd.DataFrame) -> list[str]:
    """Per run, each metric's mean over training seeds with its seed-level interval; FID∞ (the FID extrapolated
    to infinitely many images) beside the raw FID where the run measured it."""
    metrics = [
        "fid",
        *(["fid_infinity"] if "fid_infinity" in summary and summary["fid_infinity"].notna().any() else []),
    ]
    metrics += ["precision", "recall", "kid"]
    names = {
        "fid": "FID",
        "fid_infinity": "FID∞",
        "precision": "precision",
        "recall": "recall",
        "kid": "KID (no verdict)",
    }
    lines = [
        "| run | kind | GFLOPs / image | " + " | ".join(names[m] for m in metrics) + " |",
        "|---|---|---|" + "---|" * len(metrics),
    ]
    for row in summary.sort_values("gflops_per_image").itertuples():
        parts = [
            f"{getattr(row, m):.3g} [{_number(getattr(row, m + '_low'), False)}, {_number(getattr(row, m + '_high'), False)}]"
            for m in metrics
        ]
        kind = f"{row.kind} (exploratory)" if str(getattr(row, "exploratory", False)) == "True" else row.kind
        lines.append(f"| {row.schedule} | {kind} | {row.gflops_per_image:.3g} | {' | '.join(parts)} |")
    return lines


def alias_lines(cells: pd.DataFrame, runs: list[Run]) -> list[str]:
    found = aliases(cells, runs)
    if not found:
        return []
    names = ", ".join(f"`{a}` = `{b}`" for a, b in found.items())
    return [
        f"Runs that drew exactly the same images in every cell are one schedule under two names, tested once: {names}."
    ]


# ---- re-deciding a published run ---------------------------------------------------------------------------

_REPLACED_SECTIONS = ("## Results", "## Paired differences", "## Ablations", "## The adaptive rule, diagnosed")


def redecide(data_dir: str | Path, floor: tuple[float, float, int] | None = None) -> pd.DataFrame:
    """Re-decide a published run from its committed per-cell rows: differences.csv and results.csv get the
    seed-level statistics, and REPORT.md beside data/ gets its verdict-bearing sections re-rendered (the other
    sections, which carry no verdicts, are kept as they were)."""
    data_dir = Path(data_dir)
    results = pd.read_csv(data_dir / "results.csv")
    cells, runs = cell_rows(results), runs_of(results)
    results = with_run_summaries(results, runs)
    summary = results[results["train_seed"].astype(str) == "all"]
    decisions = decide(cells, runs, "full")
    atomic_write(data_dir / "results.csv", lambda h: results.to_csv(h, index=False), binary=False)
    atomic_write(data_dir / "differences.csv", lambda h: decisions.to_csv(h, index=False), binary=False)
    report = data_dir.parent / "REPORT.md"
    atomic_write_text(report, rewrite_report(report.read_text(), decisions, summary, cells, runs, floor))
    return decisions


def _claim_rows(old_rows: list[str], decisions: pd.DataFrame) -> list[str]:
    """The paper's claims table: quality rows re-decided, other rows relabelled where they carried a verdict
    without an interval."""
    quality = decisions[decisions["metric"] == "fid"]
    out = []
    for line in old_rows:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        claim = cells[0]
        if claim.startswith("Query–key attention is redundant"):
            cells[2] = _VERDICT_WORDS.sub("", cells[2])
            cells[-1] = "descriptive only: one trained model recorded, no interval"
        elif claim.startswith("Mediators cost fewer FLOPs"):
            cells[-1] = "holds in FLOPs (an exact count); wall-clock not decided (single timings, no interval)"
        elif claim.startswith("Fewer mediators suffice"):
            cells[2] = "share of A·V lost by the best rank-n map, early → late: see the premise section"
            cells[-1] = "descriptive only: one trained model recorded"
        else:
            continue  # quality claims are rendered from the decisions below
        out.append("| " + " | ".join(cells) + " |")
    # The claims family's order: the networks' quality claims (conv-matched first), then the FLOPs and premise rows,
    # then the dynamic schedules' claims. Exploratory and repeated rows are in the paired-differences table only.
    networks, schedules = [], []
    for claim, group in quality.groupby("claim", sort=False):
        for row in group.itertuples():
            if row.note:
                continue
            line = (
                f"| {claim}: {row.run} − {row.baseline} | {_paper_evidence(row.run, row.baseline, claim)} | FID {interval_text(row)} "
                f"(per seed {row.per_seed}; Holm p {row.p_holm:.2g}) | {row.verdict} |"
            )
            (networks if _NETWORK_RUN.fullmatch(row.run) else schedules).append(line)
    return out[:1] + networks + out[1:] + schedules


# Runs of one trained network at every step (the counts, full attention and the ablations), not schedules.
_NETWORK_RUN = re.compile(r"med\d+(-noconv)?|full(-conv)?|conv")


def _paper_evidence(run: str, baseline: str, claim: str) -> str:
    count = int(run[3:]) if re.fullmatch(r"med\d+", run) else None
    if (
        claim in ("quality vs full attention", "mediators vs full attention with the same conv")
        and count is not None
        and count in PAPER_FID
    ):
        control = (
            "full attention"
            if claim == "quality vs full attention"
            else "full attention (no conv-matched run in the paper)"
        )
        return f"SiT-S/2 FID {PAPER_FID[None]} ({control}) → {PAPER_FID[count]} with n = {count} (secondary summary)"
    if claim == "dynamic vs static frontier at equal FLOPs":
        return "FID 2.01 for SiT-XL/2 with dynamic mediators vs 2.06 without (paper abstract)"
    return "no such comparison in the paper"


def rewrite_report(text: str, decisions, summary, cells, runs, floor) -> str:
    """The report with its verdict-bearing sections rendered from `decisions` (fresh, or read back from
    differences.csv, where empty notes come back as missing)."""
    decisions = decisions.assign(note=decisions["note"].fillna(""))
    sections = text.split("\n## ")
    head, rest = sections[0], ["## " + s for s in sections[1:]]
    # Paragraphs without their surrounding newlines, so a fresh report and a re-decided one join alike.
    paragraphs = [p.strip("\n") for p in head.split("\n\n") if p.strip("\n")]
    paragraphs = [p for p in paragraphs if not p.startswith("**Statistics.**")]
    quality = next(i for i, p in enumerate(paragraphs) if p.startswith("Quality uses"))
    paragraphs[quality] = paragraphs[quality].split(" Intervals are ")[0]
    paragraphs.insert(quality + 1, method_paragraph(decisions, floor))
    out = ["\n\n".join(paragraphs).rstrip()]
    for section in rest:
        title = section.split("\n", 1)[0]
        if title.startswith("## The paper's claims"):
            lines = section.rstrip().split("\n")
            table_start = next(i for i, line in enumerate(lines) if line.startswith("| claim"))
            table_end = next((i for i in range(table_start, len(lines)) if not lines[i].startswith("|")), len(lines))
            rows = _claim_rows(lines[table_start + 2 : table_end], decisions)
            section = "\n".join(lines[: table_start + 2] + rows + lines[table_end:])
        elif title.startswith(_REPLACED_SECTIONS[0]):
            section = "\n".join(
                ["## Results (mean over training seeds, [95% seed-level t-interval])", ""]
                + results_table(summary)
                + ["", "Per-cell rows (training seed × sampling seed) are in `data/results.csv`."]
            )
        elif title.startswith(_REPLACED_SECTIONS[1]):
            section = "\n".join(
                ["## Paired differences (run − baseline), the claims family in order of importance", ""]
                + decisions_table(decisions)
                + [""]
                + alias_lines(cells, runs)
                + ["", "Every row, with its per-seed differences and p-values, is in `data/differences.csv`."]
            )
        elif title.startswith(_REPLACED_SECTIONS[2]):
            section = "\n".join(
                [
                    title,
                    "",
                    "The ablation comparisons are rows of the claims family above (their claims name the component).",
                ]
            )
        elif title.startswith("## The premise"):
            caveat = "One trained model was recorded, so these are descriptions of it, not verdicts."
            section = _VERDICT_WORDS.sub("", section)
            if caveat not in section:
                section = section.replace("\n|", f"\n\n{caveat}\n\n|", 1)
        elif title.startswith(_REPLACED_SECTIONS[3]):
            section = _adaptive_section(section, decisions, summary)
        out.append(section.rstrip())
    return "\n\n".join(out) + "\n"


def _adaptive_section(section: str, decisions: pd.DataFrame, summary: pd.DataFrame) -> str:
    """The adaptive rule's table keeps its switch steps; its two comparison columns get the seed-level numbers."""
    run_of = dict(zip(summary["schedule"], summary["run"]))
    fid = decisions[decisions["metric"] == "fid"]

    def against(run: str, claim: str) -> str:
        row = fid[(fid["run"] == run) & (fid["claim"] == claim)]
        if row.empty:
            return "–"
        row = next(row.itertuples())
        return f"{interval_text(row)} ({row.verdict})"

    lines = []
    for line in section.rstrip().split("\n"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in run_of:
            run = run_of[cells[0]]
            cells[-2] = against(run, "per-sample switching vs the same switch steps for every sample")
            cells[-1] = against(run, "dynamic vs static frontier at equal FLOPs")
            line = "| " + " | ".join(cells) + " |"
        lines.append(line)
    return "\n".join(lines)
