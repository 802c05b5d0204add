"""diffusers' `DiTTransformer2DModel` ⇄ attnmed's DiT: the same network under other names, converted strictly.

Where diffusers differs, and what the conversion does about it:
- Names: diffusers splits qkv into `attn1.to_q/to_k/to_v`, calls the adaLN layers `norm1.linear` and the final
  ones `proj_out_1`/`proj_out_2`, the MLP `ff.net.0.proj`/`ff.net.2`, and the patch embedding `pos_embed.proj`.
- Embedders: diffusers keeps a copy of the timestep and label embedders in every block (`norm1.emb`) and uses
  block 0's for the final layer. Converted checkpoints hold equal copies; the conversion verifies that they are
  and refuses, naming the first differing block, when they are not (one network cannot hold both).
- Numerics: diffusers' timestep embedding divides its frequencies by half − 1 (`downscale_freq_shift=1`), where
  DiT divides by half, and its pre-MLP LayerNorm uses `norm_eps` (1e-5 by default) where DiT uses 1e-6. Equal
  weights therefore do not give equal outputs. A converted model computes as the original DiT by default (the
  public DiT weights were trained that way); `numerics="diffusers"` makes it compute exactly as diffusers does.
  The choice is recorded in the model config (`timestep_freq_shift`, `mlp_norm_eps`).
- Positions: both use the same fixed 2-D sin-cos table (diffusers recomputes it as a buffer); ours is kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from mediator_models.network.config import SIZES, ModelConfig
from mediator_models.storage.errors import CheckpointError, CheckpointMismatchError

EMBEDDER = "transformer_blocks.0.norm1.emb."
NUMERICS = ("dit", "diffusers")


def is_diffusers_dit(state: Mapping[str, Any]) -> bool:
    return "transformer_blocks.0.attn1.to_q.weight" in state and "proj_out_2.weight" in state


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (
        path.is_dir()
        and (path / "config.json").exists()
        and ((path / "diffusion_pytorch_model.safetensors").exists() or (path / "diffusion_pytorch_model.bin").exists())
    )


def read_diffusers_folder(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, config) of a saved DiTTransformer2DModel folder (a pipeline's `transformer/` folder works;
    so does the pipeline folder itself). Any other folder is refused, saying what a checkpoint may be."""
    path = Path(path)
    if (path / "transformer" / "config.json").exists():
        path = path / "transformer"
    elif (path / "model_index.json").exists():  # a pipeline folder without a transformer (a UNet's, say)
        index = json.loads((path / "model_index.json").read_text())
        parts = ", ".join(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0])
        raise CheckpointError(
            f"{path} is a diffusers {index.get('_class_name', 'pipeline')} folder ({parts}), which has no "
            "transformer; attnmed reads DiT transformers: pass a DiTPipeline folder or its transformer/ folder"
        )
    if not is_diffusers_folder(path):
        raise CheckpointError(
            f"{path} is a folder but not a diffusers model folder (config.json and "
            "diffusion_pytorch_model.*); pass a checkpoint file or a diffusers DiT folder"
        )
    config = json.loads((path / "config.json").read_text())
    if config.get("_class_name") not in (None, "DiTTransformer2DModel", "Transformer2DModel"):
        raise CheckpointError(
            f"{path} holds a {config['_class_name']}; only DiT transformers convert onto attnmed's DiT"
        )
    weights = path / "diffusion_pytorch_model.safetensors"
    if weights.exists():
        from safetensors.torch import load_file

        return load_file(str(weights)), config
    return torch.load(path / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True), config


def _size_name(depth: int, hidden: int, heads: int) -> str:
    for name, shape in SIZES.items():
        if shape == (depth, hidden, heads):
            return name
    known = ", ".join(f"{n} {s}" for n, s in SIZES.items())
    raise CheckpointMismatchError(f"no attnmed size has depth {depth}, width {hidden}, {heads} heads (known: {known})")


def config_from_diffusers(
    config: Mapping[str, Any], state: Mapping[str, torch.Tensor], numerics: str = "dit"
) -> ModelConfig:
    """The attnmed ModelConfig of a diffusers DiT config (family DiT; learn_sigma when it outputs 2×C channels)."""
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
    heads, head_dim = config.get("num_attention_heads", 16), config.get("attention_head_dim", 72)
    depth, hidden = config.get("num_layers", 28), heads * head_dim
    in_channels = config.get("in_channels", 4)
    out_channels = config.get("out_channels") or in_channels
    num_classes = config.get("num_embeds_ada_norm", 1000)
    rows = state[EMBEDDER + "class_embedder.embedding_table.weight"].shape[0]
    return ModelConfig(
        family="DiT",
        size=_size_name(depth, hidden, heads),
        depth=depth,
        hidden_size=hidden,
        num_heads=heads,
        patch_size=config.get("patch_size", 2),
        input_size=config.get("sample_size", 32),
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=out_channels == 2 * in_channels,
        class_dropout_prob=0.1 if rows == num_classes + 1 else 0.0,
        timestep_freq_shift=1 if numerics == "diffusers" else 0,
        mlp_norm_eps=config.get("norm_eps", 1e-5) if numerics == "diffusers" else 1e-6,
    )


def check_embedder_copies(state: Mapping[str, torch.Tensor]) -> None:
    """Every block's copy of the timestep and label embedders must equal block 0's."""
    shared = [k for k in state if k.startswith(EMBEDDER)]
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")})
    for block in blocks[1:]:
        for key in shared:
            other = key.replace("transformer_blocks.0.", f"transformer_blocks.{block}.", 1)
            if other not in state:
                raise CheckpointMismatchError(f"block {block} has no {other.split('norm1.emb.')[1]} embedder copy")
            if not torch.equal(state[other], state[key]):
                raise CheckpointMismatchError(
                    f"block {block}'s copy of {key.split('norm1.emb.')[1]} differs from block 0's (max difference "
                    f"{(state[other].float() - state[key].float()).abs().max():.3g}); attnmed's DiT has one timestep "
                    "and one label embedder, so these weights cannot be converted without changing the network"
                )


def state_from_diffusers(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """attnmed parameter names from a diffusers DiT state dict (pos_embed is recomputed from the grid)."""
    from mediator_models.network.layers import sincos_pos_embed_2d

    check_embedder_copies(state)
    out = {
        "x_embedder.proj.weight": state["pos_embed.proj.weight"],
        "x_embedder.proj.bias": state["pos_embed.proj.bias"],
        "pos_embed": torch.from_numpy(sincos_pos_embed_2d(config.hidden_size, config.grid_size)).float()[None],
        "t_embedder.mlp.0.weight": state[EMBEDDER + "timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": state[EMBEDDER + "timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": state[EMBEDDER + "timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": state[EMBEDDER + "timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": state[EMBEDDER + "class_embedder.embedding_table.weight"],
        "final_layer.adaLN_modulation.1.weight": state["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": state["proj_out_1.bias"],
        "final_layer.linear.weight": state["proj_out_2.weight"],
        "final_layer.linear.bias": state["proj_out_2.bias"],
    }
    for i in range(config.depth):
        theirs, ours = f"transformer_blocks.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{ours}attn.qkv.{kind}"] = torch.cat([state[f"{theirs}attn1.to_{p}.{kind}"] for p in "qkv"])
            out[f"{ours}attn.proj.{kind}"] = state[f"{theirs}attn1.to_out.0.{kind}"]
            out[f"{ours}mlp.fc1.{kind}"] = state[f"{theirs}ff.net.0.proj.{kind}"]
            out[f"{ours}mlp.fc2.{kind}"] = state[f"{theirs}ff.net.2.{kind}"]
            out[f"{ours}adaLN_modulation.1.{kind}"] = state[f"{theirs}norm1.linear.{kind}"]
    return out


def to_diffusers(model) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(DiTTransformer2DModel config, state dict) of an attnmed DiT with full attention; the embedders are
    copied into every block as diffusers expects."""
    config = model.config
    if config.attention != "full" or config.uses_depthwise_conv:
        raise ValueError(
            f"diffusers' DiTTransformer2DModel has plain full attention only; {config.attention_label} "
            "does not convert (AsDiffusersTransformer runs it inside a pipeline instead)"
        )
    if config.timestep_freq_shift not in (0, 1):
        raise ValueError(f"timestep_freq_shift {config.timestep_freq_shift} has no diffusers counterpart")
    # A model that computes as DiT converts to a diffusers model that computes differently (see the module
    # docstring): the weights are the same, and `save_diffusers` says which numerics the result will have.
    ours = model.state_dict()
    diffusers_config = {
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.hidden_size // config.num_heads,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "sample_size": config.input_size,
        "patch_size": config.patch_size,
        "num_embeds_ada_norm": config.num_classes,
        "norm_eps": config.mlp_norm_eps,
    }
    embedder = {
        "timestep_embedder.linear_1.weight": ours["t_embedder.mlp.0.weight"],
        "timestep_embedder.linear_1.bias": ours["t_embedder.mlp.0.bias"],
        "timestep_embedder.linear_2.weight": ours["t_embedder.mlp.2.weight"],
        "timestep_embedder.linear_2.bias": ours["t_embedder.mlp.2.bias"],
        "class_embedder.embedding_table.weight": ours["y_embedder.embedding_table.weight"],
    }
    state = {
        "pos_embed.proj.weight": ours["x_embedder.proj.weight"],
        "pos_embed.proj.bias": ours["x_embedder.proj.bias"],
        "proj_out_1.weight": ours["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": ours["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": ours["final_layer.linear.weight"],
        "proj_out_2.bias": ours["final_layer.linear.bias"],
    }
    d = config.hidden_size
    for i in range(config.depth):
        theirs, mine = f"transformer_blocks.{i}.", f"blocks.{i}."
        for key, value in embedder.items():
            state[f"{theirs}norm1.emb.{key}"] = value.clone()
        for kind in ("weight", "bias"):
            for j, p in enumerate("qkv"):
                state[f"{theirs}attn1.to_{p}.{kind}"] = ours[f"{mine}attn.qkv.{kind}"][j * d : (j + 1) * d].clone()
            state[f"{theirs}attn1.to_out.0.{kind}"] = ours[f"{mine}attn.proj.{kind}"]
            state[f"{theirs}ff.net.0.proj.{kind}"] = ours[f"{mine}mlp.fc1.{kind}"]
            state[f"{theirs}ff.net.2.{kind}"] = ours[f"{mine}mlp.fc2.{kind}"]
            state[f"{theirs}norm1.linear.{kind}"] = ours[f"{mine}adaLN_modulation.1.{kind}"]
    return diffusers_config, state


def save_diffusers(model, folder: str | os.PathLike):
    """Write an attnmed DiT as a diffusers DiTTransformer2DModel folder (usable as a DiTPipeline's transformer);
    returns the diffusers model. It computes as diffusers does: equal to `model` when the model was built with
    `timestep_freq_shift=1` (numerics "diffusers"), close but not equal otherwise."""
    from diffusers import DiTTransformer2DModel

    config, state = to_diffusers(model)
    network = DiTTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    missing, unexpected = network.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("pos_embed.pos_embed")]
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"conversion to diffusers left keys unmatched: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    network.save_pretrained(str(folder))
    return network


class AsDiffusersTransformer(torch.nn.Module):
    """An attnmed DiT (full or mediator attention) behind diffusers' transformer interface, so a DiTPipeline can
    sample it with its own schedulers: `pipeline = DiTPipeline(transformer=AsDiffusersTransformer(model), ...)`.
    The recorder attaches to it as to the model itself."""

    def __init__(self, model):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.model = model
        plain = model.config.attention == "full" and not model.config.uses_depthwise_conv
        config, _ = to_diffusers(model) if plain else (None, None)
        self.config = FrozenDict(
            config
            or {
                "in_channels": model.config.in_channels,
                "sample_size": model.config.input_size,
                "out_channels": model.config.out_channels,
                "num_embeds_ada_norm": model.config.num_classes,
            }
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def attention_modules(self):
        return self.model.attention_modules()

    def forward(self, hidden_states, timestep=None, class_labels=None, return_dict: bool = True, **unused):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        timestep = torch.as_tensor(timestep, device=hidden_states.device).float().expand(len(hidden_states))
        sample = self.model(hidden_states, timestep, class_labels)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)
