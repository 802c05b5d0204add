"""Collection: run a sampler over many samples with the recorder attached and return a tidy table.

One row per (model, attention, mediator count, network, step, noise level, layer, head, branch, metric) with
the mean and standard deviation over samples. Head −1 is the average over heads, the paper's per-layer score.
A collection saves its progress after every batch and resumes from it, drawing exactly the samples it
would have drawn without the interruption.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from analysis.metrics import CHEAP_METRICS, RECORDING_JSD_PAIRS, check_metric_names, metric_reducer
from analysis.relations import split_relation_metrics
from mediator_models.recording.recorder import record_attention
from mediator_models.sampling.generation import ProcessConfig, SamplerConfig, generate
from mediator_models.sampling.steps import start_batch
from mediator_models.sampling.switching import evaluation_levels
from mediator_models.storage.checkpoints import atomic_save
from mediator_models.storage.distributed import init_distributed
from mediator_models.storage.errors import ConfigurationMismatchError, SettingError
from mediator_models.storage.runfolder import atomic_write, atomic_write_json, differences

COLUMNS = [
    "model",
    "attention",
    "mediators",
    "network",
    "step",
    "noise_level",
    "model_time",
    "layer",
    "head",
    "branch",
    "metric",
    "mean",
    "std",
    "count",
]


@dataclass(frozen=True)
class CollectionConfig:
    samples: int = 32  # the paper averages over 32 samples
    batch_size: int = 8
    seed: int = 0
    metrics: tuple[str, ...] = CHEAP_METRICS
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    classes: tuple[int, ...] | None = None
    jsd_pairs: int | None = RECORDING_JSD_PAIRS  # query pairs per map for the JSD score (None: all pairs)

    def __post_init__(self) -> None:
        for flag, value in (("--samples", self.samples), ("--batch-size", self.batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value!r}")
        if not self.metrics:
            check_metric_names(self.metrics)  # refuses an empty list, naming what it takes
        one_map = split_relation_metrics(self.metrics)[0]
        if one_map:
            check_metric_names(one_map)
        if self.jsd_pairs is not None and (not isinstance(self.jsd_pairs, int) or self.jsd_pairs < 1):
            raise ValueError(f"--jsd-pairs must be at least 1 (or all pairs), got {self.jsd_pairs!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def collect_redundancy(
    model,
    process: ProcessConfig,
    sampler: SamplerConfig,
    collection: CollectionConfig = CollectionConfig(),
    *,
    state_path: str | Path | None = None,
    keep_maps=None,
    keep_dir=None,
    progress: bool = True,
    map_memory: int | None = None,
) -> pd.DataFrame | None:
    """Sample `collection.samples` images with the recorder on and return the redundancy table.

    `state_path` (optional) is where progress is saved after each batch; an existing state with the same
    configuration is resumed. `keep_maps` lists (step, layer) pairs whose raw maps go to `keep_dir`. `map_memory`
    bounds the bytes of maps reduced at once (see AttentionRecorder); it changes how, not what, is recorded.
    Under torchrun, rank r records samples r, r + W, r + 2W, …; their running statistics are merged on rank 0,
    which returns the table (the other ranks return None). Each sample draws its own noise, so the table equals
    the single-process one up to float rounding.
    """
    env = init_distributed()
    config = model.config
    device = next(model.parameters()).device
    check_recordable(process, sampler, keep_maps)
    _refuse_premise_on_other_attention(config, collection.metrics)
    identity = {
        "model": config.to_dict(),
        "process": process.to_dict(),
        "sampler": sampler.to_dict(),
        "collection": collection.to_dict(),
        "world_size": env.world_size,
    }
    if state_path is not None and env.world_size > 1:
        state_path = Path(state_path).with_name(f"{Path(state_path).name}.rank{env.rank}")
    state = _load_state(state_path, identity)
    reducer, relations = _reducers(collection)
    classes = list(collection.classes) if collection.classes else None
    mine = list(range(env.rank, collection.samples, env.world_size))
    bar = None
    with record_attention(
        model,
        reducer,
        layers=collection.layers,
        heads=collection.heads,
        keep_maps=keep_maps,
        keep_dir=keep_dir,
        map_memory=map_memory,
        **relations,
    ) as recorder:
        done = 0  # how many of this rank's samples are recorded
        if state is not None:
            recorder.load_state_dict(state["recorder"])
            done = state["done"]
        if progress and env.is_main:
            from mediator_models.progress import progress_bar

            bar = progress_bar(len(mine), f"record {config.label} {sampler.describe()}", initial=done)
        while done < len(mine):
            indices = mine[done : done + collection.batch_size]
            x_T, y, noise = start_batch(indices, collection.seed, config, classes, device)
            generate(model, process, sampler, x_T, y, callback=recorder.callback, noise_fn=noise)
            done += len(indices)
            if state_path is not None:
                atomic_save({"identity": identity, "recorder": recorder.state_dict(), "done": done}, state_path)
            if bar is not None:
                bar.update(len(indices))
        if bar is not None:
            bar.close()
        if env.world_size > 1:
            gathered = [None] * env.world_size if env.is_main else None
            torch.distributed.gather_object(recorder.state_dict(), gathered, dst=0)
            if not env.is_main:
                return None
            for other in gathered[1:]:
                recorder.merge_state_dict(other)
    return _table(recorder, config.name, config.attention, config.mediators or 0)


def _reducers(collection: CollectionConfig):
    """The one-map reducer and the reducers between calls (as record_attention's keywords) of a collection."""
    one_map, steps, branches = split_relation_metrics(collection.metrics)
    reducer = metric_reducer(one_map, jsd_pairs=collection.jsd_pairs) if one_map else {}
    return reducer, {"step_reducers": steps, "branch_reducers": branches}


def _table(recorder, model: str, attention: str, mediators: int) -> pd.DataFrame:
    """The recorder's rows as the tidy table, with the model's name, attention kind and mediator count."""
    table = pd.DataFrame(recorder.rows())
    table.insert(0, "mediators", mediators)
    table.insert(0, "attention", attention)
    table.insert(0, "model", model)
    return table[COLUMNS]


def load_pipeline(
    folder: str | Path, *, text_inputs: dict[str, Any] | None = None, classes=None, size: int | None = None
):
    """Check a local diffusers pipeline folder against what will be asked of it, reading only its
    model_index.json, and return a function that loads it: (pipeline, options for its calls). Refused up front:
    a folder that is no pipeline, a pipeline without a transformer, text inputs (`text_inputs`, by setting name)
    for a class-conditional pipeline, `classes` for a text pipeline, and an image `size` for a pipeline that takes
    none."""
    import inspect

    import diffusers

    folder = Path(folder)
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(
            f"{folder} is not a local diffusers pipeline folder (no model_index.json); nothing is downloaded"
        )
    index = json.loads((folder / "model_index.json").read_text())
    kind = index.get("_class_name", "pipeline")
    if not (index.get("transformer") or [None])[0]:
        raise ValueError(
            f"{folder} holds a {kind}, which has no transformer; the recorder reads DiT-like pipelines "
            "(DiTPipeline, PixArt, SD3, Flux)"
        )
    pipeline_class = getattr(diffusers, kind, None)
    accepted = inspect.signature(pipeline_class.__call__).parameters if pipeline_class else None
    if accepted is not None and "class_labels" in accepted:
        for setting in text_inputs or {}:
            raise SettingError(
                setting,
                f"is for text pipelines; {folder} holds a {kind}, which is class-conditional: drop it and choose "
                "the classes with --classes",
            )
    if classes and accepted is not None and "class_labels" not in accepted:
        raise SettingError(
            "classes",
            f"are class labels, but {folder} holds a {kind}, which is conditioned on text: choose what it "
            "draws with prompts or text embeddings",
        )
    if size and accepted is not None and "height" not in accepted:
        transformer = folder / "transformer" / "config.json"
        latents = json.loads(transformer.read_text()).get("sample_size") if transformer.exists() else None
        sized = f" ({latents}×{latents} latents)" if latents else ""
        raise SettingError(
            "size", f"{size}: a {kind} takes no image size; it samples at its transformer's sample_size{sized}"
        )

    def load():
        from diffusers import DiffusionPipeline

        # Components saved as absent (text encoders left out to be replaced by embeddings) load as None.
        absent = {k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is None}
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # its loading bar would write carriage returns into logs
        try:
            pipeline = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **absent)
        finally:
            diffusers_logging.enable_progress_bar()
        pipeline.set_progress_bar_config(disable=True)
        options = {"height": size, "width": size} if size else {}
        if options and "use_resolution_binning" in inspect.signature(pipeline.__call__).parameters:
            options["use_resolution_binning"] = False  # PixArt would move the size to its nearest trained bin
        return pipeline, options

    return load


def collect_redundancy_diffusers(
    pipeline,
    collection: CollectionConfig = CollectionConfig(),
    *,
    steps: int = 50,
    guidance_scale: float = 1.0,
    prompts: list[str] | None = None,
    embeddings: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    map_memory: int | None = None,
    **pipeline_options,
) -> pd.DataFrame:
    """The redundancy table of a diffusers pipeline (DiT, PixArt, SD3, Flux), sampled by the pipeline's own
    scheduler loop with the recorder on its transformer: the same columns as `collect_redundancy`, so plots,
    schedules and notebooks read it unchanged. Sample i draws its initial noise from its own generator (seed + i);
    class labels (DiT) follow `collection.classes` or the seeded labels attnmed uses; text pipelines cycle
    `prompts`, or take `embeddings`: the pipeline's precomputed text inputs for one prompt (prompt_embeds,
    pooled_prompt_embeds, negative_prompt_embeds, ... with batch 1), given to every sample. `pipeline_options` go
    to every pipeline call (e.g. height and width)."""
    import inspect

    from mediator_models.recording.diffusers import PipelineSteps
    from mediator_models.sampling.steps import sample_label, sample_seed

    name = type(pipeline).__name__.removesuffix("Pipeline")
    if getattr(pipeline, "transformer", None) is None:
        raise ValueError(
            f"a {type(pipeline).__name__} has no transformer; the recorder reads DiT-like pipelines (DiTPipeline, "
            "PixArt, SD3, Flux)"
        )
    accepted = inspect.signature(pipeline.__call__).parameters
    text = "class_labels" not in accepted  # DiT takes labels, the rest prompts
    unknown = [option for option in pipeline_options if option not in accepted]
    if unknown:
        raise ValueError(f"{type(pipeline).__name__} takes no {', '.join(unknown)}; leave them out")
    if not text and (prompts or embeddings):
        raise ValueError(
            f"{name} is class-conditional: it takes class labels (--classes), not prompts or text embeddings"
        )
    if text and collection.classes:
        raise SettingError(
            "classes", f"are class labels, but {name} is conditioned on text: choose what it draws with prompts"
        )
    if text and not prompts and not embeddings:
        raise ValueError(f"{name} is conditioned on text: pass --prompt (one or more), or precomputed embeddings")
    if prompts and embeddings:
        raise ValueError("pass prompts or precomputed embeddings, not both")
    reducer, relations = _reducers(collection)
    halves = ("cond", "uncond") if not text else ("uncond", "cond")  # DiTPipeline: cond first; text pipelines: uncond
    bar = None
    if progress:
        from mediator_models.progress import progress_bar

        bar = progress_bar(collection.samples, f"record {name} ({steps} steps)")
    with record_attention(
        {name: pipeline.transformer},
        reducer,
        layers=collection.layers,
        heads=collection.heads,
        guided_halves=halves,
        map_memory=map_memory,
        **relations,
    ) as recorder:
        tracker = PipelineSteps(pipeline, recorder.callback)
        try:
            for start in range(0, collection.samples, collection.batch_size):
                indices = list(range(start, min(start + collection.batch_size, collection.samples)))
                generators = [torch.Generator().manual_seed(sample_seed(collection.seed, i)) for i in indices]
                tracker.reset(len(indices))
                if text:
                    conditioning = (
                        {"prompt": [prompts[i % len(prompts)] for i in indices]}
                        if prompts
                        else {k: v.repeat(len(indices), *[1] * (v.ndim - 1)) for k, v in embeddings.items()}
                    )
                    if "negative_prompt_embeds" in conditioning:  # PixArt defaults negative_prompt to "", not None
                        conditioning["negative_prompt"] = None
                    pipeline(
                        **conditioning,
                        num_inference_steps=steps,
                        guidance_scale=guidance_scale,
                        generator=generators,
                        output_type="latent",
                        **pipeline_options,
                    )
                else:
                    classes = list(collection.classes) if collection.classes else None
                    num_classes = pipeline.transformer.config.num_embeds_ada_norm
                    labels = [sample_label(i, collection.seed, num_classes, classes) for i in indices]
                    pipeline(
                        class_labels=labels,
                        num_inference_steps=steps,
                        guidance_scale=guidance_scale,
                        generator=generators,
                        output_type="pt",
                        **pipeline_options,
                    )
                if bar is not None:
                    bar.update(len(indices))
        finally:
            tracker.close()
            if bar is not None:
                bar.close()
    return _table(recorder, name, "full", 0)


def check_recordable(process: ProcessConfig, sampler: SamplerConfig, keep_maps=None) -> None:
    """Refuse adaptive solvers (their evaluations fall at other noise levels in every batch, so a row would mix
    levels) and kept-map steps the sampler never reaches."""
    if sampler.adaptive:
        raise ValueError(
            "the recorder needs a fixed-step sampler (each table row is one noise level); dopri5 picks "
            "its steps per batch. Use the SDE, or the ODE with --method euler or heun"
        )
    if not keep_maps:
        return
    steps = len(evaluation_levels(process, sampler))  # a dry run, needed only to check the kept steps
    wrong = sorted(pair for pair in keep_maps or () if not 0 <= pair[0] < steps)
    if wrong:
        raise ValueError(f"--keep-maps {wrong}: this sampler evaluates steps 0..{steps - 1} only")


def _refuse_premise_on_other_attention(config, metrics) -> None:
    """The premise measures ask how much of a full-attention map a rank-n one keeps; a mediator map has rank at
    most n already, so they would read ~1e-9 and say nothing."""
    premise = [m for m in metrics if m.startswith("recovery_")]
    if premise and config.attention != "full":
        raise SettingError(
            "metrics",
            f"names premise measures ({', '.join(premise)}), which measure full attention only; {config.label} "
            "has another kind, whose maps are low-rank by construction: record them on a full-attention model, "
            "or drop them",
        )


def _load_state(state_path, identity) -> dict | None:
    if state_path is None or not Path(state_path).exists():
        return None
    state = torch.load(state_path, weights_only=False)
    if state["identity"] != identity:
        raise ValueError(
            f"{state_path} holds a collection with another configuration; delete it or choose another path"
        )
    return state


# Provenance that says how a table was computed, not what it holds (a table from 2 ranks equals the 1-rank one).
HOW_RECORDED = ("ranks",)


def check_table_target(path: str | Path, provenance: dict[str, Any]) -> None:
    """Refuse, before any recording, to replace a table of another configuration (or of unknown provenance):
    a record over an existing table may only remake the same table."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder; name the table file, e.g. {path / 'redundancy.parquet'}")
    if not path.exists():
        return
    fix = f"name another --out, or delete {path} and {path.name}.json to record it again"
    sidecar = path.with_name(path.name + ".json")
    try:
        saved = json.loads(sidecar.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        raise ConfigurationMismatchError(
            f"{path} exists without a readable {sidecar.name}, so nothing says what it holds; {fix}"
        ) from None
    lines = differences(saved, provenance, ignore=HOW_RECORDED)
    if lines:
        raise ConfigurationMismatchError(
            f"{path} holds a table of another configuration:\n  " + "\n  ".join(lines) + f"\n{fix}"
        )


def write_table(table: pd.DataFrame, path: str | Path, provenance: dict[str, Any]) -> Path:
    """Write the table (parquet, or CSV when the name ends in .csv) atomically, with `<name>.json` beside it."""
    path = Path(path)
    if path.suffix == ".csv":
        atomic_write(path, lambda handle: table.to_csv(handle, index=False), binary=False)
    else:
        atomic_write(path, lambda handle: table.to_parquet(handle, index=False))
    atomic_write_json(path.with_suffix(path.suffix + ".json"), provenance)
    return path


def table_model(path: str | Path):
    """The full-attention model config a table was recorded from, from the sidecar `<table>.json`: its "model"
    (written by `attnmed record` and by published studies), or, for tables a study published before it carried one,
    the study's model name and image size on the embedded digits (one channel, ten classes)."""
    from mediator_models.network.config import ModelConfig, make_config

    sidecar = Path(str(path) + ".json")
    if not sidecar.exists():
        raise ValueError(
            f"{sidecar} is missing: it says which model the table was recorded from, and `attnmed record` writes "
            "it beside every table; keep the two together"
        )
    saved = json.loads(sidecar.read_text())
    if "model" in saved:
        return ModelConfig.from_dict(saved["model"])
    study = saved.get("study")
    if isinstance(study, dict) and "model" in study and "image_size" in study:
        return make_config(study["model"], input_size=study["image_size"], in_channels=1, num_classes=10)
    raise ValueError(f"{sidecar} names no model (neither 'model' nor a study's 'model' and 'image_size')")


def refuse_missing_values(rows: pd.DataFrame, metric: str, use: str = "read by a schedule rule") -> None:
    """Refuse rows whose values are missing (NaN): a rule comparing them is false everywhere and silently picks
    the largest count; a figure of them is empty."""
    missing = rows[rows["mean"].isna()]
    if not missing.empty:
        steps = sorted(set(missing["step"].tolist()))
        raise ValueError(
            f"the table's {metric} values are missing (NaN) in {len(missing)} of {len(rows)} rows, at steps "
            f"{steps[:8]}{' …' if len(steps) > 8 else ''}; they cannot be {use}: record the table again"
        )


# What every reader of a table relies on (model_time and count came later and are not required).
REQUIRED_COLUMNS = [c for c in COLUMNS if c not in ("model_time", "count")]


def read_table(path: str | Path) -> pd.DataFrame:
    """A redundancy table from `attnmed record` or a study, refusing with the file's name what is none."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no redundancy table at {path}; collect one with `attnmed record`")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; name the table file in it (`attnmed record --out` wrote a .parquet)")
    # Through a Python file object: pyarrow cannot encode a path that is not valid UTF-8; Python keeps its bytes.
    try:
        with open(path, "rb") as handle:
            table = pd.read_csv(handle) if path.suffix == ".csv" else pd.read_parquet(handle)
    except (OSError, ValueError, UnicodeDecodeError) as error:  # pyarrow's errors are ValueErrors (ArrowInvalid)
        kind = "CSV" if path.suffix == ".csv" else "parquet"
        raise ValueError(f"{path} is not a readable {kind} table ({type(error).__name__}: {error})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(
            f"{path} is not a redundancy table: it lacks the columns {missing}; tables come from `attnmed record` "
            "or a study's figures/data"
        )
    return table
