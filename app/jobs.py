"""Background jobs and the app-wide slot for model-heavy work.

:data:`HEAVY` is one slot shared by every tab and session: a chat generation and a pipeline step
that runs the model (generate, extract) never run at the same time; whoever comes second waits
and can say what it waits for. Gradio events that use the model also share the concurrency id
:data:`HEAVY_CONCURRENCY_ID` with a limit of one, so a Space serves them one after another.

:class:`JobManager` runs long pipeline steps in a background thread, one at a time, with
progress (``(done, total, message)`` as the pipeline reports it), a log tail (records of the
``pipeline`` and ``steering`` loggers emitted by the job's thread) and cancellation through a
``threading.Event`` the step checks between batches. A job keeps running when the browser tab
that started it closes; any session can look at it again.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

HEAVY_CONCURRENCY_ID = "model-heavy"
LOGGERS = ("pipeline", "steering", "app")


class Busy(RuntimeError):
    """A job is already running."""


class HeavySlot:
    """A lock that knows who holds it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holder: str | None = None
        self._since: float | None = None

    @property
    def holder(self) -> str | None:
        return self._holder

    def describe(self) -> str:
        if self._holder is None:
            return "free"
        return f"{self._holder} (for {time.monotonic() - (self._since or time.monotonic()):.0f} s)"

    def try_acquire(self, name: str, timeout: float = 0.0) -> bool:
        got = self._lock.acquire(timeout=timeout) if timeout > 0 else self._lock.acquire(blocking=False)
        if not got:
            return False
        self._holder, self._since = name, time.monotonic()
        return True

    def release(self) -> None:
        self._holder, self._since = None, None
        self._lock.release()

    def wait_for(self, name: str, poll: float = 0.5, stop_event: threading.Event | None = None) -> Iterator[str]:
        """Acquire the slot; while waiting, yield a line saying who holds it.

        Raises ``InterruptedError`` if ``stop_event`` is set while waiting. The caller must
        :meth:`release` once done (use :meth:`held` when nothing needs to be yielded).
        """
        while not self.try_acquire(name, timeout=poll):
            if stop_event is not None and stop_event.is_set():
                raise InterruptedError(f"{name}: cancelled while waiting for {self.describe()}")
            yield f"waiting for the model: busy with {self.describe()}"

    @contextmanager
    def held(self, name: str, stop_event: threading.Event | None = None) -> Iterator[None]:
        for _ in self.wait_for(name, stop_event=stop_event):
            pass
        try:
            yield
        finally:
            self.release()


HEAVY = HeavySlot()


@dataclass
class Job:
    name: str
    heavy: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    status: str = "queued"  # queued, running, done, failed, cancelled
    done: int = 0
    total: int = 0
    message: str = ""
    result: Any = None
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    log: deque = field(default_factory=lambda: deque(maxlen=400))
    thread: threading.Thread | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed", "cancelled")

    @property
    def fraction(self) -> float | None:
        return (self.done / self.total) if self.total else None

    def progress(self, done: int, total: int, message: str = "") -> None:
        """The ``(done, total, message)`` callback handed to pipeline steps."""
        self.done, self.total, self.message = int(done), int(total), str(message or "")

    def add_log(self, line: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S')} {line}")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(list(self.log)[-n:])

    def status_line(self) -> str:
        parts = [f"{self.name}: {self.status}"]
        if self.total:
            parts.append(f"{self.done}/{self.total}")
        if self.message:
            parts.append(self.message)
        if self.error:
            parts.append(self.error)
        elapsed = (self.finished_at or time.time()) - (self.started_at or self.created_at)
        parts.append(f"{elapsed:.0f} s")
        return " | ".join(parts)


class _ThreadLogHandler(logging.Handler):
    """Sends log records emitted by a job's own thread to that job's log."""

    def __init__(self, manager: "JobManager") -> None:
        super().__init__(logging.INFO)
        self.manager = manager
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        job = self.manager._by_thread.get(record.thread)
        if job is not None:
            try:
                job.add_log(self.format(record))
            except Exception:  # pragma: no cover - logging must never break a job
                pass


class JobManager:
    """Runs one background job at a time (see the module docstring)."""

    def __init__(self, heavy: HeavySlot = HEAVY, keep: int = 20) -> None:
        self.heavy = heavy
        self.jobs: deque[Job] = deque(maxlen=keep)
        self._by_thread: dict[int, Job] = {}
        self._lock = threading.Lock()
        handler = _ThreadLogHandler(self)
        for name in LOGGERS:
            logger = logging.getLogger(name)
            if logger.level == logging.NOTSET:
                logger.setLevel(logging.INFO)
            logger.addHandler(handler)
        self._handler = handler

    def close(self) -> None:
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(self._handler)

    def active(self) -> Job | None:
        for job in reversed(self.jobs):
            if not job.finished:
                return job
        return None

    def latest(self) -> Job | None:
        return self.jobs[-1] if self.jobs else None

    def get(self, job_id: str | None) -> Job | None:
        for job in self.jobs:
            if job.id == job_id:
                return job
        return None

    def submit(self, name: str, fn: Callable[[Job], Any], heavy: bool = False) -> Job:
        """Start ``fn(job)`` in a thread; raises :class:`Busy` while another job runs."""
        with self._lock:
            running = self.active()
            if running is not None:
                raise Busy(f"'{running.name}' is still running ({running.status_line()}); "
                           "wait for it or cancel it first")
            job = Job(name=name, heavy=heavy)
            self.jobs.append(job)
            thread = threading.Thread(target=self._run, args=(job, fn), name=f"job-{job.id}", daemon=True)
            job.thread = thread
            thread.start()
            return job

    def cancel(self, job_id: str | None = None) -> Job | None:
        job = self.get(job_id) if job_id else self.active()
        if job is not None and not job.finished:
            job.stop_event.set()
            job.add_log("cancel requested; the step stops after the current batch")
        return job

    def _run(self, job: Job, fn: Callable[[Job], Any]) -> None:
        self._by_thread[threading.get_ident()] = job
        acquired = False
        try:
            if job.heavy:
                for line in self.heavy.wait_for(f"pipeline step '{job.name}'", stop_event=job.stop_event):
                    job.message = line
                acquired = True
            job.status, job.started_at, job.message = "running", time.time(), ""
            job.add_log(f"started {job.name}")
            job.result = fn(job)
            job.status = "cancelled" if job.stop_event.is_set() else "done"
            job.add_log(f"{job.name} {job.status}")
        except InterruptedError as exc:
            job.status, job.error = "cancelled", str(exc)
        except Exception as exc:  # shown to the user; the traceback goes to the job log
            job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
            job.add_log("".join(traceback.format_exception(exc)).rstrip())
        finally:
            if acquired:
                self.heavy.release()
            job.finished_at = time.time()
            self._by_thread.pop(threading.get_ident(), None)

    def wait(self, job: Job, timeout: float | None = None) -> Job:
        if job.thread is not None:
            job.thread.join(timeout)
        return job
