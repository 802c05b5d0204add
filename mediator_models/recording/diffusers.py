"""The recorder on diffusers transformers: an attention processor that leaves each layer's computation to the
layer's own processor (outputs bit for bit unchanged) and computes its post-softmax maps beside it.

Which maps are recorded:
- DiT and PixArt blocks: the self-attention (`attn1`), softmax(s·q·kᵀ) over the image tokens, exactly as the
  layer's processor computes it: AttnProcessor2_0 (query and key norms applied when the layer has them; s is
  scaled_dot_product_attention's 1/√head_dim, which that processor uses whatever `attn.scale` says) or
  AttnProcessor (what diffusers installs on a layer built with scale_qk=False: s is the layer's `attn.scale`, and
  it applies no query or key norms). PixArt's cross-attention to the text (`attn2`) is not recorded: it is not a
  query–key interaction among image tokens, the thing mediators replace.
- SD3 joint attention (`attn` of each JointTransformerBlock, processor JointAttnProcessor2_0): one softmax over
  image and text keys together. The recorded map is its image→image block, renormalised per row: query i's
  distribution over image keys given that it attends to the image (the image–image interaction mediators would
  replace; the text block has its own size and meaning).
- Flux (processor FluxAttnProcessor): the double-stream blocks' joint attention over [text, image] tokens and the
  single-stream blocks' attention over the same concatenated sequence, both with rotary position embeddings
  applied to queries and keys as diffusers' FluxAttnProcessor applies them (its own projection helper and
  `apply_rotary_emb`). The recorded map is again the image→image block, renormalised per row; the single-stream
  blocks learn where the image starts from the transformer's input (its number of image tokens), since their
  attention sees one undivided sequence.

What is refused, naming the layer and what to change, because the map computation would not reproduce it:
- when attaching: a recognised layer whose processor is any other (xformers, sliced, rotary, IP-adapter, custom
  ones: each computes its scores its own way), and a self-attention layer with a `group_norm` (norm_num_groups)
  or a `spatial_norm` (spatial_norm_dim), which change the tokens the processor projects;
- during a call: an `attention_mask` given to a self-attention or Flux layer (their processors apply it; SD3's
  JointAttnProcessor2_0 ignores it, so it changes nothing there), `encoder_hidden_states` given to a
  self-attention layer (its keys would come from another sequence), and feature maps (B, C, H, W) instead of
  token sequences (B, N, D).
Attention layers that are none of these (cross-attention, a UNet's layers) are not recorded; a model with none
of the recognised layers is refused.
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


def _scores(query: torch.Tensor, key: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """scale·q·kᵀ in float32; scale defaults to 1/√head_dim, scaled_dot_product_attention's default."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return (query.float() @ key.float().transpose(-1, -2)) * scale


def _processor_of(module: nn.Module):
    """The processor that computes a layer's output: the wrapped one while the layer is being recorded."""
    processor = getattr(module, "processor", None)
    return processor.original if isinstance(processor, RecordingProcessor) else processor


def _reproduced_processors(kind: str) -> tuple[type, ...]:
    """The processor classes whose maps the recorder computes exactly, for each kind of layer."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    if kind == "self":
        return (AttnProcessor2_0, AttnProcessor)
    if kind == "joint":
        return (JointAttnProcessor2_0,)
    return (FluxAttnProcessor,)


def _check_reproducible(name: str, module: nn.Module, kind: str) -> None:
    """Refuse a recognised layer whose maps the recorder would not compute as its processor does."""
    processor = type(_processor_of(module))
    reproduced = _reproduced_processors(kind)
    if processor not in reproduced:
        raise ValueError(
            f"{name} uses {processor.__name__}, which the recorder does not reproduce (it reproduces "
            f"{' and '.join(p.__name__ for p in reproduced)}); set one of those with {name}.set_processor(...) "
            "or leave this model unrecorded"
        )
    if kind != "self":
        return
    if module.group_norm is not None:
        raise ValueError(
            f"{name} has a group_norm (norm_num_groups={module.group_norm.num_groups}) applied before its "
            "projections, which the recorder does not reproduce; record a model built without norm_num_groups"
        )
    if module.spatial_norm is not None:
        raise ValueError(
            f"{name} has a spatial_norm (spatial_norm_dim) applied before its projections, which the recorder "
            "does not reproduce; record a model built without spatial_norm_dim"
        )


def _image_block(joint: torch.Tensor, rows: slice, columns: slice) -> torch.Tensor:
    """The image→image block of a softmax over a joint sequence, renormalised per query."""
    image = joint[..., rows, columns]
    return image / image.sum(-1, keepdim=True)


class RecordingProcessor:
    """Wraps a layer's processor: the output is the original processor's, the maps go to `observer`."""

    def __init__(
        self,
        original,
        observer: Observer,
        kind: str,
        image_tokens: Callable[[], int] | None = None,
        name: str = "this layer",
    ):
        self.original = original
        self.observer = observer
        self.kind = kind  # "self", "joint" (SD3), "flux-joint" or "flux-single"
        self.image_tokens = image_tokens  # flux-single: how many of the sequence's tokens are the image's
        self.name = name  # the layer's module name, for refusals

    def check_inputs(self, hidden_states, encoder_hidden_states, attention_mask) -> None:
        """Refuse, before the layer runs, call-time inputs its processor would use and the maps would not."""
        if attention_mask is not None and self.kind != "joint":  # JointAttnProcessor2_0 ignores the mask
            raise ValueError(
                f"{self.name} was called with an attention_mask, which the recorder does not apply to its maps; "
                "record without a mask (pass attention_mask=None to the transformer)"
            )
        if self.kind == "self" and encoder_hidden_states is not None:
            raise ValueError(
                f"{self.name} was called with encoder_hidden_states: its keys come from another sequence, and the "
                "recorder measures self-attention among image tokens only"
            )
        if not self.kind.startswith("flux") and hidden_states.ndim != 3:
            raise ValueError(
                f"{self.name} gets feature maps {tuple(hidden_states.shape)}; the recorder handles token "
                "sequences (B, N, D)"
            )

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        self.check_inputs(hidden_states, encoder_hidden_states, attention_mask)
        output = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        with torch.no_grad():
            if self.kind.startswith("flux"):
                rotary = args[0] if args else kwargs.get("image_rotary_emb")
                maps = self.flux_maps(attn, hidden_states, encoder_hidden_states, rotary)
                self.observer(AttentionMaps("full", full=maps))
            elif self.kind == "self" or encoder_hidden_states is None:
                self.observer(self.self_attention_maps(attn, hidden_states))
            else:
                self.observer(AttentionMaps("full", full=self.joint_maps(attn, hidden_states, encoder_hidden_states)))
        return output

    def self_attention_maps(self, attn, hidden_states: torch.Tensor) -> AttentionMaps:
        """Self-attention among image tokens (DiT, PixArt): the map, and the values it mixes (what the measures of
        the output, across steps, guidance branches and the premise read). Where the layer's scale is 1/√head_dim
        the queries and keys go instead of the map, which the recorder then computes a few maps at a time within
        its memory bound (and only sampled rows of, where that suffices), and the premise's pooled mediators are
        the ones this layer would make."""
        query, key, scale = self.queries_and_keys(attn, hidden_states)
        values = _heads(attn.to_v(hidden_states), attn.heads).float()
        if scale is not None and scale != query.shape[-1] ** -0.5:
            return AttentionMaps("full", full=_scores(query, key, scale).softmax(-1), values=values)
        return AttentionMaps("full", values=values, queries=query.float(), keys=key.float())

    def queries_and_keys(self, attn, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """(queries, keys) (B, heads, N, d) as the layer's processor forms them, and the scale it applies (None:
        scaled_dot_product_attention's default)."""
        from diffusers.models.attention_processor import AttnProcessor

        plain = type(self.original) is AttnProcessor  # attn.scale, and no query or key norms
        query, key = _heads(attn.to_q(hidden_states), attn.heads), _heads(attn.to_k(hidden_states), attn.heads)
        if attn.norm_q is not None and not plain:
            query = attn.norm_q(query)
        if attn.norm_k is not None and not plain:
            key = attn.norm_k(key)
        return query, key, attn.scale if plain else None

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

    def joint_maps(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """A joint layer (SD3) given the text: the image→image block of the softmax over image and text keys, the
        queries and keys as the layer's processor forms them (see the module docstring)."""
        query, key, scale = self.queries_and_keys(attn, hidden_states)
        scores = _scores(query, key, scale)
        text_key = _heads(attn.add_k_proj(encoder_hidden_states), attn.heads)
        if getattr(attn, "norm_added_k", None) is not None:
            text_key = attn.norm_added_k(text_key)
        joint = torch.cat([scores, _scores(query, text_key)], dim=-1).softmax(-1)
        return _image_block(joint, slice(None), slice(0, scores.shape[-1]))  # SD3 puts the image first


def recordable_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, attention module, kind) of every layer the recorder measures, in network order."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_flux import FluxAttention

    layers = []
    for name, module in model.named_modules():
        kind = None
        if isinstance(module, FluxAttention):
            kind = "flux-single" if name.startswith("single_transformer_blocks") else "flux-joint"
        elif isinstance(module, Attention):
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "attn1" and not module.is_cross_attention:
                kind = "self"
            elif leaf == "attn" and getattr(module, "add_k_proj", None) is not None:
                kind = "joint"
        if kind is not None:
            _check_reproducible(name, module, kind)
            layers.append((name, module, kind))
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
        name, module, kind = found[index]
        if isinstance(module.processor, RecordingProcessor):
            raise RuntimeError(f"layer {index} is already being recorded; detach the other recorder")
        original = module.processor
        module.set_processor(
            RecordingProcessor(original, observer_for(index), kind, lambda: image["tokens"], name=name)
        )
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
