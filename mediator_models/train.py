"""Training: one loop from a laptop CPU to many GPUs (single process, or torchrun with DDP: NCCL on GPUs,
Gloo on CPUs), with the papers' recipe by default (AdamW 1e-4, no weight decay, EMA 0.9999, label dropout).

Reproducibility by construction: the batch, the noise, the timesteps, the label dropout and the flips of
step s depend only on (seed, rank, s), so a run killed and resumed from its last checkpoint reaches exactly
the weights of a run that was never stopped. A network serving several mediator counts (`mediators=(4, 16, 64,
None)`) trains at one count per step, drawn from (seed, s) alone: the same on every rank and after a resume.

The same loop distils end to end (`attnmed graft --end-to-end-steps`): a run may start from another checkpoint's
network (`init`) and add a teacher's prediction at the student's inputs as a second target (`teacher`,
`TeacherTarget`): loss = diffusion loss + teacher_weight · ‖student(x_t, t, y) − teacher(x_t, t, y)‖².
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mediator_models.data import ImageFolderSource, LatentPairSource, encode, latent_side, load_vae, open_source
from mediator_models.network.config import ModelConfig, make_config, parse_name
from mediator_models.network.dit import DiffusionTransformer
from mediator_models.sampling.generation import ProcessConfig
from mediator_models.storage.checkpoints import atomic_save, checkpoint_checksum, read_checkpoint
from mediator_models.storage.distributed import DistEnv, all_ranks_agree, init_distributed, locked_folder
from mediator_models.storage.errors import SettingError
from mediator_models.storage.runfolder import (
    atomic_write_json,
    atomic_write_text,
    clean_stale_temporaries,
    missing_folders,
    remove_if_unused,
)

# Fields that may change between a run and its resumption: bookkeeping, and the learning rate (the way out
# of a divergence: resume the last good checkpoint with a lower --lr). Changes are recorded in log.jsonl and
# in config.json's history.
# `init` is read only when a run starts, so where that file lies later does not matter.
RESUMABLE_CHANGES = {"steps", "log_every", "ckpt_every", "keep_checkpoints", "progress", "out", "lr", "init"}

# What the SiT-only fields are when not given. A DiT model's process is fixed (DDPM, predicting the noise and its
# variance), so for DiT they stay None: config.json records only what the run uses.
SIT_DEFAULTS = {"interpolant": "linear", "prediction": "velocity"}
DEFAULT_IMAGE_SIZE = 16  # digits and ImageFolder trees; a latent cache has its own

# A step whose loss exceeds this multiple of the run's lowest logged loss has left the normal range: the
# weights that produced it are treated as diverged (a finite loss can still come from exploded weights).
DIVERGENCE_FACTOR = 100.0


class TrainingDiverged(RuntimeError):
    """The loss left its normal range; checkpoints from before that are kept, later ones moved aside."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; the run stopped between two whole steps and saved a checkpoint."""

    def __init__(self, signum: int, checkpoint: Path | None):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.checkpoint = checkpoint


@dataclass(frozen=True)
class TrainConfig:
    model: str = "SiT-T/2"
    attention: str = "full"
    # One count, or a tuple of counts (None: full attention) served by one network, trained at one drawn per step.
    mediators: int | tuple[int | None, ...] | None = None
    depthwise_conv: bool | None = None  # the ablations: see ModelConfig.depthwise_conv
    data: str = "digits"  # "digits", an ImageFolder tree, or a latent cache from `attnmed cache-latents`
    image_size: int | None = None  # pixels; None: a latent cache's own size, else DEFAULT_IMAGE_SIZE
    vae: str | None = None  # local AutoencoderKL folder: train on latents of an ImageFolder, encoded on the fly
    interpolant: str | None = None  # SiT models only (None: SIT_DEFAULTS)
    prediction: str | None = None  # SiT models only (None: SIT_DEFAULTS)
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
    # End-to-end distillation. `init`: an attnmed checkpoint whose network (its model config and EMA weights) the
    # run starts from instead of a fresh one. `teacher`: the arguments of `load_for_sampling` ("checkpoint", and for
    # official files "model_name", "input_size"; "use_ema", "numerics") naming the network whose prediction at the
    # student's inputs is a second target, weighted by `teacher_weight` (see `TeacherTarget`).
    init: str | None = None
    teacher: dict[str, Any] | None = None
    teacher_weight: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.mediators, list):  # read back from config.json
            object.__setattr__(self, "mediators", tuple(self.mediators))
        if isinstance(self.mediators, tuple):  # "full" as the command line spells full attention
            object.__setattr__(self, "mediators", tuple(None if c == "full" else c for c in self.mediators))
        self.validate()
        if self.family == "SiT":
            for name, default in SIT_DEFAULTS.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, default)  # frozen: the defaults recorded as what the run uses

    def validate(self) -> None:
        """Refuse settings that cannot make a run: a `SettingError` naming the field (a front end maps it to
        its own flag)."""
        at_least_one = {
            "steps": self.steps,
            "global_batch_size": self.global_batch_size,
            "log_every": self.log_every,
            "ckpt_every": self.ckpt_every,
            "grad_accum": self.grad_accum,
        }
        if self.image_size is not None:
            at_least_one["image_size"] = self.image_size
        for name, value in at_least_one.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SettingError(name, f"must be a whole number of at least 1, got {value!r}")
        if self.keep_checkpoints is not None and (
            not isinstance(self.keep_checkpoints, int) or self.keep_checkpoints < 1
        ):
            raise SettingError(
                "keep_checkpoints",
                f"must be at least 1 (the newest checkpoint is always kept), got {self.keep_checkpoints!r}",
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SettingError("lr", f"must be a positive number, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise SettingError("weight_decay", f"must be 0 or positive, got {self.weight_decay!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise SettingError(
                "ema_decay", f"must lie in [0, 1) (the papers use 0.9999; 0.99 for short runs), got {self.ema_decay!r}"
            )
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise SettingError(
                "class_dropout_prob", f"must lie in [0, 1) (the papers use 0.1), got {self.class_dropout_prob!r}"
            )
        if not (math.isfinite(self.teacher_weight) and self.teacher_weight >= 0):
            raise SettingError("teacher_weight", f"must be 0 or positive, got {self.teacher_weight!r}")
        if self.teacher is not None and not self.teacher.get("checkpoint"):
            raise SettingError(
                "teacher", f"names no checkpoint: give {{'checkpoint': PATH, ...}}, got {self.teacher!r}"
            )
        if self.vae is not None and self.data == "digits":
            raise SettingError(
                "vae",
                "encodes an ImageFolder into SD-VAE latents, but the digits are trained on as pixels: drop the VAE, "
                "or train on an ImageFolder tree",
            )
        if self.family == "DiT":
            for name in SIT_DEFAULTS:
                if getattr(self, name) is not None:
                    raise SettingError(
                        name,
                        "applies to SiT models only: a DiT model's process is fixed (DDPM, predicting the noise and "
                        "its variance) and does not read it; leave it unset",
                    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        if parse_name(values.get("model", cls.model))[0] == "DiT":
            known -= set(SIT_DEFAULTS)  # runs from before DiT left them unset recorded SiT's, without effect
        return cls(**{k: v for k, v in values.items() if k in known})

    @property
    def family(self) -> str:
        return parse_name(self.model)[0]

    def process_config(self) -> ProcessConfig:
        if self.family == "DiT":
            return ProcessConfig("DiT")
        return ProcessConfig(self.family, self.interpolant, self.prediction)


def step_seed(seed: int, rank: int, step: int) -> int:
    """A seed for everything random in step `step` of rank `rank`."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


# The stream the per-step mediator count is drawn from, apart from the batch order's and each step's own seeds.
COUNT_STREAM = 0x6D656469


def drawn_count(counts: tuple[int | None, ...], seed: int, step: int) -> int | None:
    """The count step `step` of a network serving several counts trains at: uniform over `counts`, from (seed,
    step) alone, so every rank trains the same count (under DDP they share one set of parameters) and a resumed run
    draws what the uninterrupted one drew. Nothing else random in the step is affected."""
    return counts[int(np.random.default_rng([seed, COUNT_STREAM, step]).integers(len(counts)))]


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


def backward_on_batch(
    model: nn.Module,
    process,
    x: torch.Tensor,
    y: torch.Tensor,
    grad_accum: int = 1,
    autocast: bool = False,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    teacher: "TeacherTarget | None" = None,
) -> torch.Tensor:
    """Mean loss over the batch and its gradients, in `grad_accum` micro-batches (under DDP, gradients are
    synchronised only on the last one). `t` and `noise` may be given to make the step deterministic. With a
    `teacher`, its weighted distillation term is part of the loss (and the teacher keeps its share for the log)."""
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
            terms = process.training_loss(
                model if teacher is None else teacher.paired(model),
                x[part],
                y[part],
                t=None if t is None else t[part],
                noise=None if noise is None else noise[part],
            )
            loss = terms["loss"].float().mean()
            if teacher is not None:
                loss = loss + teacher.weight * teacher.take_term(grad_accum)
            loss = loss / grad_accum
        loss.backward()
        total += loss.detach()
    return total


class TeacherTarget:
    """End-to-end distillation's second target: the teacher's prediction at exactly the student's inputs.

    `paired(student)` is the network a process's `training_loss` calls: it runs the student, then (without
    gradients) the teacher on the same x_t, t and labels, and keeps the term mean over pixels of (student −
    teacher)² per sample, averaged over the batch (all output channels, a DiT's variance channels too). The
    labels the student drops to the null class (classifier-free guidance's training) are drawn here, as
    `LabelEmbedder.token_drop` draws them (one `torch.rand` per forward, so the step consumes the random stream as
    a plain one does), and both networks are made to drop those same labels."""

    def __init__(self, teacher: nn.Module, weight: float, student: nn.Module):
        self.teacher = teacher.requires_grad_(False).eval()
        self.weight = weight
        self.dropout_prob = student.config.class_dropout_prob
        self.student = student
        self.logged = torch.zeros(())  # this step's term, summed over its micro-batches (for the log)
        self._term: torch.Tensor | None = None
        self._dropped: torch.Tensor | None = None
        # LabelEmbedder.forward(labels, train, force_drop_ids): force the drops drawn in `paired`, on both networks.
        for network in (student, teacher):
            network.y_embedder.register_forward_pre_hook(self._force_drops)

    def _force_drops(self, module, args):
        if self._dropped is None:
            return None
        return (args[0], False, self._dropped)

    def paired(self, student_call):
        """The function (x_t, t, y) -> student prediction that also computes the distillation term."""

        def call(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if self.student.training and self.dropout_prob > 0:
                self._dropped = (torch.rand(y.shape[0], device=y.device) < self.dropout_prob).long()
            try:
                prediction = student_call(x_t, t, y)
                with torch.no_grad():
                    target = self.teacher(x_t, t, y)
            finally:
                self._dropped = None
            dims = tuple(range(1, prediction.dim()))
            self._term = (prediction.float() - target.float()).square().mean(dim=dims).mean()
            return prediction

        return call

    def take_term(self, grad_accum: int = 1) -> torch.Tensor:
        """The term of the last `paired` call (once), noting its share of the step for the log."""
        term, self._term = self._term, None
        self.logged = self.logged.to(term.device) + term.detach() / grad_accum
        return term

    def take_logged(self) -> torch.Tensor:
        """This step's distillation term (summed over micro-batches), and start the next step's."""
        value, self.logged = self.logged, torch.zeros((), device=self.logged.device)
        return value


def load_teacher(cfg: TrainConfig, student: nn.Module, device: torch.device) -> TeacherTarget:
    """The teacher `cfg.teacher` names, checked to predict the same quantity the student does, for the same data."""
    from mediator_models.sample import load_for_sampling

    loaded = load_for_sampling(**{**cfg.teacher, "device": device})
    ours, theirs = student.config, loaded.model.config
    process = cfg.process_config()
    differences = [
        f"{name}: the student's is {getattr(ours, name)!r}, the teacher's {getattr(theirs, name)!r}"
        for name in ("family", "input_size", "in_channels", "num_classes", "learn_sigma", "class_dropout_prob")
        if getattr(ours, name) != getattr(theirs, name)
    ]
    differences += [
        f"{name}: the run's is {getattr(process, name)!r}, the teacher's {getattr(loaded.process, name)!r}"
        for name in ("family", "interpolant", "prediction")
        if process.family == "SiT" and getattr(process, name) != getattr(loaded.process, name)
    ]
    if differences:
        raise SettingError(
            "teacher",
            f"{cfg.teacher['checkpoint']} predicts something else than the student: "
            + "; ".join(differences)
            + ". Distil from the network the student was grafted from",
        )
    return TeacherTarget(loaded.model, cfg.teacher_weight, student)


def _initial_network(
    state: dict[str, Any], cfg: TrainConfig, expected: ModelConfig
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and EMA weights of `state` (`cfg.init`'s checkpoint), refused where its network is not the
    one the run describes (`expected`, from the run's model name, attention and data)."""
    if "model_config" not in state:
        raise SettingError("init", f"{cfg.init} is no attnmed checkpoint (it holds no model_config)")
    config = ModelConfig.from_dict(state["model_config"])
    fields = ("name", "input_size", "in_channels", "num_classes", "attention", "mediators", "depthwise_conv")
    differences = [
        f"{name}: {cfg.init} has {getattr(config, name)!r}, the run {getattr(expected, name)!r}"
        for name in (*fields, "class_dropout_prob")
        if getattr(config, name) != getattr(expected, name)
    ]
    if differences:
        raise SettingError(
            "init", "holds another network than the run trains: " + "; ".join(differences) + ". Describe its network"
        )
    return config, state.get("ema", state["model"])


# ---- checkpoints -------------------------------------------------------------------------------------------


def checkpoint_paths(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("[0-9]*.pt"))


def check_resume_config(saved: dict[str, Any], current: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume a run under a different configuration, naming every field that differs; return the
    allowed changes (RESUMABLE_CHANGES) as {field: (before, after)}.

    Fields that another one fixes are not compared: the SiT-only fields of a DiT run, and the image size of a
    run on a latent cache (runs from before these were settled recorded a default that had no effect)."""
    settled = set(SIT_DEFAULTS) if current.family == "DiT" else set()
    if (Path(current.data) / "meta.json").exists():
        settled.add("image_size")
    differences = [
        f"{key}: checkpoint has {saved.get(key)!r}, command line has {value!r}"
        for key, value in current.to_dict().items()
        if key not in RESUMABLE_CHANGES | settled and key in saved and saved[key] != value
    ]
    if differences:
        raise ValueError(
            "cannot resume: the run was started with another configuration:\n  "
            + "\n  ".join(differences)
            + "\nUse the original settings, or a new --out folder to start a new run."
        )
    return {
        key: (saved[key], value)
        for key, value in current.to_dict().items()
        if key in RESUMABLE_CHANGES - {"progress", "out"} and key in saved and saved[key] != value
    }


def save_training_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    ema: nn.Module,
    opt,
    cfg: TrainConfig,
    model_config: ModelConfig,
    loss_floor: float | None = None,
) -> Path:
    """Write checkpoint `step` atomically, with a checksum of what it holds (pruning is `prune_checkpoints`)."""
    state = {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "opt": opt.state_dict(),
        "args": cfg.to_dict(),
        "model_config": model_config.to_dict(),
        "process": cfg.process_config().to_dict(),
        "step": step,
        "loss_floor": loss_floor,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }
    state["checksum"] = checkpoint_checksum(state)
    return atomic_save(state, run_dir / "checkpoints" / f"{step:07d}.pt")


def prune_checkpoints(run_dir: Path, keep: int | None) -> None:
    """Keep the newest `keep` checkpoints. Called only once the newest has proven healthy (the step after
    it was saved computed a loss in the normal range), so a divergence never leaves only bad checkpoints."""
    if keep:
        for old in checkpoint_paths(run_dir)[:-keep]:
            old.unlink(missing_ok=True)


def set_aside_diverged(run_dir: Path, first_bad_step: int) -> list[Path]:
    """Move checkpoints holding weights from step `first_bad_step` on into checkpoints/diverged/, out of
    --resume's way (kept, not deleted: nothing is lost)."""
    moved = []
    for path in checkpoint_paths(run_dir):
        if int(path.stem) >= first_bad_step:
            target = run_dir / "checkpoints" / "diverged" / path.name
            target.parent.mkdir(exist_ok=True)
            os.replace(path, target)
            moved.append(target)
    return moved


def truncate_log(log_path: Path, step: int) -> None:
    """Drop log records past `step` (written after the checkpoint a resume starts from), so steps never repeat."""
    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if record.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(log_path, "".join(line + "\n" for line in kept))


@contextlib.contextmanager
def stop_between_steps():
    """Turn SIGINT and SIGTERM into a request to stop at the next step boundary (a second SIGINT stops at
    once). Yields a one-item list holding the signal number received, or None."""
    received: list[int | None] = [None]
    if threading.current_thread() is not threading.main_thread():
        yield received  # signal handlers can only be set from the main thread
        return

    def request(signum, frame):
        if received[0] == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, keeping the last periodic checkpoint
        received[0] = signum

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---- the loop ----------------------------------------------------------------------------------------------


def _settle_image_size(cfg: TrainConfig, source) -> TrainConfig:
    """`cfg` with the image size the run trains at: a latent cache's own (refusing another one asked for), else
    the one asked for or the default, so that config.json and the checkpoints record the truth."""
    if isinstance(source, LatentPairSource):
        if cfg.image_size is not None and cfg.image_size != source.image_size:
            _, height, width = source.image_shape
            raise SettingError(
                "image_size",
                f"is {cfg.image_size}, but the latent cache {cfg.data} holds latents of {source.image_size} px "
                f"images ({height}×{width}); leave it unset to train at the cache's size, or cache the images "
                f"again at {cfg.image_size} px into another folder",
            )
        return dataclasses.replace(cfg, image_size=source.image_size)
    return dataclasses.replace(cfg, image_size=cfg.image_size or DEFAULT_IMAGE_SIZE)


def _data_shape(source, cfg: TrainConfig) -> tuple[int, int]:
    """(in_channels, input_size) the model sees for this data."""
    channels, height, _ = source.image_shape
    if cfg.vae is not None:
        if not isinstance(source, ImageFolderSource):
            raise SettingError("vae", "encodes images on the fly, but a latent cache is already encoded: drop the VAE")
        return 4, latent_side(cfg.image_size)
    return channels, height


def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """Train (or resume) a model; returns the run directory holding checkpoints/, log.jsonl and config.json.

    The run folder is locked while training (a second run into it is refused). SIGINT and SIGTERM stop the
    run between two whole steps and save a checkpoint (`TrainingInterrupted`), so a resume is exact.
    """
    env = init_distributed()
    if cfg.global_batch_size % env.world_size:
        raise ValueError(
            f"global batch {cfg.global_batch_size} does not divide across {env.world_size} ranks; "
            f"use a multiple of {env.world_size}"
        )
    if (cfg.global_batch_size // env.world_size) % cfg.grad_accum:
        raise ValueError(
            f"the per-rank batch of {cfg.global_batch_size // env.world_size} does not split into "
            f"{cfg.grad_accum} accumulation steps"
        )
    run_dir = Path(cfg.out)
    created = missing_folders(run_dir) if env.is_main else []
    with locked_folder(run_dir, "attnmed train", env):
        try:
            return _train_locked(cfg, env, run_dir, resume)
        except BaseException:
            remove_if_unused(created)  # a start refused by a check leaves no empty run folder behind
            raise


def _train_locked(cfg: TrainConfig, env: DistEnv, run_dir: Path, resume: bool) -> Path:
    if env.is_main:
        clean_stale_temporaries(run_dir)  # a kill during a checkpoint write leaves one; we hold the lock
    existing = checkpoint_paths(run_dir)
    if existing and not resume:
        raise ValueError(f"{run_dir} already holds checkpoints; pass --resume to continue, or choose another --out")
    if resume and not existing:
        raise SettingError(
            "resume",
            f"has nothing to continue: {run_dir} holds no checkpoint. Drop it to start a new run in that folder, "
            "or name the folder of the run to continue",
        )
    source = open_source(cfg.data, cfg.image_size or DEFAULT_IMAGE_SIZE, cfg.vae)
    cfg = _settle_image_size(cfg, source)
    in_channels, input_size = _data_shape(source, cfg)
    batch_indices(len(source), cfg.global_batch_size, 0, env.rank, env.world_size, cfg.seed)  # refuses too few items
    flip = source.flippable if cfg.flip is None else cfg.flip
    model_config = make_config(
        cfg.model,
        input_size=input_size,
        in_channels=in_channels,
        num_classes=source.num_classes,
        class_dropout_prob=cfg.class_dropout_prob,
        attention=cfg.attention,
        mediators=cfg.mediators,
        depthwise_conv=cfg.depthwise_conv,
    )
    checkpoint = read_checkpoint(existing[-1]) if existing else None
    initial = None
    if cfg.init is not None:  # the network is the init's (a resumed run's own checkpoint holds it by then)
        model_config, initial = _initial_network(checkpoint or read_checkpoint(cfg.init), cfg, model_config)
    torch.manual_seed(cfg.seed)
    model = DiffusionTransformer(model_config).to(env.device)
    if initial is not None and not existing:
        model.load_state_dict(initial, strict=True)
    ema = deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, loss_floor, changed = 0, None, {}
    if existing:
        changed = {k: {"from": a, "to": b} for k, (a, b) in check_resume_config(checkpoint["args"], cfg).items()}
        model.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        opt.load_state_dict(checkpoint["opt"])
        for group in opt.param_groups:  # the optimizer state restores the old lr; a resume may change it
            group["lr"] = cfg.lr
        start, loss_floor = checkpoint["step"], checkpoint.get("loss_floor")
    vae = load_vae(cfg.vae, env.device) if cfg.vae else None
    process = cfg.process_config().build()
    teacher = load_teacher(cfg, model, env.device) if cfg.teacher is not None else None
    # A network serving several counts leaves the other counts' bias tables (and, at full attention, the conv) out
    # of each step's graph; DDP must look for the unused parameters then.
    unused = model_config.serves_several
    net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=unused) if env.world_size > 1 else model
    log = None
    if env.is_main:
        truncate_log(run_dir / "log.jsonl", start)
        _write_run_config(run_dir, cfg, model_config, source.description, start, changed)
        log = (run_dir / "log.jsonl").open("a")
        if changed:
            log.write(json.dumps({"event": "resume", "step": start, "time": time.time(), "changed": changed}) + "\n")
            log.flush()

    local = cfg.global_batch_size // env.world_size
    bar = None
    if env.is_main and cfg.progress:
        from mediator_models.progress import progress_bar

        bar = progress_bar(cfg.steps, f"train {model_config.label}", initial=start)
    model.train()
    step, window_start, window_losses, window_counts = start, time.perf_counter(), [], {}
    window_teacher: list[float] = []  # with a teacher: each step's distillation term (before its weight)
    unproven = False  # the newest checkpoint has not yet shown a loss in the normal range
    save = lambda: save_training_checkpoint(run_dir, step, model, ema, opt, cfg, model_config, loss_floor)  # noqa: E731
    try:
        with stop_between_steps() as received:
            while step < cfg.steps:
                torch.manual_seed(step_seed(cfg.seed, env.rank, step))  # noise, timesteps, label dropout, flips
                indices = batch_indices(len(source), cfg.global_batch_size, step, env.rank, env.world_size, cfg.seed)
                flips = torch.rand(local) < 0.5 if flip else None
                x, y = source.batch(indices, flips)
                x, y = x.to(env.device), y.to(env.device)
                if vae is not None:
                    x = encode(vae, x)
                if model_config.serves_several:
                    count = drawn_count(model_config.counts, cfg.seed, step)
                    model.use_count(count)
                    label = "full" if count is None else str(count)
                    window_counts[label] = window_counts.get(label, 0) + 1
                opt.zero_grad(set_to_none=True)
                loss = backward_on_batch(
                    net, process, x, y, cfg.grad_accum, autocast=cfg.bf16 and env.device.type == "cuda", teacher=teacher
                )
                if env.world_size > 1:
                    dist.all_reduce(loss)
                    loss /= env.world_size
                if teacher is not None:
                    term = teacher.take_logged()
                    if env.world_size > 1:
                        dist.all_reduce(term)
                        term /= env.world_size
                    window_teacher.append(float(term))
                loss_value = float(loss)
                if not math.isfinite(loss_value) or (
                    loss_floor is not None and loss_value > DIVERGENCE_FACTOR * loss_floor
                ):
                    raise _diverged(run_dir, step, loss_value, loss_floor, env.is_main)
                if unproven and env.is_main:  # the weights of the newest checkpoint gave a normal loss
                    prune_checkpoints(run_dir, cfg.keep_checkpoints)
                unproven = False
                if loss_floor is None:
                    loss_floor = loss_value
                opt.step()
                update_ema(ema, model, cfg.ema_decay)
                step += 1
                window_losses.append(loss_value)
                if bar is not None:
                    bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "step": step,
                        "loss": float(np.mean(window_losses)),
                        "steps_per_sec": len(window_losses) / elapsed,
                        "lr": opt.param_groups[0]["lr"],
                        "time": time.time(),
                    }
                    if window_counts:  # a network serving several counts: the steps each count trained
                        record["counts"] = window_counts
                    if window_teacher:  # part of "loss": the distillation term, before its weight
                        record["teacher_loss"] = float(np.mean(window_teacher))
                    loss_floor = min(loss_floor, record["loss"])
                    if log is not None:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4f}", it_s=f"{record['steps_per_sec']:.1f}")
                    window_start, window_losses, window_counts = time.perf_counter(), [], {}
                    window_teacher = []
                periodic = step % cfg.ckpt_every == 0 or step == cfg.steps
                if env.is_main and periodic:
                    save()
                    unproven = True
                # Signals are acted on here, between whole steps, and by all ranks at the same step.
                if not all_ranks_agree(received[0] is None):
                    path = None
                    if env.is_main:
                        path = run_dir / "checkpoints" / f"{step:07d}.pt"
                        if not periodic and step > start:
                            save()
                        path = path if path.exists() else None
                    raise TrainingInterrupted(received[0] or signal.SIGTERM, path)
            if unproven and env.is_main:
                prune_checkpoints(run_dir, cfg.keep_checkpoints)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    if dist.is_initialized():
        dist.barrier()
    return run_dir


def _diverged(run_dir: Path, step: int, loss: float, floor: float | None, is_main: bool) -> TrainingDiverged:
    """Set aside the checkpoints holding weights that produced the abnormal loss, and say how to go on."""
    moved = set_aside_diverged(run_dir, step) if is_main else []
    last = checkpoint_paths(run_dir)
    how = (
        "non-finite"
        if not math.isfinite(loss)
        else f"{loss:.3g}, over {DIVERGENCE_FACTOR:g}× the run's lowest ({floor:.3g})"
    )
    aside = f" Checkpoints from step {step} on were moved to {run_dir / 'checkpoints' / 'diverged'}." if moved else ""
    if last:
        advice = f"Last good checkpoint: {last[-1]}; continue from it with a lower learning rate: the same command with --resume --lr <lower>."
    else:
        advice = "No good checkpoint exists yet: start again with a lower --lr (and a new --out, or delete this one)."
    return TrainingDiverged(f"the loss left its normal range at step {step} ({how}); stopped.{aside} {advice}")


def _write_run_config(
    run_dir: Path, cfg: TrainConfig, model_config: ModelConfig, data: Any, step: int, changed: dict[str, dict[str, Any]]
) -> None:
    """config.json: the configuration in force, and a history of the settings changed at each resume."""
    path = run_dir / "config.json"
    history = []
    if path.exists():
        try:
            history = json.loads(path.read_text()).get("history", [])
        except json.JSONDecodeError:
            history = []
    history = [h for h in history if h.get("step", 0) <= step]
    if changed:
        history.append({"step": step, "changed": changed})
    atomic_write_json(path, {"train": cfg.to_dict(), "model": model_config.to_dict(), "data": data, "history": history})
