"""Step 3, extract: residual-stream activations over each response's own tokens, per layer.

For every saved response the conversation is rendered with the model's chat template and the
exact token span of the response is located from the template (``ChatFormat.response_span``).
The TransformerLens bridge runs with raw HF weights; hooks on ``blocks.{l}.hook_out`` reduce each
requested layer to the per-response aggregate in fp32 right inside the hook (no full-sequence copy
of every layer is kept), and the forward pass stops after the last requested layer. Batches are
sorted by length and right-padded.
The hook of the last requested layer ends the forward pass (no later blocks, no logits).

Storage (``<run>/activations``)::

    meta.json                  model, layers, aggregation, n_layers, d_model
    index.jsonl                one record per finished response: rollout_id, role, file, n_tokens
    parts/<role>/part-*.safetensors   per-batch results (tensors keyed by rollout_id)
    <role>.safetensors         consolidated per role once every response of the role is done

Aggregations: ``mean`` (default) and ``last`` give ``[n_sel_layers, D]`` per response; ``none``
gives ``[n_tokens, n_sel_layers, D]`` (per-token, for drift analysis).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformer_lens.model_bridge.exceptions import StopAtLayerException

from pipeline.manifest import RunMismatchError, bind_model, record_step
from pipeline.progress import JobProgress, ProgressCallback, StopRequested, check_stop, print_progress
from pipeline.store import JsonlLog, RunPaths, atomic_write_json, atomic_write_with, read_responses
from steering.axis_io import LAYER_CONVENTION
from steering.chat_format import ChatTemplateError
from steering.interventions import block_output_hook_name
from steering.layers import parse_layer_spec
from steering.models import DEFAULT_MODEL_ID, LoadedModel, ModelSpec, load_model

log = logging.getLogger(__name__)

Aggregation = Literal["mean", "last", "none"]
AGGREGATIONS: tuple[str, ...] = ("mean", "last", "none")


@dataclass(frozen=True)
class ExtractConfig:
    run_dir: Path
    model_id: str = DEFAULT_MODEL_ID
    revision: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    layers: str | tuple[int, ...] | None = None  # None = every layer; text as in steering.layers
    aggregation: Aggregation = "mean"
    batch_size: int = 8
    max_batch_tokens: int = 16384  # cap on batch_size x padded length
    check_model: bool = True  # refuse to extract with a model other than the run's generator

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        if self.layers is not None and not isinstance(self.layers, str):
            object.__setattr__(self, "layers", tuple(sorted(set(int(l) for l in self.layers))))
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")

    def model_spec(self) -> ModelSpec:
        return ModelSpec(model_id=self.model_id, revision=self.revision, dtype=self.dtype, device=self.device)


@dataclass
class ExtractReport:
    total: int
    already_done: int
    extracted: int = 0
    empty: list[str] = field(default_factory=list)
    stopped: bool = False

    @property
    def remaining(self) -> int:
        return self.total - self.already_done - self.extracted


@dataclass(frozen=True)
class SpanItem:
    rollout_id: str
    role: str
    input_ids: list[int]
    start: int
    end: int


# ---------------------------------------------------------------- pure computation

def aggregate_span(hidden: Tensor, spans: Sequence[tuple[int, int]], aggregation: Aggregation) -> list[Tensor]:
    """Reduce ``hidden`` ``[B, T, D]`` over each row's ``[start, end)`` span, in fp32.

    Returns per row: ``[D]`` for ``mean``/``last``, ``[end - start, D]`` for ``none``.
    """
    if aggregation == "mean":
        weights = torch.zeros(hidden.shape[0], hidden.shape[1], dtype=torch.float32, device=hidden.device)
        for row, (start, end) in enumerate(spans):
            weights[row, start:end] = 1.0 / (end - start)
        return list(torch.einsum("bt,btd->bd", weights, hidden.to(torch.float32)).cpu())
    if aggregation == "last":
        return [hidden[row, end - 1].to(torch.float32).cpu() for row, (_, end) in enumerate(spans)]
    return [hidden[row, start:end].to(torch.float32).cpu() for row, (start, end) in enumerate(spans)]


@torch.no_grad()
def extract_batch(model: LoadedModel, items: Sequence[SpanItem], layers: Sequence[int],
                  aggregation: Aggregation) -> list[Tensor]:
    """Activations of one batch: per item ``[n_layers_sel, D]`` (or ``[n_tokens, n_layers_sel, D]``)."""
    width = max(len(item.input_ids) for item in items)
    pad = model.tokenizer.pad_token_id
    pad = int(pad) if pad is not None else 0
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, : len(item.input_ids)] = torch.tensor(item.input_ids)
        mask[row, : len(item.input_ids)] = 1
    spans = [(item.start, item.end) for item in items]
    collected: dict[int, list[Tensor]] = {}

    last = max(layers)

    def make_hook(layer: int):
        def hook(x: Tensor, hook) -> Tensor:
            collected[layer] = aggregate_span(x, spans, aggregation)
            if layer == last:
                # Nothing after the last requested layer is needed: not the later blocks, the final
                # norm, nor the vocabulary-sized logits (``stop_at_layer=n_layers`` would not skip those).
                raise StopAtLayerException(x)
            return x
        return hook

    hooks = [(block_output_hook_name(layer), make_hook(layer)) for layer in layers]
    model.bridge.run_with_hooks(ids.to(model.device), fwd_hooks=hooks, attention_mask=mask.to(model.device),
                                return_type=None)
    stack_dim = 0 if aggregation != "none" else 1
    return [torch.stack([collected[layer][row] for layer in layers], dim=stack_dim) for row in range(len(items))]


def make_batches(items: Sequence[SpanItem], batch_size: int, max_batch_tokens: int) -> list[list[SpanItem]]:
    """Sort by length and cut into batches of at most ``batch_size`` items and ``max_batch_tokens`` padded tokens."""
    ordered = sorted(items, key=lambda item: (len(item.input_ids), item.rollout_id))
    batches: list[list[SpanItem]] = []
    current: list[SpanItem] = []
    for item in ordered:
        longest = len(item.input_ids)  # ascending order: the new item is the longest
        if current and (len(current) >= batch_size or longest * (len(current) + 1) > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(item)
    if current:
        batches.append(current)
    return batches


# ---------------------------------------------------------------- storage

class ActivationStore:
    """Per-role safetensors files plus an append-only index; see the module docstring."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = RunPaths(run_dir).activations_dir
        self.index = JsonlLog(self.dir / "index.jsonl")

    @property
    def meta_path(self) -> Path:
        return self.dir / "meta.json"

    def meta(self) -> dict | None:
        return json.loads(self.meta_path.read_text()) if self.meta_path.exists() else None

    def check_or_write_meta(self, meta: dict) -> None:
        current = self.meta()
        if current is None:
            atomic_write_json(self.meta_path, meta)
            return
        keys = ("model_id", "revision", "layers", "aggregation", "n_layers", "d_model")
        diffs = [f"{k}: stored {current.get(k)!r}, now {meta.get(k)!r}" for k in keys if current.get(k) != meta.get(k)]
        if diffs:
            raise RunMismatchError(
                f"activations in {self.dir} were extracted with other settings ({'; '.join(diffs)}); "
                "use a new run directory, or remove the activations folder to start over"
            )

    def entries(self) -> dict[str, dict]:
        """rollout_id -> latest index record."""
        return {record["rollout_id"]: record for record in self.index.read()}

    def save_batch(self, items: Sequence[SpanItem], tensors: Sequence[Tensor | None]) -> None:
        by_role: dict[str, dict[str, Tensor]] = {}
        records = []
        n_tokens = {item.rollout_id: item.end - item.start for item in items}
        for item, tensor in zip(items, tensors):
            if tensor is None:
                records.append({"rollout_id": item.rollout_id, "role": item.role, "file": None, "n_tokens": 0})
                continue
            by_role.setdefault(item.role, {})[item.rollout_id] = tensor.contiguous()
        for role, group in by_role.items():
            name = f"parts/{role}/part-{uuid.uuid4().hex}.safetensors"
            atomic_write_with(self.dir / name, lambda tmp, g=group: save_file(g, str(tmp)))
            records += [{"rollout_id": key, "role": role, "file": name,
                         "n_tokens": n_tokens[key]} for key in group]
        self.index.append_many(records)

    def save_empty(self, rollout_ids: Sequence[str], role_of: dict[str, str]) -> None:
        """Record responses with no tokens to extract, so a resumed run does not retry them."""
        self.save_batch([SpanItem(rid, role_of[rid], [], 0, 0) for rid in rollout_ids], [None] * len(rollout_ids))

    def load(self, rollout_ids: Sequence[str] | None = None, role: str | None = None) -> dict[str, Tensor]:
        """Stored activations by rollout_id (empty responses are absent)."""
        entries = self.entries()
        wanted = [e for key, e in entries.items()
                  if e["file"] and (rollout_ids is None or key in rollout_ids) and (role is None or e["role"] == role)]
        by_file: dict[str, list[str]] = {}
        for entry in wanted:
            by_file.setdefault(entry["file"], []).append(entry["rollout_id"])
        out: dict[str, Tensor] = {}
        for file, keys in by_file.items():
            with safe_open(str(self.dir / file), framework="pt") as handle:
                for key in keys:
                    out[key] = handle.get_tensor(key)
        return out

    def consolidate(self, role: str) -> Path:
        """Merge a role's batch parts into ``<role>.safetensors`` (atomic), then drop the parts."""
        tensors = self.load(role=role)
        target = self.dir / f"{role}.safetensors"
        atomic_write_with(target, lambda tmp: save_file(tensors, str(tmp), metadata={"role": role}))
        entries = self.entries()
        self.index.append_many([{**entries[key], "file": target.name} for key in tensors])
        shutil.rmtree(self.dir / "parts" / role, ignore_errors=True)
        return target


# ---------------------------------------------------------------- the step

def spans_for_responses(model: LoadedModel, frame) -> tuple[list[SpanItem], list[str]]:
    """Span items for every response; also the ids whose response is empty (nothing to extract)."""
    items, empty = [], []
    for row in frame.to_dict("records"):
        try:
            span = model.chat.response_span(json.loads(row["conversation"]))
        except ChatTemplateError as exc:
            raise ChatTemplateError(f"response {row['rollout_id']}: {exc}") from exc
        if span.length == 0:
            empty.append(row["rollout_id"])
            continue
        items.append(SpanItem(row["rollout_id"], row["role"], span.input_ids, span.start, span.end))
    return items, empty


@dataclass
class PendingExtraction:
    """What :func:`extract_pending` finished before it returned."""

    extracted: int = 0  # responses saved, empty ones included
    empty: list[str] = field(default_factory=list)  # rollout ids of responses with no tokens
    stopped: bool = False


def extract_pending(model: LoadedModel, store: ActivationStore, pending, layers: Sequence[int],
                    aggregation: Aggregation, batch_size: int, max_batch_tokens: int,
                    advance: Callable[[str, int], None], stop_event: threading.Event | None = None
                    ) -> PendingExtraction:
    """Extract the responses of ``pending`` (rows of the responses table) into ``store``.

    Empty responses are recorded first; then batches sorted by length, each saved as soon as it is
    done, with ``advance(label, n)`` after each. A stop request ends it between batches
    (``stopped``); everything saved stays saved.
    """
    result = PendingExtraction()
    items, empty = spans_for_responses(model, pending)
    if empty:
        store.save_empty(empty, dict(zip(pending["rollout_id"], pending["role"])))
        result.empty, result.extracted = empty, len(empty)
        advance("empty responses", len(empty))
    try:
        for batch in make_batches(items, batch_size, max_batch_tokens):
            check_stop(stop_event)
            store.save_batch(batch, extract_batch(model, batch, layers, aggregation))
            result.extracted += len(batch)
            advance(batch[-1].role, len(batch))
    except StopRequested:
        result.stopped = True
    return result


def run_extract(config: ExtractConfig, progress: ProgressCallback | None = None,
                stop_event: threading.Event | None = None, model: LoadedModel | None = None) -> ExtractReport:
    """Extract activations for every response without them. Safe to interrupt and rerun."""
    paths = RunPaths(config.run_dir)
    responses = read_responses(config.run_dir)
    if responses.empty:
        raise FileNotFoundError(f"no responses in {paths.responses_dir}: run the 'generate' step first")
    store = ActivationStore(config.run_dir)
    done = store.entries()
    pending = responses[~responses["rollout_id"].isin(done)]
    report = ExtractReport(total=len(responses), already_done=len(responses) - len(pending))
    if config.check_model:
        bind_model(config.run_dir, config.model_id, config.revision, config.dtype, "extract")
    if not pending.empty:
        model = model or load_model(config.model_spec())
        layers = parse_layer_spec(config.layers, model.n_layers)
        store.check_or_write_meta({
            "model_id": config.model_id, "revision": config.revision, "dtype": config.dtype,
            "layers": layers, "aggregation": config.aggregation,
            "n_layers": model.n_layers, "d_model": model.d_model, "layer_convention": LAYER_CONVENTION,
        })
        record_step(config.run_dir, "extract", config, finished=False)
        tracker = JobProgress(total=len(pending), label="extract", callback=progress)
        done_now = extract_pending(model, store, pending, layers, config.aggregation, config.batch_size,
                                   config.max_batch_tokens, lambda label, n: tracker.advance(label, n=n), stop_event)
        report.extracted, report.empty, report.stopped = done_now.extracted, done_now.empty, done_now.stopped
    if report.remaining == 0:
        for role in sorted(set(responses["role"])):
            if (store.dir / "parts" / role).exists():
                store.consolidate(role)
    record_step(config.run_dir, "extract", config, finished=report.remaining == 0,
                extra={"extracted": report.already_done + report.extracted, "empty_responses": len(report.empty)})
    return report


def add_cli(subparsers) -> None:
    from pipeline.generate import add_generation_arguments

    parser = subparsers.add_parser("extract", help="extract response-token activations per layer (resumable)")
    parser.add_argument("--run-dir", type=Path, required=True, help="the run's output directory")
    add_generation_arguments(parser)
    parser.add_argument("--layers", default=None,
                        help="'all' (default), '3,5,7', an inclusive range '10-19' or a slice '10:20'")
    parser.add_argument("--aggregation", choices=AGGREGATIONS, default="mean",
                        help="mean over response tokens (default), last token, or none (per token)")
    parser.add_argument("--batch-size", type=int, default=8, help="responses per forward pass")
    parser.add_argument("--max-batch-tokens", type=int, default=16384, help="cap on batch size x padded length")
    parser.set_defaults(func=run_cli)


def config_from_args(args: argparse.Namespace) -> ExtractConfig:
    return ExtractConfig(run_dir=args.run_dir, model_id=args.model_id, revision=args.revision, dtype=args.dtype,
                         device=args.device, layers=args.layers, aggregation=args.aggregation,
                         batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens)


def run_cli(args: argparse.Namespace) -> int:
    report = run_extract(config_from_args(args), progress=print_progress)
    print(f"extract: {report.extracted} new, {report.already_done} already saved, {report.remaining} remaining"
          + (f"; {len(report.empty)} empty responses skipped" if report.empty else ""))
    return 0
