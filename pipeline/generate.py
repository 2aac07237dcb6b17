"""Step 2, generate: the model answers every rollout that has no saved response yet.

Backends: ``transformers`` (CPU/GPU, batched with left padding), ``vllm`` (GPU, imported lazily),
``openai-compatible`` (any chat-completions endpoint, e.g. a vLLM server). Responses are saved as
a new Parquet shard after every batch (atomically), so a crash or Ctrl-C loses at most the batch in
flight, and a rerun generates only the rollouts still missing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import pandas as pd
import torch

from pipeline.manifest import bind_model, record_step
from pipeline.progress import JobProgress, ProgressCallback, StopRequested, check_stop, print_progress
from pipeline.rollouts import read_rollouts
from pipeline.store import read_responses, write_response_shard
from steering.chat_format import ChatFormat
from steering.generation import stop_token_ids
from steering.models import (DEFAULT_MODEL_ID, LoadedModel, ModelSpec, display_name, load_hf_model,
                             resolve_model_source)

log = logging.getLogger(__name__)

Backend = Literal["transformers", "vllm", "openai-compatible"]
BACKENDS: tuple[str, ...] = ("transformers", "vllm", "openai-compatible")


@dataclass(frozen=True)
class GenerateConfig:
    run_dir: Path
    model_id: str = DEFAULT_MODEL_ID
    revision: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    backend: Backend = "transformers"
    batch_size: int = 8
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0
    limit: int | None = None  # generate at most this many new responses in this call
    # vllm
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    # openai-compatible
    base_url: str | None = None
    served_model_name: str | None = None  # the endpoint's model name (default: model_id)
    concurrency: int = 8
    api_key: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.backend == "openai-compatible" and not self.base_url:
            raise ValueError("the openai-compatible backend needs --base-url (e.g. http://localhost:8000/v1)")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")

    def model_spec(self) -> ModelSpec:
        return ModelSpec(model_id=self.model_id, revision=self.revision, dtype=self.dtype, device=self.device)


@dataclass
class GenerateReport:
    total: int
    already_done: int
    generated: int = 0
    finish_reasons: dict[str, int] = field(default_factory=dict)
    stopped: bool = False

    @property
    def remaining(self) -> int:
        return self.total - self.already_done - self.generated


@dataclass(frozen=True)
class PendingRollout:
    row: dict
    messages: list[dict]
    prompt_ids: list[int]


def pending_rollouts(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(all rollouts, the ones without a saved response)."""
    rollouts = read_rollouts(run_dir)
    done = set(read_responses(run_dir)["rollout_id"])
    return rollouts, rollouts[~rollouts["rollout_id"].isin(done)]


def _messages(system_prompt: str, question: str, model_name: str) -> list[dict]:
    system = system_prompt.replace("{model_name}", model_name)
    turns = [{"role": "user", "content": question}]
    return ([{"role": "system", "content": system}] if system else []) + turns


def _response_row(item: PendingRollout, text: str, finish_reason: str, n_tokens: int) -> dict:
    row = item.row
    conversation = item.messages + [{"role": "assistant", "content": text}]
    return {
        "rollout_id": row["rollout_id"], "role": row["role"], "prompt_index": int(row["prompt_index"]),
        "question_index": int(row["question_index"]), "sample_index": int(row["sample_index"]),
        "system_prompt": row["system_prompt"], "question": row["question"],
        "conversation": json.dumps(conversation), "response": text,
        "finish_reason": finish_reason, "n_tokens": int(n_tokens),
    }


def rollout_seed(config: GenerateConfig, item: PendingRollout) -> int:
    """The run's seed mixed with the rollout id: repeated samples of one prompt differ, reruns repeat."""
    return config.seed ^ zlib.crc32(item.row["rollout_id"].encode())


class TransformersBackend:
    """Batched ``generate`` of a plain HF model (no hooks needed), left padding, sorted by length."""

    def __init__(self, config: GenerateConfig, loaded: LoadedModel | None = None) -> None:
        """``loaded``: reuse a model already in memory (e.g. the app's chat model) instead of loading a copy."""
        self.config = config
        if loaded is not None:
            if loaded.model_id != config.model_id:
                raise ValueError(f"the loaded model is {loaded.model_id!r}, the run asks for {config.model_id!r}")
            # The plain twin shares the weights and skips the bridge's per-step overhead.
            self.model, self.tokenizer = loaded.decoder.model, loaded.tokenizer
        else:
            self.model, self.tokenizer = load_hf_model(config.model_spec())
        self.chat = ChatFormat(self.tokenizer)
        self.stop_ids = stop_token_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else min(self.stop_ids)

    @torch.no_grad()
    def generate(self, batch: Sequence[PendingRollout]) -> list[tuple[str, str, int]]:
        cfg = self.config
        width = max(len(item.prompt_ids) for item in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, item in enumerate(batch):
            ids[i, width - len(item.prompt_ids):] = torch.tensor(item.prompt_ids)
            mask[i, width - len(item.prompt_ids):] = 1
        # Seeded per batch content, so a resumed run samples the same way for the same batch.
        torch.manual_seed(rollout_seed(cfg, batch[0]))
        sampling = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p) if cfg.temperature > 0 \
            else dict(do_sample=False)
        out = self.model.generate(
            input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
            max_new_tokens=cfg.max_new_tokens, pad_token_id=self.pad_id, eos_token_id=sorted(self.stop_ids),
            **sampling,
        )
        results = []
        for row in out[:, width:].tolist():
            tokens, finish = [], "length"
            for token in row:
                if token in self.stop_ids:
                    finish = "stop"
                    break
                tokens.append(token)
            results.append((self.tokenizer.decode(tokens, skip_special_tokens=True), finish, len(tokens)))
        return results


class VLLMBackend:
    """vLLM offline engine on token-id prompts (the same templated ids as the other backends)."""

    def __init__(self, config: GenerateConfig) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RuntimeError(
                "the vllm backend needs vllm on a GPU machine: pip install -r requirements-gpu.txt"
            ) from exc
        from transformers import AutoTokenizer

        self.config = config
        source = resolve_model_source(config.model_spec())
        self.tokenizer = AutoTokenizer.from_pretrained(source, revision=config.revision)
        self.chat = ChatFormat(self.tokenizer)
        kwargs: dict[str, Any] = dict(model=source, revision=config.revision, seed=config.seed,
                                      tensor_parallel_size=config.tensor_parallel_size,
                                      gpu_memory_utilization=config.gpu_memory_utilization,
                                      dtype="auto" if config.dtype == "float32" else config.dtype)
        if config.max_model_len:
            kwargs["max_model_len"] = config.max_model_len
        self.engine = LLM(**kwargs)

    def generate(self, batch: Sequence[PendingRollout]) -> list[tuple[str, str, int]]:
        from vllm import SamplingParams

        cfg = self.config
        # One seed per rollout: repeated samples of a prompt differ, and a rerun repeats them whatever the batches.
        params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                                 seed=rollout_seed(cfg, item)) for item in batch]
        prompts = [{"prompt_token_ids": list(item.prompt_ids)} for item in batch]
        outputs = self.engine.generate(prompts, params, use_tqdm=False)
        results = []
        for output in outputs:
            completion = output.outputs[0]
            finish = "stop" if completion.finish_reason == "stop" else str(completion.finish_reason or "length")
            results.append((completion.text, finish, len(completion.token_ids)))
        return results


class OpenAICompatibleBackend:
    """Any chat-completions endpoint; requests run concurrently within a batch."""

    def __init__(self, config: GenerateConfig) -> None:
        from transformers import AutoTokenizer

        from pipeline.llm import LLMConfig, check_api_key

        self.config = config
        self.llm_config = LLMConfig(provider="openai-compatible", model=config.served_model_name or config.model_id,
                                    base_url=config.base_url, api_key=config.api_key,
                                    max_concurrency=config.concurrency, temperature=config.temperature,
                                    top_p=None if config.top_p >= 1.0 else config.top_p,
                                    max_tokens=config.max_new_tokens)
        check_api_key(self.llm_config)
        # The local tokenizer (when available) only renders prompts for length sorting and bookkeeping.
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(config.model_spec()))
            self.chat = ChatFormat(self.tokenizer)
        except Exception:  # noqa: BLE001 - the endpoint may serve a model we do not have locally
            self.tokenizer, self.chat = None, None

    def generate(self, batch: Sequence[PendingRollout]) -> list[tuple[str, str, int]]:
        from pipeline.llm import make_client

        async def run() -> list[tuple[str, str, int]]:
            client = make_client(self.llm_config)
            try:
                completions = await asyncio.gather(*(client.complete(item.messages, seed=rollout_seed(self.config, item))
                                                     for item in batch))
            finally:
                await client.close()
            return [(c.text, "stop" if c.stop_reason in (None, "stop", "end_turn") else str(c.stop_reason),
                     c.output_tokens) for c in completions]

        return asyncio.run(run())


def make_backend(config: GenerateConfig, loaded: LoadedModel | None = None):
    """The backend for ``config``; ``loaded`` (transformers backend only) reuses a model in memory."""
    if config.backend == "transformers":
        return TransformersBackend(config, loaded)
    return {"vllm": VLLMBackend, "openai-compatible": OpenAICompatibleBackend}[config.backend](config)


def run_generate(config: GenerateConfig, progress: ProgressCallback | None = None,
                 stop_event: threading.Event | None = None, model: LoadedModel | None = None) -> GenerateReport:
    """Generate every missing response of the run. Safe to interrupt and rerun.

    ``model``: a loaded model to reuse with the transformers backend (no second copy of the weights).
    """
    rollouts, pending = pending_rollouts(config.run_dir)
    report = GenerateReport(total=len(rollouts), already_done=len(rollouts) - len(pending))
    if config.limit is not None:
        pending = pending.iloc[: config.limit]
    if pending.empty:
        record_step(config.run_dir, "generate", config, finished=report.remaining == 0, extra={"responses": report.already_done})
        return report
    bind_model(config.run_dir, config.model_id, config.revision, config.dtype, "generate")
    record_step(config.run_dir, "generate", config, finished=False)
    backend = make_backend(config, model)
    model_name = display_name(config.model_id)
    items = []
    for row in pending.to_dict("records"):
        messages = _messages(row["system_prompt"], row["question"], model_name)
        prompt_ids = backend.chat.encode(messages) if backend.chat else []
        items.append(PendingRollout(row=row, messages=messages, prompt_ids=prompt_ids))
    items.sort(key=lambda item: (len(item.prompt_ids), item.row["rollout_id"]))
    tracker = JobProgress(total=len(items), label="generate", callback=progress)
    try:
        for start in range(0, len(items), config.batch_size):
            check_stop(stop_event)
            batch = items[start:start + config.batch_size]
            results = backend.generate(batch)
            rows = [_response_row(item, *result) for item, result in zip(batch, results)]
            write_response_shard(config.run_dir, rows)
            report.generated += len(rows)
            for row in rows:
                report.finish_reasons[row["finish_reason"]] = report.finish_reasons.get(row["finish_reason"], 0) + 1
            tracker.advance(f"{batch[-1].row['role']}", n=len(rows))
    except StopRequested:
        report.stopped = True
    record_step(config.run_dir, "generate", config, finished=report.remaining == 0,
                extra={"responses": report.already_done + report.generated})
    return report


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", dest="model_id", default=DEFAULT_MODEL_ID,
                        help=f"HF model id or local path (default: the embedded {DEFAULT_MODEL_ID})")
    parser.add_argument("--revision", default=None, help="model revision / checkpoint (git branch, tag or commit)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    parser.add_argument("--device", default="cpu", help="torch device for the transformers backend (cpu, cuda)")


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate the responses of every pending rollout (resumable)")
    parser.add_argument("--run-dir", type=Path, required=True, help="the run's output directory")
    add_generation_arguments(parser)
    parser.add_argument("--backend", choices=BACKENDS, default="transformers", help="generation backend")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (one saved shard per batch)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="maximum tokens per response")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling top_p")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--limit", type=int, default=None, help="generate at most N responses in this call")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per model")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm: fraction of GPU memory")
    parser.add_argument("--max-model-len", type=int, default=None, help="vllm: maximum context length")
    parser.add_argument("--base-url", default=None, help="openai-compatible: endpoint, e.g. http://localhost:8000/v1")
    parser.add_argument("--served-model-name", default=None, help="openai-compatible: model name at the endpoint")
    parser.add_argument("--concurrency", type=int, default=8, help="openai-compatible: requests in flight")
    parser.set_defaults(func=run_cli)


def config_from_args(args: argparse.Namespace) -> GenerateConfig:
    return GenerateConfig(
        run_dir=args.run_dir, model_id=args.model_id, revision=args.revision, dtype=args.dtype, device=args.device,
        backend=args.backend, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, limit=args.limit,
        tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len, base_url=args.base_url, served_model_name=args.served_model_name,
        concurrency=args.concurrency,
    )


def run_cli(args: argparse.Namespace) -> int:
    report = run_generate(config_from_args(args), progress=print_progress)
    print(f"generate: {report.generated} new, {report.already_done} already saved, {report.remaining} remaining; "
          f"finish reasons {report.finish_reasons}")
    return 0
