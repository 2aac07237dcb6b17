"""``project-checkpoints``: how role vectors move along a FIXED Assistant Axis across training checkpoints.

The transcripts of a run are generated once (``generate``) and judged once (``judge``); this step
replays those same transcripts through every checkpoint, captures their response activations at
the chosen layer(s), builds each checkpoint's role vectors (mean over responses with judge score
``>= min_score``, as the ``vectors`` step) and default vector, and projects them onto

* a fixed axis: the run's ``axis.safetensors`` or any axis file (``--axis``), and
* the final checkpoint's persona PCs (PCA of the final checkpoint's role vectors per layer, PC1
  oriented along the fixed axis).

Checkpoints are given as strings:

``path/to/dir``                 a local model directory (one directory per checkpoint)
``org/model``                   a Hub model id (or the embedded default id)
``org/model@rev``               a Hub model at a git revision (branch, tag or commit)
``path/to/repo@rev``            a local git repository at a revision: exported once with
                                ``git archive`` into ``--export-dir`` (offline; transformers itself
                                ignores ``revision`` for local directories)
``path/to/dir@sub``             a local directory whose revision is a separate local path: ``sub``
                                as a path of its own, or relative to ``dir`` (e.g. ``out@checkpoint-500``)
``name=spec``                   any of the above with a display name

Storage, under ``<run>/checkpoints/``::

    <safe-name>/checkpoint.json                  the spec and how it was resolved
    <safe-name>/activations/...                  an ActivationStore (same resume + atomic rules as extract)
    projections.{csv,parquet}                     one row per (checkpoint, layer, vector)
    summary.{csv,parquet}                         one row per (checkpoint, layer)
    projections.json                              both tables, the settings and the checkpoints
    trajectories.html                             plotly figures (role trajectories along the axis, PCs)

Only the responses the vectors need are extracted (the ``default`` role and responses with score
``>= min_score``). Rerunning resumes per checkpoint and per response; a checkpoint whose responses
are all stored is not even loaded. A checkpoint that is the run's own model (same id or directory,
revision and dtype) takes the run's activations instead of extracting them again (``--no-reuse`` to
extract anyway).
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import logging
import math
import os
import re
import subprocess
import tarfile
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch
from torch import Tensor

from pipeline.extract import ActivationStore, SpanItem, extract_pending
from pipeline.judge import read_scores
from pipeline.manifest import RunMismatchError, record_step
from pipeline.progress import JobProgress, ProgressCallback, print_progress
from pipeline.role_schema import DEFAULT_ROLE_NAME
from pipeline.store import RunPaths, atomic_write_json, atomic_write_text, read_responses, write_parquet_atomic
from pipeline.vectors import compute_vectors
from steering.axis_io import LAYER_CONVENTION, AxisBundle, load_axis
from steering.axis_math import compute_axis, cosine_per_layer, pca, project, unit
from steering.atomic_io import build_directory_once
from steering.layers import parse_layer_spec
from steering.models import LoadedModel, ModelLoadError, ModelSpec, cache_root, load_model

log = logging.getLogger(__name__)

PROJECTIONS_STEM = "projections"
SUMMARY_STEM = "summary"
FIGURE_FILE = "trajectories.html"


# ---------------------------------------------------------------- layers

def select_layers(spec: str | Sequence[int] | None, n_layers: int) -> list[int]:
    """Layers to project at: :func:`steering.layers.parse_layer_spec`, defaulting to the middle layer."""
    return parse_layer_spec(spec, n_layers, default="middle")


# ---------------------------------------------------------------- checkpoint specs

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, max_len: int = 80) -> str:
    """A folder name for ``name``: safe characters only; a short hash is added when anything was changed."""
    cleaned = _UNSAFE.sub("_", name).strip("._") or "checkpoint"
    if cleaned == name and len(name) <= max_len:
        return name
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
    return f"{cleaned[: max_len - 9]}-{digest}"


@dataclass(frozen=True)
class CheckpointSpec:
    """One checkpoint as given on the command line, parsed (nothing resolved yet)."""

    text: str
    model_id: str
    revision: str | None = None
    name: str = ""

    @property
    def safe_name(self) -> str:
        return safe_name(self.name)


def parse_checkpoint(text: str, name: str | None = None) -> CheckpointSpec:
    """Parse ``[name=]model[@revision]``; a string that is an existing path is a path even with ``@`` or ``=``."""
    text = text.strip()
    body = text
    if name is None and "=" in text and not Path(text).exists():
        label, rest = text.split("=", 1)
        if label and rest and "/" not in label:
            name, body = label, rest
    if Path(body).exists() or "@" not in body:
        model_id, revision = body, None
    else:
        model_id, revision = body.rsplit("@", 1)
        if not model_id or not revision:
            raise ValueError(f"checkpoint {text!r}: expected model@revision")
    if not name:
        base = Path(model_id).name if Path(model_id).exists() else model_id
        name = f"{base}@{revision}" if revision else base
    return CheckpointSpec(text=text, model_id=model_id, revision=revision, name=name)


def parse_checkpoints(texts: Sequence[str], names: Sequence[str] | None = None) -> list[CheckpointSpec]:
    """Parse a list; display names are made unique (a short hash of the spec is added on a clash)."""
    if names is not None and len(names) != len(texts):
        raise ValueError(f"{len(names)} names for {len(texts)} checkpoints")
    specs = [parse_checkpoint(t, names[i] if names else None) for i, t in enumerate(texts)]
    if not specs:
        raise ValueError("no checkpoints given")
    seen: dict[str, int] = {}
    for spec in specs:
        seen[spec.name] = seen.get(spec.name, 0) + 1
    out = []
    for spec in specs:
        if seen[spec.name] > 1:
            spec = CheckpointSpec(spec.text, spec.model_id, spec.revision,
                                  f"{spec.name}#{hashlib.sha1(spec.text.encode()).hexdigest()[:6]}")
        out.append(spec)
    if len({s.safe_name for s in out}) != len(out):
        raise ValueError(f"checkpoints {[s.text for s in specs]} are not distinct")
    return out


def _git(repo: Path, *args: str):
    try:
        result = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=False, text=True)
    except FileNotFoundError as exc:
        raise ModelLoadError("git is not installed; it is needed to read a revision of a local repository") from exc
    return result


def is_git_repo(path: Path) -> bool:
    return path.is_dir() and _git(path, "rev-parse", "--git-dir").returncode == 0


@dataclass
class ResolvedCheckpoint:
    """Where a checkpoint's weights come from. ``prepare()`` exports a git revision when needed."""

    spec: CheckpointSpec
    kind: str  # "path", "hub", "git"
    source: str  # directory or hub id to load
    revision: str | None  # hub revision, git commit sha, or the revision path as given
    git_repo: str | None = None
    git_tree: str | None = None
    export_dir: str | None = None

    def describe(self) -> dict:
        return {"name": self.spec.name, "text": self.spec.text, "model_id": self.spec.model_id,
                "kind": self.kind, "source": self.source, "revision": self.revision,
                "git_repo": self.git_repo}

    def model_spec(self, dtype: str = "float32", device: str = "cpu") -> ModelSpec:
        if self.kind == "hub":
            return ModelSpec(model_id=self.source, revision=self.revision, dtype=dtype, device=device)
        return ModelSpec(model_id=self.source, dtype=dtype, device=device)

    def prepare(self) -> None:
        if self.kind == "git":
            export_git_revision(Path(self.git_repo), self.git_tree, Path(self.source))


def resolve_checkpoint(spec: CheckpointSpec, export_root: str | os.PathLike | None = None) -> ResolvedCheckpoint:
    """Decide how to load ``spec`` (no download, no export yet)."""
    base = Path(spec.model_id).expanduser()
    if spec.revision is None:
        kind = "path" if base.exists() else "hub"
        return ResolvedCheckpoint(spec, kind, str(base) if base.exists() else spec.model_id, None)
    if not base.exists():
        return ResolvedCheckpoint(spec, "hub", spec.model_id, spec.revision)
    # a local directory with a revision: a subfolder, else a git revision, else a separate path
    if (base / spec.revision).is_dir():
        return ResolvedCheckpoint(spec, "path", str(base / spec.revision), spec.revision)
    git = is_git_repo(base)
    found = _git(base, "rev-parse", "--verify", "--quiet", f"{spec.revision}^{{commit}}") if git else None
    if found is None or found.returncode != 0:
        if Path(spec.revision).expanduser().is_dir():
            return ResolvedCheckpoint(spec, "path", str(Path(spec.revision).expanduser()), spec.revision)
        if not git:
            raise ModelLoadError(
                f"checkpoint {spec.text!r}: {spec.revision!r} is neither a directory (on its own or inside {base}) "
                f"nor a git revision ({base} is not a git repository)"
            )
        raise ModelLoadError(f"checkpoint {spec.text!r}: {base} has no git revision {spec.revision!r}")
    sha = found.stdout.strip()
    prefix = _git(base, "rev-parse", "--show-prefix").stdout.strip()
    root = Path(export_root) if export_root else cache_root() / "git-exports"
    target = root / f"{safe_name(base.resolve().name, 40)}-{sha[:12]}" / (prefix.rstrip("/") or ".")
    return ResolvedCheckpoint(spec, "git", str(target), sha, git_repo=str(base.resolve()),
                              git_tree=f"{sha}:{prefix}" if prefix else sha)


def export_git_revision(repo: Path, tree: str, target: Path) -> Path:
    """Write the files of ``tree`` (``sha`` or ``sha:subdir``) of ``repo`` to ``target`` once (atomic rename).

    Uses ``git archive``, so LFS files are smudged when git-lfs is installed; files left as LFS
    pointers raise :class:`ModelLoadError`.
    """

    def build(staging: Path) -> None:
        # streamed: model weights never sit in memory as one archive
        with tempfile.TemporaryFile() as errors:
            process = subprocess.Popen(["git", "-C", str(repo), "archive", "--format=tar", tree],
                                       stdout=subprocess.PIPE, stderr=errors)
            tar_error = None
            try:
                with tarfile.open(fileobj=process.stdout, mode="r|") as archive:
                    archive.extractall(staging, filter="data")
            except tarfile.TarError as exc:
                tar_error = exc
            finally:
                process.stdout.close()
                code = process.wait()
            if code != 0:
                errors.seek(0)
                raise ModelLoadError(f"git archive {tree} in {repo} failed: "
                                     f"{errors.read().decode(errors='replace').strip()}")
            if tar_error is not None:
                raise ModelLoadError(f"git archive {tree} in {repo}: unreadable archive ({tar_error})")
        for file in staging.rglob("*"):
            if file.is_file() and file.stat().st_size < 1024 and file.suffix in {".safetensors", ".bin", ".pt"}:
                if file.read_bytes().startswith(b"version https://git-lfs"):
                    raise ModelLoadError(
                        f"{file.name} at {tree} of {repo} is a git-lfs pointer: install git-lfs and run "
                        "'git lfs fetch --all' in the repository"
                    )

    return build_directory_once(target, build, marker=".export-complete", note=f"{repo} {tree}\n")


# ---------------------------------------------------------------- config and report

@dataclass(frozen=True)
class CheckpointsConfig:
    run_dir: Path
    checkpoints: tuple[str, ...]
    names: tuple[str, ...] | None = None
    axis_path: Path | None = None  # None = <run>/axis.safetensors
    layers: str | tuple[int, ...] | None = None  # None = middle layer of the axis
    min_score: int = 3
    min_count: int = 1
    n_pcs: int = 3
    final: str | None = None  # name of the checkpoint whose PCs and vectors are the reference (default: last)
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 8
    max_batch_tokens: int = 16384
    out_dir: Path | None = None  # None = <run>/checkpoints
    export_dir: Path | None = None  # git revision exports (None = <cache>/git-exports)
    write_figures: bool = True
    reuse_run_activations: bool = True  # a checkpoint that is the run's own model takes the run's activations

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        object.__setattr__(self, "checkpoints", tuple(self.checkpoints))
        if self.names is not None:
            object.__setattr__(self, "names", tuple(self.names))
        for key in ("axis_path", "out_dir", "export_dir"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, Path(getattr(self, key)))
        if not self.checkpoints:
            raise ValueError("give at least one checkpoint")
        if not 0 <= self.min_score <= 3:
            raise ValueError(f"min_score must be within 0..3, got {self.min_score}")
        if self.min_count < 1 or self.n_pcs < 1 or self.batch_size < 1:
            raise ValueError("min_count, n_pcs and batch_size must be >= 1")

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def output_dir(self) -> Path:
        return self.out_dir or self.checkpoints_dir


@dataclass
class CheckpointExtraction:
    name: str
    folder: Path
    total: int
    already_done: int
    extracted: int = 0
    reused: int = 0  # copied from the run's own activations (the checkpoint is the run's model)
    empty: list[str] = field(default_factory=list)
    loaded: bool = False
    stopped: bool = False

    @property
    def remaining(self) -> int:
        return self.total - self.already_done - self.extracted - self.reused


@dataclass
class CheckpointsReport:
    checkpoints: list[CheckpointExtraction]
    layers: list[int]
    final: str
    table: pd.DataFrame | None = None
    summary: pd.DataFrame | None = None
    files: dict[str, Path] = field(default_factory=dict)
    stopped: bool = False
    skipped_roles: dict[str, dict[str, str]] = field(default_factory=dict)  # checkpoint -> role -> reason

    @property
    def extracted(self) -> int:
        return sum(c.extracted for c in self.checkpoints)


# ---------------------------------------------------------------- extraction per checkpoint

def needed_responses(responses: pd.DataFrame, scores: dict[str, int], min_score: int) -> pd.DataFrame:
    """Responses the vectors use: every ``default`` response and every response with score >= min_score."""
    keep = [role == DEFAULT_ROLE_NAME or scores.get(rid, -1) >= min_score
            for rid, role in zip(responses["rollout_id"], responses["role"])]
    return responses[keep].reset_index(drop=True)


def _check_stored_meta(store: ActivationStore, expected: dict, layers: list[int]) -> list[int] | None:
    """Layers to extract with, from stored meta (None when nothing is stored yet)."""
    meta = store.meta()
    if meta is None:
        return None
    diffs = [f"{k}: stored {meta.get(k)!r}, now {expected[k]!r}" for k in ("model_id", "revision", "aggregation")
             if meta.get(k) != expected[k]]
    missing = sorted(set(layers) - set(meta.get("layers", [])))
    if missing:
        diffs.append(f"layers {missing} were not extracted (stored layers {meta.get('layers')})")
    if diffs:
        raise RunMismatchError(
            f"activations in {store.dir} were extracted with other settings ({'; '.join(diffs)}); "
            "use the same settings, or remove that folder to extract again"
        )
    return list(meta["layers"])


def run_store_of_same_model(resolved: ResolvedCheckpoint, run_dir: Path, dtype: str) -> ActivationStore | None:
    """The run's own activation store when ``resolved`` is the model (and revision, dtype) the run was
    extracted with, by mean over response tokens; else None."""
    store = ActivationStore(run_dir)
    meta = store.meta()
    if not meta or meta.get("aggregation") != "mean" or meta.get("dtype") != dtype:
        return None
    if resolved.kind == "hub":
        same = resolved.source == meta.get("model_id") and resolved.revision == meta.get("revision")
    elif resolved.kind == "path":
        run_model = Path(str(meta.get("model_id"))).expanduser()
        same = meta.get("revision") is None and run_model.is_dir() and \
            run_model.resolve() == Path(resolved.source).resolve()
    else:  # a git revision is exported to a folder of its own; the run never used that folder
        same = False
    return store if same else None


def reuse_run_activations(run_store: ActivationStore, store: ActivationStore, pending: pd.DataFrame,
                          layers: list[int], chunk: int = 256) -> tuple[int, list[str]]:
    """Copy the run's activations of the ``pending`` responses, at ``layers``, into ``store``.

    Responses the run has not extracted are left pending. Returns (responses copied, empty ones among them).
    """
    run_layers = run_store.meta()["layers"]
    index = [run_layers.index(layer) for layer in layers]
    entries = run_store.entries()
    available = [rid for rid in pending["rollout_id"] if rid in entries]
    empty = [rid for rid in available if not entries[rid]["file"]]
    if empty:
        store.save_empty(empty, {rid: entries[rid]["role"] for rid in empty})
    with_tensors = [rid for rid in available if entries[rid]["file"]]
    for start in range(0, len(with_tensors), chunk):
        keys = with_tensors[start:start + chunk]
        tensors = run_store.load(keys)
        items = [SpanItem(rid, entries[rid]["role"], [], 0, int(entries[rid]["n_tokens"])) for rid in keys]
        store.save_batch(items, [tensors[rid][index] for rid in keys])
    return len(available), empty


def extract_checkpoint(resolved: ResolvedCheckpoint, folder: Path, needed: pd.DataFrame, layers: list[int],
                       config: CheckpointsConfig, axis: AxisBundle, tracker: JobProgress,
                       stop_event: threading.Event | None = None,
                       loader: Callable[[ModelSpec], LoadedModel] = load_model) -> CheckpointExtraction:
    """Extract the pending responses of one checkpoint into ``<folder>/activations`` (resumable)."""
    store = ActivationStore(folder)
    done = store.entries()
    pending = needed[~needed["rollout_id"].isin(done)]
    result = CheckpointExtraction(resolved.spec.name, folder, total=len(needed),
                                  already_done=len(needed) - len(pending))
    expected = {"model_id": resolved.spec.model_id, "revision": resolved.revision, "aggregation": "mean"}
    stored_layers = _check_stored_meta(store, expected, layers)
    extract_layers = stored_layers or layers
    description = {**resolved.describe(), "layers": extract_layers}

    def store_meta(n_layers: int, d_model: int, **extra) -> dict:
        return {**expected, "layers": extract_layers, "n_layers": n_layers, "d_model": d_model, "dtype": config.dtype,
                "source": resolved.source, "checkpoint": resolved.spec.text, "layer_convention": LAYER_CONVENTION,
                **extra}

    run_store = run_store_of_same_model(resolved, config.run_dir, config.dtype) \
        if config.reuse_run_activations and not pending.empty else None
    run_meta = run_store.meta() if run_store is not None else None
    if run_meta is not None and set(extract_layers) <= set(run_meta["layers"]):
        # The checkpoint is the run's own model: its activations are already in the run.
        axis.check_compatible(run_meta["n_layers"], run_meta["d_model"], resolved.spec.name)
        store.check_or_write_meta(store_meta(run_meta["n_layers"], run_meta["d_model"], reused_from=str(run_store.dir)))
        result.reused, result.empty = reuse_run_activations(run_store, store, pending, extract_layers)
        tracker.advance(f"{resolved.spec.name}: the run's own activations", n=result.reused)
        pending = pending[~pending["rollout_id"].isin(store.entries())]
    if pending.empty:
        atomic_write_json(folder / "checkpoint.json", description)
    else:
        if stop_event is not None and stop_event.is_set():
            result.stopped = True
            return result
        resolved.prepare()
        model = loader(resolved.model_spec(config.dtype, config.device))
        result.loaded = True
        try:
            axis.check_compatible(model.n_layers, model.d_model, resolved.spec.name)
            atomic_write_json(folder / "checkpoint.json", description)
            store.check_or_write_meta(store_meta(model.n_layers, model.d_model))
            name = resolved.spec.name
            done_now = extract_pending(model, store, pending, extract_layers, "mean", config.batch_size,
                                       config.max_batch_tokens, lambda label, n: tracker.advance(f"{name}: {label}", n=n),
                                       stop_event)
            result.extracted, result.stopped = done_now.extracted, done_now.stopped
            result.empty = result.empty + done_now.empty
        finally:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if result.remaining == 0:
        parts = store.dir / "parts"
        if parts.exists():
            for role_dir in sorted(p for p in parts.iterdir() if p.is_dir()):
                store.consolidate(role_dir.name)
    return result


def checkpoint_vectors(folder: Path, responses: pd.DataFrame, scores: dict[str, int], layers: list[int],
                       min_score: int, min_count: int) -> tuple[Tensor, dict[str, Tensor], dict[str, int], dict[str, str]]:
    """(default ``[n_layers_sel, D]``, roles, responses used per role and for ``default``, skipped roles)."""
    store = ActivationStore(folder)
    meta = store.meta()
    if meta is None:
        raise FileNotFoundError(f"no activations in {store.dir}")
    index = [meta["layers"].index(l) for l in layers]
    needed = needed_responses(responses, scores, min_score)
    activations = {k: v[..., index, :] for k, v in store.load(rollout_ids=set(needed["rollout_id"])).items()}
    default, roles, report = compute_vectors(responses, scores, activations, min_score, min_count)
    return default, roles, {**report.counts, DEFAULT_ROLE_NAME: report.n_default}, report.skipped


# ---------------------------------------------------------------- tables

def projection_tables(names: Sequence[str], vectors: Sequence[tuple[Tensor, dict[str, Tensor]]], axis: Tensor,
                      layers: Sequence[int], final: int = -1, n_pcs: int = 3,
                      counts: Sequence[dict[str, int]] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The long table (checkpoint x layer x vector) and the summary (checkpoint x layer).

    Args:
        names: checkpoint names in order; vectors: per checkpoint ``(default [Ls, D], {role: [Ls, D]})``
        axis: the fixed axis ``[L, D]`` (rows indexed by absolute layer); layers: the ``Ls`` layers.
        final: index of the reference checkpoint (persona PCs, distance to final).
    """
    final = final % len(names)
    final_default, final_roles = vectors[final]
    role_names = sorted(set().union(*[set(r) for _, r in vectors]))
    final_names = sorted(final_roles)
    rows, summary = [], []
    for li, layer in enumerate(layers):
        direction = axis[layer].to(torch.float32)
        pcs = None
        if len(final_names) >= 2:
            pcs = pca(torch.stack([final_roles[n][li] for n in final_names]), direction,
                      n_components=min(n_pcs, len(final_names) - 1))
        for ci, (name, (default, roles)) in enumerate(zip(names, vectors)):
            previous = vectors[ci - 1] if ci > 0 else None
            entries = [("default", DEFAULT_ROLE_NAME, default)] + [("role", r, roles.get(r)) for r in role_names]
            for kind, rname, vec in entries:
                row = {"checkpoint": name, "checkpoint_index": ci, "layer": int(layer), "kind": kind, "name": rname}
                if vec is None:
                    rows.append(row)
                    continue
                v = vec[li].to(torch.float32)
                row["axis_projection"] = float(project(v, direction))
                if pcs is not None:
                    coords = (v - pcs.mean) @ pcs.components.T
                    for k in range(pcs.components.shape[0]):
                        row[f"pc{k + 1}"] = float(coords[k])
                ref = final_default if kind == "default" else final_roles.get(rname)
                if ref is not None:
                    row["dist_to_final"] = float((v - ref[li]).norm())
                    row["cos_to_final"] = float(cosine_per_layer(v, ref[li].to(torch.float32)))
                prev = None if previous is None else (previous[0] if kind == "default" else previous[1].get(rname))
                if prev is not None:
                    row["dist_to_previous"] = float((v - prev[li]).norm())
                if counts is not None:
                    row["n_responses"] = counts[ci].get(rname)
                rows.append(row)
            srow = {"checkpoint": name, "checkpoint_index": ci, "layer": int(layer), "n_roles": len(roles),
                    "default_projection": float(project(default[li], direction))}
            if roles:
                matrix = torch.stack([roles[n][li] for n in sorted(roles)]).to(torch.float32)
                own_axis = compute_axis(default[li].unsqueeze(0), matrix.unsqueeze(1))[0]
                srow["mean_role_projection"] = float(project(matrix, direction).mean())
                srow["own_axis_norm"] = float(own_axis.norm())
                srow["own_axis_cosine"] = float(cosine_per_layer(own_axis, direction))
                if len(roles) >= 2:
                    own = pca(matrix, own_axis, n_components=2)
                    srow["pc1_axis_cosine"] = abs(float(own.components[0] @ unit(direction)))
                    srow["pc1_own_axis_cosine"] = own.pc1_axis_cosine
                    srow["pc1_variance_explained"] = float(own.explained_variance_ratio[0])
            summary.append(srow)
    table = pd.DataFrame(rows)
    pc_columns = sorted((c for c in table.columns if re.fullmatch(r"pc\d+", c)), key=lambda c: int(c[2:]))
    columns = ["checkpoint", "checkpoint_index", "layer", "kind", "name", "axis_projection", *pc_columns,
               "dist_to_final", "dist_to_previous", "cos_to_final", "n_responses"]
    summary_columns = ["checkpoint", "checkpoint_index", "layer", "n_roles", "default_projection",
                       "mean_role_projection", "own_axis_norm", "own_axis_cosine", "pc1_axis_cosine",
                       "pc1_own_axis_cosine", "pc1_variance_explained"]
    return table.reindex(columns=columns), pd.DataFrame(summary).reindex(columns=summary_columns)


# ---------------------------------------------------------------- the step

def run_project_checkpoints(config: CheckpointsConfig, progress: ProgressCallback | None = None,
                            stop_event: threading.Event | None = None,
                            loader: Callable[[ModelSpec], LoadedModel] = load_model) -> CheckpointsReport:
    """Extract (resumable) and project every checkpoint; writes the tables and figures."""
    responses = read_responses(config.run_dir)
    if responses.empty:
        raise FileNotFoundError(f"no responses in {RunPaths(config.run_dir).responses_dir}: run 'generate' first")
    scores = read_scores(config.run_dir)
    if not scores:
        log.warning("no judge scores in %s: only the default vector can be computed", RunPaths(config.run_dir).scores)
    axis_path = config.axis_path or RunPaths(config.run_dir).axis
    if not axis_path.exists():
        raise FileNotFoundError(f"{axis_path} does not exist: run the 'axis' step or pass --axis FILE")
    bundle = load_axis(axis_path)
    layers = select_layers(config.layers, bundle.n_layers)
    specs = parse_checkpoints(config.checkpoints, config.names)
    final_index = len(specs) - 1
    if config.final is not None:
        matches = [i for i, s in enumerate(specs) if config.final in (s.name, s.text)]
        if not matches:
            raise ValueError(f"--final {config.final!r} is none of the checkpoints {[s.name for s in specs]}")
        final_index = matches[0]
    resolved = [resolve_checkpoint(s, config.export_dir) for s in specs]
    needed = needed_responses(responses, scores, config.min_score)
    record_step(config.run_dir, "project-checkpoints", config, finished=False)

    pending_total = 0
    for r in resolved:
        done = ActivationStore(config.checkpoints_dir / r.spec.safe_name).entries()
        pending_total += int((~needed["rollout_id"].isin(done)).sum())
    tracker = JobProgress(total=pending_total, label="project-checkpoints", callback=progress)
    report = CheckpointsReport(checkpoints=[], layers=layers, final=specs[final_index].name)
    for r in resolved:
        folder = config.checkpoints_dir / r.spec.safe_name
        result = extract_checkpoint(r, folder, needed, layers, config, bundle, tracker, stop_event, loader)
        report.checkpoints.append(result)
        log.info("checkpoint %s: %d extracted, %d stored before", r.spec.name, result.extracted, result.already_done)
        if result.stopped:
            report.stopped = True
            break
    if report.stopped or any(c.remaining for c in report.checkpoints):
        record_step(config.run_dir, "project-checkpoints", config, finished=False,
                    extra={"stopped": True})
        return report

    vectors, counts = [], []
    for result in report.checkpoints:
        default, roles, count, skipped = checkpoint_vectors(result.folder, responses, scores, layers,
                                                            config.min_score, config.min_count)
        vectors.append((default, roles))
        counts.append(count)
        if skipped:
            report.skipped_roles[result.name] = skipped
    names = [s.name for s in specs]
    table, summary = projection_tables(names, vectors, bundle.axis, layers, final_index, config.n_pcs, counts)
    report.table, report.summary = table, summary
    report.files = write_outputs(config, report, resolved, axis_path)
    record_step(config.run_dir, "project-checkpoints", config, finished=True,
                extra={"checkpoints": names, "layers": layers})
    return report


def write_outputs(config: CheckpointsConfig, report: CheckpointsReport, resolved: Sequence[ResolvedCheckpoint],
                  axis_path: Path) -> dict[str, Path]:
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for stem, frame in ((PROJECTIONS_STEM, report.table), (SUMMARY_STEM, report.summary)):
        atomic_write_text(out / f"{stem}.csv", frame.to_csv(index=False))
        write_parquet_atomic(out / f"{stem}.parquet", frame)
        files[f"{stem}_csv"] = out / f"{stem}.csv"
        files[f"{stem}_parquet"] = out / f"{stem}.parquet"
    payload = {
        "settings": {"run_dir": str(config.run_dir), "axis": str(axis_path), "layers": report.layers,
                     "min_score": config.min_score, "min_count": config.min_count, "n_pcs": config.n_pcs,
                     "final": report.final},
        "checkpoints": [{**r.describe(), "folder": str(c.folder), "responses": c.total, "empty": len(c.empty)}
                        for r, c in zip(resolved, report.checkpoints)],
        "skipped_roles": report.skipped_roles,
        "projections": _records(report.table),
        "summary": _records(report.summary),
    }
    atomic_write_json(out / f"{PROJECTIONS_STEM}.json", payload)
    files["json"] = out / f"{PROJECTIONS_STEM}.json"
    if config.write_figures:
        figures = []
        for layer in report.layers:
            figures.append(trajectory_figure(report.table, layer=layer))
            if "pc1" in report.table.columns:
                figures.append(pc_trajectory_figure(report.table, layer=layer))
            figures.append(summary_figure(report.summary, layer=layer))
        atomic_write_text(out / FIGURE_FILE, figures_html(figures, "Checkpoint trajectories on a fixed Assistant Axis"))
        files["html"] = out / FIGURE_FILE
    return files


def _records(frame: pd.DataFrame) -> list[dict]:
    out = []
    for rec in frame.to_dict("records"):
        out.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()})
    return out


def load_checkpoint_results(out_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(projections table, summary) written by the step, e.g. ``<run>/checkpoints``."""
    out = Path(out_dir)
    if (out / "checkpoints" / f"{PROJECTIONS_STEM}.parquet").exists():
        out = out / "checkpoints"  # a run directory was given
    paths = [out / f"{stem}.parquet" for stem in (PROJECTIONS_STEM, SUMMARY_STEM)]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run 'project-checkpoints' first")
    return pd.read_parquet(paths[0]), pd.read_parquet(paths[1])


# ---------------------------------------------------------------- figures

def _pick_layer(frame: pd.DataFrame, layer: int | None) -> tuple[pd.DataFrame, int]:
    layers = sorted(frame["layer"].unique())
    if not layers:
        raise ValueError("empty table")
    layer = layers[0] if layer is None else int(layer)
    if layer not in layers:
        raise ValueError(f"layer {layer} is not in the table (layers {layers})")
    return frame[frame["layer"] == layer], layer


def _checkpoint_order(frame: pd.DataFrame) -> list[str]:
    return list(frame.sort_values("checkpoint_index").drop_duplicates("checkpoint")["checkpoint"])


def trajectory_figure(table: pd.DataFrame, layer: int | None = None, value: str = "axis_projection",
                      roles: Sequence[str] | None = None):
    """Each role's ``value`` (default: projection on the fixed axis) across checkpoints; the default vector bold."""
    import plotly.graph_objects as go

    frame, layer = _pick_layer(table, layer)
    order = _checkpoint_order(frame)
    fig = go.Figure()
    role_frame = frame[frame["kind"] == "role"]
    if roles is not None:
        role_frame = role_frame[role_frame["name"].isin(list(roles))]
    for name, group in role_frame.groupby("name", sort=True):
        group = group.sort_values("checkpoint_index")
        fig.add_trace(go.Scatter(x=group["checkpoint"], y=group[value], mode="lines+markers", name=str(name),
                                 line={"width": 1}, opacity=0.75,
                                 hovertemplate=f"{name}<br>%{{x}}<br>{value}=%{{y:.3f}}<extra></extra>"))
    default = frame[frame["kind"] == "default"].sort_values("checkpoint_index")
    if not default.empty and value in default:
        fig.add_trace(go.Scatter(x=default["checkpoint"], y=default[value], mode="lines+markers", name="default (Assistant)",
                                 line={"width": 4, "color": "black", "dash": "dash"}))
    fig.update_layout(title=f"Role trajectories across checkpoints, layer {layer} ({value})",
                      xaxis={"title": "checkpoint", "categoryorder": "array", "categoryarray": order},
                      yaxis={"title": value.replace("_", " ")}, template="plotly_white", legend={"itemsizing": "constant"})
    return fig


def pc_trajectory_figure(table: pd.DataFrame, layer: int | None = None, x: str = "pc1", y: str = "pc2"):
    """Role paths in the final checkpoint's persona-PC plane; the final position is the larger marker."""
    import plotly.graph_objects as go

    frame, layer = _pick_layer(table, layer)
    if x not in frame or y not in frame:
        raise ValueError(f"the table has no {x}/{y} columns (PCA needs >= 2 roles in the final checkpoint)")
    fig = go.Figure()
    last = frame["checkpoint_index"].max()
    for (kind, name), group in frame.groupby(["kind", "name"], sort=True):
        group = group.sort_values("checkpoint_index")
        is_default = kind == "default"
        sizes = [12 if i == last else 6 for i in group["checkpoint_index"]]
        fig.add_trace(go.Scatter(x=group[x], y=group[y], mode="lines+markers", name=str(name),
                                 text=group["checkpoint"], marker={"size": sizes},
                                 line={"width": 4 if is_default else 1, "color": "black" if is_default else None},
                                 hovertemplate=f"{name}<br>%{{text}}<br>{x}=%{{x:.3f}} {y}=%{{y:.3f}}<extra></extra>"))
    fig.update_layout(title=f"Persona space of the final checkpoint, layer {layer}", xaxis_title=x.upper(),
                      yaxis_title=y.upper(), template="plotly_white")
    return fig


def summary_figure(summary: pd.DataFrame, layer: int | None = None):
    """Per checkpoint: own-axis vs fixed-axis cosine, own PC1 vs fixed-axis cosine (left), projections (right)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    frame, layer = _pick_layer(summary, layer)
    frame = frame.sort_values("checkpoint_index")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("cosines with the fixed axis", "projections on the fixed axis"))
    for column, label in (("own_axis_cosine", "own axis"), ("pc1_axis_cosine", "own PC1"),
                          ("pc1_own_axis_cosine", "own PC1 vs own axis")):
        if column in frame:
            fig.add_trace(go.Scatter(x=frame["checkpoint"], y=frame[column], mode="lines+markers", name=label), 1, 1)
    for column, label in (("default_projection", "default"), ("mean_role_projection", "mean of roles")):
        if column in frame:
            fig.add_trace(go.Scatter(x=frame["checkpoint"], y=frame[column], mode="lines+markers", name=label), 1, 2)
    fig.update_layout(title=f"Checkpoint summary, layer {layer}", template="plotly_white")
    return fig


def figures_html(figures: Sequence, title: str) -> str:
    """One self-contained HTML page (plotly.js inlined once) holding ``figures``."""
    parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figures)]
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
            f"<h2>{title}</h2>" + "\n".join(parts) + "</body></html>\n")


# ---------------------------------------------------------------- CLI

def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "project-checkpoints",
        help="replay a run's judged transcripts through training checkpoints and project onto a fixed axis",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="the run (responses + scores) to replay")
    parser.add_argument("--checkpoints", nargs="+", required=True,
                        help="checkpoints in training order: dir, hub id, id@revision, dir@subdir, name=spec")
    parser.add_argument("--names", nargs="+", default=None, help="display names, one per checkpoint")
    parser.add_argument("--axis", type=Path, default=None, help="fixed axis file (default: <run>/axis.safetensors)")
    parser.add_argument("--layers", default=None, help="'middle' (default), 'all', '3,5,7' or a slice '10:20'")
    parser.add_argument("--final", default=None, help="reference checkpoint for PCs and distances (default: last)")
    parser.add_argument("--min-score", type=int, default=3, help="keep responses with judge score >= this (0-3)")
    parser.add_argument("--min-count", type=int, default=1, help="roles with fewer kept responses get no vector")
    parser.add_argument("--n-pcs", type=int, default=3, help="persona PCs of the final checkpoint to project on")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--batch-size", type=int, default=8, help="responses per forward pass")
    parser.add_argument("--max-batch-tokens", type=int, default=16384, help="cap on batch size x padded length")
    parser.add_argument("--out-dir", type=Path, default=None, help="tables and figures (default: <run>/checkpoints)")
    parser.add_argument("--export-dir", type=Path, default=None,
                        help="where git revisions of local repositories are exported (default: the lab cache)")
    parser.add_argument("--no-figures", action="store_true", help="skip the HTML figures")
    parser.add_argument("--no-reuse", action="store_true",
                        help="extract a checkpoint that is the run's own model again instead of reusing the run's "
                             "activations")
    parser.set_defaults(func=run_cli)


def config_from_args(args: argparse.Namespace) -> CheckpointsConfig:
    return CheckpointsConfig(run_dir=args.run_dir, checkpoints=tuple(args.checkpoints),
                             names=tuple(args.names) if args.names else None, axis_path=args.axis,
                             layers=args.layers, min_score=args.min_score, min_count=args.min_count,
                             n_pcs=args.n_pcs, final=args.final, dtype=args.dtype, device=args.device,
                             batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                             out_dir=args.out_dir, export_dir=args.export_dir, write_figures=not args.no_figures,
                             reuse_run_activations=not args.no_reuse)


def run_cli(args: argparse.Namespace) -> int:
    report = run_project_checkpoints(config_from_args(args), progress=print_progress)
    for c in report.checkpoints:
        print(f"  {c.name}: {c.extracted} extracted, {c.already_done} stored before"
              + (f", {c.reused} taken from the run's own activations" if c.reused else "")
              + (f", {len(c.empty)} empty" if c.empty else ""))
    if report.stopped or report.table is None:
        print("project-checkpoints: stopped; rerun the same command to resume")
        return 1
    for name, skipped in report.skipped_roles.items():
        for role, reason in sorted(skipped.items()):
            print(f"  {name}: skipped {role}: {reason}")
    print(f"project-checkpoints: {len(report.checkpoints)} checkpoints at layers {report.layers} "
          f"(final: {report.final}) -> {report.files['projections_csv'].parent}")
    return 0
