"""Interventions on the residual stream at decoder block outputs, as TransformerLens hooks.

The math (pure functions on ``[B, T, D]`` tensors) is done in fp32 and cast back to the
activation dtype. Directions are always used as unit vectors, except for :class:`AddVector`
with ``unit_norm=False`` where the coefficient is in raw-vector units.

Hook point: ``blocks.{layer}.hook_out`` = output of decoder block ``layer`` = HF
``hidden_states[layer + 1]`` (for the last layer, before the final norm).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Sequence, Union

import torch
from torch import Tensor

from steering.axis_math import unit

Positions = Literal["all", "generated", "last"]
POSITIONS: tuple[str, ...] = ("all", "generated", "last")


def block_output_hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_out"


# ---------------------------------------------------------------- pure math on [B, T, D] (mask [B, T])

def _masked(h: Tensor, new: Tensor, mask: Tensor | None) -> Tensor:
    out = new.to(h.dtype)
    if mask is None:
        return out
    return torch.where(mask.unsqueeze(-1), out, h)


def add_vector(h: Tensor, vector: Tensor, coefficient: float, *, unit_norm: bool = True,
               mask: Tensor | None = None) -> Tensor:
    """``h + c * v`` with ``v`` the unit vector (``unit_norm``) or the raw vector."""
    v = unit(vector) if unit_norm else vector.to(torch.float32)
    return _masked(h, h.to(torch.float32) + coefficient * v.to(h.device), mask)


def ablate_direction(h: Tensor, vector: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Remove the component of ``h`` along ``vector``: ``h - (h.v) v`` (unit ``v``)."""
    v = unit(vector).to(h.device)
    x = h.to(torch.float32)
    return _masked(h, x - (x @ v).unsqueeze(-1) * v, mask)


def set_projection(h: Tensor, vector: Tensor, value: float, *, mask: Tensor | None = None) -> Tensor:
    """Replace the projection on unit ``vector`` by ``value`` (mean ablation when ``value`` is the mean)."""
    v = unit(vector).to(h.device)
    x = h.to(torch.float32)
    return _masked(h, x + (value - x @ v).unsqueeze(-1) * v, mask)


def clamp_projection(h: Tensor, vector: Tensor, lo: float | None = None, hi: float | None = None, *,
                     mask: Tensor | None = None) -> Tensor:
    """Keep the projection on unit ``vector`` inside ``[lo, hi]``; components within are untouched.

    ``lo`` alone is the Assistant-axis cap (a floor: ``h + max(lo - h.v, 0) v``); ``hi`` alone is the
    paper's cap on a role-minus-default vector (a ceiling).
    """
    v = unit(vector).to(h.device)
    x = h.to(torch.float32)
    p = x @ v
    target = p
    if lo is not None:
        target = torch.clamp(target, min=lo)
    if hi is not None:
        target = torch.clamp(target, max=hi)
    delta = target - p
    new = x + delta.unsqueeze(-1) * v
    changed = delta != 0
    mask = changed if mask is None else (mask & changed)
    return _masked(h, new, mask)


# ---------------------------------------------------------------- intervention specs

@dataclass(frozen=True)
class AddVector:
    """Add ``coefficient * vector`` at ``layer`` (unit vector by default; raw units with ``unit_norm=False``)."""

    layer: int
    vector: Tensor
    coefficient: float
    unit_norm: bool = True

    def apply(self, h: Tensor, mask: Tensor | None) -> Tensor:
        return add_vector(h, self.vector, self.coefficient, unit_norm=self.unit_norm, mask=mask)


@dataclass(frozen=True)
class AblateDirection:
    """Zero the projection on ``vector`` at ``layer``."""

    layer: int
    vector: Tensor

    def apply(self, h: Tensor, mask: Tensor | None) -> Tensor:
        return ablate_direction(h, self.vector, mask=mask)


@dataclass(frozen=True)
class MeanAblateDirection:
    """Set the projection on ``vector`` to ``mean_projection`` (e.g. its mean over a dataset)."""

    layer: int
    vector: Tensor
    mean_projection: float

    def apply(self, h: Tensor, mask: Tensor | None) -> Tensor:
        return set_projection(h, self.vector, self.mean_projection, mask=mask)


@dataclass(frozen=True)
class ClampProjection:
    """Keep the projection on ``vector`` within ``[lo, hi]`` at ``layer`` (either bound may be None)."""

    layer: int
    vector: Tensor
    lo: float | None = None
    hi: float | None = None

    def __post_init__(self) -> None:
        if self.lo is None and self.hi is None:
            raise ValueError("ClampProjection needs lo, hi or both")
        if self.lo is not None and self.hi is not None and self.lo > self.hi:
            raise ValueError(f"ClampProjection lo={self.lo} is above hi={self.hi}")

    def apply(self, h: Tensor, mask: Tensor | None) -> Tensor:
        return clamp_projection(h, self.vector, self.lo, self.hi, mask=mask)


Intervention = Union[AddVector, AblateDirection, MeanAblateDirection, ClampProjection]


def cap_on_axis(axis: Tensor, thresholds: Tensor | Sequence[float] | dict[int, float],
                layers: Sequence[int]) -> list[ClampProjection]:
    """Assistant-axis capping: a floor ``tau[layer]`` on the projection onto ``axis[layer]``.

    Args:
        axis: ``[L, D]``; thresholds: ``[L]`` (indexed by layer) or ``{layer: tau}``.
    """
    return [ClampProjection(layer=l, vector=axis[l], lo=float(thresholds[l])) for l in layers]


def add_axis(axis: Tensor, layers: Sequence[int], coefficient: float, *, unit_norm: bool = True) -> list[AddVector]:
    """Steering by addition of ``coefficient * axis[layer]`` at each of ``layers``."""
    return [AddVector(layer=l, vector=axis[l], coefficient=coefficient, unit_norm=unit_norm) for l in layers]


# ---------------------------------------------------------------- hooks

@dataclass
class PositionTracker:
    """Knows which absolute positions the current forward pass covers.

    With a KV cache, the first pass holds the whole (left-padded) prompt and each later pass one
    new token; without a cache every pass starts at position 0. ``prompt_length`` is the padded
    prompt length: positions ``>= prompt_length`` are generated tokens.
    """

    prompt_length: int = 0
    offset: int = 0
    length: int = 0
    _seen: int = 0

    def reset(self, prompt_length: int) -> None:
        self.prompt_length, self.offset, self.length, self._seen = prompt_length, 0, 0, 0

    def observe(self, seq_len: int) -> None:
        self.offset = self._seen if (self._seen > 0 and seq_len == 1) else 0
        self.length = seq_len
        self._seen = self.offset + seq_len

    def mask(self, positions: Positions, batch: int, seq_len: int, device) -> Tensor | None:
        if positions == "all":
            return None
        if positions == "last":
            m = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
            m[:, -1] = True
            return m
        if positions == "generated":
            absolute = torch.arange(seq_len, device=device) + self.offset
            return (absolute >= self.prompt_length).unsqueeze(0).expand(batch, seq_len)
        raise ValueError(f"unknown positions {positions!r}; choose one of {POSITIONS}")


@dataclass
class InterventionPlan:
    """Interventions to apply together, and at which token positions."""

    interventions: list[Intervention] = field(default_factory=list)
    positions: Positions = "all"

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown positions {self.positions!r}; choose one of {POSITIONS}")

    @property
    def layers(self) -> list[int]:
        return sorted({i.layer for i in self.interventions})

    def validate(self, n_layers: int, d_model: int) -> None:
        for item in self.interventions:
            if not 0 <= item.layer < n_layers:
                raise ValueError(f"intervention layer {item.layer} is outside the model's 0..{n_layers - 1}")
            if tuple(item.vector.shape) != (d_model,):
                raise ValueError(
                    f"intervention vector at layer {item.layer} has shape {tuple(item.vector.shape)}, "
                    f"the model's d_model is {d_model}"
                )

    def hooks(self, tracker: PositionTracker) -> list[tuple[str, Callable]]:
        """``(hook_name, fn)`` pairs: one position hook on the embedding, one per intervened layer."""

        def observe_positions(x: Tensor, hook) -> Tensor:
            tracker.observe(x.shape[1])
            return x

        hooks: list[tuple[str, Callable]] = [("embed.hook_out", observe_positions)]
        by_layer: dict[int, list[Intervention]] = {}
        for item in self.interventions:
            by_layer.setdefault(item.layer, []).append(item)
        for layer, items in sorted(by_layer.items()):
            hooks.append((block_output_hook_name(layer), _make_layer_hook(items, self.positions, tracker)))
        return hooks


def _make_layer_hook(items: list[Intervention], positions: Positions, tracker: PositionTracker) -> Callable:
    def hook_fn(x: Tensor, hook) -> Tensor:
        mask = tracker.mask(positions, x.shape[0], x.shape[1], x.device)
        for item in items:
            x = item.apply(x, mask)
        return x

    return hook_fn


@contextmanager
def applied(hook_host, plan: InterventionPlan | None, prompt_length: int = 0,
            extra_hooks: Sequence[tuple[str, Callable]] = ()) -> Iterator[PositionTracker]:
    """Context in which every forward of ``hook_host`` is intervened on.

    ``hook_host``: the TransformerLens bridge (its forward, and its HF model's ``generate``) or a
    :class:`steering.plain_decoder.PlainDecoder` (the weight-sharing plain twin used for generation);
    both take ``hooks(fwd_hooks=[(name, fn), ...])``.

    ``extra_hooks`` (e.g. projection monitors) run after the interventions at the same hook point.
    Hooks are removed on exit, also on error.
    """
    tracker = PositionTracker()
    tracker.reset(prompt_length)
    hooks = list(plan.hooks(tracker)) if plan is not None and plan.interventions else []
    hooks += list(extra_hooks)
    with hook_host.hooks(fwd_hooks=hooks):
        yield tracker
