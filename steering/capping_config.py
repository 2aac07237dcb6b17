"""The paper's published capping configs (``capping_config.pt``).

Layout::

    {"vectors": {name: {"layer": int, "vector": Tensor[D]}},
     "experiments": [{"id": "layers_46:54-p0.25", "interventions": [{"vector": name, "cap": float}]}]}

Each vector is role-minus-default, i.e. it points *against* the Assistant Axis, and ``cap`` is a
ceiling on the projection onto it. A ceiling ``cap`` on ``-axis`` is exactly a floor ``-cap`` on
``+axis``, so both forms become :class:`~steering.interventions.ClampProjection`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from steering.axis_io import AxisFileError, load_pt_safely
from steering.interventions import ClampProjection


@dataclass(frozen=True)
class CappingVector:
    layer: int
    vector: Tensor  # [D], role-minus-default direction


@dataclass(frozen=True)
class CappingConfig:
    vectors: dict[str, CappingVector]
    experiments: dict[str, list[tuple[str, float]]]  # id -> [(vector name, cap)]

    def interventions(self, experiment_id: str) -> list[ClampProjection]:
        """Ceilings of one experiment, as clamp interventions (``hi=cap`` on the stored vector)."""
        if experiment_id not in self.experiments:
            known = ", ".join(sorted(self.experiments)[:10])
            raise KeyError(f"no experiment {experiment_id!r} in the capping config (e.g. {known})")
        out = []
        for name, cap in self.experiments[experiment_id]:
            item = self.vectors[name]
            out.append(ClampProjection(layer=item.layer, vector=item.vector, hi=cap))
        return out

    def as_axis_floors(self, experiment_id: str) -> list[ClampProjection]:
        """The same experiment written as floors on the Assistant direction (``-vector``, ``lo=-cap``)."""
        return [ClampProjection(layer=c.layer, vector=-c.vector, lo=-c.hi) for c in self.interventions(experiment_id)]


def parse_capping_config(obj: object, source: str = "capping config") -> CappingConfig:
    if not isinstance(obj, dict) or "vectors" not in obj or "experiments" not in obj:
        raise AxisFileError(f"{source}: expected a dict with 'vectors' and 'experiments'")
    vectors: dict[str, CappingVector] = {}
    for name, entry in dict(obj["vectors"]).items():
        if not isinstance(entry, dict) or "layer" not in entry or "vector" not in entry:
            raise AxisFileError(f"{source}: vectors[{name!r}] needs 'layer' and 'vector'")
        vector = entry["vector"]
        if not isinstance(vector, Tensor) or vector.dim() != 1:
            raise AxisFileError(f"{source}: vectors[{name!r}].vector must be a 1-D tensor")
        vectors[str(name)] = CappingVector(int(entry["layer"]), vector.detach().to(torch.float32))
    experiments: dict[str, list[tuple[str, float]]] = {}
    for index, experiment in enumerate(obj["experiments"]):
        try:
            exp_id = str(experiment["id"])
            items = [(str(i["vector"]), float(i["cap"])) for i in experiment["interventions"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise AxisFileError(f"{source}: experiments[{index}] is malformed ({exc})") from exc
        for name, _ in items:
            if name not in vectors:
                raise AxisFileError(f"{source}: experiment {exp_id!r} names unknown vector {name!r}")
        experiments[exp_id] = items
    return CappingConfig(vectors, experiments)


def load_capping_config(path: str | os.PathLike) -> CappingConfig:
    path = Path(path)
    return parse_capping_config(load_pt_safely(path), str(path))
