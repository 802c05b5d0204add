"""The recorder on diffusers transformers: an attention processor that leaves each layer's computation to the
layer's own processor (outputs bit for bit unchanged) and computes its post-softmax maps beside it.

Which maps are recorded:
- DiT and PixArt blocks: the self-attention (`attn1`), softmax(q·kᵀ/√d) over the image tokens, exactly as
  diffusers' AttnProcessor2_0 computes it (its scaled_dot_product_attention scales by 1/√head_dim; query and
  key norms are applied when the layer has them). PixArt's cross-attention to the text (`attn2`) is not recorded:
  it is not a query–key interaction among image tokens, the thing mediators replace.
- SD3 joint attention (`attn` of each JointTransformerBlock): one softmax over image and text keys together. The
  recorded map is its image→image block, renormalised per row: query i's distribution over image keys given that
  it attends to the image (the image–image interaction mediators would replace; the text block has its own size
  and meaning).
Other attention layers (Flux's rotary-embedding processors among them) are not recognised and are refused.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .attention import AttentionMaps

Observer = Callable[[AttentionMaps], None]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def _scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    return (query.float() @ key.float().transpose(-1, -2)) / query.shape[-1] ** 0.5


class RecordingProcessor:
    """Wraps a layer's processor: the output is the original processor's, the maps go to `observer`."""

    def __init__(self, original, observer: Observer, kind: str):
        self.original = original
        self.observer = observer
        self.kind = kind  # "self" or "joint"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        output = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        with torch.no_grad():
            self.observer(AttentionMaps("full", full=self.maps(attn, hidden_states, encoder_hidden_states)))
        return output

    def maps(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> torch.Tensor:
        if hidden_states.ndim != 3:
            raise ValueError("the recorder handles token sequences (B, N, D); this layer gets feature maps")
        query, key = _heads(attn.to_q(hidden_states), attn.heads), _heads(attn.to_k(hidden_states), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        scores = _scores(query, key)
        if self.kind == "self" or encoder_hidden_states is None:
            return scores.softmax(-1)
        text_key = _heads(attn.add_k_proj(encoder_hidden_states), attn.heads)
        if getattr(attn, "norm_added_k", None) is not None:
            text_key = attn.norm_added_k(text_key)
        joint = torch.cat([scores, _scores(query, text_key)], dim=-1).softmax(-1)
        image = joint[..., : scores.shape[-1]]
        return image / image.sum(-1, keepdim=True)  # the image→image block, renormalised per query


def recordable_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, attention module, kind) of every layer the recorder measures, in network order."""
    from diffusers.models.attention_processor import Attention

    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, Attention):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "attn1" and not module.is_cross_attention:
            layers.append((name, module, "self"))
        elif leaf == "attn" and getattr(module, "add_k_proj", None) is not None:
            if "rotary" in type(module.processor).__name__.lower() or "Flux" in type(module.processor).__name__:
                raise ValueError(f"{name} uses {type(module.processor).__name__}, which the recorder does not reproduce")
            layers.append((name, module, "joint"))
    if not layers:
        raise ValueError(f"no recordable self-attention found in {type(model).__name__} (DiT, PixArt and SD3 "
                         "transformers are supported)")  # fmt: skip
    return layers


def attach(model: nn.Module, observer_for: Callable[[int], Observer], layers: list[int] | None = None) -> Callable[[], None]:
    """Install recording processors on the chosen layers (all by default); returns the function that restores
    the original processors."""
    found = recordable_layers(model)
    chosen = range(len(found)) if layers is None else layers
    restore = []
    for index in chosen:
        if index >= len(found):
            raise ValueError(f"--layers {index} does not exist: the model has {len(found)} recordable layers")
        _, module, kind = found[index]
        if isinstance(module.processor, RecordingProcessor):
            raise RuntimeError(f"layer {index} is already being recorded; detach the other recorder")
        original = module.processor
        module.set_processor(RecordingProcessor(original, observer_for(index), kind))
        restore.append((module, original))

    def detach() -> None:
        for module, original in restore:
            module.set_processor(original)

    return detach


def num_heads(model: nn.Module) -> int:
    return recordable_layers(model)[0][1].heads


def noise_level_of(scheduler, timestep: torch.Tensor) -> float:
    """The common noise-level axis σ/(α+σ) (1 = noise, 0 = data) of a diffusers scheduler's timestep: from
    ᾱ_t for DDPM-family schedulers (α = √ᾱ, σ = √(1−ᾱ)); for flow matching x_t = (1−σ)x + σε, so it is σ."""
    t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
    if hasattr(scheduler, "alphas_cumprod"):
        index = min(max(int(round(t)), 0), len(scheduler.alphas_cumprod) - 1)
        alpha_bar = float(scheduler.alphas_cumprod[index])
        alpha, sigma = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
        return sigma / (alpha + sigma)
    if hasattr(scheduler, "config") and "shift" in scheduler.config:  # FlowMatchEulerDiscreteScheduler
        return min(max(t / scheduler.config.num_train_timesteps, 0.0), 1.0)
    raise ValueError(f"no noise level known for {type(scheduler).__name__}; use a DDPM-family or flow-matching scheduler")


class PipelineSteps:
    """Tells a step callback (the recorder's) which evaluation a diffusers pipeline's transformer is at: a
    forward pre-hook reads the timestep the pipeline passes and places it on the noise-level axis. With
    guidance the transformer sees the doubled batch; the callback is shown one half, so the recorder splits it."""

    def __init__(self, pipeline, callback, guided: bool):
        from .stepping import StepInfo

        self.pipeline, self.callback, self.guided, self.index = pipeline, callback, guided, 0
        self._step_info = StepInfo
        self._handle = pipeline.transformer.register_forward_pre_hook(self._before, with_kwargs=True)

    def _before(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        timestep = kwargs.get("timestep")
        level = noise_level_of(self.pipeline.scheduler, timestep)
        shown = x[: len(x) // 2] if self.guided else x
        self.callback(self._step_info(self.index, torch.as_tensor(timestep).flatten()[: len(shown)], level, shown))
        self.index += 1

    def reset(self) -> None:
        self.index = 0

    def close(self) -> None:
        self._handle.remove()
