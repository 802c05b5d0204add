"""Sampling to disk: PNGs, an `.npz` in the ADM evaluator's layout and a JSON sidecar, single process or
under torchrun. Sample i is drawn from its own seed (seed + i) and its own label, whatever the batch and the
number of ranks, so an interrupted run restarts where it stopped and keeps the images already written.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mediator_models.network.config import ModelConfig
from mediator_models.network.dit import DiffusionTransformer, build_model
from mediator_models.sampling.generation import ProcessConfig, SamplerConfig, generate
from mediator_models.sampling.steps import start_batch
from mediator_models.sampling.switching import count_label
from mediator_models.storage.checkpoints import (
    describe_state_dict,
    extract_state_dict,
    load_checkpoint,
    read_checkpoint,
    weights_digest,
)
from mediator_models.storage.distributed import init_distributed, locked_folder
from mediator_models.storage.errors import SettingError
from mediator_models.storage.runfolder import atomic_write, atomic_write_json, claim_identity, clean_stale_temporaries


@dataclass
class LoadedModel:
    model: DiffusionTransformer
    process: ProcessConfig
    source: str
    weights: str = ""  # digest of the weights sampled from: what a sample folder's identity names
    data: str | None = None  # what an attnmed checkpoint was trained on (its "args"), e.g. "digits"; else None


def load_for_sampling(
    checkpoint: str | os.PathLike,
    *,
    model_name: str | None = None,
    input_size: int | None = None,
    num_classes: int = 1000,
    use_ema: bool = True,
    attention: str | None = None,
    mediators: int | None = None,
    device: torch.device | str = "cpu",
    numerics: str = "dit",
    depthwise_conv: bool | None = None,
) -> LoadedModel:
    """A model ready to sample: attnmed checkpoints describe themselves (a `model_name`, `input_size`,
    `attention` or `mediators` that disagrees with the checkpoint is refused); official DiT/SiT files (plain
    state dicts) need `model_name` (and the input size, default 32, and attention they were trained with). A
    diffusers DiT folder (a DiTTransformer2DModel, or a pipeline folder holding one) converts onto our DiT and
    computes as the original DiT, or exactly as diffusers does with `numerics="diffusers"`. A checkpoint of a
    network serving several counts loads as the network of one of them (`CountView`): `mediators` (or
    `attention="full"`) picks it, by default its first; `switchable_networks` expands it to all of them."""
    from mediator_models.storage.diffusers_weights import config_from_diffusers, read_diffusers_folder

    if Path(checkpoint).is_dir():  # a diffusers DiT (read_diffusers_folder refuses any other folder)
        weights, diffusers_config = read_diffusers_folder(checkpoint)
        config = config_from_diffusers(diffusers_config, weights, numerics)
        conflicts = _conflicting_flags(config, model_name, input_size, attention, mediators, depthwise_conv)
        if conflicts:
            raise ValueError(
                f"{checkpoint} is a diffusers DiT ({config.label}); it disagrees with {', '.join(conflicts)}"
            )
        model = DiffusionTransformer(config)
        load_checkpoint(model, weights)
        return LoadedModel(model.to(device).eval(), ProcessConfig("DiT"), str(checkpoint), weights_digest(weights))
    if numerics != "dit":
        raise ValueError(
            "--numerics applies to diffusers models only; attnmed and official DiT/SiT files compute as DiT"
        )
    state = read_checkpoint(checkpoint)
    served = None
    if "model_config" in state:
        config = ModelConfig.from_dict(state["model_config"])
        if config.serves_several:  # the flags pick one of its counts instead of describing the network
            served, attention, mediators = _count_asked(config, attention, mediators, checkpoint), None, None
        conflicts = _conflicting_flags(config, model_name, input_size, attention, mediators, depthwise_conv)
        if conflicts:
            raise ValueError(
                f"{checkpoint} is an attnmed checkpoint that says which model it holds; it disagrees with "
                + ", ".join(conflicts)
                + ". Drop these flags (they are for official DiT/SiT files only)"
            )
        process = ProcessConfig(**state.get("process", {"family": config.family}))
        model = DiffusionTransformer(config)
    else:
        if model_name is None:
            raise ValueError(
                f"{checkpoint} does not say which model it holds; pass --model (e.g. DiT-XL/2) "
                "and --input-size (32 for 256 px)"
            )
        weights = extract_state_dict(state, use_ema=use_ema)
        model = build_model(
            model_name,
            **_data_shape_of(weights, input_size, num_classes),
            attention=attention or "full",
            mediators=mediators,
            depthwise_conv=depthwise_conv,
        )
        process = ProcessConfig(model.config.family)
    if "model_config" in state:
        weights = extract_state_dict(state, use_ema=use_ema)
    load_checkpoint(model, weights)
    model = model.to(device).eval()
    if model.config.serves_several:
        model = model.at_count(served)
    data = state.get("args", {}).get("data") if isinstance(state.get("args"), dict) else None
    return LoadedModel(model, process, str(checkpoint), weights_digest(weights), data)


def _count_asked(config: ModelConfig, attention: str | None, mediators: int | None, checkpoint) -> int | None:
    """The count of a network serving several that --mediators / --attention full ask for (default: its first)."""
    if attention not in (None, "mediator", "full") or (attention == "full" and mediators is not None):
        raise ValueError(
            f"{checkpoint} holds {config.label}; pick one of its counts with --mediators N or --attention full"
        )
    count = None if attention == "full" else config.counts[0] if mediators is None else mediators
    if count not in config.counts:
        served = ", ".join("full (--attention full)" if c is None else str(c) for c in config.counts)
        raise ValueError(f"{checkpoint} holds {config.label}, which serves {served}; not {mediators}")
    return count


def _each_count(loaded: LoadedModel) -> list[LoadedModel]:
    """A network serving several counts as the network of each (same file, same weights); others as they are."""
    if not serves_several(loaded):
        return [loaded]
    network = loaded.model.network
    return [
        LoadedModel(view, loaded.process, loaded.source, loaded.weights, loaded.data)
        for view in network.count_views().values()
    ]


def serves_several(loaded: LoadedModel) -> bool:
    """Whether `loaded` is one count of a network serving several (which one --ckpt can switch between)."""
    network = getattr(loaded.model, "network", None)
    return network is not None and network.config.serves_several


def _data_shape_of(weights, input_size: int | None, num_classes: int) -> dict[str, Any]:
    """What a plain state dict says of the data it was trained on, which no flag sets: its channels, its labels
    (one more embedding row with label dropout, the null class), whether it learned the variance, and, unless
    --input-size is given, its token grid. The architecture (--model) is checked against it on loading."""
    info = describe_state_dict(weights)
    shape: dict[str, Any] = {"input_size": 32 if input_size is None else input_size, "num_classes": num_classes}
    if "in_channels" in info:
        shape["in_channels"] = info["in_channels"]
        if "out_channels" in info:
            shape["learn_sigma"] = info["out_channels"] == 2 * info["in_channels"]
    if "embedding_rows" in info:
        rows = info["embedding_rows"]  # the papers train with label dropout: num_classes + 1 rows
        shape.update(num_classes=rows - 1, class_dropout_prob=0.1) if rows > 1 else shape.update(num_classes=rows)
    if input_size is None and "num_tokens" in info and "patch_size" in info:
        side = math.isqrt(info["num_tokens"])
        if side * side == info["num_tokens"]:
            shape["input_size"] = side * info["patch_size"]
    return shape


def _conflicting_flags(config: ModelConfig, model_name, input_size, attention, mediators, depthwise_conv) -> list[str]:
    """The model flags given on the command line that a self-describing checkpoint contradicts."""
    given = {
        "--model": (model_name, config.name),
        "--input-size": (input_size, config.input_size),
        "--attention": (attention, config.attention),
        "--mediators": (mediators, config.mediators),
        "--depthwise-conv": (depthwise_conv, config.uses_depthwise_conv),
    }
    return [
        f"{flag} {value} (the checkpoint holds {saved})"
        for flag, (value, saved) in given.items()
        if value is not None and value != saved
    ]


# What networks switched within one sampling run must share: everything but the attention.
SWITCHABLE_FIELDS = (
    "family",
    "size",
    "depth",
    "hidden_size",
    "num_heads",
    "patch_size",
    "input_size",
    "in_channels",
    "num_classes",
    "learn_sigma",
    "class_dropout_prob",
)


def switchable_networks(loaded: list[LoadedModel]) -> dict[int | None, LoadedModel]:
    """Key loaded models by mediator count (None: full attention), refusing any pair that cannot be switched
    between within one sampling run (another size, patch, input size, label set or process). A network serving
    several counts stands for each of them."""
    loaded = [count for item in loaded for count in _each_count(item)]
    first = loaded[0]
    networks: dict[int | None, LoadedModel] = {}
    for other in loaded:
        a, b = first.model.config, other.model.config
        differing = [
            f"{f}: {getattr(a, f)} vs {getattr(b, f)}" for f in SWITCHABLE_FIELDS if getattr(a, f) != getattr(b, f)
        ]
        if other.process != first.process:
            differing.append(f"process: {first.process.to_dict()} vs {other.process.to_dict()}")
        if differing:
            raise ValueError(
                f"{other.source} cannot be switched with {first.source}: "
                + "; ".join(differing)
                + ". Networks switched within one run differ only in their attention"
            )
        count = b.mediators if b.attention == "mediator" else None
        if count in networks:
            raise ValueError(
                f"{other.source} and {networks[count].source} both hold "
                f"{'full attention' if count is None else f'{count} mediators'}; give one network per count"
            )
        networks[count] = other
    return networks


@dataclass
class Switching:
    """Sampling that switches between networks: the network the sampler starts from, the step callback that
    picks each step's network, and the description recorded in samples.json."""

    base: LoadedModel
    callback: Any
    description: dict[str, Any]


def switching_by_schedule(loaded: list[LoadedModel], schedule) -> Switching:
    """A fixed schedule (`MediatorSchedule`) over networks that differ in their attention only. A schedule with
    per-layer intervals also needs them to share every tensor outside attention (grafted from one source)."""
    networks, order = _switchable_in_order(loaded)
    callback = schedule.callback({c: networks[c].model for c in order}, names={c: networks[c].source for c in order})
    return Switching(networks[order[0]], callback, {**schedule.to_dict(), "networks": _weights(networks, order)})


def adaptive_switching(
    loaded: list[LoadedModel],
    sampler: SamplerConfig,
    ratios,
    *,
    warmup: int = 3,
    distance: str = "l1",
    statistic: str = "state",
) -> Switching:
    """The paper's rule over networks ordered fewest mediators first: `ratios` ρ_1 … ρ_{m−1}, one per switch.
    Refuses what would never switch (a warm-up as long as the run) or cannot be measured (a sampler evaluating
    the network more than once per step)."""
    from mediator_models.sampling.switching import AdaptiveSwitch, evaluation_levels

    networks, order = _switchable_in_order(loaded)
    if sampler.adaptive or sampler.method == "heun":
        raise SettingError(
            "adaptive",
            "measures the distance between consecutive steps, so it needs a sampler that evaluates the network "
            "once per step: the SDE (euler), DDPM, DDIM or the ODE with --method euler",
        )
    labels = ", ".join(map(count_label, order))
    if ratios is None or len(ratios) != len(order) - 1:
        raise SettingError(
            "rho", f"needs {len(order) - 1} values with {len(order)} networks ({labels}), one per switch"
        )
    if any(not r > 0 for r in ratios):
        raise SettingError("rho", f"values must be positive, got {list(ratios)}")
    if not isinstance(warmup, int) or warmup < 1:
        raise SettingError("warmup", f"must be at least 1, got {warmup!r}")
    # μ averages d_2 … d_{K+1}; the first evaluation that can run another network is K + 2.
    evaluations = len(evaluation_levels(networks[order[0]].process, sampler))
    if evaluations < warmup + 3:
        raise SettingError(
            "warmup",
            f"is {warmup}, but the rule can first switch at evaluation {warmup + 2} and this sampler makes "
            f"{evaluations}: no sample would ever switch. Use a warm-up of at most {max(evaluations - 3, 0)}, "
            "or more steps" + ("" if evaluations >= 4 else " (at least 4 evaluations)"),
        )
    switch = AdaptiveSwitch(
        [networks[c].model for c in order], ratios, warmup=warmup, distance=distance, statistic=statistic
    )
    description = {
        "name": "adaptive ρ=" + "/".join(f"{r:g}" for r in ratios),
        "rule": "paper (adaptive)" if statistic == "state" else "paper's rule on the drift (ours)",
        "statistic": statistic,
        "order": [count_label(c) for c in order],
        "rho": list(ratios),
        "warmup": warmup,
        "distance": distance,
        "networks": _weights(networks, order),
    }
    return Switching(networks[order[0]], switch, description)


def _switchable_in_order(loaded: list[LoadedModel]) -> tuple[dict[int | None, LoadedModel], list[int | None]]:
    networks = switchable_networks(loaded)
    return networks, sorted(c for c in networks if c is not None) + ([None] if None in networks else [])


def _weights(networks: dict[int | None, LoadedModel], order) -> dict[str, str]:
    return {count_label(c): networks[c].weights for c in order}


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [−1, 1] -> (B, H, W, 3) uint8; one-channel images are repeated to RGB (ADM's layout)."""
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr


def write_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    atomic_write(path, lambda handle: Image.fromarray(array).save(handle, format="PNG"))


IMAGE_CHANNELS = (1, 3)  # what a model draws as pixels (grey or RGB); anything else is latents for a VAE


def check_sampling_request(
    config: ModelConfig,
    sampler: SamplerConfig,
    num_samples: int,
    batch_size: int,
    classes: list[int] | None,
    vae=None,
) -> None:
    """Refuse, before any work, requests that cannot be sampled (a SettingError naming the parameter)."""
    sampler.check(config.family, config.in_channels)
    if vae is None and config.in_channels not in IMAGE_CHANNELS:
        raise SettingError(
            "vae",
            f"is needed: the model draws {config.in_channels}-channel latents, which are no images; name the "
            "AutoencoderKL folder that decodes them (a pipeline folder given as --ckpt brings its own)",
        )
    if vae is not None:
        latent_channels = vae.config.latent_channels
        if config.in_channels != latent_channels:
            kind = "pixels" if config.in_channels in IMAGE_CHANNELS else "latents"
            raise SettingError(
                "vae",
                f"decodes {latent_channels}-channel latents, but the model draws {config.in_channels}-channel "
                f"{kind}" + (": drop the VAE" if kind == "pixels" else ": give the VAE the model was trained with"),
            )
    for setting, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise SettingError(setting, f"must be at least 1, got {value!r}")
    if classes is not None:
        if len(classes) == 0:
            raise SettingError(
                "classes", "was given without labels; name at least one, or leave it unset for random labels"
            )
        wrong = [c for c in classes if not 0 <= c < config.num_classes]
        if wrong:
            raise SettingError("classes", f"{wrong} out of range: the model knows labels 0..{config.num_classes - 1}")


def sample_to_folder(
    loaded: LoadedModel,
    out_dir: str | os.PathLike,
    *,
    num_samples: int,
    sampler: SamplerConfig,
    batch_size: int = 16,
    seed: int = 0,
    classes: list[int] | None = None,
    vae=None,
    callback=None,
    schedule: dict | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write samples 0..num_samples−1 as PNGs (skipping those already there), then `samples.npz` (`arr_0`,
    uint8 NHWC) and `samples.json` (what made them and what they cost). Returns the sidecar dict.

    The folder belongs to one configuration, recorded in `sampling.json` at the first start: a restart with
    the same configuration resumes (more samples may be asked for), anything else is refused naming the
    setting that differs, and a second concurrent run into the folder is refused by its lock.
    `callback` is the sampler's step callback (a mediator schedule or the adaptive rule, which may hand
    steps to other networks, or replace attention computations, saying in `saved_gmacs_per_image` what that saved
    in the run just drawn); `schedule` describes it in the sidecar. Costs are counted per sample."""
    config = loaded.model.config
    check_sampling_request(config, sampler, num_samples, batch_size, classes, vae)  # before any work or folder
    env = init_distributed()
    out = Path(out_dir)
    with locked_folder(out, "attnmed sample", env):
        provenance = {
            "checkpoint": loaded.source,
            "weights": loaded.weights,
            "model": config.to_dict(),
            "process": loaded.process.to_dict(),
            "sampler": sampler.to_dict(),
            "seed": seed,
            "classes": classes,
            "decoded_with_vae": vae is not None,
            "schedule": schedule,
        }
        if sampler.adaptive:  # dopri5 shares its step size across the batch: batching changes the images
            provenance.update(batch_size=batch_size, world_size=env.world_size)
        if env.is_main:
            _claim_sample_folder(out, provenance)
            clean_stale_temporaries(out)
        _sample_missing(loaded, out, env, num_samples, sampler, batch_size, seed, classes, vae, callback, progress)
        if dist.is_initialized():
            dist.barrier()
        return finalize_folder(out, num_samples, provenance) if env.is_main else {}


def _claim_sample_folder(out: Path, provenance: dict[str, Any]) -> None:
    identity = out / "sampling.json"
    if not identity.exists():
        strays = sorted(out.glob("[0-9]*.png"))
        if strays:
            raise ValueError(
                f"{out} already holds {len(strays)} images (e.g. {strays[0].name}) but no sampling.json "
                "saying what made them; sample into another --out, or move them away first"
            )
    fix = (
        "To continue that sampling, repeat its settings; to sample this configuration, choose another --out "
        "(or delete the folder)."
    )
    claim_identity(identity, provenance, what="samples", fix=fix, ignore=("checkpoint",))


def _recorded_costs(out: Path) -> dict[int, dict]:
    """Per-sample cost records of every rank; a line cut short by a kill is ignored (its sample is redone)."""
    costs: dict[int, dict] = {}
    for path in sorted(out.glob("costs-rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            costs[entry["index"]] = entry
    return costs


def _sample_missing(loaded, out, env, num_samples, sampler, batch_size, seed, classes, vae, callback, progress) -> None:
    model, config = loaded.model, loaded.model.config
    device = next(model.parameters()).device
    costs = _recorded_costs(out)
    # A sample is done when both its image and its cost record exist (a kill can fall between the two).
    todo = [
        i for i in range(env.rank, num_samples, env.world_size) if not (out / f"{i:06d}.png").exists() or i not in costs
    ]
    costs_path = out / f"costs-rank{env.rank}.jsonl"
    bar = None
    if progress and env.is_main:
        from mediator_models.progress import progress_bar

        bar = progress_bar(len(todo), f"sample {config.label} {sampler.describe()}")
    for start in range(0, len(todo), batch_size):
        indices = todo[start : start + batch_size]
        began = time.perf_counter()
        x_T, y, noise = start_batch(indices, seed, config, classes, device)
        images, caller = generate(model, loaded.process, sampler, x_T, y, callback=callback, noise_fn=noise)
        if vae is not None:
            from mediator_models.data import decode

            images = decode(vae, images)
        seconds = (time.perf_counter() - began) / len(indices)  # wall-clock per image on this machine
        switching = _switching_records(callback, caller, len(indices))
        spent = caller.gflops
        saved = getattr(callback, "saved_gmacs_per_image", None)
        if saved is not None:  # a callback that replaced attention computations itself (a plan) counted what it saved
            spent = spent - saved
        with costs_path.open("a") as handle:  # costs first: an image is never left without its cost record
            for i, gflops, did in zip(indices, spent.tolist(), switching):
                record = {"index": i, "nfe": caller.nfe, "gflops": gflops, "seconds": seconds, **did}
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for i, array in zip(indices, to_uint8(images)):
            write_png(array, out / f"{i:06d}.png")
        if bar is not None:
            bar.update(len(indices))
    if bar is not None:
        bar.close()


def _switching_records(callback, caller, batch: int) -> list[dict]:
    """Per sample, what switching did: `switch_steps`, the evaluation indices at which it moved to another network
    (the adaptive rule's own record, or, for one network per step, where the network used changed), and, from
    the adaptive rule, `distances`, its d_k per step split into state, injected noise and drift."""
    if hasattr(callback, "switch_steps") and len(callback.switch_steps) == batch:
        traces = getattr(callback, "traces", None) or [None] * batch
        return [
            {"switch_steps": list(steps), **({"distances": trace} if trace is not None else {})}
            for steps, trace in zip(callback.switch_steps, traces)
        ]
    changes = [k for k in range(1, len(caller.used)) if caller.used[k] is not caller.used[k - 1]]
    return [{"switch_steps": changes}] * batch


def finalize_folder(out: Path, num_samples: int, provenance: dict[str, Any]) -> dict[str, Any]:
    """Pack the PNGs into `samples.npz` and write `samples.json` with the mean cost per image."""
    from PIL import Image

    missing = [i for i in range(num_samples) if not (out / f"{i:06d}.png").exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} samples are missing in {out} (first: {missing[0]}); run again to finish")
    arrays = []
    for i in range(num_samples):
        with Image.open(out / f"{i:06d}.png") as image:
            arrays.append(np.asarray(image.convert("RGB")))
    atomic_write(out / "samples.npz", lambda handle: np.savez(handle, arr_0=np.stack(arrays)))
    costs = _recorded_costs(out)
    known = [costs[i] for i in range(num_samples) if i in costs]
    sidecar = {
        **provenance,
        "num_samples": num_samples,
        "nfe_per_image": float(np.mean([c["nfe"] for c in known])) if known else None,
        "gflops_per_image": float(np.mean([c["gflops"] for c in known])) if known else None,
        "seconds_per_image": float(np.mean([c.get("seconds", np.nan) for c in known])) if known else None,
        "npz": "samples.npz",
    }
    if provenance.get("schedule"):  # switching runs: what each sample did and spent
        sidecar["per_sample"] = [
            {
                "index": i,
                "gflops": costs[i]["gflops"],
                "switch_steps": costs[i].get("switch_steps", []),
                **({"distances": costs[i]["distances"]} if "distances" in costs[i] else {}),
            }
            for i in range(num_samples)
            if i in costs
        ]
    atomic_write_json(out / "samples.json", sidecar)
    return sidecar
