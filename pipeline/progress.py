"""Progress reporting shared by all long steps: a callback (CLI printer, gr.Progress) plus rate/ETA logs."""
from __future__ import annotations

import sys
import threading
import time

from pipeline.llm import JobProgress, ProgressCallback

__all__ = ["JobProgress", "ProgressCallback", "print_progress", "StopRequested", "check_stop"]


class StopRequested(Exception):
    """Raised between batches when the caller asked the step to stop; finished work is saved."""


def check_stop(stop_event: threading.Event | None) -> None:
    if stop_event is not None and stop_event.is_set():
        raise StopRequested("stopped on request; finished work is saved and the step resumes where it stopped")


_started: dict[int, tuple[float, int]] = {}


def print_progress(done: int, total: int, message: str) -> None:
    """Terminal progress bar with rate and ETA (one bar per job, keyed by its total)."""
    now = time.monotonic()
    start, first = _started.setdefault(total, (now, done))
    rate = (done - first) / (now - start) if now > start and done > first else 0.0
    eta = f"{(total - done) / rate:.0f}s" if rate > 0 else "?"
    width = 30
    filled = int(width * done / total) if total else width
    line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {rate:.2f}/s ETA {eta} {message[:40]}"
    sys.stderr.write(f"\r{line:<100}")
    if done >= total:
        _started.pop(total, None)
        sys.stderr.write("\n")
    sys.stderr.flush()
