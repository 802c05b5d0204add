"""Shared benchmark helpers: interleaved timing, machine description, and the RESULTS.md sections.

Timings on a shared 2-core machine are noisy, so every benchmark measures its candidates side by side in
one run, interleaved round by round, and reports medians and ratios rather than absolute times.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from datetime import date
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_medians(candidates: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each candidate, measured round-robin so drifts in load hit all alike."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, body: str) -> None:
    """Replace this benchmark's section of RESULTS.md (other benchmarks' sections are kept)."""
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else "# Benchmark results\n\nLatest run of each script in benchmarks/.\n"
    )
    section = (
        f"<!-- {name}:start -->\n## {name}\n\n_{date.today()}, {machine()}_\n\n{body.strip()}\n<!-- {name}:end -->"
    )
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(RESULTS)


def trained_map_payloads(steps: int, samples: int, folder: Path) -> list[dict]:
    """Attention maps of a trained model at the paper's grid, for accuracy benchmarks: SiT-T/1 trained `steps`
    steps on the digits at 16×16 with patch 1 (256 tokens; enough for local and global patterns to form), sampled
    with the SDE (20 steps) and the recorder keeping every layer's maps at four steps. One kept-map payload per
    (step, layer): "effective" (samples, heads, 256, 256), "step", "layer", "noise_level"."""
    from analysis.metrics import metric_reducer
    from mediator_models.recording.recorder import record_attention
    from mediator_models.sampling.generation import SamplerConfig, generate
    from mediator_models.sampling.steps import start_batch

    loaded = trained_model(steps, folder)
    keep = [(step, layer) for step in (0, 6, 12, 19) for layer in range(loaded.model.config.depth)]
    x_T, y, noise = start_batch(list(range(samples)), 0, loaded.model.config, None, "cpu")
    with record_attention(
        loaded.model, metric_reducer(("entropy",)), keep_maps=keep, keep_dir=folder / "maps"
    ) as recorder:
        sampler = SamplerConfig(kind="sde", steps=20)
        generate(loaded.model, loaded.process, sampler, x_T, y, callback=recorder.callback, noise_fn=noise)
    return [torch.load(path, weights_only=False) for path in sorted((folder / "maps").glob("*.pt"))]


def trained_model(steps: int, folder: Path):
    """SiT-T/1 trained `steps` steps on the digits at 16×16 with patch 1 (256 tokens), loaded to sample."""
    from mediator_models.sample import load_for_sampling
    from mediator_models.train import TrainConfig, train

    torch.manual_seed(0)
    run = train(
        TrainConfig(
            model="SiT-T/1",
            steps=steps,
            lr=1e-3,
            ema_decay=0.99,
            global_batch_size=32,
            ckpt_every=steps,
            out=str(folder / "train"),
            progress=False,
        )
    )
    return load_for_sampling(run / "checkpoints" / f"{steps:07d}.pt")
