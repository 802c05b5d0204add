"""Cost of recording: sampling with the recorder and (a) the cheap metrics (JSD score, entropy, cosine),
(b) all metrics (adding the singular-value ranks), against sampling without it, as ratios in one run.
Goal: (a) under 2× the unrecorded time with sampled JSD pairs; the exact JSD at 64 tokens (the default there) costs more.

It also times the pieces of a DiT-XL/2 collection at 256 px on this machine (one forward pass at the
collection's batch, one layer's maps through the metrics) and extrapolates the full collection of the paper
(28 layers, 16 heads, 256 tokens, 250 steps, 32 samples), with its peak memory.

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


def sampling_ratios(rounds: int, batch: int) -> list[list[object]]:
    rows = []
    for attention, n in (("full", None), ("mediator", 16)):
        model = build_model(
            "SiT-T/2", input_size=16, in_channels=1, num_classes=10, attention=attention, mediators=n
        ).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "adaLN" in name or "final_layer.linear" in name:
                    p.normal_(0, 0.05)
        sampler = SamplerConfig(kind="sde", steps=50)
        x_T, y, noise = start_batch(list(range(batch)), 0, model.config, None, "cpu")

        def plain():
            generate(model, ProcessConfig("SiT"), sampler, x_T, y)

        def recorded(metrics):
            def run():
                with record_attention(model, metric_reducer(metrics)) as recorder:
                    generate(model, ProcessConfig("SiT"), sampler, x_T, y, callback=recorder.callback)

            return run

        times = interleaved_medians(
            {"none": plain, "cheap": recorded(CHEAP_METRICS), "all": recorded(ALL_METRICS)}, rounds
        )
        for key in ("none", "cheap", "all"):
            rows.append(
                [
                    model.config.label,
                    f"SDE 50 steps, batch {batch}",
                    key,
                    f"{times[key]:.2f}",
                    f"{times[key] / times['none']:.2f}",
                ]
            )
            print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


def xl_estimate(batch: int = 8, samples: int = 32, steps: int = 250) -> str:
    """Time one DiT-XL/2 forward at `batch` and one layer's maps through the metrics; extrapolate."""
    torch.manual_seed(0)
    model = build_model("DiT-XL/2").eval()
    x, t, y = torch.randn(batch, 4, 32, 32), torch.full((batch,), 500.0), torch.zeros(batch, dtype=torch.long)
    with torch.no_grad():
        model(x, t, y)
        start = time.perf_counter()
        model(x, t, y)
        forward = time.perf_counter() - start
    maps = AttentionMaps("full", full=torch.softmax(torch.randn(batch, 16, 256, 256) * 3, dim=-1))
    per_layer = {}
    for label, metrics in (("cheap", CHEAP_METRICS), ("all", ALL_METRICS)):
        reducer = metric_reducer(metrics)  # what the recorder runs, JSD over its fixed pairs included
        reducer(maps)
        start = time.perf_counter()
        reducer(maps)
        per_layer[label] = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    batches = samples // batch
    lines = [
        f"DiT-XL/2 at 256 px on this machine, batch {batch}: one forward {forward:.1f} s; one layer's maps "
        f"through the metrics: cheap {per_layer['cheap']:.2f} s, all {per_layer['all']:.2f} s."
    ]
    for label in ("cheap", "all"):
        per_step = forward + 28 * per_layer[label]
        hours = per_step * steps * batches / 3600
        lines.append(
            f"- {samples} samples × {steps} steps, {label} metrics, no guidance: about {hours:.1f} h "
            f"({per_step:.1f} s per step and batch); with guidance about {2 * hours:.1f} h."
        )
    lines.append(
        f"- Peak resident memory of this measurement: {peak_gb:.1f} GB (weights 2.7 GB; one layer's maps "
        f"at batch {batch} are {batch * 16 * 256 * 256 * 4 / 2**20:.0f} MB, reduced in the hook)."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-xl", action="store_true", help="skip the DiT-XL/2 estimate (allocates 2.7 GB)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = sampling_ratios(args.rounds, 8) + sampling_ratios(args.rounds, 32)
    body = "Sampling seconds (median of interleaved rounds) and the ratio to unrecorded sampling.\n\n" + markdown_table(
        ["model", "run", "recorder", "seconds", "ratio"], rows
    )
    if not args.skip_xl:
        estimate = xl_estimate()
        print(estimate)
        body += "\n\n" + estimate
    write_section("recorder_overhead (cpu)", body)
    print(body)


if __name__ == "__main__":
    main()
