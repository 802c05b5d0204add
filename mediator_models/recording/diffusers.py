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
- Flux: the double-stream blocks' joint attention over [text, image] tokens and the single-stream blocks'
  attention over the same concatenated sequence, both with rotary position embeddings applied to queries and keys
  as diffusers' FluxAttnProcessor applies them (its own projection helper and `apply_rotary_emb`). The recorded map
  is again the image→image block, renormalised per row; the single-stream blocks learn where the image starts from
  the transformer's input (its number of image tokens), since their attention sees one undivided sequence.
Other attention layers are not recognised and are refused.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mediator_models.network.attention import AttentionMaps

Observer = Callable[[AttentionMaps], None]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def _scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    return (query.float() @ key.float().transpose(-1, -2)) / query.shape[-1] ** 0.5


def _image_block(joint: torch.Tensor, rows: slice, columns: slice) -> torch.Tensor:
    """The image→image block of a softmax over a joint sequence, renormalised per query."""
    image = joint[..., rows, columns]
    return image / image.sum(-1, keepdim=True)


class RecordingProcessor:
    """Wraps a layer's processor: the output is the original processor's, the maps go to `observer`."""

    def __init__(self, original, observer: Observer, kind: str, image_tokens: Callable[[], int] | None = None):
        self.original = original
        self.observer = observer
        self.kind = kind  # "self", "joint" (SD3), "flux-joint" or "flux-single"
        self.image_tokens = image_tokens  # flux-single: how many of the sequence's tokens are the image's

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        output = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        with torch.no_grad():
            if self.kind.startswith("flux"):
                rotary = args[0] if args else kwargs.get("image_rotary_emb")
                maps = self.flux_maps(attn, hidden_states, encoder_hidden_states, rotary)
            else:
                maps = self.maps(attn, hidden_states, encoder_hidden_states)
            self.observer(AttentionMaps("full", full=maps))
        return output

    def flux_maps(self, attn, hidden_states, encoder_hidden_states, rotary) -> torch.Tensor:
        """Queries and keys exactly as FluxAttnProcessor forms them (projections, RMS norms, text first, rotary
        embedding), then the image→image block of the joint softmax."""
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, _, text_query, text_key, _ = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = (
            attn.norm_q(query.unflatten(-1, (-1, attn.head_dim))),
            attn.norm_k(key.unflatten(-1, (-1, attn.head_dim))),
        )
        text = 0
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            text_query = attn.norm_added_q(text_query.unflatten(-1, (-1, attn.head_dim)))
            text_key = attn.norm_added_k(text_key.unflatten(-1, (-1, attn.head_dim)))
            query, key = torch.cat([text_query, query], dim=1), torch.cat([text_key, key], dim=1)
            text = encoder_hidden_states.shape[1]
        elif self.kind == "flux-single":
            text = query.shape[1] - self.image_tokens()
        if rotary is not None:
            query = apply_rotary_emb(query, rotary, sequence_dim=1)
            key = apply_rotary_emb(key, rotary, sequence_dim=1)
        joint = _scores(query.transpose(1, 2), key.transpose(1, 2)).softmax(-1)  # (B, heads, text + image, same)
        return _image_block(joint, slice(text, None), slice(text, None))

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
        return _image_block(joint, slice(None), slice(0, scores.shape[-1]))  # SD3 puts the image first


def recordable_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, attention module, kind) of every layer the recorder measures, in network order."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

    layers = []
    for name, module in model.named_modules():
        processor = type(getattr(module, "processor", None))
        if isinstance(module, FluxAttention):
            if processor is not FluxAttnProcessor and processor is not RecordingProcessor:
                raise ValueError(
                    f"{name} uses {processor.__name__}, which the recorder does not reproduce (it "
                    "reproduces FluxAttnProcessor)"
                )
            layers.append(
                (name, module, "flux-single" if name.startswith("single_transformer_blocks") else "flux-joint")
            )
            continue
        if not isinstance(module, Attention):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "attn1" and not module.is_cross_attention:
            layers.append((name, module, "self"))
        elif leaf == "attn" and getattr(module, "add_k_proj", None) is not None:
            if "rotary" in processor.__name__.lower():
                raise ValueError(f"{name} uses {processor.__name__}, which the recorder does not reproduce")
            layers.append((name, module, "joint"))
    if not layers:
        raise ValueError(
            f"no recordable self-attention found in {type(model).__name__} (DiT, PixArt, SD3 and Flux "
            "transformers are supported)"
        )
    return layers


def attach(
    model: nn.Module, observer_for: Callable[[int], Observer], layers: list[int] | None = None
) -> Callable[[], None]:
    """Install recording processors on the chosen layers (all by default); returns the function that restores
    the original processors."""
    found = recordable_layers(model)
    chosen = range(len(found)) if layers is None else layers
    restore = []
    image = {"tokens": None}  # Flux's single-stream blocks: the image's share of their one sequence

    def remember_image(module, args, kwargs):
        image["tokens"] = (args[0] if args else kwargs["hidden_states"]).shape[1]

    hook = (
        model.register_forward_pre_hook(remember_image, with_kwargs=True)
        if any(kind == "flux-single" for _, _, kind in found)
        else None
    )
    for index in chosen:
        if index >= len(found):
            raise ValueError(f"--layers {index} does not exist: the model has {len(found)} recordable layers")
        _, module, kind = found[index]
        if isinstance(module.processor, RecordingProcessor):
            raise RuntimeError(f"layer {index} is already being recorded; detach the other recorder")
        original = module.processor
        module.set_processor(RecordingProcessor(original, observer_for(index), kind, lambda: image["tokens"]))
        restore.append((module, original))

    def detach() -> None:
        for module, original in restore:
            module.set_processor(original)
        if hook is not None:
            hook.remove()

    return detach


def num_heads(model: nn.Module) -> int:
    return recordable_layers(model)[0][1].heads


def noise_level_of(scheduler, timestep: torch.Tensor) -> float:
    """The common noise-level axis σ/(α+σ) (1 = noise, 0 = data) of the step a diffusers scheduler is at: from
    ᾱ_t of the timestep for DDPM-family schedulers (α = √ᾱ, σ = √(1−ᾱ)); for flow matching x_t = (1−σ)x + σε, so
    it is the scheduler's current σ (read from the scheduler, not the timestep: SD3 hands its transformer t, Flux
    t/1000, so the number alone is ambiguous)."""
    t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
    if hasattr(scheduler, "alphas_cumprod"):
        index = min(max(int(round(t)), 0), len(scheduler.alphas_cumprod) - 1)
        alpha_bar = float(scheduler.alphas_cumprod[index])
        alpha, sigma = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
        return sigma / (alpha + sigma)
    if hasattr(scheduler, "config") and "shift" in scheduler.config:  # FlowMatchEulerDiscreteScheduler
        index = scheduler.step_index if scheduler.step_index is not None else (scheduler.begin_index or 0)
        return min(max(float(scheduler.sigmas[index]), 0.0), 1.0)
    raise ValueError(
        f"no noise level known for {type(scheduler).__name__}; use a DDPM-family or flow-matching scheduler"
    )


class PipelineSteps:
    """Tells a step callback (the recorder's) which evaluation a diffusers pipeline's transformer is at: a
    forward pre-hook reads the timestep the pipeline passes and places it on the noise-level axis. A pipeline
    that guides by doubling the batch (DiT, PixArt, SD3) shows the transformer twice the samples asked for; the
    callback is shown one half, so the recorder splits the maps. Flux's guidance is an embedding: no doubling."""

    def __init__(self, pipeline, callback):
        from mediator_models.sampling.steps import StepInfo

        self.pipeline, self.callback, self.index, self.batch = pipeline, callback, 0, None
        self._step_info = StepInfo
        self._handle = pipeline.transformer.register_forward_pre_hook(self._before, with_kwargs=True)

    def _before(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        timestep = kwargs.get("timestep")
        level = noise_level_of(self.pipeline.scheduler, timestep)
        shown = x[: len(x) // 2] if self.batch is not None and len(x) == 2 * self.batch else x
        self.callback(self._step_info(self.index, torch.as_tensor(timestep).flatten()[: len(shown)], level, shown))
        self.index += 1

    def reset(self, batch: int) -> None:
        """Before each pipeline call: evaluations count from 0 again, for `batch` samples."""
        self.index, self.batch = 0, batch

    def close(self) -> None:
        self._handle.remove()
