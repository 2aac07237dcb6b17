"""``memory``: peak RSS of loading + extracting, relative to the model's parameter bytes.

Each measurement runs in a fresh subprocess (``python -m bench.memory_bench <case> ...``) that
reports its own RSS high-water mark (``VmHWM`` in ``/proc/self/status``; ``ru_maxrss`` elsewhere), so
one case cannot inherit another's peak. Cases:

* ``imports``          the libraries a loading process imports (torch, transformers, TransformerLens)
* ``pipeline-load``    ``steering.models.load_model`` (HF weights inside the TransformerLens bridge)
* ``pipeline-extract`` load + the pipeline's extraction of every response, all layers
* ``pipeline-extract-8`` load + the pipeline's extraction, 8 layers
* ``hf-load``          a plain ``AutoModelForCausalLM`` (sdpa)
* ``hf-extract``       plain HF load + the forward-hook baseline of the ``extract`` benchmark

After every load each parameter is read once (weights mmapped from safetensors count in RSS only
once touched), so the load cases compare. Figures: ``peak / parameter bytes`` and ``(peak - imports peak) / parameter bytes`` (what the
model and the work add on top of the interpreter and libraries).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from typing import Any

from bench.common import ROOT, Options, format_table, machine_info, write_result

CASES = ("imports", "pipeline-load", "pipeline-extract", "pipeline-extract-8", "hf-load", "hf-extract")


def defaults(options: Options) -> tuple[int, int]:
    return options.n_responses or (16 if options.quick else 200), options.max_tokens or (64 if options.quick else 256)


def _peak_bytes() -> int:
    """This process's RSS high-water mark.

    Linux: ``VmHWM`` of ``/proc/self/status``. Not ``ru_maxrss``: that survives ``execve`` and starts at the
    RSS of the forked parent (a benchmark process holding two models would set every case's floor).
    """
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)  # KiB on Linux, bytes on macOS


def _current_rss() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return None


def touch_weights(model) -> None:
    """Read every parameter once: safetensors weights may be mmapped lazily and only count once touched."""
    import torch

    with torch.no_grad():
        for tensor in model.parameters():
            tensor.sum()


def child(case: str, model_id: str | None, n: int, max_tokens: int, batch_size: int, threads: int | None) -> dict:
    """One measurement, in this (fresh) process."""
    import torch
    from transformer_lens.model_bridge import TransformerBridge  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from bench.common import capping_layers
    from bench.corpus import synthesize_responses
    from bench.extract_bench import baseline_extract, pipeline_extract
    from bench.models import load_pipeline_model, load_plain_hf, parameter_bytes

    if threads:
        torch.set_num_threads(threads)
    out: dict[str, Any] = {"case": case}
    if case.startswith("pipeline"):
        model = load_pipeline_model(model_id)
        touch_weights(model.hf_model)
        out["param_bytes"] = parameter_bytes(model.hf_model)
        out["rss_after_load"] = _current_rss()
        if case != "pipeline-load":
            frame = synthesize_responses(model.tokenizer, n, max_tokens=max_tokens, model_name=model.display_name)
            layers = capping_layers(model.n_layers, 8) if case.endswith("-8") else list(range(model.n_layers))
            out["response_tokens"], _ = pipeline_extract(model, frame, layers, batch_size)
    elif case.startswith("hf"):
        hf_model, tokenizer = load_plain_hf(model_id)
        touch_weights(hf_model)
        out["param_bytes"] = parameter_bytes(hf_model)
        out["rss_after_load"] = _current_rss()
        if case == "hf-extract":
            frame = synthesize_responses(tokenizer, n, max_tokens=max_tokens)
            layers = list(range(hf_model.config.num_hidden_layers))
            out["response_tokens"], _ = baseline_extract(hf_model, tokenizer, frame, layers, batch_size)
    elif case != "imports":
        raise ValueError(f"unknown case {case!r}")
    out["peak_rss"] = _peak_bytes()
    return out


def measure(case: str, options: Options, n: int, max_tokens: int) -> dict:
    cmd = [sys.executable, "-m", "bench.memory_bench", case, "--n", str(n), "--max-tokens", str(max_tokens),
           "--batch-size", str(options.batch_size)]
    if options.model_id:
        cmd += ["--model", options.model_id]
    if options.threads:
        cmd += ["--threads", str(options.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory case {case} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(options: Options, log=print) -> dict[str, Any]:
    from bench.models import spec_for
    from steering.models import resolve_model_source

    machine = machine_info()
    n, max_tokens = defaults(options)
    resolve_model_source(spec_for(options.model_id))  # export the embedded model now, not inside a measurement
    log(f"memory: {len(CASES)} subprocesses; extraction of {n} synthesized responses (<= {max_tokens} tokens), "
        f"batch size {options.batch_size}")
    cases: dict[str, dict] = {}
    for case in CASES:
        cases[case] = measure(case, options, n, max_tokens)
        log(f"  {case}: peak RSS {cases[case]['peak_rss'] / 2 ** 20:.0f} MiB")
    params = cases["pipeline-load"]["param_bytes"]
    imports = cases["imports"]["peak_rss"]
    rows, ratios = [], {}
    for case, data in cases.items():
        peak = data["peak_rss"]
        ratios[case] = {"peak_over_params": round(peak / params, 3),
                        "above_imports_over_params": round((peak - imports) / params, 3)}
        rows.append([case, peak / 2 ** 20, (peak - imports) / 2 ** 20, ratios[case]["peak_over_params"],
                     ratios[case]["above_imports_over_params"]])
    ratios["pipeline_extract_vs_hf_extract (above imports)"] = round(
        (cases["pipeline-extract"]["peak_rss"] - imports) / max(1, cases["hf-extract"]["peak_rss"] - imports), 3)
    log("")
    log(format_table(["case", "peak MiB", "above imports MiB", "peak / params", "(peak - imports) / params"], rows))
    log(f"\nparameter bytes: {params / 2 ** 20:.0f} MiB (fp32, tied weights once); pipeline extract peak above "
        f"imports is {ratios['pipeline_extract_vs_hf_extract (above imports)']:.2f}x the HF baseline's")
    payload = {
        "machine": machine,
        "settings": {"model": options.model_id or "default (SmolLM2-135M-Instruct, embedded)", "dtype": "float32",
                     "n_responses": n, "max_response_tokens": max_tokens, "batch_size": options.batch_size,
                     "measure": "VmHWM (peak RSS) of a fresh subprocess per case"},
        "param_bytes": params,
        "cases": cases,
        "ratios": ratios,
    }
    path = write_result(options, "memory", payload)
    log(f"wrote {path}")
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one memory measurement (used by `python -m bench memory`)")
    parser.add_argument("case", choices=CASES)
    parser.add_argument("--model", default=None)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    result = child(args.case, args.model, args.n, args.max_tokens, args.batch_size, args.threads)
    sys.stdout.flush()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
