"""Crash-safe file writes: write a temp file in the same directory, fsync, then ``os.replace``.

Readers therefore see the old file or the new one, never a partial write.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Callable


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_with(path: str | os.PathLike, writer) -> None:
    """Atomically create ``path`` with ``writer(tmp_path)`` (for libraries that write to a path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        writer(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


_directory_lock = threading.Lock()


def build_directory_once(target: str | os.PathLike, build: Callable[[Path], None],
                         marker: str = ".build-complete", note: str = "") -> Path:
    """Create directory ``target`` once, atomically.

    ``build(staging)`` fills a fresh sibling staging directory, which gets a ``marker`` file and is
    then renamed to ``target``. A finished ``target`` (marker present) is returned as it is; a
    crash leaves at most a staging directory behind, never a half-filled ``target``.
    """
    target = Path(target)
    if (target / marker).exists():
        return target
    with _directory_lock:
        if (target / marker).exists():
            return target
        staging = target.parent / f".{target.name}.{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        try:
            build(staging)
            (staging / marker).write_text(note or "complete\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target
