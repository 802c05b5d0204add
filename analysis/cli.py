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
    parser.add_argument(
        "--input-size", type=int, default=32, help="spatial side of the model input (32 = 256 px latents)"
    )
    _add_attention(parser, default="full")


def _configure_models(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-size", type=int, default=32, help="spatial side of the model input (32 = 256 px latents)"
    )
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
        print(
            f"{name:<10} {cfg.depth:>5} {cfg.hidden_size:>6} {cfg.num_heads:>5} {cfg.num_tokens:>6} {params:>11.1f} {gmacs:>8.2f}"
        )
    return 0


def _configure_flops(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registry name, e.g. DiT-XL/2")
    _add_model_shape(parser)
    parser.add_argument("--breakdown", action="store_true", help="print the MACs of each part")


@command("flops", "print a model's forward GFLOPs (MACs at batch 1, the papers' convention)", _configure_flops)
def run_flops(args: argparse.Namespace) -> int:
    from mediator_models import macs_breakdown, make_config

    config = make_config(
        args.name,
        input_size=args.input_size,
        attention=args.attention,
        mediators=args.mediators,
        depthwise_conv=args.depthwise_conv,
    )
    parts = macs_breakdown(config)
    total = sum(parts.values()) / 1e9
    if args.breakdown:
        for part, macs in parts.items():
            print(f"{part:<24} {macs / 1e9:>12.4f}")
    print(f"{config.label}: {total:.2f} GFLOPs")
    return 0


def _configure_train(parser: argparse.ArgumentParser) -> None:
    from mediator_models.progress import LOG_INTERVAL_S
    from mediator_models.train import DEFAULT_IMAGE_SIZE, SIT_DEFAULTS, TrainConfig

    defaults = TrainConfig()
    parser.add_argument("--model", default=defaults.model, help="registry name, e.g. SiT-T/2, SiT-S/2, DiT-XL/2")
    _add_attention(parser, default="full", several=True)
    parser.add_argument("--data", default=defaults.data, help="'digits', an ImageFolder tree, or a latent cache folder")
    # Unset flags stay unset (SUPPRESS) so that TrainConfig settles them from the data and the model family.
    parser.add_argument(
        "--image-size",
        type=int,
        default=argparse.SUPPRESS,
        help=f"image side in pixels (default: a latent cache's own, else {DEFAULT_IMAGE_SIZE})",
    )
    parser.add_argument("--vae", default=None, help="local AutoencoderKL folder: train on latents encoded on the fly")
    parser.add_argument(
        "--interpolant",
        choices=("linear", "gvp"),
        default=argparse.SUPPRESS,
        help=f"SiT only (default: {SIT_DEFAULTS['interpolant']}; DiT's process is fixed)",
    )
    parser.add_argument(
        "--prediction",
        choices=("velocity", "noise", "score"),
        default=argparse.SUPPRESS,
        help=f"SiT only: what the network predicts (default: {SIT_DEFAULTS['prediction']}; DiT's process is fixed)",
    )
    parser.add_argument(
        "--batch-size",
        dest="global_batch_size",
        type=int,
        default=defaults.global_batch_size,
        help="global batch, split across ranks under torchrun",
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help="total optimizer steps of the run")
    parser.add_argument(
        "--lr",
        type=float,
        default=defaults.lr,
        help="AdamW learning rate (may change on --resume, e.g. after a divergence)",
    )
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay")
    parser.add_argument(
        "--ema-decay",
        type=float,
        default=defaults.ema_decay,
        help="EMA decay per step (0.9999 for 400K-step runs; 0.99 for a few thousand steps)",
    )
    parser.add_argument(
        "--class-dropout",
        dest="class_dropout_prob",
        type=float,
        default=defaults.class_dropout_prob,
        help="probability of dropping a label to the null class (for classifier-free guidance)",
    )
    parser.add_argument(
        "--grad-accum",
        type=int,
        default=defaults.grad_accum,
        help="micro-batches per step (the batch is split; same result, less memory)",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPUs)")
    parser.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random horizontal flips (default: on where the data allows, off for digits)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="training seed (data order, noise, init)")
    parser.add_argument("--log-every", type=int, default=defaults.log_every, help="steps between log.jsonl records")
    parser.add_argument("--ckpt-every", type=int, default=defaults.ckpt_every, help="steps between checkpoints")
    parser.add_argument(
        "--keep-checkpoints",
        type=int,
        default=defaults.keep_checkpoints,
        help="keep the newest N checkpoints (at least 1)",
    )
    parser.add_argument("--out", default=defaults.out, help="run folder (checkpoints/, log.jsonl, config.json)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"a progress bar (where the output is not a terminal: a line every {LOG_INTERVAL_S:g} s)",
    )


def _add_attention(parser: argparse.ArgumentParser, default: str | None = None, several: bool = False) -> None:
    parser.add_argument(
        "--attention",
        choices=("full", "mediator", "conv"),
        default=default,
        help="attention kind; conv: the ablation with the depthwise conv alone"
        + ("" if default else " (official files only; default full)"),
    )
    if several:
        parser.add_argument(
            "--mediators",
            type=_count_or_full,
            nargs="+",
            default=None,
            help="mediator count n (a perfect square); several, e.g. 4 16 64 full, train one network serving "
            "them all (full: full attention), at a count drawn per step",
        )
    else:
        parser.add_argument("--mediators", type=int, default=None, help="mediator count n (a perfect square)")
    parser.add_argument(
        "--depthwise-conv",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the mediator block's depthwise 3×3 conv on v (default: on for mediator and conv, off "
        "for full): --no-depthwise-conv isolates the mediators, --depthwise-conv with full "
        "attention isolates the conv",
    )


def _count_or_full(text: str) -> int | str:
    """A mediator count, or 'full' (full attention as one count of a network serving several)."""
    if text == "full":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes mediator counts (perfect squares) or 'full', got {text!r}") from None


def _served_counts(counts: list | None):
    """--mediators as TrainConfig takes it: one count, or a tuple of several (None: full attention)."""
    if counts is None:
        return None
    if len(counts) == 1:
        if counts[0] == "full":
            raise ValueError("--mediators full alone is full attention: use --attention full, or name more counts")
        return counts[0]
    return tuple(None if c == "full" else c for c in counts)


@command("train", "train a model (single process, or under torchrun with DDP)", _configure_train)
def run_train(args: argparse.Namespace) -> int:
    import dataclasses

    from mediator_models.train import TrainConfig, train

    args.mediators = _served_counts(args.mediators)
    if isinstance(args.mediators, tuple) and args.attention == "full":
        args.attention = "mediator"  # several counts are one mediator network (full attention one of its counts)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    run_dir = train(config, resume=args.resume)
    print(f"done: {run_dir}")
    return 0


def _add_checkpoint_args(parser: argparse.ArgumentParser, several: bool = False, required: bool = True) -> None:
    if several:
        parser.add_argument(
            "--ckpt",
            required=True,
            action="append",
            help="attnmed training checkpoint, an official DiT/SiT file or a diffusers DiT folder; repeat it (one per mediator "
            "count) to switch networks with --schedule or --adaptive",
        )
    else:
        parser.add_argument(
            "--ckpt",
            required=required,
            help="attnmed training checkpoint, an official DiT/SiT file or a diffusers DiT folder",
        )
    parser.add_argument("--model", default=None, help="for official files only: the registry name, e.g. DiT-XL/2")
    parser.add_argument("--input-size", type=int, default=None, help="for official files only (default 32 = 256 px)")
    _add_attention(parser)
    parser.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument(
        "--numerics",
        choices=("dit", "diffusers"),
        default="dit",
        help="diffusers DiT folders: compute as the original DiT (its weights were trained so) or "
        "exactly as diffusers' DiTTransformer2DModel does",
    )


def _add_sampler_args(parser: argparse.ArgumentParser, steps: int = 250, steps_flag: str = "--steps") -> None:
    """The sampler's flags; `steps_flag` names its step count where --steps means something else (intervene)."""
    parser.add_argument("--sampler", default=None, help="ddpm | ddim (DiT); sde | ode (SiT); default: the paper's")
    parser.add_argument("--method", default=None, help="SDE: euler | heun; ODE: dopri5 | euler | heun")
    parser.add_argument(steps_flag, dest="steps", type=int, default=steps, help="the sampler's steps")
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--guided-channels", type=int, default=None, help="3 reproduces the public code's guidance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--classes", type=int, nargs="*", default=None, help="cycle through these labels (default: random)"
    )


def _load_from_args(args: argparse.Namespace, checkpoint: str | None = None):
    """(loaded model, sampler config) from the checkpoint and sampler arguments."""
    from mediator_models.sample import load_for_sampling
    from mediator_models.sampling.generation import default_sampler
    from mediator_models.storage.distributed import init_distributed

    env = init_distributed()
    loaded = load_for_sampling(
        checkpoint or args.ckpt,
        model_name=args.model,
        input_size=args.input_size,
        use_ema=not args.raw_weights,
        attention=args.attention,
        mediators=args.mediators,
        depthwise_conv=args.depthwise_conv,
        device=env.device,
        numerics=args.numerics,
    )
    changes = {
        "steps": args.steps,
        "cfg_scale": args.cfg_scale,
        "guided_channels": args.guided_channels,
        "method": args.method,
    }
    if args.sampler:
        changes["kind"] = args.sampler
    sampler = default_sampler(loaded.process.family, **changes)
    sampler.check(loaded.process.family, loaded.model.config.in_channels)
    return loaded, sampler


def _configure_sample(parser: argparse.ArgumentParser) -> None:
    _add_checkpoint_args(parser, several=True)
    _add_sampler_args(parser)
    parser.add_argument("--num-samples", type=int, default=64, help="images to draw (sample i uses seed + i)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward batch (per rank)")
    parser.add_argument(
        "--vae",
        default=None,
        help="local AutoencoderKL folder to decode latents (default: a pipeline folder's own vae/; needed for "
        "latent models)",
    )
    switching = parser.add_mutually_exclusive_group()
    switching.add_argument(
        "--schedule", default=None, help="schedule JSON (from `attnmed schedule`): the network of each step"
    )
    switching.add_argument(
        "--plan",
        default=None,
        help="plan JSON (from `attnmed plan`): the attention computation of each (window of evaluations, layer)",
    )
    switching.add_argument(
        "--adaptive",
        action="store_true",
        help="the paper's rule: move to the next network (fewest mediators first) when the step "
        "distance falls below ρ_i times its warm-up mean",
    )
    parser.add_argument("--rho", type=float, nargs="+", default=None, help="--adaptive: ρ_1 … ρ_{m−1}, one per switch")
    # The --adaptive settings default to None so that giving one without --adaptive is refused, not ignored.
    parser.add_argument(
        "--warmup", type=int, default=None, help="--adaptive: warm-up steps K (default 3, the public example)"
    )
    parser.add_argument("--distance", choices=("l1", "l2"), default=None, help="--adaptive: step distance (default l1)")
    parser.add_argument(
        "--statistic",
        choices=("state", "drift"),
        default=None,
        help="--adaptive: d_k on the states (default: the paper's) or on the drift, without the SDE's injected "
        "noise (ours)",
    )
    parser.add_argument("--out", required=True, help="folder for the PNGs, samples.npz and samples.json")


@command(
    "sample",
    "sample a checkpoint to PNGs + ADM-layout npz + JSON sidecar (restartable, torchrun-ready)",
    _configure_sample,
)
def run_sample(args: argparse.Namespace) -> int:
    from mediator_models.sample import adaptive_switching, switching_by_schedule
    from mediator_models.sampling.switching import MediatorSchedule

    if len(args.ckpt) > 1 and not (args.schedule or args.adaptive):
        raise ValueError("several --ckpt need --schedule FILE or --adaptive to say which network runs each step")
    adaptive_only = {"--rho": args.rho, "--warmup": args.warmup, "--distance": args.distance}
    adaptive_only["--statistic"] = args.statistic
    given = [flag for flag, value in adaptive_only.items() if value is not None]
    if given and not args.adaptive:
        raise ValueError(
            f"{', '.join(given)} belong{'s' if len(given) == 1 else ''} to --adaptive; add it or drop them"
        )
    from mediator_models.sample import serves_several

    loaded, sampler = _load_from_args(args, args.ckpt[0])
    if args.plan:
        return _sample_plan(args, loaded, sampler)
    if (args.schedule or args.adaptive) and len(args.ckpt) < 2 and not serves_several(loaded):
        raise ValueError(
            "--schedule and --adaptive switch between networks: give one --ckpt per mediator count, or one of a "
            "network serving several counts"
        )
    callback, schedule = None, None
    if args.schedule or args.adaptive:
        networks = [loaded] + [_load_from_args(args, c)[0] for c in args.ckpt[1:]]
        if args.schedule:
            switching = switching_by_schedule(networks, MediatorSchedule.load(args.schedule))
        else:
            switching = adaptive_switching(
                networks,
                sampler,
                args.rho,
                warmup=3 if args.warmup is None else args.warmup,
                distance=args.distance or "l1",
                statistic=args.statistic or "state",
            )
        loaded, callback, schedule = switching.base, switching.callback, switching.description
    sidecar = _sample_into_folder(args, loaded, sampler, callback, schedule)
    if sidecar:
        print(f"wrote {args.num_samples} samples to {args.out} ({sidecar['gflops_per_image']:.3g} GFLOPs per image)")
    return 0


def _sample_into_folder(args: argparse.Namespace, loaded, sampler, callback, schedule):
    """`sample_to_folder` with the command's settings, decoding through the VAE of --vae or of a pipeline folder."""
    from mediator_models.sample import sample_to_folder

    vae = None
    vae_folder = args.vae or _pipeline_vae(args.ckpt[0])
    if vae_folder:
        from mediator_models.data import load_vae

        vae = load_vae(vae_folder, next(loaded.model.parameters()).device)
    return sample_to_folder(
        loaded,
        args.out,
        num_samples=args.num_samples,
        sampler=sampler,
        batch_size=args.batch_size,
        seed=args.seed,
        classes=args.classes,
        vae=vae,
        callback=callback,
        schedule=schedule,
    )


def _sample_plan(args: argparse.Namespace, loaded, sampler) -> int:
    """`attnmed sample --plan`: sample one full-attention network with each cell's attention computation replaced as
    the plan says; samples.json counts the GFLOPs per image of what ran."""
    from analysis.intervene import check_plan, load_plan, plan_description, plan_intervention

    if len(args.ckpt) > 1:
        raise ValueError("--plan runs one full-attention network: give one --ckpt")
    plan = load_plan(args.plan)
    check_plan(plan, loaded.model.config, loaded.process, sampler)
    with plan_intervention(loaded.model, plan) as intervention:
        sidecar = _sample_into_folder(args, loaded, sampler, intervention, plan_description(plan))
    if sidecar:
        expected = plan["gflops_per_image"]["expected"]
        print(
            f"wrote {args.num_samples} samples to {args.out} ({sidecar['gflops_per_image']:.6g} GFLOPs per image; the "
            f"plan expected {expected:.6g})"
        )
    return 0


def _pipeline_vae(checkpoint: str) -> str | None:
    """The VAE folder of a diffusers pipeline folder given as a checkpoint (DiTPipeline: `vae/`), else None."""
    from pathlib import Path

    folder = Path(checkpoint)
    return str(folder / "vae") if (folder / "model_index.json").exists() and (folder / "vae").is_dir() else None


def _configure_record(parser: argparse.ArgumentParser) -> None:
    _add_checkpoint_args(parser, required=False)
    parser.add_argument(
        "--diffusers",
        default=None,
        metavar="FOLDER",
        help="instead of --ckpt: a local diffusers pipeline folder (DiT, PixArt, SD3), sampled by its "
        "own scheduler with --steps and --cfg-scale",
    )
    parser.add_argument(
        "--prompt", nargs="+", default=None, help="--diffusers text pipelines: prompts, cycled per sample"
    )
    parser.add_argument(
        "--embeddings",
        default=None,
        metavar="FILE.pt",
        help="--diffusers text pipelines without their text encoders: a torch file holding the "
        "pipeline's text inputs for one prompt (prompt_embeds, pooled_prompt_embeds, "
        "negative_prompt_embeds, ... with batch 1), given to every sample",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="--diffusers: image height and width in pixels, exactly (no resolution binning)",
    )
    _add_sampler_args(parser)
    parser.add_argument("--samples", type=int, default=32, help="samples to average over (the paper: 32)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--metrics",
        default="cheap",
        help="'cheap' (jsd, entropy, cosine), 'all' (adds the singular-value ranks) or a comma list of "
        "those words and metrics, e.g. all,recovery_rank_16,recovery_pooled_16,recovery_bound_16 (the "
        "premise: how much of A·V a rank-16 or pooled 16-mediator map loses, and the least any rank-16 map "
        "can lose; full attention only); 'atlas' adds locality, sinks and null baselines; 'changes' adds each layer's change from the previous evaluation and "
        "between the guidance branches (step_*, branch_*: output relative L1 and cosine, map total variation)",
    )
    parser.add_argument(
        "--jsd-pairs",
        default="2048",
        help="query pairs per map for the JSD score, drawn per map ('all' for the exact mean; all "
        "pairs anyway up to 64 tokens at 2048). Fewer pairs record faster: see README",
    )
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="record only these layers")
    parser.add_argument("--heads", type=int, nargs="*", default=None, help="reduce only these heads")
    parser.add_argument(
        "--keep-maps",
        nargs="*",
        default=(),
        metavar="STEP:LAYER",
        help="also save the raw maps of these (step, layer) pairs beside the table",
    )
    parser.add_argument(
        "--map-memory",
        type=_byte_size,
        default="1GiB",
        help="most memory the maps and their reductions hold at once (e.g. 512MB): a layer's maps are computed "
        "and reduced a few (sample, head) maps at a time",
    )
    parser.add_argument("--out", required=True, help="table path (.parquet, or .csv)")


def _byte_size(text: str) -> int:
    """'512MB', '2GiB', '1e9' -> bytes (MB and MiB both 2**20: a memory budget)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"takes a size such as 512MB or 2GB, got {text!r}")
    return int(float(match.group(1)) * 1024 ** ["", "k", "m", "g", "t"].index(match.group(2).lower()))


@command("record", "sample with the attention recorder on and write the redundancy table", _configure_record)
def run_record(args: argparse.Namespace) -> int:
    from pathlib import Path

    from analysis.collect import CollectionConfig, check_table_target, collect_redundancy, write_table
    from analysis.metrics import ALL_METRICS, ATLAS_METRICS, CHEAP_METRICS
    from analysis.relations import RELATION_METRICS

    named = {"cheap": CHEAP_METRICS, "all": ALL_METRICS, "atlas": ATLAS_METRICS, "changes": RELATION_METRICS}
    metrics = tuple(dict.fromkeys(m for part in args.metrics.split(",") if part for m in named.get(part, (part,))))
    keep = [_step_layer(pair) for pair in args.keep_maps]
    if keep and args.diffusers:
        raise ValueError(
            "--keep-maps keeps attnmed networks' maps; with --diffusers the pipeline's maps are measured, not kept: "
            "drop --keep-maps"
        )
    out = Path(args.out)
    if out.suffix not in (".parquet", ".csv"):
        raise ValueError(f"--out {out}: name the table .parquet or .csv")
    try:
        jsd_pairs = None if args.jsd_pairs == "all" else int(args.jsd_pairs)
    except ValueError:
        raise ValueError(f"--jsd-pairs takes a number of pairs or 'all', got {args.jsd_pairs!r}") from None
    collection = CollectionConfig(
        samples=args.samples,
        batch_size=args.batch_size,
        seed=args.seed,
        jsd_pairs=jsd_pairs,
        metrics=tuple(metrics),
        layers=None if args.layers is None else tuple(args.layers),
        heads=None if args.heads is None else tuple(args.heads),
        classes=tuple(args.classes) if args.classes else None,
    )
    if (args.ckpt is None) == (args.diffusers is None):
        raise ValueError(
            "give either --ckpt (an attnmed, official or diffusers DiT checkpoint) or --diffusers (a pipeline folder)"
        )
    if args.diffusers:
        return _record_diffusers(args, collection, out)
    from mediator_models.storage.distributed import init_distributed, locked_folder

    env = init_distributed()
    with locked_folder(out.parent, "attnmed record", env, name=f".{out.name}.lock"):  # also refuses an unwritable --out
        loaded, sampler = _load_from_args(args)
        provenance = {
            "checkpoint": loaded.source,
            "weights": loaded.weights,
            "model": loaded.model.config.to_dict(),
            "process": loaded.process.to_dict(),
            "sampler": sampler.to_dict(),
            "collection": collection.to_dict(),
            "ranks": env.world_size,
        }
        check_table_target(out, provenance)
        state = out.with_name(f".{out.name}.state.pt")
        table = collect_redundancy(
            loaded.model,
            loaded.process,
            sampler,
            collection,
            state_path=state,
            keep_maps=keep,
            keep_dir=out.with_suffix("").with_name(out.stem + "-maps"),
            map_memory=args.map_memory,
        )
        if table is None:  # another rank of a torchrun job: rank 0 merges and writes
            return 0
        write_table(table, out, provenance)
        for leftover in out.parent.glob(f".{out.name}.state.pt*"):
            leftover.unlink(missing_ok=True)
    print(f"wrote {len(table)} rows to {out}")
    return 0


def _record_diffusers(args: argparse.Namespace, collection, out) -> int:
    """`attnmed record --diffusers FOLDER`: the pipeline's own scheduler loop, recorded into the same table."""
    from analysis.collect import check_table_target, collect_redundancy_diffusers, load_pipeline, write_table
    from mediator_models.storage.runfolder import FolderLock

    text_inputs = {name: getattr(args, name) for name in ("prompt", "embeddings") if getattr(args, name)}
    loading = load_pipeline(args.diffusers, text_inputs=text_inputs, classes=args.classes, size=args.size)
    embeddings = _read_embeddings(args.embeddings) if args.embeddings else None
    with FolderLock(out.parent, "attnmed record", name=f".{out.name}.lock"):  # also refuses an unwritable --out
        pipeline, options = loading()
        provenance = {
            "diffusers": str(args.diffusers),
            "pipeline": type(pipeline).__name__,
            "scheduler": dict(pipeline.scheduler.config),
            "steps": args.steps,
            "cfg_scale": args.cfg_scale,
            "prompts": args.prompt,
            "embeddings": args.embeddings,
            "size": args.size,
            "collection": collection.to_dict(),
        }
        check_table_target(out, provenance)
        table = collect_redundancy_diffusers(
            pipeline,
            collection,
            steps=args.steps,
            guidance_scale=args.cfg_scale,
            prompts=args.prompt,
            embeddings=embeddings,
            map_memory=args.map_memory,
            **options,
        )
        write_table(table, out, provenance)
    print(f"wrote {len(table)} rows to {out}")
    return 0


def _read_embeddings(path: str) -> dict:
    """A pipeline's precomputed text inputs: a torch file holding {name: tensor with batch 1}."""
    import torch

    try:
        data = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"--embeddings {path}: no such file") from None
    except Exception as error:
        raise ValueError(
            f"--embeddings {path} is not a torch file of tensors ({type(error).__name__}: {error})"
        ) from None
    if (
        not isinstance(data, dict)
        or not data
        or not all(torch.is_tensor(v) and v.ndim >= 1 and len(v) == 1 for v in data.values())
    ):
        raise ValueError(
            f"--embeddings {path} must hold {{name: tensor of batch 1}}, e.g. prompt_embeds and "
            "pooled_prompt_embeds for SD3 and Flux"
        )
    return data


def _step_layer(text: str) -> tuple[int, int]:
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        step, layer = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--keep-maps takes STEP:LAYER pairs such as 0:3, got {text!r}") from None
    return step, layer


def _configure_schedule(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "table", help="redundancy table from `attnmed record` (.parquet or .csv) of a full-attention model"
    )
    parser.add_argument(
        "--counts",
        nargs="+",
        required=True,
        metavar="N",
        help="the networks at hand: mediator counts and/or 'full', e.g. 4 16 64 full",
    )
    parser.add_argument(
        "--rule",
        choices=("energy-rank", "jsd", "budget", "recovery"),
        default="energy-rank",
        help="energy-rank: smallest count holding the maps' rank at --tau; jsd: --thresholds on the "
        "JSD score; budget: the rank rule lowered until it fits --budget-gflops; recovery: the "
        "fewest mediators whose rank-n map keeps every layer's A·V within --epsilon (needs "
        "recovery_rank_N rows)",
    )
    parser.add_argument("--epsilon", type=float, default=0.1, help="recovery rule: largest relative error of A·V")
    parser.add_argument(
        "--per-layer",
        action="store_true",
        help="recovery rule: give each layer its own count (the fewest within --epsilon in that layer); sampling it "
        "needs networks grafted from one source (`attnmed graft`)",
    )
    parser.add_argument(
        "--recovery-kind",
        choices=("rank", "pooled", "bound"),
        default="rank",
        help="recovery rule: the truncated SVD of A, the mediator form from pooled queries, or the bound (the "
        "least error any rank-n map reaches on A·V; 0 once n reaches the head dimension)",
    )
    parser.add_argument(
        "--tau", type=float, default=0.9, help="energy fraction for the rank rules (0.9 or 0.99, as recorded)"
    )
    parser.add_argument(
        "--thresholds",
        type=float,
        nargs="*",
        default=(),
        help="jsd rule: ascending JSD levels (bits), one per count after the first",
    )
    parser.add_argument("--budget-gflops", type=float, default=None, help="budget rule: GFLOPs per image")
    parser.add_argument(
        "--aggregate",
        choices=("mean", "max", "quantile"),
        default="mean",
        help="how layers and heads are combined per step",
    )
    parser.add_argument("--name", default=None, help="the schedule's name (default: describes the rule)")
    parser.add_argument("--out", required=True, help="schedule JSON to write (for `attnmed sample --schedule`)")


@command(
    "schedule",
    "derive a mediator schedule from a recorded redundancy table and print its GFLOPs per image",
    _configure_schedule,
)
def run_schedule(args: argparse.Namespace) -> int:
    from pathlib import Path

    from analysis.collect import read_table, table_model
    from analysis.schedule import schedule_from_table
    from mediator_models.storage.errors import SettingError

    counts = [None if c == "full" else _positive_count(c) for c in args.counts]
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name the schedule file to write, e.g. {out / 'schedule.json'}")
    if out.exists() and out.resolve() in {Path(args.table).resolve(), Path(str(args.table) + ".json").resolve()}:
        raise ValueError(f"--out {out} is the table being read (or its sidecar); name another file for the schedule")
    table = read_table(args.table)
    try:
        derived = schedule_from_table(
            table,
            counts,
            table_model(args.table),
            args.rule,
            tau=args.tau,
            thresholds=args.thresholds,
            epsilon=args.epsilon,
            recovery_kind=args.recovery_kind,
            budget_gflops=args.budget_gflops,
            aggregate=args.aggregate,
            name=args.name,
            per_layer=args.per_layer,
        )
    except SettingError:
        raise  # a flag's value is wrong, not the table
    except ValueError as error:
        raise ValueError(f"{args.table}: {error}") from None
    derived.schedule.save(args.out)
    print(derived.schedule)
    static = ", ".join(f"{'full' if c is None else f'n={c}'} {g:.4g}" for c, g in derived.static_gflops.items())
    print(f"expected {derived.gflops:.4g} GFLOPs per image over the table's {derived.steps} steps (static: {static})")
    print(f"wrote {args.out}")
    return 0


def _positive_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"--counts takes positive mediator counts or 'full', got {text!r}")
    return value


# The figure options of `attnmed plot`, as analysis.plots names them (AXES, VIEWS; tests check they agree): spelt
# out here so that building the parser does not import matplotlib.
PLOT_AXES = ("step", "noise", "logsnr", "t")
PLOT_VIEWS = ("paper", "heads", "ranks", "spectra")


def _configure_plot(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "tables",
        nargs="+",
        metavar="table",
        help="redundancy tables (.parquet or .csv) from `attnmed record` or a reproduction; several are drawn "
        "together, each figure holding all of them, labelled by table and network",
    )
    parser.add_argument("--metric", default="jsd", help="the score of the heat maps and curves")
    parser.add_argument(
        "--axis",
        choices=PLOT_AXES,
        default=None,
        help="where the steps go: step, noise (σ/(α+σ)), logsnr (log α²/σ², to compare processes) or t (the "
        "process's own model time; refused for tables of different processes). Default: heat maps by step, "
        "curves by noise level",
    )
    parser.add_argument(
        "--views",
        nargs="+",
        choices=PLOT_VIEWS,
        default=["paper"],
        help="paper: heat maps, curves per layer, measures; heads: a heat map per head; ranks: the rank measures "
        "per head; spectra: singular values of the maps kept by `record --keep-maps` (read from <table>-maps)",
    )
    parser.add_argument("--labels", nargs="+", default=None, help="a name per table (default: their file names)")
    parser.add_argument("--out", required=True, help="folder for the figures (PNG and PDF)")


def _kept_maps_beside(table: str):
    """Where `attnmed record` keeps a table's maps (its keep_dir): `<table stem>-maps` beside the table."""
    from pathlib import Path

    return Path(table).with_suffix("").with_name(Path(table).stem + "-maps")


@command("plot", "draw the paper-style redundancy figures of one or several recorded tables", _configure_plot)
def run_plot(args: argparse.Namespace) -> int:
    from analysis import plots
    from mediator_models.storage.runfolder import check_creatable

    table = plots.read_tables(args.tables, args.labels)  # each table's reading errors name its file
    for path, (_, part) in zip(args.tables, table.groupby("source", sort=False)):
        if args.metric not in set(part["metric"]):
            raise ValueError(f"{path} has no {args.metric!r} rows; it holds {sorted(set(part['metric']))}")
    if args.axis is not None:
        plots.check_shared_axis(table, args.axis)
    maps = None
    if "spectra" in args.views:  # the maps of several tables are told apart by their table's label
        several = len(args.tables) > 1
        maps = []
        for path, label in zip(args.tables, plots.sources(table)):
            kept = plots.read_kept_maps(_kept_maps_beside(path))
            maps += [{**payload, "source": label} if several else payload for payload in kept]
    check_creatable(args.out)  # nothing made yet: a table that cannot be drawn leaves no empty folder
    for path in plots.redundancy_figures(table, args.out, args.metric, args.axis, args.views, maps):
        print(path)
    return 0


def _configure_cache_latents(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="ImageFolder tree (ROOT/CLASS/IMAGE)")
    parser.add_argument(
        "--image-size", type=int, default=256, help="image side in pixels: a multiple of 8 (16 for the /2 models)"
    )
    parser.add_argument("--vae", required=True, help="local AutoencoderKL folder (e.g. sd-vae-ft-ema)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per VAE pass")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="a progress bar")
    parser.add_argument("--out", required=True, help="cache folder (resumable: rerun the same command to continue)")


@command(
    "cache-latents",
    "encode an ImageFolder once (and its mirror images) so training skips the VAE",
    _configure_cache_latents,
)
def run_cache_latents(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mediator_models.data import (
        ImageFolderSource,
        cache_identity,
        cache_latents,
        check_latent_cache,
        latent_side,
        load_vae,
    )
    from mediator_models.storage.runfolder import check_creatable

    # Everything that can refuse the command is checked before the VAE is loaded.
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    latent_side(args.image_size)
    check_creatable(args.out, "--out")
    source = ImageFolderSource(args.data, args.image_size)
    check_latent_cache(args.out, cache_identity(source, args.vae))
    finished = (Path(args.out) / "meta.json").exists()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = load_vae(args.vae, device)
    path = cache_latents(source, vae, args.out, args.batch_size, progress=args.progress, vae_name=args.vae)
    done = "already cached" if finished else "cached"
    print(f"{done}: latents of {len(source)} images at {args.image_size} px in {path}")
    return 0


def _configure_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("samples", help="sample folder or .npz (arr_0, uint8 NHWC)")
    parser.add_argument(
        "--reference",
        default="digits-heldout",
        help="'digits-heldout', 'textures-heldout', an image folder, an .npz of images, or an ADM reference .npz "
        "(mu/sigma)",
    )
    parser.add_argument(
        "--extractor",
        choices=("digits", "textures", "inception"),
        default="digits",
        help="the pinned digits or textures CNN, or torch-fidelity's Inception",
    )
    parser.add_argument("--inception-weights", default=None, help="local torch-fidelity Inception .pth")
    parser.add_argument(
        "--image-size", type=int, default=16, help="digits and textures: the size the classifier works at"
    )
    parser.add_argument(
        "--adm",
        action="store_true",
        help="the ADM evaluator's five metrics (FID, sFID, Inception Score, precision, recall) against "
        "an ADM reference batch .npz given as --reference; needs --inception-weights",
    )


@command("evaluate", "FID / KID / precision / recall of samples against a reference", _configure_evaluate)
def run_evaluate(args: argparse.Namespace) -> int:
    import json

    from analysis.quality.evaluate import Extractor, compute_metrics
    from analysis.quality.images import load_images

    if args.adm:
        from analysis.quality.adm import AdmInception, adm_metrics

        if args.inception_weights is None:
            raise ValueError("--adm needs --inception-weights (the local torch-fidelity InceptionV3 .pth)")
        inception = AdmInception(args.inception_weights)  # refuses a file of other weights before images are read
        images = load_images(args.samples).images.permute(0, 2, 3, 1).numpy()
        metrics = adm_metrics(images, args.reference, inception)
    else:
        extractor = {
            "digits": lambda: Extractor.digits(args.image_size),
            "textures": lambda: Extractor.textures(args.image_size),
            "inception": lambda: Extractor.inception(args.inception_weights),
        }[args.extractor]()
        reference = args.reference
        if reference in ("digits-heldout", "textures-heldout"):
            from mediator_models import data

            reference = getattr(data, reference.removesuffix("-heldout"))("heldout", args.image_size)
        metrics = compute_metrics(args.samples, reference, extractor)
    print(json.dumps(metrics, indent=2))
    by_reason: dict[str, list[str]] = {}
    for metric, reason in metrics["skipped"].items():
        by_reason.setdefault(reason, []).append(metric)
    for reason, names in by_reason.items():
        print(f"attnmed evaluate: {' and '.join(names)} not scored: {reason}", file=sys.stderr)
    return 0


def _configure_graft(parser: argparse.ArgumentParser) -> None:
    from mediator_models.graft import DEFAULT_DISTILL_LR
    from mediator_models.progress import LOG_INTERVAL_S

    parser.add_argument(
        "--ckpt",
        required=True,
        help="a full-attention attnmed checkpoint, an official DiT/SiT file or a diffusers DiT folder",
    )
    parser.add_argument("--model", default=None, help="for official files only: the registry name, e.g. DiT-XL/2")
    parser.add_argument("--input-size", type=int, default=None, help="for official files only (default 32 = 256 px)")
    parser.add_argument("--raw-weights", action="store_true", help="graft the raw weights instead of the EMA")
    parser.add_argument(
        "--numerics",
        choices=("dit", "diffusers"),
        default="dit",
        help="diffusers DiT folders: compute as the original DiT or exactly as diffusers does",
    )
    parser.add_argument(
        "--mediators",
        type=_count_or_full,
        nargs="+",
        required=True,
        help="mediator counts, one network each (perfect squares); with --shared one network serving them all, "
        "full (full attention) possibly among them",
    )
    parser.add_argument(
        "--shared",
        action="store_true",
        help="write one network serving every count (shared.pt: one set of weights, bias tables per count) instead "
        "of one per count; --distill-steps then fits one count per step",
    )
    _add_sampler_args(parser, steps=50)
    parser.add_argument(
        "--samples", type=int, default=8, help="trajectories the training-free error is measured on (0: none)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="trajectories per forward batch")
    parser.add_argument(
        "--distill-steps",
        type=int,
        default=0,
        help="then fit each mediator layer to its full-attention layer's output on the source's trajectories, "
        "for this many AdamW steps of --batch-size trajectories (resumable: run the same command again)",
    )
    parser.add_argument(
        "--distill-lr", type=float, default=DEFAULT_DISTILL_LR, help="learning rate of the layer-wise distillation"
    )
    parser.add_argument(
        "--end-to-end-steps",
        type=int,
        default=0,
        help="then train the whole network for this many steps of --batch-size images on the diffusion loss plus "
        "--teacher-weight times its squared error against the source's prediction, with `attnmed train`'s loop "
        "(exact resume, DDP under torchrun) into OUT/end_to_end/med{n}/",
    )
    parser.add_argument(
        "--teacher-weight",
        type=float,
        default=10.0,
        help="end to end: weight λ of ‖student − source‖² beside the diffusion loss (0: the diffusion loss alone)",
    )
    parser.add_argument("--end-to-end-lr", type=float, default=1e-4, help="end to end: AdamW learning rate")
    parser.add_argument(
        "--end-to-end-ema-decay",
        type=float,
        default=None,
        help="end to end: EMA decay per step (default: 1 − 10/steps, at most 0.9999: an average over a tenth of the "
        "run)",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="end to end: the training data, as `attnmed train --data` takes it (default: what the source's "
        "checkpoint records it was trained on)",
    )
    parser.add_argument(
        "--data-free",
        action="store_true",
        help="end to end: train on --teacher-samples samples the source draws with the sampler (OUT/teacher_samples/) "
        "instead of a data set",
    )
    parser.add_argument(
        "--teacher-samples", type=int, default=1024, help="with --data-free: how many samples the source draws"
    )
    parser.add_argument(
        "--save-every", type=int, default=50, help="steps between the distillations' checkpoints (what a kill loses)"
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"progress bars (where the output is not a terminal: a line every {LOG_INTERVAL_S:g} s)",
    )
    parser.add_argument(
        "--out", required=True, help="folder for med{n}.pt, errors.json, graft.json (and end_to_end/, stages.json)"
    )


@command(
    "graft",
    "make mediator networks from a trained full-attention one (shared tensors copied, biases and conv zero) and "
    "print their training-free error per layer",
    _configure_graft,
)
def run_graft(args: argparse.Namespace) -> int:
    from mediator_models.graft import format_error_table, format_stage_table, graft_to_folder

    changes = {"steps": args.steps, "cfg_scale": args.cfg_scale, "guided_channels": args.guided_channels}
    changes.update({"method": args.method, **({"kind": args.sampler} if args.sampler else {})})
    result = graft_to_folder(
        args.ckpt,
        args.out,
        args.mediators,
        model_name=args.model,
        input_size=args.input_size,
        use_ema=not args.raw_weights,
        numerics=args.numerics,
        sampler=changes,
        samples=args.samples,
        batch_size=args.batch_size,
        seed=args.seed,
        classes=args.classes,
        distill_steps=args.distill_steps,
        distill_lr=args.distill_lr,
        end_to_end_steps=args.end_to_end_steps,
        end_to_end_lr=args.end_to_end_lr,
        end_to_end_ema_decay=args.end_to_end_ema_decay,
        teacher_weight=args.teacher_weight,
        data=args.data,
        data_free=args.data_free,
        teacher_samples=args.teacher_samples,
        save_every=args.save_every,
        device="cuda" if torch.cuda.is_available() else "cpu",
        progress=args.progress,
        shared=args.shared,
    )
    if result.errors:
        print(format_error_table(result.errors))
    if result.stages:
        print(format_stage_table(result.stages))
    print("wrote " + ", ".join(str(path) for path in result.paths))
    return 0


def _configure_intervene(parser: argparse.ArgumentParser) -> None:
    _add_checkpoint_args(parser)
    parser.add_argument(
        "--replace",
        required=True,
        help="what replaces the chosen heads' output A·V: none | rank:R (A's truncated SVD) | mediator:N (the "
        "pooled mediator form of recovery_pooled_N) | reuse-previous (the previous evaluation's output) | "
        "share-cfg (the unconditional branch takes the conditional one's) | window:R (keys within radius R)",
    )
    parser.add_argument(
        "--steps",
        dest="step_range",
        default=None,
        metavar="A:B",
        help="replace at evaluations A..B−1 (from 0); the sampler's own step count is --sampler-steps",
    )
    parser.add_argument("--layers", type=int, nargs="+", required=True, help="replace in these layers")
    parser.add_argument(
        "--grid",
        action="store_true",
        help="one intervention per (window of --windows, layer of --layers), each in one layer; with --table, rank "
        "the table's measures by their Spearman correlation with the damage",
    )
    parser.add_argument(
        "--windows",
        nargs="+",
        default=None,
        metavar="K | A:B",
        help="with --grid: the evaluations cut into K near-equal windows, or the windows A:B themselves",
    )
    parser.add_argument(
        "--table",
        default=None,
        help="with --grid: a redundancy table of this checkpoint and sampler (`attnmed record`) whose measures "
        "are correlated with the damage",
    )
    parser.add_argument("--heads", type=int, nargs="+", default=None, help="only these heads (default: all)")
    # The sampler's settings as `attnmed sample` takes them, its step count named --sampler-steps (--steps is the
    # evaluation range here).
    _add_sampler_args(parser, steps_flag="--sampler-steps")
    parser.add_argument("--samples", type=int, default=16, help="samples drawn twice: unmodified and replaced")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", required=True, help="folder for report.json (locked; one configuration per folder)")


@command(
    "intervene",
    "sample with one attention computation replaced at chosen steps, layers and heads, and measure the damage",
    _configure_intervene,
)
def run_intervene(args: argparse.Namespace) -> int:
    from analysis.intervene import (
        GridConfig,
        InterventionConfig,
        Replacement,
        format_grid_report,
        format_report,
        parse_step_range,
        run_intervention,
        run_intervention_grid,
    )
    from mediator_models.storage.errors import SettingError

    Replacement.parse(args.replace)  # refuse a bad --replace or --steps before loading anything
    shared = {
        "replace": args.replace,
        "layers": tuple(args.layers),
        "heads": None if args.heads is None else tuple(args.heads),
        "samples": args.samples,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "classes": tuple(args.classes) if args.classes is not None else None,
    }
    if args.grid:
        if args.step_range is not None:
            raise SettingError("step_range", "is one intervention's range; a --grid takes its windows from --windows")
        if args.windows is None:
            raise SettingError("windows", "is required with --grid: a count K, or windows A:B")
        grid = GridConfig(windows=tuple(args.windows), **shared)
        loaded, sampler = _load_from_args(args)
        print(format_grid_report(run_intervention_grid(loaded, sampler, grid, args.out, args.table)))
        print(f"wrote {args.out}/report.json")
        return 0
    for setting, value in (("windows", args.windows), ("table", args.table)):
        if value is not None:
            raise SettingError(setting, "belongs to a grid of interventions: add --grid, or drop it")
    if args.step_range is None:
        raise SettingError("step_range", "is required: give the evaluations A:B to replace at (or use --grid)")
    job = InterventionConfig(steps=parse_step_range(args.step_range), **shared)
    loaded, sampler = _load_from_args(args)
    report = run_intervention(loaded, sampler, job, args.out)
    print(format_report(report))
    print(f"wrote {args.out}/report.json")
    return 0


def _configure_plan(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "sources",
        nargs="+",
        help="a redundancy table of a full-attention model (`attnmed record`; its sidecar names the sampler) and/or "
        "intervention grid reports (`attnmed intervene --grid`, report.json) of that model and sampler; a grid's "
        "measured damage predicts the cells it covers, the table the others",
    )
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--budget-error",
        type=float,
        default=None,
        help="greedy (DiTFastAttn): per cell the cheapest method whose predicted error is at most this",
    )
    budget.add_argument(
        "--budget-gflops",
        type=float,
        default=None,
        help="exact (an integer program): the least summed predicted error with at most these GFLOPs per image",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="the methods to choose among besides full attention: mediator:N, reuse-previous, share-cfg, window:R "
        "(default: every one the sources predict)",
    )
    parser.add_argument(
        "--windows",
        nargs="+",
        default=None,
        metavar="K | A:B",
        help="a table's evaluations cut into K near-equal windows, or the windows A:B (default: one per evaluation); "
        "grids bring their own",
    )
    parser.add_argument("--name", default=None, help="the plan's name (default: describes the budget)")
    parser.add_argument("--out", required=True, help="plan JSON to write (for `attnmed sample --plan`)")


@command(
    "plan",
    "choose per (window of evaluations, layer) the attention computation within an error or GFLOPs budget",
    _configure_plan,
)
def run_plan(args: argparse.Namespace) -> int:
    from analysis.intervene import check_plan_target, format_plan, make_plan, write_plan

    check_plan_target(args.out, args.sources)
    plan = make_plan(
        args.sources,
        budget_error=args.budget_error,
        budget_gflops=args.budget_gflops,
        methods=args.methods,
        windows=args.windows,
        name=args.name,
    )
    write_plan(plan, args.out, args.sources)
    print(format_plan(plan))
    print(f"wrote {args.out}")
    return 0


def _configure_atlas(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", help="the run folder of a finished `attnmed reproduce` study (runs/reproduce-...)")
    parser.add_argument("--out", required=True, help="the atlas folder (resumable: rerun the same command)")
    parser.add_argument("--table-samples", type=int, default=16, help="samples per redundancy table")
    parser.add_argument("--grid-samples", type=int, default=64, help="samples per intervention grid cell")
    parser.add_argument("--cfg-scale", type=float, default=1.5, help="the guided table and the share-cfg grid")
    parser.add_argument(
        "--budgets-of",
        nargs="+",
        default=["med16", "med64"],
        help="static runs of the study whose GFLOPs per image the plans are held to",
    )
    parser.add_argument("--plan-samples", type=int, default=None, help="images per plan cell (default: the study's)")


@command(
    "atlas",
    "on a study's full-attention network: which measure predicts each intervention's damage, and plans against "
    "the trained mediator networks",
    _configure_atlas,
)
def run_atlas(args: argparse.Namespace) -> int:
    from analysis.study.atlas import Atlas, AtlasConfig

    config = AtlasConfig(
        table_samples=args.table_samples,
        grid_samples=args.grid_samples,
        cfg_scale=args.cfg_scale,
        budgets_of=tuple(args.budgets_of),
        plan_samples=args.plan_samples,
    )
    Atlas(args.study, args.out, config).run()
    return 0


def _configure_reproduce(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        choices=("quick", "default", "paper-grid"),
        default="default",
        help="quick: every stage at toy budgets (minutes); default: the demo on an 8×8 token grid "
        "(about 45 min on 2 cores); paper-grid: the paper's 16×16 grid with its counts 4/16/64, "
        "ablations and adaptive diagnostics (about 90 min on 2 cores)",
    )
    parser.add_argument("--runs", default="runs", help="folder for the run (resumable: rerun to continue)")
    parser.add_argument(
        "--figures",
        default=None,
        help="also publish the figures, tables and REPORT.md into this folder (e.g. figures, to "
        "remake the committed reference run); by default they stay in the run folder",
    )


@command(
    "reproduce",
    "the whole study on the embedded digits: train, record, schedule, sample, evaluate, report",
    _configure_reproduce,
)
def run_reproduce(args: argparse.Namespace) -> int:
    from analysis.study.reproduce import run_study

    report = run_study(args.preset, args.runs, args.figures)
    print(f"done: {report}")
    return 0


def _configure_graft_study(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        choices=("quick", "paper-grid"),
        default="paper-grid",
        help="quick: every stage at toy budgets (a smoke test); paper-grid: the paper-grid study's models, data and "
        "sampler at 5 training seeds (about an hour on 2 cores)",
    )
    parser.add_argument("--runs", default="runs", help="folder for the run (resumable: rerun to continue)")
    parser.add_argument(
        "--figures",
        default=None,
        help="publish the figures, tables and REPORT.md into this folder instead of the "
        "run folder's report/ (e.g. figures/graft to remake the committed run)",
    )


@command(
    "graft-study",
    "mediators grafted onto trained full-attention networks (training-free and distilled) against mediators and a "
    "shared network trained from scratch, and a derived per-layer schedule against the adaptive rule",
    _configure_graft_study,
)
def run_graft_study_command(args: argparse.Namespace) -> int:
    from analysis.study.grafting import run_graft_study

    report = run_graft_study(args.preset, args.runs, args.figures)
    print(f"done: {report}")
    return 0


def _run_and_leave_the_process_group(args: argparse.Namespace) -> int:
    from mediator_models.storage.distributed import finish_distributed

    try:
        return COMMANDS[args.command][2](args)
    finally:
        finish_distributed()


def main(argv: Sequence[str] | None = None) -> int:
    import errno
    import os
    import signal

    parser = argparse.ArgumentParser(prog="attnmed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {}
    for name, (help_text, configure, run) in COMMANDS.items():
        commands[name] = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        configure(commands[name])
    args = parser.parse_args(argv)
    # A path that is not valid UTF-8 arrives with its bytes escaped; write its bytes back as they came (as Unix tools do) rather than fail on it.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    from mediator_models.storage.checkpoints import CheckpointError
    from mediator_models.storage.errors import SettingError
    from mediator_models.storage.runfolder import FolderBusyError
    from mediator_models.train import TrainingDiverged, TrainingInterrupted

    def terminate(signum, frame):  # what cluster schedulers send before a kill: unwind like Ctrl-C
        raise TrainingInterrupted(signum, None)

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, terminate)
    resume_hint = (
        "add --resume to the same command to continue"
        if args.command == "train"
        else "run the same command again to continue"
    )
    try:
        return _run_and_leave_the_process_group(args)
    except SettingError as error:  # the library names its parameter; the user knows the flag that sets it
        print(
            f"attnmed {args.command}: error: {_flag_for(commands[args.command], error.setting)} {error.reason}",
            file=sys.stderr,
        )
        return 2
    except (ValueError, FileNotFoundError, CheckpointError, FolderBusyError) as error:
        # Bad input: the message, not a traceback.
        print(f"attnmed {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of the output went away (`attnmed models | head`): stop quietly, as Unix tools do, and keep
        # Python from complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            where = f"{error.filename}: " if error.filename else ""
            print(f"attnmed {args.command}: error: {where}{error.strerror or error}", file=sys.stderr)
            return 1
        raise
    except TrainingDiverged as error:
        print(f"attnmed {args.command}: {error}", file=sys.stderr)
        return 1
    except TrainingInterrupted as interrupted:
        saved = f"saved {interrupted.checkpoint}; " if interrupted.checkpoint else ""
        name = signal.Signals(interrupted.signum).name
        print(f"\nattnmed {args.command}: stopped by {name}; {saved}{resume_hint}", file=sys.stderr)
        return 128 + interrupted.signum
    except KeyboardInterrupt:
        print(f"\nattnmed {args.command}: interrupted; {resume_hint}", file=sys.stderr)
        return 130


def _flag_for(parser: argparse.ArgumentParser, setting: str) -> str:
    """The option of `parser` that sets the library's `setting` (its long form), or the setting's own name
    where no flag sets it."""
    for action in parser._actions:
        if action.dest == setting and action.option_strings:
            return max(action.option_strings, key=len)
    return setting


if __name__ == "__main__":
    sys.exit(main())
