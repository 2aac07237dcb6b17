"""``pipeline-cost``: wall time per pipeline step on a small run, projected to the paper's full run.

Runs the real steps (``pipeline.rollouts`` -> ``generate`` -> ``extract`` -> ``judge`` ->
``vectors`` -> ``axis``) in ``<out-dir>/pipeline-cost-run[-quick]`` (recreated each time) on the
default model, CPU, fp32: 10 roles (``default`` + 9 character roles) x 5 system prompts x 10
questions, ``max_new_tokens=256``, batch size 8, temperature 0.7. ``--quick``: 2 roles x 2 x 2 and
16 new tokens (the projection from a quick run is NOT representative: it says so).

Model loading is a fixed cost (the extract model is loaded apart; generate loads its own, and one such
load is timed apart and not scaled); everything else is projected linearly in the number of rollouts to the paper's 276 roles x 5 prompts x 240 questions. The judge talks to a local
stub server that answers "3" at once: its row is the pipeline's own overhead, without the API's
latency, rate limits or price (``python -m pipeline judge --dry-run`` estimates those).

GPU/vLLM: no GPU here. The ``generate + extract on GPU`` row is a placeholder that the script fills
(vllm backend when importable, else transformers on cuda; extract on cuda) when
``torch.cuda.is_available()``.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

from bench.common import Options, apply_threads, format_table, machine_info, write_result

FULL_ROLES, FULL_PROMPTS, FULL_QUESTIONS = 276, 5, 240


def shape(options: Options) -> tuple[int, int, int, int]:
    """(roles incl. default, prompts, questions, max_new_tokens)."""
    if options.quick:
        return 2, 2, 2, options.max_tokens or 16
    return 10, 5, 10, options.max_tokens or 256


@contextmanager
def stub_judge_server() -> Iterator[str]:
    """An OpenAI-compatible chat-completions server on 127.0.0.1 that answers "3"; yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 - keep the output clean
            pass

        def do_POST(self):  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            request = json.loads(self.rfile.read(length) or b"{}")
            body = json.dumps({
                "id": "stub", "object": "chat.completion", "created": int(time.time()),
                "model": request.get("model", "stub"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "3"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101},
            }).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    saved = {key: os.environ.get(key) for key in ("NO_PROXY", "no_proxy")}
    for key in saved:
        os.environ[key] = ",".join(filter(None, [saved[key], "127.0.0.1", "localhost"]))
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.shutdown()
        server.server_close()


def _time(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def gpu_row(run_dir: Path, model_id: str | None, max_new_tokens: int, batch_size: int, n_rollouts: int,
            n_full: int) -> dict[str, Any]:
    """Generate + extract on the GPU over the same rollouts (a fresh copy of the run's rollouts)."""
    import torch

    from pipeline.extract import ExtractConfig, run_extract
    from pipeline.generate import GenerateConfig, run_generate
    from steering.models import DEFAULT_MODEL_ID

    if not torch.cuda.is_available():
        return {"step": "generate + extract on GPU (vLLM)", "status": "placeholder: needs a GPU (none here)",
                "seconds": None, "projected_s": None}
    gpu_dir = run_dir.parent / f"{run_dir.name}-gpu"
    shutil.rmtree(gpu_dir, ignore_errors=True)
    gpu_dir.mkdir(parents=True)
    shutil.copy(run_dir / "rollouts.parquet", gpu_dir / "rollouts.parquet")
    try:
        import vllm  # noqa: F401

        backend = "vllm"
    except ImportError:
        backend = "transformers"
    mid = model_id or DEFAULT_MODEL_ID
    gen_s, _ = _time(lambda: run_generate(GenerateConfig(
        run_dir=gpu_dir, model_id=mid, device="cuda", backend=backend, batch_size=max(batch_size, 64),
        max_new_tokens=max_new_tokens, temperature=0.7)))
    ext_s, _ = _time(lambda: run_extract(ExtractConfig(run_dir=gpu_dir, model_id=mid, device="cuda",
                                                       batch_size=max(batch_size, 32))))
    total = gen_s + ext_s
    return {"step": f"generate + extract on GPU ({backend}, {torch.cuda.get_device_name(0)})", "status": "measured",
            "seconds": round(total, 2), "generate_s": round(gen_s, 2), "extract_s": round(ext_s, 2),
            "projected_s": round(total * n_full / n_rollouts, 1),
            "note": "includes model loading in each step"}


def run(options: Options, log=print) -> dict[str, Any]:
    from pipeline.axis_step import AxisConfig, run_axis
    from pipeline.extract import ExtractConfig, run_extract
    from pipeline.generate import GenerateConfig, run_generate
    from pipeline.judge import JudgeConfig, judge_run
    from pipeline.llm import LLMConfig
    from pipeline.role_schema import shipped_role_set
    from pipeline.rollouts import RolloutsConfig, make_rollouts
    from pipeline.vectors import VectorsConfig, run_vectors
    from steering.models import DEFAULT_MODEL_ID, ModelSpec, load_hf_model, load_model

    threads = apply_threads(options)
    machine = machine_info()
    n_roles, n_prompts, n_questions, max_new_tokens = shape(options)
    model_id = options.model_id or DEFAULT_MODEL_ID
    run_dir = options.out_dir / f"pipeline-cost-run{'-quick' if options.quick else ''}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    characters = sorted(shipped_role_set().roles)[: n_roles - 1]
    n_rollouts = n_roles * n_prompts * n_questions
    n_full = FULL_ROLES * FULL_PROMPTS * FULL_QUESTIONS
    scale = n_full / n_rollouts
    log(f"pipeline-cost{' (QUICK: tiny run, projection not representative)' if options.quick else ''}: "
        f"{n_roles} roles (default + {', '.join(characters)}) x {n_prompts} prompts x {n_questions} questions = "
        f"{n_rollouts} rollouts, max_new_tokens {max_new_tokens}, batch {options.batch_size}, {threads} threads; "
        f"projection x{scale:.0f} to {FULL_ROLES} x {FULL_PROMPTS} x {FULL_QUESTIONS} = {n_full} rollouts")

    steps: list[dict[str, Any]] = []

    def step(name: str, fn: Callable[[], Any], fixed: bool = False, note: str = "", fixed_part_s: float = 0.0) -> Any:
        """Time ``fn``; ``fixed_part_s`` of it (a model load inside the step) is not scaled by the projection."""
        seconds, result = _time(fn)
        variable = max(0.0, seconds - fixed_part_s)
        projected = seconds if fixed else fixed_part_s + variable * scale
        steps.append({"step": name, "seconds": round(seconds, 3),
                      "per_rollout_s": None if fixed else round(variable / n_rollouts, 5),
                      "projected_s": round(projected, 1),
                      "scaling": "fixed" if fixed else ("linear in rollouts" + (
                          f" (+{fixed_part_s:.1f} s fixed model load)" if fixed_part_s else "")),
                      "note": note})
        log(f"  {name}: {seconds:.2f} s")
        return result

    spec = ModelSpec(model_id=model_id, dtype="float32", device="cpu")
    gen_config = GenerateConfig(run_dir=run_dir, model_id=model_id, batch_size=options.batch_size,
                                max_new_tokens=max_new_tokens, temperature=0.7)
    step("rollouts", lambda: make_rollouts(RolloutsConfig(run_dir=run_dir, roles=tuple(characters),
                                                          question_count=n_questions, prompt_count=n_prompts)))
    # run_generate loads its own plain HF model (as `python -m pipeline run` does): time one load apart, so
    # the projection scales only the generation itself.
    load_hf_model(spec)  # first load of the process: one-off imports, not part of the estimate
    load_s, _ = _time(lambda: load_hf_model(spec))
    log(f"  (plain HF model load, inside generate: {load_s:.2f} s)")
    gen = step("generate (transformers, CPU; incl. model load)", lambda: run_generate(gen_config),
               fixed_part_s=load_s)
    model = step("load model (extract: TL bridge)", lambda: load_model(spec), fixed=True)
    step("extract (all layers, mean)", lambda: run_extract(
        ExtractConfig(run_dir=run_dir, model_id=model_id, batch_size=options.batch_size), model=model))
    del model
    with stub_judge_server() as base_url:
        llm = LLMConfig(provider="openai-compatible", model="stub-judge", base_url=base_url, api_key="stub",
                        max_concurrency=16, max_tokens=16)
        step("judge (local stub API)", lambda: judge_run(run_dir, JudgeConfig(llm=llm)),
             note="pipeline overhead only: no API latency, rate limit or price")
    step("vectors", lambda: run_vectors(VectorsConfig(run_dir=run_dir)))
    step("axis", lambda: run_axis(AxisConfig(run_dir=run_dir)))

    n_tokens = None
    try:
        from pipeline.store import read_responses

        n_tokens = int(read_responses(run_dir)["n_tokens"].sum())
    except Exception:  # noqa: BLE001 - informative only
        pass
    total = sum(s["seconds"] for s in steps)
    projected = sum(s["projected_s"] for s in steps)
    gpu = gpu_row(run_dir, options.model_id, max_new_tokens, options.batch_size, n_rollouts, n_full)
    rows = [[s["step"], s["seconds"], s["per_rollout_s"], s["projected_s"] / 3600, s["scaling"]] for s in steps]
    rows.append(["total (CPU)", total, None, projected / 3600, ""])
    rows.append([gpu["step"], gpu["seconds"], None, gpu["projected_s"] / 3600 if gpu["projected_s"] else None,
                 gpu["status"]])
    log("")
    log(format_table(["step", "seconds", "s / rollout", f"projected h ({n_full} rollouts)", "scaling"], rows))
    log(f"\n{n_rollouts} rollouts, {n_tokens} generated tokens; generate finish reasons {gen.finish_reasons}")
    if options.quick:
        log("QUICK run: tiny shape and max_new_tokens; the projection is a smoke test, not an estimate")
    payload = {
        "machine": machine,
        "settings": {"model": model_id, "device": "cpu", "dtype": "float32", "roles": ["default", *characters],
                     "prompts": n_prompts, "questions": n_questions, "rollouts": n_rollouts,
                     "max_new_tokens": max_new_tokens, "batch_size": options.batch_size, "temperature": 0.7,
                     "full_run": {"roles": FULL_ROLES, "prompts": FULL_PROMPTS, "questions": FULL_QUESTIONS,
                                  "rollouts": n_full},
                     "representative": not options.quick, "run_dir": str(run_dir)},
        "generated_tokens": n_tokens,
        "finish_reasons": gen.finish_reasons,
        "steps": steps,
        "total_s": round(total, 2),
        "ratios": {"projected_full_over_measured": round(scale, 2)},
        "projected_total_s": round(projected, 1),
        "projected_total_h": round(projected / 3600, 2),
        "gpu": gpu,
    }
    path = write_result(options, "pipeline-cost", payload)
    log(f"wrote {path}")
    return payload
