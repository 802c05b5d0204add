"""Sampling to disk: PNGs, an `.npz` in the ADM evaluator's layout and a JSON sidecar, single process or
under torchrun. Sample i is drawn from its own seed (seed + i) and its own label, whatever the batch and the
number of ranks, so an interrupted run restarts where it stopped and keeps the images already written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import extract_state_dict, load_checkpoint, read_checkpoint
from .config import ModelConfig
from .dit import DiffusionTransformer, build_model
from .sampling import ProcessConfig, SamplerConfig, generate
from .stepping import PerSampleNoise, sample_seed
from .train import init_distributed


@dataclass
class LoadedModel:
    model: DiffusionTransformer
    process: ProcessConfig
    source: str


def load_for_sampling(checkpoint: str | os.PathLike, *, model_name: str | None = None, input_size: int = 32,
                      num_classes: int = 1000, use_ema: bool = True, attention: str = "full",
                      mediators: int | None = None, device: torch.device | str = "cpu") -> LoadedModel:
    """A model ready to sample: attnmed checkpoints describe themselves; official DiT/SiT files (plain state
    dicts) need `model_name` (and the input size / attention they were trained with)."""
    state = read_checkpoint(checkpoint)
    if "model_config" in state:
        config = ModelConfig.from_dict(state["model_config"])
        process = ProcessConfig(**state.get("process", {"family": config.family}))
        model = DiffusionTransformer(config)
    else:
        if model_name is None:
            raise ValueError(f"{checkpoint} does not say which model it holds; pass --model (e.g. DiT-XL/2) "
                             "and --input-size (32 for 256 px)")  # fmt: skip
        model = build_model(model_name, input_size=input_size, num_classes=num_classes, attention=attention,
                            mediators=mediators)  # fmt: skip
        process = ProcessConfig(model.config.family)
    load_checkpoint(model, extract_state_dict(state, use_ema=use_ema))
    return LoadedModel(model.to(device).eval(), process, str(checkpoint))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [−1, 1] -> (B, H, W, 3) uint8; one-channel images are repeated to RGB (ADM's layout)."""
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr


def sample_label(index: int, seed: int, num_classes: int, classes: list[int] | None) -> int:
    if classes:
        return classes[index % len(classes)]
    return int(np.random.default_rng([seed, index, 1]).integers(num_classes))


def start_batch(indices: list[int], seed: int, config: ModelConfig, classes: list[int] | None,
                device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, PerSampleNoise]:
    """Initial noise, labels and the per-sample noise stream of samples `indices` of a run seeded `seed`;
    each depends only on its own index, so any batching draws the same samples."""
    noise = PerSampleNoise([sample_seed(seed, i) for i in indices], device)
    x_T = noise((len(indices), config.in_channels, config.input_size, config.input_size))
    y = torch.tensor([sample_label(i, seed, config.num_classes, classes) for i in indices], device=device)
    return x_T, y, noise


def write_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    tmp = path.with_suffix(".png.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)


def sample_to_folder(loaded: LoadedModel, out_dir: str | os.PathLike, *, num_samples: int, sampler: SamplerConfig,
                     batch_size: int = 16, seed: int = 0, classes: list[int] | None = None, vae=None,
                     callback=None, schedule: dict | None = None, progress: bool = True) -> dict[str, Any]:
    """Write samples 0..num_samples−1 as PNGs (skipping those already there), then `samples.npz` (`arr_0`,
    uint8 NHWC) and `samples.json` (what made them and what they cost). Returns the sidecar dict.

    `callback` is the sampler's step callback (a mediator schedule or the adaptive rule, which may hand
    steps to other networks); `schedule` describes it in the sidecar. Costs are counted per sample."""
    sampler.check(loaded.process.family)  # before any work or folder
    env = init_distributed()
    model, config = loaded.model, loaded.model.config
    device = next(model.parameters()).device
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(env.rank, num_samples, env.world_size) if not (out / f"{i:06d}.png").exists()]
    costs_path = out / f"costs-rank{env.rank}.jsonl"
    bar = None
    if progress and env.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"sample {config.label} {sampler.describe()}", dynamic_ncols=True)
    for start in range(0, len(todo), batch_size):
        indices = todo[start : start + batch_size]
        x_T, y, noise = start_batch(indices, seed, config, classes, device)
        images, caller = generate(model, loaded.process, sampler, x_T, y, callback=callback, noise_fn=noise)
        if vae is not None:
            from .data import decode

            images = decode(vae, images)
        with costs_path.open("a") as costs:
            for i, array, gflops in zip(indices, to_uint8(images), caller.gflops.tolist()):
                write_png(array, out / f"{i:06d}.png")
                costs.write(json.dumps({"index": i, "nfe": caller.nfe, "gflops": gflops}) + "\n")
        if bar is not None:
            bar.update(len(indices))
    if bar is not None:
        bar.close()
    if dist.is_initialized():
        dist.barrier()
    sidecar: dict[str, Any] = {}
    if env.is_main:
        sidecar = finalize_folder(out, num_samples, {
            "checkpoint": loaded.source, "model": config.to_dict(), "process": loaded.process.to_dict(),
            "sampler": sampler.to_dict(), "seed": seed, "classes": classes, "decoded_with_vae": vae is not None,
            "schedule": schedule})  # fmt: skip
    return sidecar


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
    tmp = out / "samples.tmp.npz"
    np.savez(tmp, arr_0=np.stack(arrays))
    tmp.replace(out / "samples.npz")
    costs: dict[int, dict] = {}
    for path in sorted(out.glob("costs-rank*.jsonl")):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            costs[entry["index"]] = entry
    known = [costs[i] for i in range(num_samples) if i in costs]
    sidecar = {
        **provenance,
        "num_samples": num_samples,
        "nfe_per_image": float(np.mean([c["nfe"] for c in known])) if known else None,
        "gflops_per_image": float(np.mean([c["gflops"] for c in known])) if known else None,
        "npz": "samples.npz",
    }
    tmp_json = out / "samples.json.tmp"
    tmp_json.write_text(json.dumps(sidecar, indent=2))
    tmp_json.replace(out / "samples.json")
    return sidecar
