"""Images per second of one training step (forward, backward, AdamW), full attention against mediators.

CPU: the small config on the embedded digits' shape (SiT-T/2 at 16×16×1: 64 tokens) and at 32×32×4 latents
(256 tokens). GPU (when present): DiT-S/2 and SiT-S/2 at 256 px (32×32×4 latents), as in the paper.

Optionally `--public-models PATH` names a local copy of the public mediator code's `models.py` (not part of
this repository; it needs timm). Its AttentionWithMediators is then timed beside ours in the same run, on
the same weights, and the two outputs are compared.

    python benchmarks/train_throughput.py [--rounds 5] [--public-models /tmp/public/models.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, markdown_table, write_section  # noqa: E402

from mediator_models import build_model, config_gmacs  # noqa: E402
from mediator_models.network.attention import MediatorAttention  # noqa: E402
from mediator_models.sampling.generation import ProcessConfig  # noqa: E402
from mediator_models.train import backward_on_batch  # noqa: E402


def training_step(model, batch: int, device):
    process = ProcessConfig(model.config.family).build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        backward_on_batch(model, process, x, y)
        opt.step()

    return step


def model_rows(cases, batch: int, rounds: int, device) -> list[list[object]]:
    rows = []
    for name, input_size, channels in cases:
        steps, models = {}, {}
        for attention, n in (("full", None), ("mediator", 4), ("mediator", 16), ("mediator", 64)):
            grid = input_size // int(name.split("/")[1])
            if n is not None and n > grid * grid:
                continue
            model = (
                build_model(
                    name, input_size=input_size, in_channels=channels, num_classes=10, attention=attention, mediators=n
                )
                .to(device)
                .train()
            )
            label = "full" if n is None else f"mediator n={n}"
            steps[label], models[label] = training_step(model, batch, device), model
        times = interleaved_medians(steps, rounds)
        for label, seconds in times.items():
            gmacs = config_gmacs(models[label].config)
            rows.append(
                [
                    f"{name} @{input_size}x{input_size}x{channels}",
                    label,
                    batch,
                    f"{gmacs:.3f}",
                    f"{batch / seconds:.1f}",
                    f"{times['full'] / seconds:.2f}",
                ]
            )
            print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


def public_attention_rows(path: str, rounds: int, device) -> list[list[object]]:
    """Time the public AttentionWithMediators against ours on identical weights, and compare outputs."""
    spec = importlib.util.spec_from_file_location("public_mediator_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = []
    for grid, n in ((16, 4), (16, 16), (16, 64), (32, 64), (64, 64)):
        ours = MediatorAttention(384, 6, grid, n).to(device)
        theirs = module.AttentionWithMediators(384, latent_size=(grid, grid), num_heads=6, mediator_num=n).to(device)
        theirs.load_state_dict(ours.state_dict())  # identical parameter names and shapes
        x = torch.randn(8, grid * grid, 384, device=device)
        with torch.no_grad():
            difference = (ours(x) - theirs(x)).abs().max().item()
            times = interleaved_medians({"ours": lambda: ours(x), "public": lambda: theirs(x)}, rounds)
        rows.append(
            [
                grid * grid,
                n,
                f"{difference:.1e}",
                f"{times['public'] * 1e3:.1f}",
                f"{times['ours'] * 1e3:.1f}",
                f"{times['public'] / times['ours']:.2f}",
            ]
        )
        print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--public-models", default=None, help="local copy of the public mediator models.py")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if device.type == "cuda":
        cases = [("DiT-S/2", 32, 4), ("SiT-S/2", 32, 4)]
    else:
        cases = [("SiT-T/2", 16, 1), ("SiT-T/2", 32, 4)]
    rows = model_rows(cases, args.batch, args.rounds, device)
    body = (
        "Training step (forward, backward, AdamW) at batch %d, median of interleaved rounds; GFLOPs are "
        "forward MACs per image (the papers' convention).\n\n" % args.batch
    )
    body += markdown_table(["model", "attention", "batch", "GFLOPs/img", "images/s", "speed vs full"], rows)
    if args.public_models:
        public = public_attention_rows(args.public_models, args.rounds, device)
        body += (
            "\n\nThe public AttentionWithMediators (its models.py, run from a local copy outside the "
            "repository) against ours: one layer, width 384, 6 heads, batch 8, forward, same weights.\n\n"
        )
        body += markdown_table(
            ["tokens", "mediators", "max abs(ours − public)", "public ms", "ours ms", "our speed-up"], public
        )
    write_section(f"train_throughput ({device.type})", body)
    print(body)


if __name__ == "__main__":
    main()
