"""Training: one loop from a laptop CPU to many GPUs (single process, or torchrun with DDP: NCCL on GPUs,
Gloo on CPUs), with the papers' recipe by default (AdamW 1e-4, no weight decay, EMA 0.9999, label dropout).

Reproducibility by construction: the batch, the noise, the timesteps, the label dropout and the flips of
step s depend only on (seed, rank, s), so a run killed and resumed from its last checkpoint reaches exactly
the weights of a run that was never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import atomic_save, read_checkpoint
from .config import ModelConfig, make_config, parse_name
from .data import ImageFolderSource, encode, load_vae, open_source
from .dit import DiffusionTransformer
from .sampling import ProcessConfig

# Fields that may change between a run and its resumption (they do not change what is computed).
RESUMABLE_CHANGES = {"steps", "log_every", "ckpt_every", "keep_checkpoints", "progress", "out"}


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class TrainConfig:
    model: str = "SiT-T/2"
    attention: str = "full"
    mediators: int | None = None
    data: str = "digits"  # "digits", an ImageFolder tree, or a latent cache from `attnmed cache-latents`
    image_size: int = 16
    vae: str | None = None  # local AutoencoderKL folder: train on latents of an ImageFolder, encoded on the fly
    interpolant: str = "linear"  # SiT models
    prediction: str = "velocity"  # SiT models
    global_batch_size: int = 32
    steps: int = 1500
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    class_dropout_prob: float = 0.1
    grad_accum: int = 1
    bf16: bool = False  # autocast on GPUs
    flip: bool | None = None  # horizontal flips; default: on where the data allows it (not for digits)
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    keep_checkpoints: int | None = 2  # keep the newest k periodic checkpoints (None: keep all)
    out: str = "runs/train"
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @property
    def family(self) -> str:
        return parse_name(self.model)[0]

    def process_config(self) -> ProcessConfig:
        return ProcessConfig(self.family, self.interpolant, self.prediction)


# ---- distributed set-up ------------------------------------------------------------------------------------


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistEnv:
    """Under torchrun, join the process group (NCCL on GPUs, Gloo on CPUs); else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return DistEnv(rank, world, device)


def step_seed(seed: int, rank: int, step: int) -> int:
    """A seed for everything random in step `step` of rank `rank`."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def batch_indices(num_items: int, global_batch: int, step: int, rank: int, world: int, seed: int) -> np.ndarray:
    """This rank's share of the global batch of `step`: epochs are seeded permutations (last partial batch
    dropped), and rank r takes the r-th contiguous slice, so the ranks together see the global batch."""
    per_epoch = num_items // global_batch
    if per_epoch == 0:
        raise ValueError(f"the dataset has {num_items} items, fewer than one global batch of {global_batch}")
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_items)
    batch = order[position * global_batch : (position + 1) * global_batch]
    local = global_batch // world
    return batch[rank * local : (rank + 1) * local]


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.mul_(decay).add_(param.detach(), alpha=1 - decay)


def backward_on_batch(model: nn.Module, process, x: torch.Tensor, y: torch.Tensor, grad_accum: int = 1,
                      autocast: bool = False, t: torch.Tensor | None = None,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss over the batch and its gradients, in `grad_accum` micro-batches (under DDP, gradients are
    synchronised only on the last one). `t` and `noise` may be given to make the step deterministic."""
    if len(x) % grad_accum:
        raise ValueError(f"the per-rank batch of {len(x)} does not split into {grad_accum} accumulation steps")
    micro = len(x) // grad_accum
    total = torch.zeros((), device=x.device)
    for i in range(grad_accum):
        part = slice(i * micro, (i + 1) * micro)
        last = i == grad_accum - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        cast = torch.autocast(x.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with sync, cast:
            terms = process.training_loss(model, x[part], y[part],
                                          t=None if t is None else t[part], noise=None if noise is None else noise[part])  # fmt: skip
            loss = terms["loss"].float().mean() / grad_accum
        loss.backward()
        total += loss.detach()
    return total


# ---- checkpoints -------------------------------------------------------------------------------------------


def checkpoint_paths(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("[0-9]*.pt"))


def check_resume_config(saved: dict[str, Any], current: TrainConfig) -> None:
    """Refuse to resume a run under a different configuration, naming every field that differs."""
    differences = [
        f"{key}: checkpoint has {saved.get(key)!r}, command line has {value!r}"
        for key, value in current.to_dict().items()
        if key not in RESUMABLE_CHANGES and key in saved and saved[key] != value
    ]
    if differences:
        raise ValueError(
            "cannot resume: the run was started with another configuration:\n  " + "\n  ".join(differences)
            + "\nUse the original settings, or a new --out folder to start a new run."
        )


def save_training_checkpoint(run_dir: Path, step: int, model: nn.Module, ema: nn.Module, opt, cfg: TrainConfig,
                             model_config: ModelConfig) -> Path:
    state = {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "opt": opt.state_dict(),
        "args": cfg.to_dict(),
        "model_config": model_config.to_dict(),
        "process": cfg.process_config().to_dict(),
        "step": step,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }
    path = atomic_save(state, run_dir / "checkpoints" / f"{step:07d}.pt")
    if cfg.keep_checkpoints:
        for old in checkpoint_paths(run_dir)[: -cfg.keep_checkpoints]:
            old.unlink(missing_ok=True)
    return path


# ---- the loop ----------------------------------------------------------------------------------------------


def _data_shape(source, cfg: TrainConfig) -> tuple[int, int]:
    """(in_channels, input_size) the model sees for this data."""
    channels, height, _ = source.image_shape
    if cfg.vae is not None:
        if not isinstance(source, ImageFolderSource):
            raise ValueError("--vae encodes images on the fly; a latent cache is already encoded, drop --vae")
        if cfg.image_size % 8:
            raise ValueError(f"image size {cfg.image_size} is not a multiple of 8, as the SD VAE needs")
        return 4, cfg.image_size // 8
    return channels, height


def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """Train (or resume) a model; returns the run directory holding checkpoints/, log.jsonl and config.json."""
    env = init_distributed()
    if cfg.global_batch_size % env.world_size:
        raise ValueError(f"global batch {cfg.global_batch_size} does not divide across {env.world_size} ranks; "
                         f"use a multiple of {env.world_size}")  # fmt: skip
    if (cfg.global_batch_size // env.world_size) % cfg.grad_accum:
        raise ValueError(f"the per-rank batch of {cfg.global_batch_size // env.world_size} does not split into "
                         f"{cfg.grad_accum} accumulation steps")  # fmt: skip
    run_dir = Path(cfg.out)
    existing = checkpoint_paths(run_dir)
    if existing and not resume:
        raise ValueError(f"{run_dir} already holds checkpoints; pass --resume to continue, or choose another --out")
    source = open_source(cfg.data, cfg.image_size, cfg.vae)
    in_channels, input_size = _data_shape(source, cfg)
    flip = source.flippable if cfg.flip is None else cfg.flip
    vae = load_vae(cfg.vae, env.device) if cfg.vae else None
    model_config = make_config(cfg.model, input_size=input_size, in_channels=in_channels,
                               num_classes=source.num_classes, class_dropout_prob=cfg.class_dropout_prob,
                               attention=cfg.attention, mediators=cfg.mediators)  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = DiffusionTransformer(model_config).to(env.device)
    ema = deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if existing:
        checkpoint = read_checkpoint(existing[-1])
        check_resume_config(checkpoint["args"], cfg)
        model.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        opt.load_state_dict(checkpoint["opt"])
        start = checkpoint["step"]
    process = cfg.process_config().build()
    net = nn.parallel.DistributedDataParallel(model) if env.world_size > 1 else model
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(
            {"train": cfg.to_dict(), "model": model_config.to_dict(), "data": source.description}, indent=2))  # fmt: skip

    local = cfg.global_batch_size // env.world_size
    log = (run_dir / "log.jsonl").open("a") if env.is_main else None
    bar = None
    if env.is_main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {model_config.label}", dynamic_ncols=True)
    model.train()
    step, window_start, window_losses = start, time.perf_counter(), []
    try:
        while step < cfg.steps:
            torch.manual_seed(step_seed(cfg.seed, env.rank, step))  # noise, timesteps, label dropout, flips
            indices = batch_indices(len(source), cfg.global_batch_size, step, env.rank, env.world_size, cfg.seed)
            flips = torch.rand(local) < 0.5 if flip else None
            x, y = source.batch(indices, flips)
            x, y = x.to(env.device), y.to(env.device)
            if vae is not None:
                x = encode(vae, x)
            opt.zero_grad(set_to_none=True)
            loss = backward_on_batch(net, process, x, y, cfg.grad_accum, autocast=cfg.bf16 and env.device.type == "cuda")
            if env.world_size > 1:
                dist.all_reduce(loss)
                loss /= env.world_size
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                last = checkpoint_paths(run_dir)
                raise TrainingDiverged(
                    f"loss became {loss_value} at step {step}; stopped without saving. Last good checkpoint: "
                    f"{last[-1] if last else 'none'}. Lower --lr, or resume from it with --resume."
                )
            opt.step()
            update_ema(ema, model, cfg.ema_decay)
            step += 1
            window_losses.append(loss_value)
            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "loss": float(np.mean(window_losses)), "steps_per_sec": len(window_losses) / elapsed,
                          "lr": opt.param_groups[0]["lr"], "time": time.time()}  # fmt: skip
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", it_s=f"{record['steps_per_sec']:.1f}")
                window_start, window_losses = time.perf_counter(), []
            if env.is_main and (step % cfg.ckpt_every == 0 or step == cfg.steps):
                save_training_checkpoint(run_dir, step, model, ema, opt, cfg, model_config)
    except KeyboardInterrupt:
        # Keep what was done: the last completed step is saved (atomically) so --resume continues from it.
        if env.is_main and step > start:
            path = save_training_checkpoint(run_dir, step, model, ema, opt, cfg, model_config)
            print(f"\ninterrupted: saved {path}; continue with --resume")
        raise
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    if dist.is_initialized():
        dist.barrier()
    return run_dir
