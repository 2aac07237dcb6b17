"""Step 6, axis: ``mean(default) - mean(roles)`` per layer, saved in the native format with metadata.

Also writes ``axis_summary.json`` (per layer: axis norm, PC1-axis cosine, variance explained by
PC1/PC2 of the role vectors) and capping thresholds per layer at chosen quantiles of the
projections of this run's own responses onto the axis.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.extract import ActivationStore
from pipeline.manifest import read_manifest, record_step
from pipeline.store import RunPaths, atomic_write_json
from pipeline.vectors import load_vectors
from steering.axis_io import AxisBundle, AxisMetadata, save_axis
from steering.axis_math import compute_axis, project, summarize_layers
from steering.calibration import format_quantile, thresholds_from_projections


@dataclass(frozen=True)
class AxisConfig:
    run_dir: Path
    quantiles: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5, 0.75)

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        for q in self.quantiles:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"quantiles must be within [0, 1], got {q}")


@dataclass
class AxisReport:
    path: Path
    n_roles: int
    n_layers: int
    summary: dict


def run_axis(config: AxisConfig) -> AxisReport:
    paths = RunPaths(config.run_dir)
    vectors = load_vectors(config.run_dir)
    store = ActivationStore(config.run_dir)
    meta = store.meta() or {}
    if meta.get("n_layers") is not None and len(vectors.layers) != meta["n_layers"]:
        raise ValueError(
            f"the axis needs activations of every layer; this run extracted layers {vectors.layers} "
            f"of {meta['n_layers']}. Re-extract with --layers all in a new run directory."
        )
    names, role_matrix = vectors.role_matrix()
    if len(names) < 1:
        raise ValueError("no role vectors: every role was skipped by the vectors step (see its report)")
    axis = compute_axis(vectors.default, role_matrix)
    summary = {"layers": vectors.layers}
    if len(names) >= 2:
        layer_summary = summarize_layers(role_matrix, axis)
        summary.update({k: getattr(layer_summary, k).tolist() for k in
                        ("axis_norm", "pc1_axis_cosine", "pc1_variance_explained", "pc2_variance_explained")})
    else:
        summary["axis_norm"] = axis.norm(dim=-1).tolist()
    projections = project(torch.stack([v.mean(0) if v.dim() == 3 else v for v in store.load().values()]), axis)
    thresholds = {f"p{format_quantile(q)}": thresholds_from_projections(projections, q).tolist()
                  for q in config.quantiles}
    summary["role_projections"] = {n: project(role_matrix[i], axis).tolist() for i, n in enumerate(names)}
    summary["default_projection"] = project(vectors.default, axis).tolist()
    manifest = read_manifest(config.run_dir)
    settings = {"n_roles": len(names), "roles": names, "role_counts": vectors.counts,
                "n_projection_samples": int(projections.shape[0]),
                "steps": {k: v.get("settings") for k, v in manifest.get("steps", {}).items()}}
    bundle = AxisBundle(
        axis=axis,
        metadata=AxisMetadata(model_id=meta.get("model_id"), revision=meta.get("revision"),
                              thresholds=thresholds, settings=settings, source=str(paths.run_dir)),
        default_vector=vectors.default,
        role_vectors=dict(zip(names, role_matrix)),
    )
    save_axis(paths.axis, bundle)
    atomic_write_json(paths.run_dir / "axis_summary.json", summary)
    record_step(config.run_dir, "axis", config, finished=True, extra={"n_roles": len(names)})
    return AxisReport(path=paths.axis, n_roles=len(names), n_layers=axis.shape[0], summary=summary)


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("axis", help="compute the Assistant Axis, PCA summary and capping thresholds")
    parser.add_argument("--run-dir", type=Path, required=True, help="the run's output directory")
    parser.add_argument("--quantiles", type=float, nargs="+", default=[0.01, 0.05, 0.25, 0.5, 0.75],
                        help="quantiles (0-1) of the run's projections to store as capping thresholds")
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    report = run_axis(AxisConfig(run_dir=args.run_dir, quantiles=tuple(args.quantiles)))
    cos = report.summary.get("pc1_axis_cosine")
    extra = f"; PC1-axis cosine at middle layer {cos[len(cos) // 2]:.3f}" if cos else ""
    print(f"axis: {report.n_layers} layers from {report.n_roles} roles -> {report.path}{extra}")
    return 0
