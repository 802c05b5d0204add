"""Model configurations: one frozen dataclass, and the registry of names (`DiT-XL/2`, `SiT-S/2`, `DiT-T/2`, ...).

DiT and SiT share their networks (docs/reference.md §1); the family only decides whether the forward pass returns the
learned-variance channels (DiT) or drops them (SiT). A config also carries its attention kind, so one name
plus `attention="mediator", mediators=n` gives the mediator variant of any model, and `mediators=(4, 16, 64, None)`
one network that serves several counts (None: full attention) from one set of weights (`at_count` gives the config
of the network each count is).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

FAMILIES = ("DiT", "SiT")
ATTENTION_KINDS = ("full", "mediator", "conv")  # conv: the ablation with the depthwise conv alone

# size -> (depth, hidden_size, num_heads). S/B/L/XL are the papers' sizes; T is a small CPU config (about
# 0.2 s per training step at batch 32 on 64 tokens, see docs/design.md) that learns the embedded digits in minutes;
# XT is T at half the width with the same head dimension (32), about half T's cost per step at 256 tokens: the
# paper-grid study trains 5 seeds of it.
SIZES: dict[str, tuple[int, int, int]] = {
    "XT": (4, 64, 2),
    "T": (4, 128, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (1, 2, 4, 8)
PAPER_PATCH_SIZES = (2, 4, 8)

_NAME = re.compile(r"^(DiT|SiT)-(XT|T|S|B|L|XL)/(\d+)$")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes a network's shape and behaviour; saved inside checkpoints as a plain dict."""

    family: str = "DiT"
    size: str = "XL"
    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: int = 2
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    mlp_ratio: float = 4.0
    attention: str = "full"
    # One count n, or a tuple of the counts one network serves (None in it: full attention), e.g. (4, 16, 64, None):
    # they share every tensor but their position-bias tables; the first is the count it runs at unless told otherwise.
    mediators: int | tuple[int | None, ...] | None = None
    # How the network computes, where ports of DiT differ from the original: diffusers' DiTTransformer2DModel
    # divides its timestep frequencies by half − 1 (downscale_freq_shift=1) and normalises before the MLP with
    # its norm_eps (1e-5 by default). The original DiT: 0 and 1e-6. `numerics="diffusers"` on loading sets both.
    timestep_freq_shift: int = 0
    mlp_norm_eps: float = 1e-6
    # The mediator block's depthwise 3×3 conv on v (docs/reference.md §6 step 5). None: as the kind has it (mediator and
    # conv yes, full no). Set it to isolate the mediators from the conv: mediators without it, full attention with it.
    depthwise_conv: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.mediators, list):  # a config read back from JSON: its tuple of counts became a list
            object.__setattr__(self, "mediators", tuple(self.mediators))
        self.validate()

    # ---- derived quantities -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"{self.family}-{self.size}/{self.patch_size}"

    @property
    def grid_size(self) -> int:
        """Side of the square token grid."""
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        """Channels the final layer predicts (twice the input when the variance is learned)."""
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def uses_depthwise_conv(self) -> bool:
        return self.attention != "full" if self.depthwise_conv is None else self.depthwise_conv

    # ---- networks that serve several counts ----------------------------------------------------------
    @property
    def serves_several(self) -> bool:
        """Whether the network serves several counts from one set of weights (`mediators` is a tuple)."""
        return isinstance(self.mediators, tuple)

    @property
    def counts(self) -> tuple[int | None, ...]:
        """The counts the network serves (None: full attention), its default first; one for other networks."""
        if self.serves_several:
            return self.mediators
        return (self.mediators,) if self.attention == "mediator" else (None,)

    def at_count(self, count: int | None) -> "ModelConfig":
        """The single-count config of the network that a network serving several counts is at `count`: its
        FLOPs, its label and the layout its tensors take in a checkpoint of that count alone. Full attention
        keeps the conv only where `depthwise_conv=True` says every count has it (None: as each kind has it)."""
        if count not in self.counts:
            raise ValueError(
                f"{self.label} does not serve {_count_text(count)}; it serves {', '.join(map(_count_text, self.counts))}"
            )
        if not self.serves_several:
            return self
        if count is None:
            return self.replace(attention="full", mediators=None)
        return self.replace(mediators=count)

    @property
    def attention_label(self) -> str:
        """`full`, `mediator n=16`, and for the ablations `full + conv`, `mediator n=16, no conv`, `conv only`;
        a network serving several counts: `mediator n=4/16/64/full`."""
        if self.serves_several:
            counts = "/".join("full" if c is None else str(c) for c in self.mediators)
            conv = ", no conv" if not self.uses_depthwise_conv else ""
            conv += ", conv in full" if self.depthwise_conv and None in self.mediators else ""
            return f"mediator n={counts}{conv}"
        if self.attention == "conv":
            return "conv only"
        if self.attention == "full":
            return "full + conv" if self.uses_depthwise_conv else "full"
        return f"mediator n={self.mediators}" + ("" if self.uses_depthwise_conv else ", no conv")

    @property
    def label(self) -> str:
        """Human-readable description, e.g. `SiT-S/2 (mediator n=16) @32`."""
        return f"{self.name} ({self.attention_label}) @{self.input_size}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}; known fields: {sorted(known)}")
        return cls(**values)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- validation ---------------------------------------------------------------------------------
    def validate(self) -> None:
        """Fail at construction, with the fix in the message, for configurations the network cannot run."""
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; choose one of {FAMILIES}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention kind {self.attention!r}; choose one of {ATTENTION_KINDS}")
        for field, flag in (
            ("input_size", "--input-size"),
            ("in_channels", "in_channels"),
            ("num_classes", "num_classes"),
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be a positive whole number, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "choose a head count that divides the width"
            )
        if self.input_size % self.patch_size:
            valid = [p for p in PATCH_SIZES if self.input_size % p == 0]
            raise ValueError(
                f"patch size {self.patch_size} does not divide input_size {self.input_size}; "
                f"use a patch size in {valid} or an input_size that is a multiple of {self.patch_size}"
            )
        if self.attention == "mediator":
            if self.mediators is None:
                raise ValueError("attention='mediator' needs a mediator count, e.g. mediators=16")
            if self.serves_several:
                check_served_counts(self.mediators, self.num_tokens)
            else:
                check_mediator_count(self.mediators, self.num_tokens)
        elif self.mediators is not None:
            raise ValueError(
                f"mediators={self.mediators} was given with attention={self.attention!r}; "
                "pass attention='mediator' to use mediators, or drop the count"
            )
        if self.attention == "conv" and self.depthwise_conv is False:
            raise ValueError("attention='conv' is the depthwise conv alone; without it the block mixes no tokens")


def check_mediator_count(mediators: int, num_tokens: int) -> None:
    """Mediators are q pooled to a √n × √n grid, so n must be a perfect square no larger than the tokens."""
    if not isinstance(mediators, int) or mediators < 1:
        raise ValueError(f"the mediator count must be a positive integer, got {mediators!r}")
    root = math.isqrt(mediators)
    if root * root != mediators:
        lower, upper = root**2, (root + 1) ** 2
        nearest = [lower, upper] if lower > 0 else [upper]
        raise ValueError(
            f"mediator count {mediators} is not a perfect square: mediators are queries average-pooled to a "
            f"√n × √n grid. Nearest valid counts: {' or '.join(map(str, nearest))}"
        )
    if mediators > num_tokens:
        raise ValueError(
            f"{mediators} mediators exceed the {num_tokens} tokens of the grid; "
            f"use at most {num_tokens} (a mediator per token already costs more than full attention)"
        )


def _count_text(count: int | None) -> str:
    return "full attention" if count is None else f"{count} mediators"


def check_served_counts(counts: tuple, num_tokens: int) -> None:
    """The counts of a network serving several: each a valid mediator count or None (full attention), each once,
    at least two of them and one a mediator count."""
    if len(counts) < 2:
        raise ValueError(
            f"mediators={counts!r} names one count; a network serving several counts needs two or more "
            "(e.g. (4, 16, 64, None)); for one count give the number itself, mediators=16"
        )
    repeated = sorted({"full" if c is None else c for c in counts if counts.count(c) > 1}, key=str)
    if repeated:
        raise ValueError(f"mediators={counts!r} names {repeated} more than once; name each count once")
    if all(c is None for c in counts):
        raise ValueError("a network serving several counts needs at least one mediator count besides full attention")
    for count in counts:
        if count is not None:
            check_mediator_count(count, num_tokens)


def parse_name(name: str) -> tuple[str, str, int]:
    """`"SiT-XL/2"` -> `("SiT", "XL", 2)`, with a message listing the registry on a typo."""
    match = _NAME.match(name)
    if match is None or int(match.group(3)) not in PATCH_SIZES:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(registry_names())}")
    return match.group(1), match.group(2), int(match.group(3))


def registry_names(include_small: bool = True) -> list[str]:
    """Every name `build_model` accepts: the papers' grid, then the small CPU configs."""
    names = [f"{fam}-{size}/{p}" for fam in FAMILIES for size in ("S", "B", "L", "XL") for p in PAPER_PATCH_SIZES]
    if include_small:
        names += [f"{fam}-T/{p}" for fam in FAMILIES for p in PATCH_SIZES]
    return names


def make_config(
    name: str,
    *,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    class_dropout_prob: float = 0.1,
    attention: str = "full",
    mediators: int | tuple[int | None, ...] | None = None,
    depthwise_conv: bool | None = None,
) -> ModelConfig:
    """The config behind a registry name, with the caller's data shape and attention choice."""
    family, size, patch_size = parse_name(name)
    depth, hidden_size, num_heads = SIZES[size]
    return ModelConfig(
        family=family,
        size=size,
        depth=depth,
        hidden_size=hidden_size,
        num_heads=num_heads,
        patch_size=patch_size,
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        class_dropout_prob=class_dropout_prob,
        attention=attention,
        mediators=mediators,
        depthwise_conv=depthwise_conv,
    )
