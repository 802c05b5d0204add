"""One attention layer (width 384, 6 heads, batch 1) against the token count: time ratios beside FLOP ratios.

Candidates: full attention through fused SDPA, full attention explicit (softmax(QKᵀ)V, what recording costs),
and mediator attention with n = 4, 16, 64. The speed-up of mediator attention over SDPA is compared with its
FLOP ratio, the arithmetic limit: the share of it reached, forward and forward+backward (the goal: 90% at 1024
tokens and above).

    python benchmarks/attention_scaling.py [--tokens 256 1024 4096 16384] [--rounds 5]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, markdown_table, write_section  # noqa: E402

from mediator_models.network.attention import FullAttention, MediatorAttention  # noqa: E402

WIDTH, HEADS = 384, 6
EXPLICIT_MAP_LIMIT_BYTES = 4 * 2**30  # skip the explicit path when its N×N maps would not fit comfortably


def layer_macs(tokens: int, mediators: int | None) -> int:
    linear = 4 * tokens * WIDTH * WIDTH  # qkv and proj
    if mediators is None:
        return linear + 2 * tokens * tokens * WIDTH
    return linear + 4 * mediators * tokens * WIDTH + 10 * tokens * WIDTH


def candidates_for(tokens: int, device: torch.device):
    grid = math.isqrt(tokens)
    full = FullAttention(WIDTH, HEADS).to(device)
    explicit = FullAttention(WIDTH, HEADS).to(device)
    explicit.load_state_dict(full.state_dict())
    explicit.map_observer = lambda maps: None  # forces the explicit path, keeps nothing
    layers = {"full SDPA": (full, None)}
    if HEADS * tokens * tokens * 4 * 3 < EXPLICIT_MAP_LIMIT_BYTES:
        layers["full explicit"] = (explicit, None)
    for n in (4, 16, 64):
        layers[f"mediator n={n}"] = (MediatorAttention(WIDTH, HEADS, grid, n).to(device), n)
    return layers


def run(tokens_list: list[int], rounds: int, device: torch.device) -> str:
    rows = []
    for tokens in tokens_list:
        layers = candidates_for(tokens, device)
        x = torch.randn(1, tokens, WIDTH, device=device)
        x_grad = x.clone().requires_grad_(True)
        forward = {name: (lambda m=m: m(x)) for name, (m, _) in layers.items()}
        backward = {name: (lambda m=m: m(x_grad).sum().backward()) for name, (m, _) in layers.items()}
        n_rounds = rounds if tokens <= 4096 else max(2, rounds // 2)
        with torch.no_grad():
            fwd = interleaved_medians(forward, n_rounds)
        bwd = interleaved_medians(backward, n_rounds)
        base_macs = layer_macs(tokens, None)
        for name, (_, mediators) in layers.items():
            flop_ratio = base_macs / layer_macs(tokens, mediators)
            speed_fwd = fwd["full SDPA"] / fwd[name]
            speed_bwd = bwd["full SDPA"] / bwd[name]
            rows.append(
                [
                    tokens,
                    name,
                    f"{fwd[name] * 1e3:.2f}",
                    f"{bwd[name] * 1e3:.2f}",
                    f"{flop_ratio:.2f}",
                    f"{speed_fwd:.2f}",
                    f"{speed_bwd:.2f}",
                    f"{speed_fwd / flop_ratio:.0%}",
                    f"{speed_bwd / flop_ratio:.0%}",
                ]
            )
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    header = [
        "tokens",
        "layer",
        "fwd ms",
        "fwd+bwd ms",
        "FLOP ratio vs SDPA",
        "fwd speed-up",
        "fwd+bwd speed-up",
        "share of the FLOP ratio, fwd",
        "fwd+bwd",
    ]
    return markdown_table(header, rows) + "\n\n" + goal_summary(rows)


def goal_summary(rows: list[list]) -> str:
    """Which mediator layers at 1024 tokens and above reach 90% of their FLOP ratio in this run, by pass."""
    judged = [r for r in rows if r[0] >= 1024 and str(r[1]).startswith("mediator")]
    parts = []
    for column, label in ((7, "forward"), (8, "forward+backward")):
        met = [f"{r[0]} tokens {r[1].removeprefix('mediator ')}" for r in judged if float(r[column].rstrip("%")) >= 90]
        shares = [float(r[column].rstrip("%")) for r in judged]
        parts.append(
            f"{label}: {min(shares):.0f}–{max(shares):.0f}% of the FLOP ratio, the goal met at "
            + (", ".join(met) if met else "none")
        )
    return "In this run, at 1024 tokens and above, " + "; ".join(parts) + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    table = run(args.tokens, args.rounds, device)
    note = (
        "One attention layer, width 384, 6 heads, batch 1, median of interleaved rounds. Speed-ups and FLOP "
        "ratios are relative to full attention with fused SDPA; the last two columns are the share of the "
        "arithmetic limit (the FLOP ratio) that the measured speed-up reaches (the goal: 90% at 1024 tokens and "
        "above). "
        "Mediator attention first ran at 1.5-2.0x its FLOP ratio at 4096 tokens: the time went to resizing the "
        "7x7 bias tables with F.interpolate (16 ms of 115), transposing v for the depthwise conv (12 ms), "
        "transposing q for the pooling (6 ms) and adding non-contiguous biases. Now the tables are resized as "
        "R·T·Rᵀ and cached while autograd is off, q is pooled by a reshaped mean (a matmul with the pooling "
        "matrix is 2-6x faster but spends n·N·C multiply-adds the FLOP count does not have), the conv runs "
        "channels-last. What is left at 1024 tokens is memory-bound work the FLOP "
        "count does not see: the bias broadcast into qkv's output, the copy of the strided v into the conv's "
        "channels-last input, and the small n-key softmaxes (in the backward, SDPA's math path for a bias that "
        "needs its gradient)."
    )
    write_section(f"attention_scaling ({device.type})", note + "\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
