"""Chat transcripts as JSON: every turn's text, token ids, per-token projections and the settings used.

Layout (``format`` = ``assistant-axis-lab/chat-transcript``, ``version`` 1)::

    {"format", "version", "created",
     "model": {"model_id", "n_layers", "d_model", "revision"},
     "axis": {"source", "shape", "model_id", "thresholds"} | null,
     "monitor_layer": int | null,
     "turns": [{"index", "user", "settings", "intervention": {"note", "layers", "thresholds"},
                "steered": REPLY, "baseline": REPLY | null}]}

    REPLY = {"text", "token_ids", "tokens" (decoded one by one, when a tokenizer is given),
             "projections": {"<layer>": [one value per token]}, "mean_projection": {"<layer>": float}}
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from app.chat_engine import AxisChoice, Conversation, Reply
from steering.atomic_io import atomic_write_json

FORMAT = "assistant-axis-lab/chat-transcript"
VERSION = 1


def _reply(reply: Reply | None, tokenizer: Any = None) -> dict[str, Any] | None:
    if reply is None:
        return None
    layers = sorted({layer for p in reply.projections for layer in p})
    out: dict[str, Any] = {"text": reply.text, "token_ids": list(reply.token_ids)}
    if tokenizer is not None:
        out["tokens"] = [tokenizer.decode([t]) for t in reply.token_ids]
    out["projections"] = {str(layer): reply.series(layer) for layer in layers}
    out["mean_projection"] = {str(layer): reply.mean_projection(layer) for layer in layers}
    return out


def build_transcript(conversation: Conversation, *, model: dict[str, Any] | None = None,
                     axis: AxisChoice | None = None, monitor_layer: int | None = None,
                     tokenizer: Any = None) -> dict[str, Any]:
    """The JSON-ready transcript of ``conversation`` (see the module docstring)."""
    axis_info = None
    if axis is not None:
        meta = axis.bundle.metadata
        axis_info = {"source": axis.source, "shape": [axis.bundle.n_layers, axis.bundle.d_model],
                     "model_id": meta.model_id, "thresholds": sorted(meta.thresholds),
                     "capping_experiments": sorted(axis.capping.experiments) if axis.capping else []}
    turns = []
    for index, turn in enumerate(conversation.turns):
        turns.append({
            "index": index,
            "user": turn.user,
            "settings": turn.settings,
            "intervention": {"note": turn.note, "layers": list(turn.intervened_layers),
                             "thresholds": {str(k): v for k, v in sorted(turn.thresholds.items())}},
            "steered": _reply(turn.steered, tokenizer),
            "baseline": _reply(turn.baseline, tokenizer),
        })
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": dict(model or {}),
        "axis": axis_info,
        "monitor_layer": monitor_layer,
        "turns": turns,
    }


def save_transcript(folder: str | os.PathLike, transcript: dict[str, Any], name: str | None = None) -> Path:
    """Write ``transcript`` to ``folder/<name or chat-<time>>.json`` atomically; returns the path."""
    stem = name or time.strftime("chat-%Y%m%d-%H%M%S")
    path = Path(folder) / f"{stem}.json"
    atomic_write_json(path, transcript)
    return path


def load_transcript(path: str | os.PathLike) -> dict[str, Any]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a chat transcript (format {data.get('format')!r})")
    return data
