"""On-disk layout of a pipeline run and crash-safe writers.

Every file a step produces is written atomically (temp file in the same directory,
fsync, ``os.replace``) or appended line by line to a JSONL log whose reader ignores a
torn final line. A crash therefore loses at most the record or batch in flight.

Run directory layout::

    manifest.json            settings, model, package versions (see pipeline.manifest)
    roles/                   snapshot of the run's role set, paper layout
    rollouts.parquet         one row per (role, prompt, question, sample)
    responses/shard-*.parquet  generated responses, one shard per saved batch
    scores.jsonl             judge scores, appended as they arrive
    activations/             per-role safetensors + index.json
    vectors.safetensors      per-role and default mean vectors
    axis.safetensors         the Assistant Axis (native format, steering.axis_io)
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pandas as pd

from steering.atomic_io import atomic_write_bytes, atomic_write_json, atomic_write_text, atomic_write_with

__all__ = [
    "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "atomic_write_with", "JsonlLog",
    "RunPaths", "RESPONSE_COLUMNS", "write_parquet_atomic", "write_response_shard", "read_responses",
]

RESPONSE_COLUMNS: tuple[str, ...] = (
    "rollout_id", "role", "prompt_index", "question_index", "sample_index",
    "system_prompt", "question", "conversation", "response", "finish_reason", "n_tokens",
)


class JsonlLog:
    """Append-only JSON-lines file; one record per line, flushed and fsynced per append."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def append(self, record: dict) -> None:
        self.append_many([record])

    def append_many(self, records: Iterable[dict]) -> None:
        lines = "".join(json.dumps(r, default=str) + "\n" for r in records)
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_torn_tail()
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())

    def _repair_torn_tail(self) -> None:
        """Cut an unterminated last line (left by a crash) so new records start on a fresh line."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) == b"\n":
                return
            handle.seek(0)
            data = handle.read()
            cut = data.rfind(b"\n") + 1
            handle.truncate(cut)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                if not line.endswith("\n"):
                    break  # torn final line from a crash
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records


@dataclass(frozen=True)
class RunPaths:
    """Paths of one run directory (see the module docstring)."""

    run_dir: Path

    def __init__(self, run_dir: str | os.PathLike) -> None:
        object.__setattr__(self, "run_dir", Path(run_dir))

    @property
    def manifest(self) -> Path:
        return self.run_dir / "manifest.json"

    @property
    def roles_dir(self) -> Path:
        return self.run_dir / "roles"

    @property
    def rollouts(self) -> Path:
        return self.run_dir / "rollouts.parquet"

    @property
    def responses_dir(self) -> Path:
        return self.run_dir / "responses"

    @property
    def scores(self) -> Path:
        return self.run_dir / "scores.jsonl"

    @property
    def activations_dir(self) -> Path:
        return self.run_dir / "activations"

    @property
    def vectors(self) -> Path:
        return self.run_dir / "vectors.safetensors"

    @property
    def axis(self) -> Path:
        return self.run_dir / "axis.safetensors"

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"


def write_parquet_atomic(path: str | os.PathLike, frame: pd.DataFrame) -> None:
    atomic_write_with(path, lambda tmp: frame.to_parquet(tmp, index=False))


def write_response_shard(run_dir: str | os.PathLike, rows: list[dict]) -> Path | None:
    """Save one batch of responses as a new shard; returns its path (None for an empty batch)."""
    if not rows:
        return None
    paths = RunPaths(run_dir)
    frame = pd.DataFrame(rows, columns=list(RESPONSE_COLUMNS))
    existing = sorted(paths.responses_dir.glob("shard-*.parquet")) if paths.responses_dir.exists() else []
    index = len(existing)
    shard = paths.responses_dir / f"shard-{index:06d}-{uuid.uuid4().hex[:8]}.parquet"
    write_parquet_atomic(shard, frame)
    return shard


def read_responses(run_dir: str | os.PathLike) -> pd.DataFrame:
    """All saved responses of a run, one row per rollout_id (first saved copy wins)."""
    paths = RunPaths(run_dir)
    shards = sorted(paths.responses_dir.glob("shard-*.parquet")) if paths.responses_dir.exists() else []
    if not shards:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in RESPONSE_COLUMNS})
    frame = pd.concat([pd.read_parquet(s) for s in shards], ignore_index=True)
    return frame.drop_duplicates("rollout_id", keep="first").reset_index(drop=True)
