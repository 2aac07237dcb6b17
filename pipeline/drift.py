"""``drift``: how a conversation moves along the Assistant Axis, turn by turn and token by token.

Two analyses:

* **Transcript projection** (``--transcript FILE``): a multi-turn conversation, either a JSON list of
  ``{"role", "content"}`` messages, an object with a ``"messages"`` list (an optional
  ``"system_prompt"`` is prepended), or the chat tab's export (``"turns"``; ``--side`` picks the
  steered or baseline thread), is rendered with the model's chat template and run
  through the model once. Every assistant turn's own tokens (located exactly as in ``extract``) are
  projected onto the unit axis at the chosen layers: per token and as the mean per turn.
* **Scripted conversation** (``--script FILE``): a list of user turns (a JSON list of strings, a list
  of user messages, or ``{"system_prompt": ..., "turns": [...]}``) is played against the model, once
  without intervention and, with ``--cap``, once with Assistant-axis capping (a floor ``tau`` on the
  projection at the capped layers; ``tau`` from the axis file's thresholds, ``p0.25``, or a number).
  The projections are those the live monitor records while generating (after the cap).

Outputs in ``--out``: ``<stem>_tokens.csv`` (one row per token and layer), ``<stem>_turns.csv`` (mean
per assistant turn), ``<stem>.json`` (both, plus the conversations) and ``<stem>.html`` (figures).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from torch import Tensor

from pipeline.checkpoints import figures_html, select_layers
from pipeline.progress import JobProgress, ProgressCallback, check_stop, print_progress
from pipeline.store import atomic_write_json, atomic_write_text
from steering.axis_io import AxisBundle, load_axis
from steering.axis_math import unit
from steering.generation import GenerationSettings, Monitor, stream_generate
from steering.interventions import POSITIONS, InterventionPlan, block_output_hook_name, cap_on_axis
from steering.models import DEFAULT_MODEL_ID, LoadedModel, ModelSpec, load_model

TOKEN_COLUMNS = ("turn", "message_index", "token_index", "step", "position", "token_id", "token", "layer",
                 "projection")
TURN_COLUMNS = ("turn", "message_index", "layer", "mean_projection", "min_projection", "n_tokens", "text")


# ---------------------------------------------------------------- inputs

def _content_text(content: Any) -> str:
    """Message content as text (plain string, or a list of ``{"type": "text", "text": ...}`` parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(_content_text(part) for part in content)
    return str(content)


def _read_json(source: str | os.PathLike | Any) -> Any:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"{path}: file not found")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    return source


def _chat_export_messages(data: dict, side: str) -> tuple[str | None, list[dict]]:
    """Messages of one thread of the chat tab's export (``assistant-axis-lab/chat-transcript``)."""
    if side not in {"steered", "baseline"}:
        raise ValueError(f"side must be 'steered' or 'baseline', got {side!r}")
    messages, system = [], None
    for index, turn in enumerate(data["turns"]):
        if not isinstance(turn, dict) or "user" not in turn:
            raise ValueError(f"chat transcript turn {index} has no 'user' text")
        reply = turn.get(side) or turn.get("steered") or {}
        messages.append({"role": "user", "content": turn["user"]})
        messages.append({"role": "assistant", "content": reply.get("text", "") if isinstance(reply, dict) else ""})
        system = (turn.get("settings") or {}).get("system_prompt") or system
    return system, messages


def load_transcript(source: str | os.PathLike | list | dict, side: str = "steered") -> list[dict[str, str]]:
    """Messages of a transcript file or object.

    Accepted: a list of ``{role, content}`` messages; an object with a ``"messages"`` list (and an
    optional ``"system_prompt"``); the chat tab's export (``"turns"`` of ``{"user", "steered",
    "baseline", "settings"}``), of which ``side`` picks the thread (``baseline`` falls back to the
    steered reply on turns without one). Re-projecting a steered thread runs the model without
    the intervention; the export itself holds the live (intervened) projections.
    """
    data = _read_json(source)
    system = None
    if isinstance(data, dict):
        if "messages" not in data and isinstance(data.get("turns"), list):
            system, data = _chat_export_messages(data, side)
        else:
            system = data.get("system_prompt") or data.get("system")
            data = data.get("messages", data.get("conversation"))
    if not isinstance(data, list):
        raise ValueError("a transcript is a JSON list of {role, content} messages or an object with a 'messages' list")
    messages = []
    for index, message in enumerate(data):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"transcript message {index} is not a {{role, content}} object")
        role = str(message["role"])
        if role not in {"system", "user", "assistant"}:
            raise ValueError(f"transcript message {index}: unknown role {role!r}")
        messages.append({"role": role, "content": _content_text(message.get("content"))})
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": str(system)})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the transcript has no assistant turn to project")
    return messages


def load_script(source: str | os.PathLike | list | dict) -> tuple[str | None, list[str]]:
    """(system prompt, user turns) of a script: a list of strings/user messages or ``{"system_prompt", "turns"}``."""
    data = _read_json(source)
    system = None
    if isinstance(data, dict):
        system = data.get("system_prompt") or data.get("system")
        data = data.get("turns", data.get("user_turns", data.get("messages")))
    if not isinstance(data, list) or not data:
        raise ValueError("a script is a non-empty JSON list of user turns (strings or {role: user, content})")
    turns = []
    for index, item in enumerate(data):
        if isinstance(item, str):
            turns.append(item)
        elif isinstance(item, dict) and item.get("role", "user") == "user":
            turns.append(_content_text(item.get("content")))
        elif isinstance(item, dict) and item.get("role") == "system" and index == 0 and system is None:
            system = _content_text(item.get("content"))
        else:
            raise ValueError(f"script item {index} is not a user turn")
    return system, turns


def resolve_thresholds(bundle: AxisBundle, cap: str | float) -> Tensor:
    """Per-layer ``tau`` ``[L]``: ``"p0.25"`` = the axis file's stored quantile threshold, a number = that value everywhere."""
    if isinstance(cap, str) and cap.strip().lower().startswith("p"):
        return bundle.threshold(float(cap.strip()[1:]))
    return torch.full((bundle.n_layers,), float(cap), dtype=torch.float32)


# ---------------------------------------------------------------- results

@dataclass
class DriftResult:
    """Projections of one conversation's assistant turns. ``tokens``/``turns`` are long tables (one row per layer)."""

    tokens: pd.DataFrame
    turns: pd.DataFrame
    layers: list[int]
    messages: list[dict[str, str]]
    label: str = "transcript"
    thresholds: dict[int, float] = field(default_factory=dict)  # layer -> capping floor, when capped
    capped_layers: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"label": self.label, "layers": self.layers, "capped_layers": self.capped_layers,
                "thresholds": {str(k): v for k, v in self.thresholds.items()}, "messages": self.messages,
                "turns": _records(self.turns), "tokens": _records(self.tokens)}

    @classmethod
    def from_dict(cls, data: dict) -> "DriftResult":
        return cls(tokens=pd.DataFrame(data["tokens"], columns=list(TOKEN_COLUMNS)),
                   turns=pd.DataFrame(data["turns"], columns=list(TURN_COLUMNS)), layers=list(data["layers"]),
                   messages=data.get("messages", []), label=data.get("label", "transcript"),
                   thresholds={int(k): float(v) for k, v in data.get("thresholds", {}).items()},
                   capped_layers=list(data.get("capped_layers", [])))


@dataclass
class DriftComparison:
    """The same scripted conversation without and with capping."""

    uncapped: DriftResult
    capped: DriftResult

    @property
    def layers(self) -> list[int]:
        return self.uncapped.layers

    @property
    def thresholds(self) -> dict[int, float]:
        return self.capped.thresholds

    def turn_table(self) -> pd.DataFrame:
        """Per turn and layer: mean projection uncapped, capped, their difference, and tau."""
        a = self.uncapped.turns[["turn", "layer", "mean_projection", "n_tokens"]]
        b = self.capped.turns[["turn", "layer", "mean_projection", "n_tokens"]]
        merged = a.merge(b, on=["turn", "layer"], how="outer", suffixes=("_uncapped", "_capped"))
        merged = merged.rename(columns={"mean_projection_uncapped": "uncapped", "mean_projection_capped": "capped"})
        merged["difference"] = merged["capped"] - merged["uncapped"]
        merged["capped_layer"] = merged["layer"].isin(self.capped.capped_layers)
        merged["tau"] = merged["layer"].map(lambda l: self.thresholds.get(int(l), float("nan")))
        return merged.sort_values(["layer", "turn"]).reset_index(drop=True)

    def token_table(self) -> pd.DataFrame:
        frames = [r.tokens.assign(condition=name) for name, r in (("uncapped", self.uncapped), ("capped", self.capped))]
        return pd.concat(frames, ignore_index=True)

    def to_dict(self) -> dict:
        return {"uncapped": self.uncapped.to_dict(), "capped": self.capped.to_dict(),
                "comparison": _records(self.turn_table())}

    @classmethod
    def from_dict(cls, data: dict) -> "DriftComparison":
        return cls(DriftResult.from_dict(data["uncapped"]), DriftResult.from_dict(data["capped"]))


def _records(frame: pd.DataFrame) -> list[dict]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()}
            for rec in frame.to_dict("records")]


def _turn_rows(tokens: pd.DataFrame, texts: dict[int, tuple[int, str]]) -> pd.DataFrame:
    rows = []
    for (turn, layer), group in tokens.groupby(["turn", "layer"], sort=True):
        message_index, text = texts[int(turn)]
        rows.append({"turn": int(turn), "message_index": message_index, "layer": int(layer),
                     "mean_projection": float(group["projection"].mean()),
                     "min_projection": float(group["projection"].min()), "n_tokens": int(len(group)), "text": text})
    for turn, (message_index, text) in texts.items():  # empty turns keep a row per layer
        if tokens.empty or not (tokens["turn"] == turn).any():
            for layer in sorted(tokens["layer"].unique()) if not tokens.empty else []:
                rows.append({"turn": turn, "message_index": message_index, "layer": int(layer),
                             "mean_projection": float("nan"), "min_projection": float("nan"), "n_tokens": 0,
                             "text": text})
    return pd.DataFrame(rows, columns=list(TURN_COLUMNS)).sort_values(["layer", "turn"]).reset_index(drop=True)


# ---------------------------------------------------------------- transcript projection

@torch.no_grad()
def forward_projections(model: LoadedModel, input_ids: Sequence[int], axis: Tensor, layers: Sequence[int]) -> Tensor:
    """Projection of every position's block output onto unit ``axis[layer]``: ``[T, len(layers)]`` fp32."""
    device = model.device
    directions = {l: unit(axis[l]).to(device) for l in layers}
    out: dict[int, Tensor] = {}

    def make_hook(layer: int):
        def hook(x: Tensor, hook) -> Tensor:
            out[layer] = (x[0].to(torch.float32) @ directions[layer]).cpu()
            return x
        return hook

    ids = torch.tensor([list(input_ids)], device=device)
    model.bridge.run_with_hooks(ids, fwd_hooks=[(block_output_hook_name(l), make_hook(l)) for l in layers],
                                attention_mask=torch.ones_like(ids), stop_at_layer=max(layers) + 1,
                                return_type=None)
    return torch.stack([out[l] for l in layers], dim=1)


def project_transcript(model: LoadedModel, messages: Sequence[dict], axis: Tensor | AxisBundle,
                       layers: Sequence[int] | str | None = None, label: str = "transcript") -> DriftResult:
    """Per-token and per-turn projections of every assistant turn of ``messages`` onto ``axis``.

    One forward pass over the whole conversation when the chat template renders each turn's prefix
    identically inside the full conversation (ChatML, Llama, Gemma...); otherwise each turn gets a
    forward pass of its own prefix.
    """
    bundle = axis if isinstance(axis, AxisBundle) else None
    axis = bundle.axis if bundle is not None else axis.to(torch.float32)
    if bundle is not None:
        bundle.check_compatible(model.n_layers, model.d_model, model.model_id)
    elif tuple(axis.shape) != (model.n_layers, model.d_model):
        raise ValueError(f"axis shape {tuple(axis.shape)} does not fit the model ({model.n_layers}, {model.d_model})")
    layers = select_layers(layers, model.n_layers)
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    full_ids = model.chat.encode(messages, add_generation_prompt=False)
    full_proj: Tensor | None = None
    rows, texts = [], {}
    step = 0
    turn = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        turn += 1
        texts[turn] = (index, message["content"])
        span = model.chat.response_span(messages[: index + 1])
        if span.length == 0:
            continue
        if full_ids[: span.end] == span.input_ids[: span.end]:
            if full_proj is None:
                full_proj = forward_projections(model, full_ids, axis, layers)
            proj = full_proj[span.start: span.end]
        else:
            proj = forward_projections(model, span.input_ids[: span.end], axis, layers)[span.start: span.end]
        for k, position in enumerate(range(span.start, span.end)):
            token_id = int(span.input_ids[position])
            token = model.tokenizer.decode([token_id])
            for li, layer in enumerate(layers):
                rows.append((turn, index, k, step, position, token_id, token, int(layer), float(proj[k, li])))
            step += 1
    tokens = pd.DataFrame(rows, columns=list(TOKEN_COLUMNS))
    return DriftResult(tokens=tokens, turns=_turn_rows(tokens, texts), layers=list(layers), messages=messages,
                       label=label)


# ---------------------------------------------------------------- scripted conversations

def run_script(model: LoadedModel, user_turns: Sequence[str], axis: Tensor | AxisBundle,
               layers: Sequence[int] | str | None = None, *, system_prompt: str | None = None,
               plan: InterventionPlan | None = None, settings: GenerationSettings = GenerationSettings(),
               label: str = "scripted", thresholds: dict[int, float] | None = None,
               progress: ProgressCallback | None = None, stop_event: threading.Event | None = None) -> DriftResult:
    """Play ``user_turns`` against the model (optionally under ``plan``), monitoring the projection of
    every generated token at ``layers`` (plus the plan's layers) after the interventions."""
    axis_tensor = axis.axis if isinstance(axis, AxisBundle) else axis.to(torch.float32)
    if tuple(axis_tensor.shape) != (model.n_layers, model.d_model):
        raise ValueError(f"axis shape {tuple(axis_tensor.shape)} does not fit the model "
                         f"({model.n_layers}, {model.d_model})")
    layers = select_layers(layers, model.n_layers)
    capped = plan.layers if plan is not None else []
    monitored = sorted(set(layers) | set(capped))
    monitor = Monitor(axis=axis_tensor, layers=monitored)
    messages: list[dict[str, str]] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    rows, texts = [], {}
    step = 0
    tracker = JobProgress(total=len(user_turns), label=f"drift {label}", callback=progress)
    for turn, user in enumerate(user_turns, start=1):
        check_stop(stop_event)
        messages.append({"role": "user", "content": user})
        prompt = model.chat.encode(messages, add_generation_prompt=True)
        text = ""
        for k, token_step in enumerate(stream_generate(model, prompt, plan, settings, monitor)):
            text = token_step.text
            token = model.tokenizer.decode([token_step.token_id])
            for layer in monitored:
                rows.append((turn, len(messages), k, step, len(prompt) + k, token_step.token_id, token, int(layer),
                             float(token_step.projections[layer])))
            step += 1
        messages.append({"role": "assistant", "content": text})
        texts[turn] = (len(messages) - 1, text)
        tracker.advance(f"{label}: turn {turn}")
    tokens = pd.DataFrame(rows, columns=list(TOKEN_COLUMNS))
    return DriftResult(tokens=tokens, turns=_turn_rows(tokens, texts), layers=monitored, messages=messages,
                       label=label, thresholds=dict(thresholds or {}), capped_layers=list(capped))


def compare_capping(model: LoadedModel, user_turns: Sequence[str], axis: Tensor | AxisBundle,
                    thresholds: Tensor | Sequence[float], layers: Sequence[int] | str | None = None,
                    cap_layers: Sequence[int] | str | None = None, *, system_prompt: str | None = None,
                    settings: GenerationSettings = GenerationSettings(), positions: str = "all",
                    progress: ProgressCallback | None = None,
                    stop_event: threading.Event | None = None) -> DriftComparison:
    """Run the script without and with Assistant-axis capping (floor ``thresholds[layer]`` at ``cap_layers``)."""
    axis_tensor = axis.axis if isinstance(axis, AxisBundle) else axis.to(torch.float32)
    layers = select_layers(layers, model.n_layers)
    cap_layers = (list(layers) if cap_layers is None else
                  select_layers(cap_layers, model.n_layers))
    thresholds = torch.as_tensor(thresholds, dtype=torch.float32)
    if thresholds.shape != (model.n_layers,):
        raise ValueError(f"thresholds must be one value per layer ({model.n_layers}), got {tuple(thresholds.shape)}")
    plan = InterventionPlan(cap_on_axis(axis_tensor, thresholds, cap_layers), positions=positions)
    taus = {int(l): float(thresholds[l]) for l in cap_layers}
    uncapped = run_script(model, user_turns, axis_tensor, sorted(set(layers) | set(cap_layers)),
                          system_prompt=system_prompt, settings=settings, label="uncapped", thresholds=taus,
                          progress=progress, stop_event=stop_event)
    capped = run_script(model, user_turns, axis_tensor, layers, system_prompt=system_prompt, plan=plan,
                        settings=settings, label="capped", thresholds=taus, progress=progress, stop_event=stop_event)
    return DriftComparison(uncapped, capped)


# ---------------------------------------------------------------- saving and loading

def save_drift(result: DriftResult | DriftComparison, out_dir: str | os.PathLike, stem: str = "drift",
               figures: bool = True) -> dict[str, Path]:
    """Write ``<stem>_tokens.csv``, ``<stem>_turns.csv``, ``<stem>.json`` and ``<stem>.html``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(result, DriftComparison):
        tokens, turns = result.token_table(), result.turn_table()
        figs = [comparison_figure(result, layer=l, per=p) for l in _figure_layers(result.capped) for p in ("token", "turn")]
    else:
        tokens, turns = result.tokens, result.turns
        figs = [drift_figure(result, layer=None, per=p) for p in ("token", "turn")]
    files = {"tokens": out / f"{stem}_tokens.csv", "turns": out / f"{stem}_turns.csv", "json": out / f"{stem}.json"}
    atomic_write_text(files["tokens"], tokens.to_csv(index=False))
    atomic_write_text(files["turns"], turns.to_csv(index=False))
    atomic_write_json(files["json"], {"kind": "comparison" if isinstance(result, DriftComparison) else "drift",
                                      **result.to_dict()})
    if figures:
        files["html"] = out / f"{stem}.html"
        atomic_write_text(files["html"], figures_html(figs, "Conversation drift along the Assistant Axis"))
    return files


def load_drift(path: str | os.PathLike) -> DriftResult | DriftComparison:
    """Read a ``<stem>.json`` written by :func:`save_drift`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return DriftComparison.from_dict(data) if data.get("kind") == "comparison" else DriftResult.from_dict(data)


# ---------------------------------------------------------------- figures

def _figure_layers(result: DriftResult) -> list[int]:
    return result.capped_layers[:1] or result.layers[:1]


def _turn_starts(tokens: pd.DataFrame) -> list[tuple[int, int]]:
    starts = tokens.groupby("turn")["step"].min()
    return [(int(t), int(s)) for t, s in starts.items()]


def drift_figure(result: DriftResult, layer: int | Sequence[int] | None = None, per: str = "token"):
    """Projection along the conversation: per token (x = token across assistant turns) or per turn (mean).

    ``layer``: one layer, several, or None for every layer of the result. Turn starts are dotted
    lines; capping floors (if any) dashed.
    """
    import plotly.graph_objects as go

    layers = result.layers if layer is None else [int(layer)] if isinstance(layer, int) else list(layer)
    fig = go.Figure()
    for l in layers:
        if per == "turn":
            frame = result.turns[result.turns["layer"] == l]
            fig.add_trace(go.Scatter(x=frame["turn"], y=frame["mean_projection"], mode="lines+markers",
                                     name=f"layer {l}", text=frame["text"].str.slice(0, 120),
                                     hovertemplate="turn %{x}<br>mean %{y:.3f}<br>%{text}<extra></extra>"))
        else:
            frame = result.tokens[result.tokens["layer"] == l]
            fig.add_trace(go.Scatter(x=frame["step"], y=frame["projection"], mode="lines", name=f"layer {l}",
                                     text=frame["token"], customdata=frame["turn"],
                                     hovertemplate="turn %{customdata}<br>%{text}<br>%{y:.3f}<extra></extra>"))
        if l in result.thresholds:
            fig.add_hline(y=result.thresholds[l], line_dash="dash", line_color="red",
                          annotation_text=f"tau layer {l}", annotation_position="bottom right")
    if per != "turn" and not result.tokens.empty:
        for turn, start in _turn_starts(result.tokens):
            fig.add_vline(x=start - 0.5, line_dash="dot", line_color="grey", opacity=0.5)
    fig.update_layout(title=f"{result.label}: projection on the Assistant Axis per {per}",
                      xaxis_title="assistant token" if per != "turn" else "assistant turn",
                      yaxis_title="projection", template="plotly_white")
    return fig


def comparison_figure(comparison: DriftComparison, layer: int | None = None, per: str = "token"):
    """Uncapped vs capped trajectories at one layer (default: the first capped layer), with tau."""
    import plotly.graph_objects as go

    layer = int(layer) if layer is not None else _figure_layers(comparison.capped)[0]
    fig = go.Figure()
    for name, result, color in (("uncapped", comparison.uncapped, "#1f77b4"), ("capped", comparison.capped, "#d62728")):
        if per == "turn":
            frame = result.turns[result.turns["layer"] == layer]
            fig.add_trace(go.Scatter(x=frame["turn"], y=frame["mean_projection"], mode="lines+markers", name=name,
                                     line={"color": color}, text=frame["text"].str.slice(0, 120),
                                     hovertemplate="turn %{x}<br>mean %{y:.3f}<br>%{text}<extra></extra>"))
        else:
            frame = result.tokens[result.tokens["layer"] == layer]
            fig.add_trace(go.Scatter(x=frame["step"], y=frame["projection"], mode="lines", name=name,
                                     line={"color": color}, text=frame["token"], customdata=frame["turn"],
                                     hovertemplate="turn %{customdata}<br>%{text}<br>%{y:.3f}<extra></extra>"))
    if layer in comparison.thresholds:
        fig.add_hline(y=comparison.thresholds[layer], line_dash="dash", line_color="black",
                      annotation_text="tau", annotation_position="bottom right")
    fig.update_layout(title=f"Capped vs uncapped, layer {layer}, per {per}",
                      xaxis_title="assistant token" if per != "turn" else "assistant turn",
                      yaxis_title="projection", template="plotly_white")
    return fig


# ---------------------------------------------------------------- CLI

def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("drift", help="project a conversation onto the axis per turn/token; "
                                   "compare a scripted conversation with and without capping",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--axis", type=Path, help="axis file (.safetensors or a paper .pt)")
    source.add_argument("--run-dir", type=Path, help="use <run>/axis.safetensors")
    parser.add_argument("--model", dest="model_id", default=None,
                        help="model id or local dir (default: the axis file's model, else the embedded default)")
    parser.add_argument("--revision", default=None, help="model revision (git branch, tag or commit)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--layers", default=None, help="'middle' (default), 'all', '3,5,7' or a slice '10:20'")
    parser.add_argument("--transcript", type=Path, default=None,
                        help="JSON list of {role, content} messages, or an object with a 'messages' list")
    parser.add_argument("--side", choices=["steered", "baseline"], default="steered",
                        help="which thread of a chat-tab export to project (default: steered)")
    parser.add_argument("--script", type=Path, default=None,
                        help="JSON list of user turns (or {'system_prompt', 'turns'}) to play against the model")
    parser.add_argument("--system-prompt", default=None, help="system prompt for --script (overrides the file's)")
    parser.add_argument("--cap", default=None,
                        help="also run the script with capping: 'p0.25' (the axis file's threshold) or a number")
    parser.add_argument("--cap-layers", default=None, help="layers to cap (default: --layers)")
    parser.add_argument("--cap-positions", choices=POSITIONS, default="all", help="positions the cap applies to")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per scripted reply")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--out", type=Path, required=True, help="output folder for tables and figures")
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    if args.transcript is None and args.script is None:
        raise ValueError("give --transcript FILE, --script FILE, or both")
    if args.cap is not None and args.script is None:
        raise ValueError("--cap compares a scripted conversation: give --script FILE")
    bundle = load_axis(args.axis if args.axis is not None else args.run_dir / "axis.safetensors")
    model_id = args.model_id or bundle.metadata.model_id or DEFAULT_MODEL_ID
    revision = args.revision if args.model_id else (args.revision or (bundle.metadata.revision
                                                                      if bundle.metadata.model_id else None))
    model = load_model(ModelSpec(model_id=model_id, revision=revision, dtype=args.dtype, device=args.device))
    bundle.check_compatible(model.n_layers, model.d_model, model_id)
    layers = select_layers(args.layers, model.n_layers)
    if args.transcript is not None:
        result = project_transcript(model, load_transcript(args.transcript, args.side), bundle, layers,
                                    label=args.transcript.stem)
        files = save_drift(result, args.out, "transcript")
        print(f"drift: {result.turns['turn'].nunique()} assistant turns at layers {layers} -> {files['turns']}")
    if args.script is not None:
        system, turns = load_script(args.script)
        system = args.system_prompt if args.system_prompt is not None else system
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
        if args.cap is None:
            result = run_script(model, turns, bundle, layers, system_prompt=system, settings=settings,
                                progress=print_progress)
            files = save_drift(result, args.out, "script")
        else:
            taus = resolve_thresholds(bundle, args.cap)
            cap_layers = select_layers(args.cap_layers, model.n_layers) if args.cap_layers else layers
            result = compare_capping(model, turns, bundle, taus, layers, cap_layers, system_prompt=system,
                                     settings=settings, positions=args.cap_positions, progress=print_progress)
            files = save_drift(result, args.out, "capping")
            table = result.turn_table()
            print(table[table["capped_layer"]][["turn", "layer", "uncapped", "capped", "tau"]].to_string(index=False))
        print(f"drift: scripted conversation of {len(turns)} turns -> {files['turns']}")
    return 0
