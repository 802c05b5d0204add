"""Peak memory of recording, beside plain sampling, at 1024, 4096 and 16384 tokens, under a map-memory bound.

The recorder computes and reduces a layer's maps a few (sample, head) maps at a time, as many as
`--map-memory` allows at `MAP_ENTRY_BYTES` per map entry. This measures what that bound is worth: the peak resident
memory of one recorded sampling step against the same step unrecorded, in a fresh process per size (the kernel's
high-water mark, VmHWM, reset between the two). The model is narrow (SiT-T/1: 4 layers, width 128, 4 heads) so
the maps, not the network, dominate; one image, the cheap measures (JSD from 2048 sampled pairs per map, entropy,
cosine), every layer recorded.

    python benchmarks/recorder_memory.py [--tokens 1024 4096 16384] [--map-memory 512MiB]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: the peak is measured on Linux only")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size


def measure(tokens: int, map_memory: int, steps: int = 1) -> dict:
    """In this process: peak resident bytes of one sampling step unrecorded and recorded, and seconds."""
    import torch

    from analysis.metrics import CHEAP_METRICS, metric_reducer
    from mediator_models import build_model
    from mediator_models.recording.recorder import record_attention
    from mediator_models.sampling.generation import ProcessConfig, SamplerConfig, generate
    from mediator_models.sampling.steps import start_batch

    side = math.isqrt(tokens)
    torch.manual_seed(0)
    model = build_model("SiT-T/1", input_size=side, in_channels=1, num_classes=10).eval()
    sampler = SamplerConfig(kind="ode", method="euler", steps=steps)
    x_T, y, _ = start_batch([0], 0, model.config, None, "cpu")
    process = ProcessConfig("SiT")
    generate(model, process, sampler, x_T, y)  # warm: allocator pools and kernels
    _reset_peak()
    start = time.perf_counter()
    generate(model, process, sampler, x_T, y)
    plain = (_peak_bytes(), time.perf_counter() - start)
    _reset_peak()
    start = time.perf_counter()
    with record_attention(model, metric_reducer(CHEAP_METRICS), map_memory=map_memory) as recorder:
        generate(model, process, sampler, x_T, y, callback=recorder.callback)
    recorded = (_peak_bytes(), time.perf_counter() - start)
    assert recorder.rows(), "nothing was recorded"
    return {
        "tokens": tokens,
        "map_memory": map_memory,
        "plain_peak": plain[0],
        "recorded_peak": recorded[0],
        "extra": recorded[0] - plain[0],
        "plain_s": plain[1],
        "recorded_s": recorded[1],
        "one_map": tokens * tokens * 4,
    }


def measure_in_fresh_process(tokens: int, map_memory: int) -> dict:
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import json, recorder_memory as r; "
    code += f"print(json.dumps(r.measure({tokens}, {map_memory})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode:
        raise RuntimeError(f"measuring {tokens} tokens failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(count: int) -> str:
    return f"{count / 2**20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--map-memory", default="512MiB", help="the recorder's bound (e.g. 512MiB)")
    args = parser.parse_args()
    from analysis.cli import _byte_size
    from mediator_models.recording.recorder import MAP_ENTRY_BYTES

    rows = []
    for tokens in args.tokens:
        budget = max(_byte_size(args.map_memory), tokens * tokens * MAP_ENTRY_BYTES)  # at least one map
        result = measure_in_fresh_process(tokens, budget)
        # The same step with the whole layer's maps at once, where that fits this machine (below 8 GiB of maps).
        whole = measure_in_fresh_process(tokens, 2**40)["extra"] if tokens * tokens * 16 <= 8 * 2**30 else None
        rows.append(
            [
                tokens,
                mib(budget),
                mib(result["one_map"]),
                mib(result["plain_peak"]),
                mib(result["recorded_peak"]),
                mib(result["extra"]),
                f"{result['extra'] / budget:.2f}",
                "—" if whole is None else mib(whole),
                f"{result['recorded_s'] / result['plain_s']:.1f}×",
            ]
        )
        print(rows[-1], flush=True)
    header = ["tokens", "bound MiB", "one map MiB", "plain peak MiB", "recorded peak MiB", "extra MiB"]
    header += ["extra / bound", "extra unbounded MiB", "time ratio"]
    table = markdown_table(header, rows)
    print(table)
    write_section(
        "recorder_memory",
        "Peak resident memory of one recorded sampling step (SiT-T/1, 4 layers, width 128, 4 heads, one image, "
        "cheap measures, every layer) against the same step unrecorded, each size in a fresh process. The bound "
        f"is `--map-memory` ({args.map_memory}), raised to one map's estimate ({MAP_ENTRY_BYTES} bytes per entry) "
        "where a single map needs more; the extra peak stays within it. 'extra unbounded' is the same step reducing "
        "each layer's maps all at once (not run where that would not fit this machine).\n\n" + table,
    )


if __name__ == "__main__":
    main()
