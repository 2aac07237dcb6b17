"""Pipeline steps as background jobs, and what the app shows about a run (no UI here).

The step functions (``pipeline.rollouts`` ... ``pipeline.axis_step``) are imported inside the
functions, so the app starts even where a step module is broken or missing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from app.jobs import HEAVY, HeavySlot, Job
from app.model_store import ModelStore
from pipeline.store import RunPaths

STEPS = ("rollouts", "generate", "extract", "judge", "vectors", "axis")
ALL = "all"
HEAVY_STEPS = frozenset({"generate", "extract"})


@dataclass(frozen=True)
class PipelineSettings:
    run_dir: str
    model_id: str
    device: str = "cpu"
    dtype: str = "float32"
    roles_dir: str | None = None  # None: the shipped roles
    roles: tuple[str, ...] | None = None  # None: every role of the set
    question_count: int | None = 3
    prompt_count: int | None = None
    rollouts_per_prompt: int = 1
    batch_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0
    aggregation: str = "mean"
    judge_provider: str = "openai"
    judge_model: str = "gpt-4.1-mini"
    judge_base_url: str | None = None
    judge_api_key: str | None = field(default=None, repr=False)
    judge_concurrency: int = 8
    judge_limit: int | None = None
    min_score: int = 3
    min_count: int = 1
    quantiles: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5, 0.75)

    def __post_init__(self) -> None:
        if not str(self.run_dir).strip():
            raise ValueError("choose a run directory")
        if not str(self.model_id).strip():
            raise ValueError("choose a model id")

    def judge_llm(self):
        from pipeline.llm import LLMConfig

        return LLMConfig(provider=self.judge_provider, model=self.judge_model, base_url=self.judge_base_url or None,
                         api_key=self.judge_api_key or None, max_concurrency=self.judge_concurrency, max_tokens=16)


def check_settings(step: str, settings: PipelineSettings) -> None:
    """Fail before starting a job on what can be checked up front (the judge's API key)."""
    if step in ("judge", ALL):
        from pipeline.llm import check_api_key

        check_api_key(settings.judge_llm())


def step_function(step: str, settings: PipelineSettings, models: ModelStore,
                  heavy: HeavySlot = HEAVY) -> Callable[[Job], Any]:
    """``fn(job)`` running one step (or ``all`` of them in order) with ``settings``.

    Progress and cancellation go through ``job``; the steps that run the model (generate,
    extract) wait for the app-wide heavy slot first, so they never overlap a chat generation.
    """
    if step != ALL and step not in STEPS:
        raise ValueError(f"unknown step {step!r}; choose one of {', '.join(STEPS + (ALL,))}")
    run_dir = Path(settings.run_dir).expanduser()

    def rollouts(job: Job) -> Any:
        from pipeline.rollouts import RolloutsConfig, make_rollouts

        frame = make_rollouts(RolloutsConfig(
            run_dir=run_dir, roles=settings.roles, roles_dir=Path(settings.roles_dir) if settings.roles_dir else None,
            question_count=settings.question_count, prompt_count=settings.prompt_count,
            rollouts_per_prompt=settings.rollouts_per_prompt))
        job.progress(1, 1, f"{len(frame)} rollouts for {frame['role'].nunique()} roles")
        return {"rollouts": len(frame), "roles": int(frame["role"].nunique())}

    def generate(job: Job) -> Any:
        from pipeline.generate import GenerateConfig, run_generate

        same = models.dtype == settings.dtype and models.device == settings.device
        report = run_generate(GenerateConfig(
            run_dir=run_dir, model_id=settings.model_id, dtype=settings.dtype, device=settings.device,
            batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed),
            progress=job.progress, stop_event=job.stop_event, model=models.get(settings.model_id) if same else None)
        return _report_dict(report)

    def extract(job: Job) -> Any:
        from pipeline.extract import ExtractConfig, run_extract

        config = ExtractConfig(run_dir=run_dir, model_id=settings.model_id, dtype=settings.dtype,
                               device=settings.device, aggregation=settings.aggregation,
                               batch_size=settings.batch_size)
        same = models.dtype == settings.dtype and models.device == settings.device
        model = models.get(settings.model_id) if same else None
        return _report_dict(run_extract(config, progress=job.progress, stop_event=job.stop_event, model=model))

    def judge(job: Job) -> Any:
        from pipeline.judge import JudgeConfig, judge_run

        report = judge_run(run_dir, JudgeConfig(llm=settings.judge_llm(), roles=settings.roles,
                                                limit=settings.judge_limit),
                           progress=job.progress, stop_event=job.stop_event)
        return _report_dict(report)

    def vectors(job: Job) -> Any:
        from pipeline.vectors import VectorsConfig, run_vectors

        report = run_vectors(VectorsConfig(run_dir=run_dir, min_score=settings.min_score,
                                           min_count=settings.min_count))
        job.progress(1, 1, f"{len(report.counts)} role vectors")
        return _report_dict(report)

    def axis(job: Job) -> Any:
        from pipeline.axis_step import AxisConfig, run_axis

        report = run_axis(AxisConfig(run_dir=run_dir, quantiles=tuple(settings.quantiles)))
        job.progress(1, 1, f"axis from {report.n_roles} roles")
        # (not "path": gradio_client takes a dict with a "path" key for a file to download)
        return {"axis_file": str(report.path), "n_roles": report.n_roles, "n_layers": report.n_layers}

    functions = {"rollouts": rollouts, "generate": generate, "extract": extract, "judge": judge,
                 "vectors": vectors, "axis": axis}

    def run_one(name: str, job: Job) -> Any:
        if name not in HEAVY_STEPS:
            return functions[name](job)
        for line in heavy.wait_for(f"pipeline step '{name}'", stop_event=job.stop_event):
            job.message = line
        try:
            return functions[name](job)
        finally:
            heavy.release()

    def run_all(job: Job) -> Any:
        reports = {}
        for number, name in enumerate(STEPS, start=1):
            if job.stop_event.is_set():
                break
            job.add_log(f"step {number}/{len(STEPS)}: {name}")
            job.progress(0, 0, f"{name} ({number}/{len(STEPS)})")
            reports[name] = run_one(name, job)
        return reports

    if step == ALL:
        return run_all
    return lambda job: run_one(step, job)


def _report_dict(report: Any) -> dict:
    if hasattr(report, "as_dict"):
        data = report.as_dict()
    else:
        data = {k: v for k, v in vars(report).items() if not k.startswith("_")}
    for name in ("remaining",):
        if hasattr(report, name):
            data[name] = getattr(report, name)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}


# --------------------------------------------------------------------------- what a run holds


def run_overview(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Counts of what each step has produced in ``run_dir`` (all zero for a new folder)."""
    paths = RunPaths(Path(run_dir).expanduser())
    out: dict[str, Any] = {"run_dir": str(paths.run_dir), "exists": paths.run_dir.is_dir()}
    if not out["exists"]:
        return out
    from pipeline.judge import read_scores
    from pipeline.manifest import read_manifest
    from pipeline.store import read_responses

    out["rollouts"] = len(pd.read_parquet(paths.rollouts, columns=["rollout_id"])) if paths.rollouts.exists() else 0
    out["responses"] = len(read_responses(paths.run_dir))
    out["scores"] = len(read_scores(paths.run_dir))
    try:
        from pipeline.extract import ActivationStore

        out["activations"] = sum(1 for e in ActivationStore(paths.run_dir).entries().values() if e.get("file"))
    except Exception:  # a run without activations, or an older layout
        out["activations"] = 0
    out["vectors"] = paths.vectors.exists()
    out["axis"] = paths.axis.exists()
    manifest = read_manifest(paths.run_dir)
    out["model"] = (manifest.get("model") or {}).get("model_id")
    out["steps"] = {name: ("finished" if entry.get("finished") else "started")
                    for name, entry in manifest.get("steps", {}).items()}
    return out


RESPONSE_TABLE_COLUMNS = ["role", "score", "question", "response", "finish_reason", "n_tokens", "rollout_id"]


def scored_responses(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Every saved response of a run with its judge score (``None`` = not scored), sorted by role."""
    from pipeline.judge import read_scores
    from pipeline.store import read_responses

    run = Path(run_dir).expanduser()
    frame = read_responses(run) if run.is_dir() else pd.DataFrame()
    if frame.empty:
        return pd.DataFrame(columns=RESPONSE_TABLE_COLUMNS)
    scores = read_scores(run)
    frame = frame.assign(score=[scores.get(r) for r in frame["rollout_id"]])
    return frame.sort_values(["role", "rollout_id"])[RESPONSE_TABLE_COLUMNS].reset_index(drop=True)


def filter_responses(frame: pd.DataFrame, role: str | None = None, text: str | None = None,
                     limit: int | None = 300) -> pd.DataFrame:
    """Rows of one role and/or whose question or response contains ``text`` (case-insensitive)."""
    if role:
        frame = frame[frame["role"] == role]
    if text:
        needle = text.lower()
        frame = frame[frame["question"].str.lower().str.contains(needle, regex=False)
                      | frame["response"].fillna("").str.lower().str.contains(needle, regex=False)]
    return (frame.head(limit) if limit is not None else frame).reset_index(drop=True)


def responses_table(run_dir: str | os.PathLike, role: str | None = None, text: str | None = None,
                    limit: int | None = 300) -> pd.DataFrame:
    """:func:`scored_responses` filtered with :func:`filter_responses`."""
    return filter_responses(scored_responses(run_dir), role, text, limit)


def score_lists(frame: pd.DataFrame) -> tuple[list[str], list[int | None]]:
    """(role, score) of every character-role response of a :func:`scored_responses` table, for the histogram."""
    frame = frame[frame["role"] != "default"]
    return list(frame["role"]), [None if pd.isna(s) else int(s) for s in frame["score"]]


@dataclass
class RunVectorsView:
    names: list[str]
    role_vectors: Any  # [R, L, D]
    axis: Any  # [L, D]
    default: Any | None  # [L, D]
    layer_summary: Any  # steering.axis_math.LayerSummary


def run_vectors_view(run_dir: str | os.PathLike) -> RunVectorsView:
    """Role vectors, axis and per-layer summary of a finished run (from ``axis.safetensors``)."""
    import json

    import torch

    from steering.axis_io import load_axis
    from steering.axis_math import LayerSummary, summarize_layers

    paths = RunPaths(Path(run_dir).expanduser())
    if not paths.axis.exists():
        raise FileNotFoundError(f"{paths.axis} does not exist: run the 'axis' step first")
    bundle = load_axis(paths.axis)
    names = sorted(bundle.role_vectors)
    if len(names) < 2:
        raise ValueError(f"{paths.axis}: PCA needs at least two role vectors, the axis has {len(names)}")
    matrix = torch.stack([bundle.role_vectors[n] for n in names])
    summary_path = paths.run_dir / "axis_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    keys = ("axis_norm", "pc1_axis_cosine", "pc1_variance_explained", "pc2_variance_explained")
    if all(k in summary for k in keys):  # written by the axis step
        layer_summary = LayerSummary(*(torch.tensor(summary[k], dtype=torch.float32) for k in keys))
    else:
        layer_summary = summarize_layers(matrix, bundle.axis)
    return RunVectorsView(names=names, role_vectors=matrix, axis=bundle.axis, default=bundle.default_vector,
                          layer_summary=layer_summary)
