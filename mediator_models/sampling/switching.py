"""Mediator schedules: which network evaluates each sampling step.

Two kinds, both used as the sampler's step callback:
- `MediatorSchedule`: static, a table of noise-level intervals -> mediator count (or full attention), for the
  whole network or per layer. Schedules are data: saved and loaded as JSON, printed readably, validated against
  the models at hand. A per-layer interval runs `LayerMixedNetwork`: one network whose layers borrow the
  attention modules of the others, sound only for networks that share every other tensor (grafted ones).
- `AdaptiveSwitch`: the paper's rule (docs/reference.md §7). With d_k the mean |x_k − x_{k−1}| (or squared) between
  consecutive states, μ the mean of d_k over K warm-up steps, the sampler moves from network i to i+1 when
  d_k < ρ_i·μ, one way only. Decisions are per sample (the public code decides per batch, so it needs batch
  size 1 for per-sample decisions); a batch gets exactly the switches its samples would get one by one.

Networks are keyed by mediator count, with `None` (or the string "full") for full attention. A network serving
several counts from one set of weights (`ModelConfig.mediators` a tuple) may stand for all of them: both take it in
place of the networks, switch counts inside it, and cost each step what its count costs.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from mediator_models.network.config import ModelConfig
from mediator_models.network.dit import CountView
from mediator_models.network.flops import config_gmacs
from mediator_models.network.flops import layered_gmacs as layer_gmacs
from mediator_models.sampling.steps import StepInfo
from mediator_models.storage.runfolder import atomic_write_json

FULL = None  # network key of full attention


def count_label(count: int | None) -> str:
    return "full" if count is None else f"n={count}"


def _parse_count(value) -> int | None:
    """A mediator count from JSON: a whole number, or "full"/null for full attention (4.9 or true are refused)."""
    if value is None or value == "full":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise ValueError(f'mediators must be a positive whole number or "full", got {json.dumps(value)}')
    return int(value)


def _parse_level(value, key: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 <= value <= 1
    ):
        raise ValueError(f"'{key}' must be a noise level in [0, 1], got {json.dumps(value)}")
    return float(value)


def _parse_layers(value) -> dict[int, int | None]:
    """An interval's per-layer counts from JSON: {"layer index": count or "full"}."""
    if not isinstance(value, dict):
        raise ValueError(f'\'layers\' maps layer indices to counts, e.g. {{"2": "full"}}; got {json.dumps(value)}')
    layers = {}
    for key, count in value.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise ValueError(f"'layers' keys are layer indices 0, 1, 2, ...; got {json.dumps(key)}")
        layers[int(key)] = _parse_count(count)
    return layers


def _layer_list(layers: Sequence[int]) -> str:
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(map(str, layers))


@dataclass(frozen=True)
class Interval:
    """Noise levels in (low, high] use `mediators` (None: full attention) in every layer but those `layers`
    names, which use their own count; the interval holding 0 includes it.

    `layers` may be given as a mapping {layer: count}; it is kept as sorted (layer, count) pairs, without the
    layers whose count is the interval's own (so equal schedules compare equal).
    """

    high: float
    low: float
    mediators: int | None
    layers: tuple[tuple[int, int | None], ...] = ()

    def __post_init__(self) -> None:
        given = self.layers.items() if isinstance(self.layers, Mapping) else self.layers
        canonical = tuple(
            sorted((int(layer), count) for layer, count in dict(given).items() if count != self.mediators)
        )
        object.__setattr__(self, "layers", canonical)

    @property
    def per_layer(self) -> bool:
        return bool(self.layers)

    @property
    def counts_used(self) -> set[int | None]:
        return {self.mediators, *(count for _, count in self.layers)}

    def layer_counts(self, depth: int) -> tuple[int | None, ...]:
        """The count of each of `depth` layers."""
        own = dict(self.layers)
        return tuple(own.get(layer, self.mediators) for layer in range(depth))

    @property
    def span(self) -> str:
        return f"{self.high:.2f}→{self.low:.2f}"

    def describe(self) -> str:
        text = f"{self.span}: {count_label(self.mediators)}"
        if self.layers:
            by_count: dict[int | None, list[int]] = {}
            for layer, count in self.layers:
                by_count.setdefault(count, []).append(layer)
            text += " (" + "; ".join(f"{_layer_list(ls)}: {count_label(c)}" for c, ls in by_count.items()) + ")"
        return text


class MediatorSchedule:
    """Piecewise-constant mediator count over the noise level (1 = pure noise, 0 = data), for the whole network
    or per layer.

    As JSON (`to_dict`, `save`, `load`): {"name": ..., "intervals": [{"from": 1.0, "to": 0.5, "mediators": 4},
    {"from": 0.5, "to": 0.0, "mediators": 16, "layers": {"2": "full", "3": "full"}}]}. "mediators" is the count
    (or "full") of every layer; the optional "layers" gives the layers that depart from it their own count or
    "full" (here: layers 2 and 3 use full attention below noise level 0.5, the others 16 mediators). An interval
    without "layers" switches the whole network, as every schedule did before per-layer intervals existed.
    """

    def __init__(self, intervals: Sequence[Interval], name: str = "schedule"):
        self.intervals = tuple(sorted(intervals, key=lambda i: -i.high))
        self.name = name
        self.source: str | None = None  # the file it was loaded from, named in errors
        self.validate()

    @property
    def per_layer(self) -> bool:
        """Whether some interval gives layers their own counts (which needs networks that share all but attention)."""
        return any(i.per_layer for i in self.intervals)

    def _where(self) -> str:
        return f"schedule {self.source}" if self.source else f"schedule {self.name!r}"

    @classmethod
    def constant(cls, mediators: int | None, name: str | None = None) -> "MediatorSchedule":
        return cls([Interval(1.0, 0.0, mediators)], name or f"static {count_label(mediators)}")

    @classmethod
    def from_boundaries(cls, counts: Sequence[int | None], boundaries: Sequence[float], name: str = "schedule"):
        """counts[0] from noise 1 down to boundaries[0], counts[1] down to boundaries[1], ..., last down to 0."""
        if len(boundaries) != len(counts) - 1:
            raise ValueError(f"{len(counts)} counts need {len(counts) - 1} boundaries, got {len(boundaries)}")
        edges = [1.0, *boundaries, 0.0]
        return cls([Interval(edges[i], edges[i + 1], c) for i, c in enumerate(counts)], name)

    def validate(self, available: Sequence[int | None] | None = None, depth: int | None = None) -> None:
        """Intervals must tile [0, 1] without gaps or overlaps; counts must exist among `available`, and the
        layers an interval names among the `depth` layers of the networks."""
        if not self.intervals:
            raise ValueError("a schedule needs at least one interval")
        edge = 1.0
        for interval in self.intervals:
            if not (math.isfinite(interval.high) and math.isfinite(interval.low)):
                raise ValueError(
                    f"{self._where()} has a non-finite bound in {interval}; bounds are noise levels in [0, 1]"
                )
            if abs(interval.high - edge) > 1e-9 or interval.low > interval.high:
                raise ValueError(
                    f"{self._where()} does not tile [0, 1]: interval {interval} starts at "
                    f"{interval.high}, expected {edge}"
                )
            edge = interval.low
        if abs(edge) > 1e-9:
            raise ValueError(f"{self._where()} stops at noise level {edge}; the last interval must reach 0")
        for interval in self.intervals:
            missing = interval.counts_used - set(available) if available is not None else set()
            if missing:
                raise ValueError(
                    f"{self._where()} interval {interval.span} uses {sorted(map(count_label, missing))} but only "
                    f"{sorted(map(count_label, available))} are available; give a network (--ckpt) for each"
                )
            beyond = [layer for layer, _ in interval.layers if depth is not None and layer >= depth]
            if beyond:
                raise ValueError(
                    f"{self._where()} interval {interval.span} names {_layer_list(beyond)}, but the networks have "
                    f"{depth} layers (0 to {depth - 1})"
                )

    def interval_at(self, level: float) -> Interval:
        for interval in self.intervals:
            if level > interval.low or interval.low <= 0.0:
                return interval
        return self.intervals[-1]

    def count_at(self, level: float) -> int | None:
        """The count at `level` of every layer its interval does not name."""
        return self.interval_at(level).mediators

    def callback(
        self,
        networks: Mapping[int | None, torch.nn.Module] | torch.nn.Module,
        names: Mapping[int | None, str] | None = None,
    ):
        """A step callback that hands each step to the network its noise level calls for: one of `networks`, or
        for a per-layer interval a `LayerMixedNetwork` of them. Per-layer intervals are refused unless the
        networks they mix share every tensor outside attention; `names` (e.g. their files) name them in errors.
        `networks` may be one network serving several counts (or its `count_views()`): each step then runs it at
        the count (or per-layer counts) of its interval."""
        networks = as_count_networks(networks)
        shared = shared_network_of(networks)
        depth = next((n.config.depth for n in networks.values() if hasattr(n, "config")), None)
        self.validate(list(networks), depth)
        mixed = [i for i in self.intervals if i.per_layer]
        if mixed and shared is None:
            used = sorted({c for i in mixed for c in i.counts_used}, key=lambda c: math.inf if c is None else c)
            check_shared_outside_attention({c: networks[c] for c in used}, names)

        def evaluated_by(interval: Interval):
            if not interval.per_layer:
                return networks[interval.mediators]
            if shared is not None:  # one network: its layers switch counts, nothing is borrowed
                return SharedLayerView(shared, interval.layer_counts(depth))
            return LayerMixedNetwork(networks, interval.layer_counts(depth), interval.mediators)

        evaluated = {i: evaluated_by(i) for i in self.intervals}

        def choose(info: StepInfo):
            network = evaluated[self.interval_at(info.noise_level)]
            if isinstance(network, (LayerMixedNetwork, SharedLayerView)):
                network.batch = len(info.x)
            return network

        return choose

    def expected_gflops(
        self, levels: Sequence[float], configs: Mapping[int | None, ModelConfig], cfg: bool = False
    ) -> float:
        """GFLOPs per image of a run whose network evaluations fall at `levels` (see `evaluation_levels`), with
        `configs` the network of each count: per-layer intervals cost each layer as its own count's network."""
        total = 0.0
        for level in levels:
            interval = self.interval_at(level)
            if interval.per_layer:
                depth = configs[interval.mediators].depth
                total += layer_gmacs(configs, interval.layer_counts(depth))
            else:
                total += config_gmacs(configs[interval.mediators])
        return (2 if cfg else 1) * total

    # ---- as data ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        def as_json(count: int | None):
            return "full" if count is None else count

        intervals = []
        for i in self.intervals:
            entry = {"from": i.high, "to": i.low, "mediators": as_json(i.mediators)}
            if i.layers:
                entry["layers"] = {str(layer): as_json(count) for layer, count in i.layers}
            intervals.append(entry)
        return {"name": self.name, "intervals": intervals}

    @classmethod
    def from_dict(cls, data: Mapping) -> "MediatorSchedule":
        try:
            intervals = [
                Interval(
                    _parse_level(i["from"], "from"),
                    _parse_level(i["to"], "to"),
                    _parse_count(i["mediators"]),
                    _parse_layers(i["layers"]) if "layers" in i else (),
                )
                for i in data["intervals"]
            ]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"not a schedule: {error}; expected {{'intervals': [{{'from', 'to', 'mediators'}}]}} (each interval "
                "may add 'layers': {layer index: count or 'full'})"
            ) from error
        return cls(intervals, data.get("name", "schedule"))

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "MediatorSchedule":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no schedule file at {path}")
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            hint = (
                "; it is a redundancy table: derive a schedule from it with `attnmed schedule TABLE --out FILE.json`"
                if path.suffix in (".parquet", ".csv")
                else ""
            )
            raise ValueError(f"{path} is not a schedule JSON (from `attnmed schedule`): {error}{hint}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a schedule JSON (from `attnmed schedule`): it holds no object")
        try:
            schedule = cls.from_dict(data)
        except ValueError as error:
            raise ValueError(f"schedule {path}: {error}") from None
        schedule.source = str(path)
        return schedule

    def __str__(self) -> str:
        return f"{self.name} [noise level " + ", ".join(i.describe() for i in self.intervals) + "]"

    def __eq__(self, other) -> bool:
        return isinstance(other, MediatorSchedule) and self.to_dict() == other.to_dict()


def count_configs(network: torch.nn.Module) -> dict[int | None, ModelConfig]:
    """{count: the config of that count's network} of a network serving several counts (for `expected_gflops`)."""
    return {count: network.config.at_count(count) for count in network.config.counts}


def as_count_networks(networks) -> dict[int | None, torch.nn.Module]:
    """`networks` keyed by count: a mapping as given, or a network serving several counts as its count views."""
    if isinstance(networks, torch.nn.Module):
        config = getattr(networks, "config", None)
        if config is None or not config.serves_several:
            label = getattr(config, "label", type(networks).__name__)
            raise ValueError(
                f"{label} serves one count; give the networks to switch between keyed by count, e.g. "
                "{4: net4, 16: net16}, or one network serving several counts"
            )
        return networks.count_views()
    return dict(networks)


def shared_network_of(networks: Mapping[int | None, torch.nn.Module]):
    """The one network serving several counts that every network of `networks` is a view of, else None."""
    owners = {id(n.network): n.network for n in networks.values() if isinstance(n, CountView)}
    if len(owners) == 1 and all(isinstance(n, CountView) for n in networks.values()):
        return next(iter(owners.values()))
    return None


def ordered_counts(counts) -> list[int | None]:
    """Counts in the order the adaptive rule uses them: fewest mediators first, full attention last."""
    return sorted(c for c in counts if c is not None) + ([None] if None in counts else [])


_ATTENTION_KEY = re.compile(r"blocks\.\d+\.attn\.")


def first_difference_outside_attention(a: torch.nn.Module, b: torch.nn.Module) -> str | None:
    """The first state-dict tensor outside the attention modules that `a` and `b` do not hold bit for bit alike
    (by name, shape, dtype and value), or None when they share them all."""
    own, theirs = a.state_dict(), b.state_dict()
    for key, tensor in own.items():
        if _ATTENTION_KEY.match(key):
            continue
        other = theirs.get(key)
        if (
            other is None
            or other.shape != tensor.shape
            or other.dtype != tensor.dtype
            or not torch.equal(other, tensor)
        ):
            return key
    return next((k for k in theirs if not _ATTENTION_KEY.match(k) and k not in own), None)


def check_shared_outside_attention(
    networks: Mapping[int | None, torch.nn.Module], names: Mapping[int | None, str] | None = None
) -> None:
    """Refuse networks that cannot be mixed layer by layer: all must hold the first one's tensors outside attention."""
    names = names or {}
    counts = list(networks)
    for count in counts[1:]:
        key = first_difference_outside_attention(networks[counts[0]], networks[count])
        if key is not None:
            first, other = (names.get(c, f"the {count_label(c)} network") for c in (counts[0], count))
            raise ValueError(
                f"{other} and {first} differ outside attention, first in {key}: a per-layer schedule runs layers of "
                "several networks as one, which needs networks that share every other tensor, as those `attnmed "
                "graft` makes from one source; networks trained apart can only switch whole (a schedule without "
                "'layers')"
            )


class LayerMixedNetwork:
    """The network of count `base` with layer l running the attention module of the network of `counts[l]`.

    For the duration of each call the base network's blocks hold the borrowed modules; its own are put back
    afterwards, whatever happens, so the base network is never left changed. Sound only for networks that
    share every tensor outside attention (`check_shared_outside_attention`). `batch` is the number of samples
    the next evaluation is for (set by the schedule's callback), which its cost per sample needs.
    """

    def __init__(self, networks: Mapping[int | None, torch.nn.Module], counts: Sequence[int | None], base: int | None):
        self.network = networks[base]
        self.counts = tuple(counts)
        self.borrowed = {layer: networks[c].blocks[layer].attn for layer, c in enumerate(counts) if c != base}
        self.gmacs = layer_gmacs({c: networks[c].config for c in set(counts)}, counts)
        self.batch = 1

    @contextmanager
    def _borrowing(self):
        blocks = self.network.blocks
        own = {layer: blocks[layer].attn for layer in self.borrowed}
        try:
            for layer, module in self.borrowed.items():
                blocks[layer].attn = module
            yield self.network
        finally:
            for layer, module in own.items():
                blocks[layer].attn = module

    def __call__(self, x, t, y):
        with self._borrowing() as network:
            return network(x, t, y)

    def forward_with_cfg(self, x, t, y, cfg_scale, guided_channels=None):
        with self._borrowing() as network:
            return network.forward_with_cfg(x, t, y, cfg_scale, guided_channels)

    def gmacs_per_sample(self) -> torch.Tensor:
        return torch.full((self.batch,), self.gmacs, dtype=torch.float64)


class SharedLayerView(CountView):
    """A network serving several counts run with one count per layer (a per-layer interval of a schedule), costing
    each layer what it costs in its count's network. `batch` is set by the schedule's callback, as for
    `LayerMixedNetwork`."""

    def __init__(self, network: torch.nn.Module, layer_counts: Sequence[int | None]):
        super().__init__(network, layer_counts)
        self.gmacs = layer_gmacs({c: network.config.at_count(c) for c in set(self.layer_counts)}, self.layer_counts)
        self.batch = 1

    def gmacs_per_sample(self) -> torch.Tensor:
        return torch.full((self.batch,), self.gmacs, dtype=torch.float64)


class RoutedNetwork(torch.nn.Module):
    """Evaluates each sample of a batch with the network assigned to it (per-sample switching)."""

    def __init__(self, networks: Sequence[torch.nn.Module], assignment: torch.Tensor):
        super().__init__()
        self.networks = list(networks)
        self.assignment = assignment  # (B,) index into networks

    def _route(self, x, call) -> torch.Tensor:
        out = None
        for index in self.assignment.unique().tolist():
            rows = (self.assignment == index).nonzero().flatten()
            part = call(self.networks[index], rows)
            if out is None:
                out = part.new_empty((len(x), *part.shape[1:]))
            out[rows] = part
        return out

    def forward(self, x, t, y):
        return self._route(x, lambda net, rows: net(x[rows], t[rows], y[rows]))

    def forward_with_cfg(self, x, t, y, cfg_scale, guided_channels=None):
        half = len(x) // 2
        cond = self._route(
            x[:half],
            lambda net, rows: net.forward_with_cfg(
                torch.cat([x[rows], x[rows + half]]),
                torch.cat([t[rows], t[rows + half]]),
                torch.cat([y[rows], y[rows + half]]),
                cfg_scale,
                guided_channels,
            )[: len(rows)],
        )
        return torch.cat([cond, cond])

    def gmacs_per_sample(self) -> torch.Tensor:
        costs = torch.tensor([config_gmacs(net.config) for net in self.networks], dtype=torch.float64)
        return costs[self.assignment.cpu()]


STATISTICS = ("state", "drift")


class AdaptiveSwitch:
    """The paper's step-wise switching between networks of increasing mediator count (docs/reference.md §7).

    `networks` are ordered as they are used (fewest mediators first, as the paper: 4, 16, 64), or are one network
    serving several counts (its counts are then used fewest first, full attention last); `ratios` are
    ρ_1 … ρ_{m−1}. Following the public code, the first difference d_1 = |x_1 − x_0| is not used, μ averages
    d_2 … d_{K+1}, and from k = K+2 on the network moves from i to i+1 when d_k < ρ_i·μ (several moves may
    happen at one step). Works with samplers that evaluate the network once per step (SDE Euler–Maruyama,
    DDPM, DDIM, fixed-step Euler ODE).

    `statistic="state"` is the paper's d_k on the states. Under the SDE most of a step is the injected noise
    √(2w_t)·dW, whose size is fixed by the time grid, so the switch falls at nearly the same step for every
    sample; `statistic="drift"` (ours, not the paper's) measures d_k on Δx minus that noise, the part the
    network moved. Each sample's trace of both parts is kept in `traces` (per step k ≥ 2: d on the state, on
    the injected noise, on the drift), for diagnosing what the rule responds to.
    """

    def __init__(
        self,
        networks: Sequence[torch.nn.Module],
        ratios: Sequence[float],
        warmup: int = 3,
        distance: str = "l1",
        statistic: str = "state",
    ):
        if isinstance(networks, torch.nn.Module):
            views = as_count_networks(networks)
            networks = [views[c] for c in ordered_counts(views)]
        if len(ratios) != len(networks) - 1:
            raise ValueError(f"{len(networks)} networks need {len(networks) - 1} ratios ρ_i, got {len(ratios)}")
        if distance not in ("l1", "l2"):
            raise ValueError(f"unknown distance {distance!r}; choose 'l1' (mean |Δx|) or 'l2' (mean Δx²)")
        if warmup < 1:
            raise ValueError("the warm-up needs at least one step")
        if statistic not in STATISTICS:
            raise ValueError(
                f"unknown statistic {statistic!r}; choose 'state' (the paper's d_k) or 'drift' (ours: d_k "
                "without the sampler's injected noise)"
            )
        self.statistic = statistic
        self.networks = list(networks)
        self.ratios = [float(r) for r in ratios]
        self.warmup = warmup
        self.distance = distance
        self.reset()

    def reset(self) -> None:
        self.previous: torch.Tensor | None = None
        self.step = 0
        self.baseline: torch.Tensor | None = None
        self.assignment: torch.Tensor | None = None
        self.switch_steps: list[list[int]] = []  # per sample: the evaluation index of each move
        self.traces: list[list[list[float]]] = []  # per sample, per step k ≥ 2: [d state, d noise, d drift]

    def _distance(self, x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        diff = (x - previous).flatten(1)
        return diff.abs().mean(1) if self.distance == "l1" else (diff**2).mean(1)

    def __call__(self, info: StepInfo):
        x = info.x
        if self.assignment is None or len(self.assignment) != len(x) or info.index == 0:
            self.reset()
            self.assignment = torch.zeros(len(x), dtype=torch.long, device=x.device)
            self.baseline = torch.zeros(len(x), dtype=torch.float64, device=x.device)
            self.switch_steps = [[] for _ in range(len(x))]
            self.traces = [[] for _ in range(len(x))]
        k = self.step  # x is x_k
        if k >= 2:
            noise = info.injected if info.injected is not None else torch.zeros_like(x)
            parts = [
                self._distance(x, self.previous),
                self._distance(noise, torch.zeros_like(noise)),
                self._distance(x - noise, self.previous),
            ]
            for trace, values in zip(self.traces, torch.stack(parts, 1).tolist()):
                trace.append(values)
            d = (parts[0] if self.statistic == "state" else parts[2]).double()
            if k <= self.warmup + 1:
                self.baseline += d / self.warmup
            else:
                for i, ratio in enumerate(self.ratios):
                    move = (self.assignment == i) & (d < ratio * self.baseline)
                    for sample in move.nonzero().flatten().tolist():
                        self.switch_steps[sample].append(info.index)
                    self.assignment = torch.where(move, self.assignment + 1, self.assignment)
        self.previous = x.detach().clone()
        self.step += 1
        return RoutedNetwork(self.networks, self.assignment.clone())


def evaluation_levels(process, sampler) -> list[float]:
    """The noise levels at which `sampler` evaluates the network (one dry run with a free stand-in network).

    Adaptive ODE solvers (dopri5) choose their steps from the dynamics, so their levels are only known by
    running them; they are refused here.
    """
    from mediator_models.sampling.generation import generate

    if sampler.kind == "ode" and (sampler.method or "dopri5") == "dopri5":
        raise ValueError("dopri5 chooses its steps as it goes; expected costs need a fixed-step sampler")
    levels: list[float] = []

    def record(info: StepInfo):
        levels.append(info.noise_level)

    class Zero(torch.nn.Module):
        def forward(self, x, t, y):
            return torch.zeros(len(x), 2 * x.shape[1], *x.shape[2:]) if process.family == "DiT" else torch.zeros_like(x)

    plain = type(sampler)(**{**sampler.to_dict(), "cfg_scale": 1.0})
    generate(Zero(), process, plain, torch.zeros(1, 1, 1, 1), torch.zeros(1, dtype=torch.long), callback=record)
    return levels
