"""How accurate JSD, entropy and cosine from sampled query rows are on a trained model's maps at 4096 tokens.

Above `SAMPLE_ROWS_ABOVE_TOKENS` query rows the recorder estimates the measures that average over queries from
`RECORDING_QUERY_ROWS` rows drawn per map, computing only those rows. This trains SiT-T/1 on the digits at 16×16
(256 tokens, as jsd_accuracy and sketch_accuracy do), runs the trained weights at a 64×64 grid (4096 tokens; the
position embedding is DiT's fixed sin-cos table, remade for the larger grid as when a DiT samples at another
resolution), samples with the SDE, and compares every map's estimate with the value over all rows: entropy and
cosine exact, JSD from 65536 pairs over all rows (its own relative standard error is below 0.1%). Writes the
"row_accuracy" section of RESULTS.md.

    python benchmarks/row_accuracy.py [--steps 300] [--samples 1] [--sde-steps 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.metrics import (  # noqa: E402
    CHEAP_METRICS,
    RECORDING_JSD_PAIRS,
    RECORDING_QUERY_ROWS,
    jsd_redundancy,
    measure,
    metric_reducer,
)
from benchmarks.common import markdown_table, trained_model, write_section  # noqa: E402
from mediator_models.network.dit import DiffusionTransformer  # noqa: E402
from mediator_models.recording.recorder import record_attention  # noqa: E402
from mediator_models.sampling.generation import SamplerConfig, generate  # noqa: E402
from mediator_models.sampling.steps import start_batch  # noqa: E402

REFERENCE_PAIRS = 65536
INPUT_SIZE = 64  # 4096 tokens at patch 1


def at_input_size(model: DiffusionTransformer, input_size: int) -> DiffusionTransformer:
    """The trained network on a larger grid: every tensor but the fixed sin-cos position table, remade there."""
    larger = DiffusionTransformer(dataclasses.replace(model.config, input_size=input_size)).eval()
    weights = {name: tensor for name, tensor in model.state_dict().items() if name != "pos_embed"}
    missing, unexpected = larger.load_state_dict(weights, strict=False)
    if list(missing) != ["pos_embed"] or unexpected:
        raise RuntimeError(f"the weights do not carry over: missing {missing}, unexpected {unexpected}")
    return larger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps of the 256-token model")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--sde-steps", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        loaded = trained_model(args.steps, Path(tmp))
    model = at_input_size(loaded.model, INPUT_SIZE)
    depth, tokens = model.config.depth, model.config.num_tokens
    sampled_reducer = metric_reducer(CHEAP_METRICS)
    rows: list[dict] = []
    seconds = {"sampled rows": 0.0, "all rows": 0.0}

    def reducer(maps):
        call = len(rows) // (maps.shape[0] * maps.shape[1])
        started = time.perf_counter()
        estimate = sampled_reducer(maps)  # first, while the 4096×4096 maps are not computed yet
        seconds["sampled rows"] += time.perf_counter() - started
        started = time.perf_counter()
        full = maps.effective
        measure(full, CHEAP_METRICS, jsd_pairs=RECORDING_JSD_PAIRS)  # what recording every row costs
        seconds["all rows"] += time.perf_counter() - started
        exact = measure(full, ("entropy", "cosine"))
        exact["jsd"] = jsd_redundancy(full, max_pairs=REFERENCE_PAIRS)
        for sample in range(full.shape[0]):
            for head in range(full.shape[1]):
                rows.append(
                    {"evaluation": call // depth, "layer": call % depth}
                    | {f"exact_{m}": float(exact[m][sample, head]) for m in CHEAP_METRICS}
                    | {f"rows_{m}": float(estimate[m][sample, head]) for m in CHEAP_METRICS}
                )
        return estimate

    x_T, y, noise = start_batch(list(range(args.samples)), 0, model.config, None, "cpu")
    with record_attention(model, reducer) as recorder:
        generate(
            model,
            loaded.process,
            SamplerConfig(kind="sde", steps=args.sde_steps),
            x_T,
            y,
            callback=recorder.callback,
            noise_fn=noise,
        )
    table_rows = []
    for name in CHEAP_METRICS:
        exact = np.array([r[f"exact_{name}"] for r in rows])
        estimate = np.array([r[f"rows_{name}"] for r in rows])
        error = np.abs(estimate - exact) / np.maximum(np.abs(exact), 1e-12)
        groups: dict[tuple, list[int]] = {}
        for index, r in enumerate(rows):
            groups.setdefault((r["evaluation"], r["layer"]), []).append(index)
        of_mean = [
            abs(estimate[i].mean() - exact[i].mean()) / max(abs(exact[i].mean()), 1e-12) for i in groups.values()
        ]
        table_rows.append(
            [
                name,
                f"{np.median(exact):.4g}",
                f"{np.median(error):.2%}",
                f"{np.percentile(error, 95):.2%}",
                f"{error.max():.2%}",
                f"{np.mean(estimate - exact) / np.mean(np.abs(exact)):+.2%}",
                f"{max(of_mean):.2%}",
            ]
        )
    maps = len(rows)
    body = (
        f"SiT-T/1 trained {args.steps} steps on the digits at 16×16, run at {INPUT_SIZE}×{INPUT_SIZE} ({tokens} "
        f"tokens), SDE {args.sde_steps} steps, {args.samples} sample(s): {maps} maps of {tokens}×{tokens}. Each "
        f"map's estimate from {RECORDING_QUERY_ROWS} sampled query rows (the recorder's default above 2048 tokens) "
        f"against all rows (JSD: {REFERENCE_PAIRS} pairs over all rows). Relative error per map; 'bias' is the mean "
        "signed error over all maps; 'error of a row's mean' is the worst over (evaluation, layer) of the mean "
        "over its heads, what a table row holds.\n\n"
        + markdown_table(
            ["measure", "all rows (median)", "median error", "95th pct", "max", "bias", "error of a row's mean"],
            table_rows,
        )
        + f"\n\nSeconds per map for the three measures: {seconds['sampled rows'] / maps:.3f} from sampled rows "
        f"(the rows computed from queries and keys), {seconds['all rows'] / maps:.3f} from all rows of the "
        f"computed map (map included), {seconds['all rows'] / max(seconds['sampled rows'], 1e-9):.1f}× more."
    )
    print(body)
    write_section("row_accuracy", body)


if __name__ == "__main__":
    main()
