"""The `attnmed` command line: one subcommand per step of the study, each a thin wrapper over a function."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

import torch

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help_text: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register `run(args) -> exit code` as subcommand `name`."""

    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help_text, configure, run)
        return run

    return register


def _add_model_shape(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-size", type=int, default=32, help="spatial side of the model input (32 = 256 px latents)")
    parser.add_argument("--attention", choices=("full", "mediator"), default="full")
    parser.add_argument("--mediators", type=int, default=None, help="mediator count n (a perfect square)")


def _configure_models(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-size", type=int, default=32, help="spatial side of the model input (32 = 256 px latents)")
    parser.add_argument("--small", action="store_true", help="also list the small CPU configs")


@command("models", "list the model registry with parameter counts and GFLOPs", _configure_models)
def run_models(args: argparse.Namespace) -> int:
    from mediator_models import build_model, model_gmacs, registry_names

    print(f"{'name':<10} {'depth':>5} {'hidden':>6} {'heads':>5} {'tokens':>6} {'params (M)':>11} {'GFLOPs':>8}")
    for name in registry_names(include_small=args.small):
        with torch.device("meta"):  # shapes only: no weights are allocated
            model = build_model(name, input_size=args.input_size)
        cfg = model.config
        params = sum(p.numel() for p in model.parameters()) / 1e6
        gmacs = model_gmacs(name, input_size=args.input_size)
        print(f"{name:<10} {cfg.depth:>5} {cfg.hidden_size:>6} {cfg.num_heads:>5} {cfg.num_tokens:>6} {params:>11.1f} {gmacs:>8.2f}")
    return 0


def _configure_flops(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registry name, e.g. DiT-XL/2")
    _add_model_shape(parser)
    parser.add_argument("--breakdown", action="store_true", help="print the MACs of each part")


@command("flops", "print a model's forward GFLOPs (MACs at batch 1, the papers' convention)", _configure_flops)
def run_flops(args: argparse.Namespace) -> int:
    from mediator_models import macs_breakdown, make_config

    config = make_config(args.name, input_size=args.input_size, attention=args.attention, mediators=args.mediators)
    parts = macs_breakdown(config)
    total = sum(parts.values()) / 1e9
    if args.breakdown:
        for part, macs in parts.items():
            print(f"{part:<24} {macs / 1e9:>12.4f}")
    print(f"{config.label}: {total:.2f} GFLOPs")
    return 0


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    pass


@command("demo", "forward pass of each model family on a digits-sized input, with FLOPs counted two ways", _configure_demo)
def run_demo(args: argparse.Namespace) -> int:
    from mediator_models import build_model, config_gmacs, measured_macs

    print(f"{'model':<34} {'output':<18} {'analytic GFLOPs':>15} {'measured':>9}")
    for family in ("DiT", "SiT"):
        for attention, mediators in (("full", None), ("mediator", 4), ("mediator", 16)):
            model = build_model(f"{family}-T/2", input_size=16, in_channels=1, num_classes=10,
                                attention=attention, mediators=mediators).eval()
            x = torch.randn(2, 1, 16, 16)
            with torch.no_grad():
                out = model(x, torch.tensor([10.0, 900.0]), torch.tensor([3, 10]))
            analytic = config_gmacs(model.config)
            measured = measured_macs(model) / 1e9
            print(f"{model.config.label:<34} {str(tuple(out.shape)):<18} {analytic:>15.4f} {measured:>9.4f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnmed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, configure, run) in COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except (ValueError, FileNotFoundError) as error:
        # Bad input: one clear line, not a traceback.
        print(f"attnmed {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
