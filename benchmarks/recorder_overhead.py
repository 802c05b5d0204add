"""Cost of recording, against goals: sampling with the recorder and (a) the default measures (JSD score, entropy,
cosine), (b) all measures (adding the singular-value ranks), as ratios to sampling without it, measured side by
side in one run (interleaved rounds, medians).

Goals: on SiT-S/2 at 256 tokens, (a) ≤ 1.5× and (b) ≤ 2×; at 4096 tokens (b) ≤ 3×. The demo model
(SiT-T/2 at 64 tokens) is timed too, without a goal. At 256 tokens the cheap measures are timed once more with
512 JSD pairs per map (`--jsd-pairs 512`), the trade whose error jsd_accuracy measures.

It also times the pieces of a DiT-XL/2 collection at 256 px and of a PixArt-size transformer at 1024 px (4096
tokens: DiT-XL/2's 28 layers, width 1152 and 16 heads on a 128×128 latent) on this machine (one forward pass,
one layer's maps through the metrics) and extrapolates the full collections (the README's estimates).

    python benchmarks/recorder_overhead.py [--rounds 3] [--skip-xl]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, markdown_table, write_section  # noqa: E402

from analysis.metrics import ALL_METRICS, CHEAP_METRICS, metric_reducer  # noqa: E402
from mediator_models import build_model  # noqa: E402
from mediator_models.network.attention import AttentionMaps  # noqa: E402
from mediator_models.recording.recorder import record_attention  # noqa: E402
from mediator_models.sampling.generation import ProcessConfig, SamplerConfig, generate  # noqa: E402
from mediator_models.sampling.steps import start_batch  # noqa: E402

# JSD pairs per map of the cheaper recording (`--jsd-pairs 512`); its error on trained maps: jsd_accuracy.
FEWER_PAIRS = 512

# (label, model name, build options, batch, SDE steps, goals {recorder: ratio})
CASES = (
    ("demo model", "SiT-T/2", {"input_size": 16, "in_channels": 1, "num_classes": 10}, 8, 50, {}),
    (
        "SiT-S/2, 256 tokens",
        "SiT-S/2",
        {"input_size": 32, "in_channels": 4, "num_classes": 1000},
        4,
        4,
        {"cheap": 1.5, "all": 2.0},
    ),
    ("narrow SiT, 4096 tokens", "SiT-T/1", {"input_size": 64, "in_channels": 1, "num_classes": 10}, 1, 2, {"all": 3.0}),
)


def sampling_ratios(rounds: int) -> list[list[object]]:
    rows = []
    for label, name, options, batch, steps, goals in CASES:
        model = build_model(name, **options).eval()
        with torch.no_grad():  # adaLN-Zero starts every block as the identity: give the blocks something to do
            for parameter_name, p in model.named_parameters():
                if "adaLN" in parameter_name or "final_layer.linear" in parameter_name:
                    p.normal_(0, 0.05)
        sampler = SamplerConfig(kind="sde", steps=steps)
        x_T, y, noise = start_batch(list(range(batch)), 0, model.config, None, "cpu")

        def plain():
            generate(model, ProcessConfig("SiT"), sampler, x_T, y)

        def recorded(metrics, **options):
            def run():
                with record_attention(model, metric_reducer(metrics, **options)) as recorder:
                    generate(model, ProcessConfig("SiT"), sampler, x_T, y, callback=recorder.callback)

            return run

        candidates = {"none": plain, "cheap": recorded(CHEAP_METRICS), "all": recorded(ALL_METRICS)}
        if model.config.num_tokens == 256:  # the JSD's pairs are most of the cheap cost: the trade at fewer
            candidates[f"cheap, {FEWER_PAIRS} pairs"] = recorded(CHEAP_METRICS, jsd_pairs=FEWER_PAIRS)
        times = interleaved_medians(candidates, rounds if model.config.num_tokens < 4096 else 1)
        for key in candidates:
            ratio = times[key] / times["none"]
            goal = goals.get(key.split(",")[0])
            verdict = "–" if goal is None else ("met" if ratio <= goal else "not met")
            rows.append(
                [
                    f"{label}: {model.config.label}",
                    f"SDE {steps} steps, batch {batch}",
                    key,
                    f"{times[key]:.2f}",
                    f"{ratio:.2f}",
                    "–" if goal is None else f"≤ {goal:g}×",
                    verdict,
                ]
            )
            print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


def collection_estimate(
    label: str, input_size: int, batch: int, samples: int, steps: int, guided: bool
) -> tuple[str, dict[str, float]]:
    """Time one DiT-XL/2-shaped forward at `input_size` (32: 256 px, 256 tokens; 128: 1024 px, 4096 tokens) and
    one layer's maps through the metrics; extrapolate `samples` × `steps` over the 28 layers (twice with
    guidance). Returns the lines and the hours per recorder."""
    torch.manual_seed(0)
    model = build_model("DiT-XL/2", input_size=input_size).eval()
    tokens, heads = model.config.num_tokens, model.config.num_heads
    x = torch.randn(batch, 4, input_size, input_size)
    t, y = torch.full((batch,), 500.0), torch.zeros(batch, dtype=torch.long)
    with torch.no_grad():
        model(x, t, y)
        start = time.perf_counter()
        model(x, t, y)
        forward = time.perf_counter() - start
    queries, keys = torch.randn(batch, heads, tokens, 72), torch.randn(batch, heads, tokens, 72)
    maps = AttentionMaps("full", full=torch.softmax(queries @ keys.transpose(-2, -1) * 72**-0.5 * 3, dim=-1))
    per_layer = {}
    for recorder, metrics in (("cheap", CHEAP_METRICS), ("all", ALL_METRICS)):
        reducer = metric_reducer(metrics)  # what the recorder runs, JSD over its fixed pairs included
        reducer(maps)
        start = time.perf_counter()
        reducer(maps)
        per_layer[recorder] = time.perf_counter() - start
    del maps
    factor = 2 if guided else 1
    lines = [
        f"{label} ({tokens} tokens, {heads} heads) on this machine, batch {batch}: one forward {forward:.1f} s; one "
        f"layer's maps through the metrics: cheap {per_layer['cheap']:.2f} s, all {per_layer['all']:.2f} s."
    ]
    hours = {"none": factor * forward * steps * samples / batch / 3600}
    for recorder in ("cheap", "all"):
        per_step = forward + model.config.depth * per_layer[recorder]
        hours[recorder] = factor * per_step * steps * samples / batch / 3600
        lines.append(
            f"- {samples} samples × {steps} steps{', guided' if guided else ''}, {recorder} metrics: about "
            f"{hours[recorder]:.1f} h ({per_step:.1f} s per step and batch; unrecorded sampling {hours['none']:.2f} h)."
        )
    return "\n".join(lines), hours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-xl", action="store_true", help="skip the DiT-XL/2 estimate (allocates 2.7 GB)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = sampling_ratios(args.rounds)
    body = (
        "Sampling seconds (median of interleaved rounds; one round at 4096 tokens) and the ratio to unrecorded "
        "sampling, against the goals (random weights: the cost does not depend on them).\n\n"
        + markdown_table(["model", "run", "recorder", "seconds", "ratio", "goal", ""], rows)
    )
    if not args.skip_xl:
        for label, size, batch, samples, steps, guided in (
            ("DiT-XL/2 at 256 px", 32, 8, 32, 250, False),
            ("PixArt-size transformer at 1024 px", 128, 1, 8, 20, True),
        ):
            estimate, _ = collection_estimate(label, size, batch, samples, steps, guided)
            print(estimate, flush=True)
            body += "\n\n" + estimate
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        body += f"\n\nPeak resident memory of these measurements: {peak_gb:.1f} GB."
    write_section("recorder_overhead (cpu)", body)
    print(body)


if __name__ == "__main__":
    main()
