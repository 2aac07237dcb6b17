"""Progress reporting shared by all long steps: a callback (CLI printer, gr.Progress) plus rate/ETA logs."""
from __future__ import annotations

import sys
import threading
from typing import Callable

from pipeline.llm import JobProgress, ProgressCallback

__all__ = ["JobProgress", "ProgressCallback", "print_progress", "StopRequested", "check_stop"]


class StopRequested(Exception):
    """Raised between batches when the caller asked the step to stop; finished work is saved."""


def check_stop(stop_event: threading.Event | None) -> None:
    if stop_event is not None and stop_event.is_set():
        raise StopRequested("stopped on request; finished work is saved and the step resumes where it stopped")


def print_progress(done: int, total: int, message: str) -> None:
    width = 30
    filled = int(width * done / total) if total else width
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {message[:60]:<60}")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()
