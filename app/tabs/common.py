"""Helpers shared by tabs: following a background job with gr.Progress."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import gradio as gr

from app.jobs import Job

POLL_S = 0.5


def follow_job(job: Job, progress: gr.Progress | None, render: Callable[[Job], tuple],
               poll_s: float = POLL_S) -> Iterator[tuple]:
    """Yield ``render(job)`` every ``poll_s`` until the job ends, moving ``progress`` along."""
    while True:
        if progress is not None and not job.finished:
            if job.total:
                progress((job.done, job.total), desc=job.message or job.name, unit="items")
            else:
                progress(None, desc=job.message or f"{job.name}: {job.status}")
        yield render(job)
        if job.finished:
            return
        time.sleep(poll_s)


def job_status_markdown(job: Job | None) -> str:
    if job is None:
        return "No job has run in this app yet."
    icon = {"done": "Done", "failed": "Failed", "cancelled": "Cancelled", "running": "Running",
            "queued": "Queued"}.get(job.status, job.status)
    return f"**{icon}**: {job.status_line()}"


def as_json(value: Any) -> Any:
    """Something gr.JSON can show (reports may hold paths and dataclasses)."""
    import dataclasses
    from pathlib import Path

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [as_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
