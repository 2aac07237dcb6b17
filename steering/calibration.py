"""Capping thresholds from observed projections, and the paper's experiment ids ``layers_A:B-pQ``."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

_EXPERIMENT_ID = re.compile(r"^layers_(-?\d*):(-?\d*)-p(\d*\.?\d+)$")


def thresholds_from_projections(projections: Tensor, quantile: float) -> Tensor:
    """Per-layer threshold tau = the ``quantile`` (0..1, e.g. 0.25 for ``p0.25``) of observed projections.

    Args:
        projections: ``[N, L]`` projections of N observed responses onto the unit axis.
    Returns:
        ``[L]`` fp32.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be within [0, 1], got {quantile}")
    p = projections.detach().to(torch.float32)
    if p.dim() != 2 or p.shape[0] == 0:
        raise ValueError(f"projections must be [N, L] with N >= 1, got shape {tuple(p.shape)}")
    return torch.quantile(p, quantile, dim=0)


@dataclass(frozen=True)
class ExperimentId:
    """``layers_A:B-pQ``: cap the layers of the Python slice ``A:B`` at the ``Q`` quantile."""

    start: int | None
    stop: int | None
    quantile: float

    def layers(self, n_layers: int) -> list[int]:
        return list(range(n_layers))[slice(self.start, self.stop)]

    def __str__(self) -> str:
        a = "" if self.start is None else str(self.start)
        b = "" if self.stop is None else str(self.stop)
        return f"layers_{a}:{b}-p{format_quantile(self.quantile)}"


def format_quantile(q: float) -> str:
    text = f"{q:.6f}".rstrip("0").rstrip(".")
    return text if "." in text else f"{text}.0" if text != "0" else "0.0"


def parse_experiment_id(text: str) -> ExperimentId:
    match = _EXPERIMENT_ID.match(text.strip())
    if not match:
        raise ValueError(f"experiment id {text!r} is not of the form 'layers_A:B-pQ' (e.g. 'layers_46:54-p0.25')")
    a, b, q = match.groups()
    quantile = float(q)
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"experiment id {text!r}: quantile {quantile} is outside [0, 1]")
    return ExperimentId(int(a) if a else None, int(b) if b else None, quantile)
