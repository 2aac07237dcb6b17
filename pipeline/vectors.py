"""Step 5, vectors: per-role mean activation over well-judged responses, and the default vector.

A role's vector is the mean over its responses with judge score >= ``min_score`` (default 3); a
role with fewer than ``min_count`` such responses gets no vector and is reported, never silently
dropped. The default vector is the mean over all responses of the ``default`` role (not judged).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from pipeline.extract import ActivationStore
from pipeline.judge import read_scores
from pipeline.manifest import record_step
from pipeline.role_schema import DEFAULT_ROLE_NAME
from pipeline.store import RunPaths, atomic_write_with, read_responses


@dataclass(frozen=True)
class VectorsConfig:
    run_dir: Path
    min_score: int = 3
    min_count: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        if not 0 <= self.min_score <= 3:
            raise ValueError(f"min_score must be within 0..3, got {self.min_score}")
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")


@dataclass
class VectorsReport:
    n_default: int
    counts: dict[str, int] = field(default_factory=dict)  # role -> responses used
    skipped: dict[str, str] = field(default_factory=dict)  # role -> reason
    layers: list[int] = field(default_factory=list)


@dataclass
class RunVectors:
    """Vectors of a run: ``default`` and each role ``[n_layers_sel, D]``."""

    default: Tensor
    roles: dict[str, Tensor]
    layers: list[int]
    counts: dict[str, int]

    def role_matrix(self) -> tuple[list[str], Tensor]:
        names = sorted(self.roles)
        return names, torch.stack([self.roles[n] for n in names])


def _per_response_vector(tensor: Tensor) -> Tensor:
    """``[L, D]`` from a stored aggregate (``none`` aggregation stores ``[T, L, D]``: averaged here)."""
    return tensor.mean(0) if tensor.dim() == 3 else tensor


def compute_vectors(responses, scores: dict[str, int], activations: dict[str, Tensor], min_score: int,
                    min_count: int) -> tuple[Tensor, dict[str, Tensor], VectorsReport]:
    """Pure part of the step (tables and tensors in, vectors out)."""
    default_ids = [rid for rid, role in zip(responses["rollout_id"], responses["role"])
                   if role == DEFAULT_ROLE_NAME and rid in activations]
    if not default_ids:
        raise ValueError("no extracted responses of the 'default' role: the default vector cannot be computed")
    default = torch.stack([_per_response_vector(activations[r]) for r in default_ids]).mean(0)
    report = VectorsReport(n_default=len(default_ids))
    roles: dict[str, Tensor] = {}
    for role, group in responses.groupby("role"):
        if role == DEFAULT_ROLE_NAME:
            continue
        ids = list(group["rollout_id"])
        scored = [r for r in ids if r in scores]
        kept = [r for r in scored if scores[r] >= min_score and r in activations]
        if len(kept) < min_count:
            report.skipped[role] = (f"{len(kept)} responses with score >= {min_score} (need {min_count}); "
                                    f"{len(scored)}/{len(ids)} scored")
            continue
        roles[role] = torch.stack([_per_response_vector(activations[r]) for r in kept]).mean(0)
        report.counts[role] = len(kept)
    return default, roles, report


def run_vectors(config: VectorsConfig) -> VectorsReport:
    paths = RunPaths(config.run_dir)
    store = ActivationStore(config.run_dir)
    meta = store.meta()
    if meta is None:
        raise FileNotFoundError(f"no activations in {store.dir}: run the 'extract' step first")
    responses = read_responses(config.run_dir)
    activations = store.load()
    default, roles, report = compute_vectors(responses, read_scores(config.run_dir), activations,
                                             config.min_score, config.min_count)
    report.layers = list(meta["layers"])
    tensors = {"default": default.contiguous(), **{f"role.{name}": v.contiguous() for name, v in roles.items()}}
    metadata = {"assistant_axis_lab.vectors": json.dumps({**asdict(report), "model_id": meta["model_id"],
                                                          "revision": meta.get("revision"),
                                                          "n_layers": meta["n_layers"], "d_model": meta["d_model"],
                                                          "min_score": config.min_score,
                                                          "min_count": config.min_count})}
    atomic_write_with(paths.vectors, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    record_step(config.run_dir, "vectors", config, finished=True,
                extra={"roles_with_vectors": len(roles), "roles_skipped": report.skipped})
    return report


def load_vectors(run_dir: str | Path) -> RunVectors:
    path = RunPaths(run_dir).vectors
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the 'vectors' step first")
    with safe_open(str(path), framework="pt") as handle:
        info = json.loads((handle.metadata() or {})["assistant_axis_lab.vectors"])
        default = handle.get_tensor("default")
        roles = {key[len("role."):]: handle.get_tensor(key) for key in handle.keys() if key.startswith("role.")}
    return RunVectors(default=default, roles=roles, layers=info["layers"], counts=info["counts"])


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("vectors", help="per-role and default mean vectors from judged activations")
    parser.add_argument("--run-dir", type=Path, required=True, help="the run's output directory")
    parser.add_argument("--min-score", type=int, default=3, help="keep responses with judge score >= this (0-3)")
    parser.add_argument("--min-count", type=int, default=1,
                        help="roles with fewer kept responses get no vector (and are reported)")
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    report = run_vectors(VectorsConfig(run_dir=args.run_dir, min_score=args.min_score, min_count=args.min_count))
    print(f"vectors: default from {report.n_default} responses; {len(report.counts)} roles with vectors")
    for role, reason in sorted(report.skipped.items()):
        print(f"  skipped {role}: {reason}")
    return 0
