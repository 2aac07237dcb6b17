"""Persona dynamics for the app, without any UI: checkpoint projections and conversation drift as jobs and views.

The method lives in :mod:`pipeline.checkpoints` and :mod:`pipeline.drift`; this module only turns
widget values into their inputs (text -> checkpoint list, upload or pasted JSON -> messages,
run directory / file / the chat's axis -> an axis), runs the heavy parts as :class:`app.jobs.Job`
functions on the app's shared model, and shapes their outputs for display (tables, figures).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from app.jobs import Job
from app.model_store import ModelStore
from pipeline.progress import StopRequested

CHECKPOINTS_JOB = "project-checkpoints"
CAPPING_JOB = "drift capping comparison"
JOB_NAMES = (CHECKPOINTS_JOB, CAPPING_JOB)
SIDES = ("steered", "baseline")


# --------------------------------------------------------------------------- small parsers


def checkpoint_lines(text: str | None) -> tuple[str, ...]:
    """One checkpoint per line (as on the CLI: dir, hub id, ``id@rev``, ``name=spec``); blank and ``#`` lines skipped."""
    lines = [line.strip() for line in (text or "").splitlines()]
    return tuple(line for line in lines if line and not line.startswith("#"))


def optional_path(value: Any) -> Path | None:
    text = str(value or "").strip()
    return Path(text).expanduser() if text else None


def parse_cap(text: Any) -> str | float:
    """The capping floor as :func:`pipeline.drift.resolve_thresholds` takes it: ``"p0.25"`` or a number."""
    value = str(text if text is not None else "").strip()
    if not value:
        raise ValueError("give a cap threshold: 'p0.25' (a percentile stored with the axis) or a number")
    if value.lower().startswith("p"):
        try:
            float(value[1:])
        except ValueError:
            raise ValueError(f"cap threshold {value!r}: write e.g. 'p0.25' or a number") from None
        return value
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"cap threshold {value!r}: write e.g. 'p0.25' or a number") from None


def _json_text(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the {what} is not valid JSON ({exc})") from None


def read_transcript(upload: str | os.PathLike | None, text: str | None, side: str = "steered") -> list[dict]:
    """Messages of an uploaded transcript file or of pasted JSON (:func:`pipeline.drift.load_transcript` formats)."""
    from pipeline.drift import load_transcript

    if upload:
        return load_transcript(Path(upload), side)
    if text and text.strip():
        return load_transcript(_json_text(text, "transcript"), side)
    raise ValueError("upload a transcript or paste one (JSON) first")


def read_script(upload: str | os.PathLike | None, text: str | None) -> tuple[str | None, list[str]]:
    """(system prompt, user turns) of an uploaded script, pasted JSON, or plain text with one user turn per line."""
    from pipeline.drift import load_script

    if upload:
        return load_script(Path(upload))
    text = (text or "").strip()
    if not text:
        raise ValueError("upload a script or write the user turns (a JSON list, or one turn per line)")
    if text[0] in "[{":
        return load_script(_json_text(text, "script"))
    return load_script([line.strip() for line in text.splitlines() if line.strip()])


def latest_chat_export(folder: str | os.PathLike) -> Path | None:
    """The newest chat transcript exported by the chat tab (``*.json`` in ``folder``), if any."""
    folder = Path(folder)
    files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return files[-1] if files else None


# --------------------------------------------------------------------------- checkpoints


def checkpoint_loader(models: ModelStore) -> Callable:
    """Loader for :func:`pipeline.checkpoints.run_project_checkpoints` that shares memory with the app.

    A checkpoint that is exactly the app's loaded model (same id, revision, dtype, device) reuses
    it; any other first drops the app's model (loaded again on its next use), so the accelerator
    never holds two models.
    """
    def loader(spec):
        from steering import models as model_module

        loaded = models.loaded
        if loaded is not None and loaded.spec == spec:
            return loaded
        models.unload()
        return model_module.load_model(spec)

    return loader


def checkpoints_config(run_dir: Any, checkpoints_text: str | None, axis_path: Any = None, layers: Any = None,
                       min_score: Any = 3, models: ModelStore | None = None, batch_size: int = 8):
    """A :class:`pipeline.checkpoints.CheckpointsConfig` from the tab's values (raises ValueError with the reason)."""
    from pipeline.checkpoints import CheckpointsConfig

    run = optional_path(run_dir)
    if run is None:
        raise ValueError("choose a run directory (a run with generated and judged responses)")
    if not run.is_dir():
        raise ValueError(f"{run} does not exist")
    checkpoints = checkpoint_lines(checkpoints_text)
    if not checkpoints:
        raise ValueError("list the checkpoints, one per line, in training order")
    device = models.device if models is not None else "cpu"
    dtype = models.dtype if models is not None else "float32"
    return CheckpointsConfig(run_dir=run, checkpoints=checkpoints, axis_path=optional_path(axis_path),
                             layers=(str(layers).strip() or None) if layers is not None else None,
                             min_score=int(min_score if min_score is not None else 3), dtype=dtype, device=device,
                             batch_size=int(batch_size))


def checkpoints_function(config, models: ModelStore) -> Callable[[Job], Any]:
    """``fn(job)`` running :func:`pipeline.checkpoints.run_project_checkpoints` with the job's progress and stop."""
    def run(job: Job) -> dict:
        from pipeline.checkpoints import run_project_checkpoints

        report = run_project_checkpoints(config, progress=job.progress, stop_event=job.stop_event,
                                         loader=checkpoint_loader(models))
        return {"checkpoints": [{"name": c.name, "responses": c.total, "stored_before": c.already_done,
                                 "extracted": c.extracted, "reused_from_run": c.reused, "empty": len(c.empty)} for c in report.checkpoints],
                "layers": report.layers, "final": report.final, "stopped": report.stopped,
                "skipped_roles": report.skipped_roles,
                "output_dir": str(report.files["json"].parent) if "json" in report.files else None}

    return run


@dataclass
class CheckpointsView:
    table: pd.DataFrame
    summary: pd.DataFrame
    layers: list[int]
    checkpoints: list[str]


def checkpoint_results(run_dir: Any) -> CheckpointsView:
    """The tables a finished ``project-checkpoints`` wrote in ``run_dir`` (or its ``checkpoints`` folder)."""
    from pipeline.checkpoints import load_checkpoint_results

    path = optional_path(run_dir)
    if path is None:
        raise ValueError("choose a run directory")
    table, summary = load_checkpoint_results(path)
    layers = sorted(int(l) for l in summary["layer"].unique())
    order = summary.sort_values("checkpoint_index").drop_duplicates("checkpoint")["checkpoint"].tolist()
    return CheckpointsView(table=table, summary=summary, layers=layers, checkpoints=order)


def pick_layer(layers: Sequence[int], value: Any) -> int:
    """``value`` when it is one of ``layers``, else the first of them."""
    try:
        layer = int(value)
    except (TypeError, ValueError):
        return layers[0]
    return layer if layer in layers else layers[0]


def checkpoint_figures(view: CheckpointsView, layer: int) -> tuple[Any, Any, Any]:
    """(role trajectories along the axis, trajectories in the final checkpoint's PC plane, summary) at ``layer``."""
    from app.plots import empty_figure
    from pipeline.checkpoints import pc_trajectory_figure, summary_figure, trajectory_figure

    try:
        pcs = pc_trajectory_figure(view.table, layer=layer)
    except ValueError as exc:
        pcs = empty_figure("Persona space of the final checkpoint", str(exc))
    return trajectory_figure(view.table, layer=layer), pcs, summary_figure(view.summary, layer=layer)


def display_table(frame: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """Rounded floats and None for missing values (what a Dataframe widget shows and serialises)."""
    out = frame.copy()
    for column in out.columns:
        if pd.api.types.is_float_dtype(out[column]):
            out[column] = out[column].round(digits)
    return out.astype(object).where(out.notna(), None)


# --------------------------------------------------------------------------- drift


def choose_axis(path: Any, upload: Any = None, chat_axis: Any = None):
    """(AxisBundle, source): the uploaded file, else the path (run dir or file), else the chat tab's loaded axis."""
    from app.chat_engine import load_axis_from_path
    from steering.axis_io import AxisFileError

    if upload:
        choice = load_axis_from_path(str(upload))
    elif str(path or "").strip():
        choice = load_axis_from_path(str(path))
    elif chat_axis is not None:
        choice = chat_axis
    else:
        raise AxisFileError("choose an axis: a run directory or axis file (or load one in the chat tab)")
    return choice.bundle, choice.source


def drift_model_id(text: Any, bundle, default: str) -> str:
    """The model to run: the one written, else the axis file's model, else the app's default."""
    return str(text or "").strip() or (bundle.metadata.model_id or "").strip() or default


def drift_views(result) -> tuple[Any, Any, pd.DataFrame]:
    """(per-token figure, per-turn figure, per-turn table) of a :class:`pipeline.drift.DriftResult`."""
    from pipeline.drift import drift_figure

    table = result.turns.assign(text=result.turns["text"].str.slice(0, 200))
    return (drift_figure(result, per="token"), drift_figure(result, per="turn"),
            display_table(table.drop(columns=["message_index"])))


def comparison_layers(comparison) -> list[int]:
    """Layers to offer for the comparison plots: the capped ones first, then the other monitored ones."""
    capped = list(comparison.capped.capped_layers)
    return capped + [l for l in comparison.capped.layers if l not in capped]


def comparison_views(comparison, layer: int | None = None) -> tuple[Any, Any, pd.DataFrame]:
    """(per-token figure, per-turn figure, per-turn table) of a :class:`pipeline.drift.DriftComparison`."""
    from pipeline.drift import comparison_figure

    layer = pick_layer(comparison_layers(comparison), layer)
    table = comparison.turn_table()
    return (comparison_figure(comparison, layer=layer, per="token"),
            comparison_figure(comparison, layer=layer, per="turn"), display_table(table))


def capping_function(models: ModelStore, model_id: str, bundle, user_turns: Sequence[str], cap: str | float,
                     layers: Any = None, cap_layers: Any = None, *, system_prompt: str | None = None,
                     max_new_tokens: int = 64, out_dir: str | os.PathLike | None = None) -> Callable[[Job], Any]:
    """``fn(job)`` playing the script without and with capping on the shared model (a heavy job)."""
    def run(job: Job) -> dict:
        from pipeline.drift import compare_capping, resolve_thresholds, save_drift
        from steering.generation import GenerationSettings

        model = models.get(model_id)
        bundle.check_compatible(model.n_layers, model.d_model, model_id)
        n = len(user_turns)

        def progress(done: int, total: int, message: str) -> None:  # uncapped turns, then capped ones
            job.progress(done + (n if message.startswith("capped") else 0), 2 * n, message)

        try:
            comparison = compare_capping(
                model, list(user_turns), bundle, resolve_thresholds(bundle, cap), str(layers or "").strip() or None,
                str(cap_layers or "").strip() or None, system_prompt=system_prompt,
                settings=GenerationSettings(max_new_tokens=int(max_new_tokens), temperature=0.0),
                progress=progress, stop_event=job.stop_event)
        except StopRequested:
            return {"stopped": True}
        files = save_drift(comparison, Path(out_dir) / time.strftime("capping-%Y%m%d-%H%M%S"), "capping",
                           figures=False) if out_dir else {}
        return {"comparison": comparison, "files": {k: str(v) for k, v in files.items()}}

    return run
