"""``extract``: response-token throughput of the pipeline's extraction vs a straightforward HF baseline.

Pipeline side (what ``pipeline.extract.run_extract`` does per batch, minus the disk writes):
``spans_for_responses`` -> ``make_batches`` (sorted by length) -> ``extract_batch`` on the
TransformerLens-bridged model (per-layer mean inside the hook, forward stopped after the last
requested layer).

Baseline (the approach of the paper's scripts): a separately loaded ``AutoModelForCausalLM``
(sdpa attention) with ``register_forward_hook`` on every decoder layer keeping each layer's
output, right-padded batches of the same size in input order, a full forward pass (logits
included), then the mean over each response's tokens for the requested layers. Both sides
tokenize with ``ChatFormat.response_span`` inside the timed region, and use the same
conversations (``bench.corpus``), batch size and layers. The baseline's cost does not depend on
the layers requested (it hooks and keeps every layer), so it runs once, with every layer, and the
8-layer comparison uses the same run.
"""
from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator, Sequence

import torch

from bench.common import (Options, apply_threads, capping_layers, format_table, interleave_steps, machine_info,
                          per_round_ratios, profile_call, ratio, run_steps, write_result)
from bench.corpus import synthesize_responses
from bench.models import load_pipeline_model, load_plain_hf
from pipeline.extract import SpanItem, extract_batch, make_batches, spans_for_responses
from steering.chat_format import ChatFormat

TARGET_SPEEDUP = 1.5
MAX_REL_DIFF = 1e-4
PIPELINE_MAX_BATCH_TOKENS = 16384  # ExtractConfig's default


def defaults(options: Options) -> tuple[int, int, int]:
    """(n_responses, max response tokens, rounds)."""
    n = options.n_responses or (24 if options.quick else 200)
    max_tokens = options.max_tokens or (64 if options.quick else 256)
    rounds = options.repeats or 1
    return n, max_tokens, rounds


# ---------------------------------------------------------------- the two sides

def pipeline_extract(model, frame, layers: Sequence[int], batch_size: int,
                     max_batch_tokens: int = PIPELINE_MAX_BATCH_TOKENS, sort: bool = True) -> tuple[int, dict]:
    """The pipeline's extraction of every response of ``frame``; (response tokens, {rollout_id: [L, D]})."""
    return run_steps(pipeline_steps(model, frame, layers, batch_size, max_batch_tokens, sort))


def baseline_extract(hf_model, tokenizer, frame, layers: Sequence[int], batch_size: int, *,
                     sort: bool = False, stop_early: bool = False) -> tuple[int, dict]:
    """The baseline (see :func:`baseline_steps`) run to the end."""
    return run_steps(baseline_steps(hf_model, tokenizer, frame, layers, batch_size, sort=sort, stop_early=stop_early))


@contextlib.contextmanager
def stop_before_unembed(model) -> Iterator[None]:
    """The proposed fix of ``extract_batch``, applied from outside: end the forward after the last block.

    ``extract_batch`` passes ``stop_at_layer=max(layers) + 1``; when the last layer is requested that is
    ``n_layers``, which the bridge never stops at, so the final norm and the unembedding (logits
    ``[B, T, vocab]``) are computed and thrown away. A hook on ``ln_final.hook_in`` raising the bridge's
    ``StopAtLayerException`` (which ``run_with_hooks`` catches) ends the pass where the fix would.
    """
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    def stop(x, hook):
        raise StopAtLayerException(x)

    with model.bridge.hooks(fwd_hooks=[("ln_final.hook_in", stop)]):
        yield


def pipeline_steps(model, frame, layers: Sequence[int], batch_size: int,
                   max_batch_tokens: int = PIPELINE_MAX_BATCH_TOKENS, sort: bool = True,
                   fixed: bool = False) -> Iterator[None]:
    """:func:`pipeline_extract` as a generator that yields after tokenizing and after each batch.

    ``fixed``: with :func:`stop_before_unembed` around each batch (ablation: the proposed fix).
    """
    items, _empty = spans_for_responses(model, frame)
    if sort:
        batches = make_batches(items, batch_size, max_batch_tokens)
    else:  # ablation: the same code on input-order batches
        batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    yield
    out: dict[str, torch.Tensor] = {}
    for batch in batches:
        with stop_before_unembed(model) if fixed else contextlib.nullcontext():
            tensors = extract_batch(model, batch, list(layers), "mean")
        for item, tensor in zip(batch, tensors):
            out[item.rollout_id] = tensor
        yield
    return sum(item.end - item.start for item in items), out


class _StopForward(Exception):
    pass


def baseline_steps(hf_model, tokenizer, frame, layers: Sequence[int], batch_size: int, *,
                   sort: bool = False, stop_early: bool = False) -> Iterator[None]:
    """Forward hooks on every decoder layer, right-padded input-order batches, mean over the response.

    ``sort`` and ``stop_early`` are ablations (sorted batches; raise out of the forward after the
    last requested layer, skipping later layers and the logits), not part of the baseline.
    """
    chat = ChatFormat(tokenizer)
    items = []
    for row in frame.to_dict("records"):
        span = chat.response_span(json.loads(row["conversation"]))
        if span.length:
            items.append(SpanItem(row["rollout_id"], row["role"], span.input_ids, span.start, span.end))
    if sort:
        batches = make_batches(items, batch_size, PIPELINE_MAX_BATCH_TOKENS)
    else:
        batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    decoder_layers = hf_model.model.layers
    last = max(layers)
    captured: dict[int, torch.Tensor] = {}

    def make_hook(index: int):
        def hook(module, inputs, output):
            captured[index] = output[0] if isinstance(output, tuple) else output
            if stop_early and index == last:
                raise _StopForward
        return hook

    yield
    out: dict[str, torch.Tensor] = {}
    for batch in batches:
        width = max(len(item.input_ids) for item in batch)
        ids = torch.full((len(batch), width), int(pad), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            ids[row, : len(item.input_ids)] = torch.tensor(item.input_ids)
            mask[row, : len(item.input_ids)] = 1
        # Hooks live for one forward only: interleaved variants share the model between steps.
        handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(decoder_layers)]
        try:
            with torch.no_grad():
                hf_model(input_ids=ids, attention_mask=mask)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        for row, item in enumerate(batch):
            out[item.rollout_id] = torch.stack(
                [captured[layer][row, item.start:item.end].to(torch.float32).mean(0) for layer in layers])
        captured.clear()
        yield
    return sum(item.end - item.start for item in items), out


def token_counts(model, frame, batch_size: int) -> dict[str, int]:
    """Response, input and padded token counts (sorted batches vs input-order batches)."""
    items, _ = spans_for_responses(model, frame)
    sorted_batches = make_batches(items, batch_size, PIPELINE_MAX_BATCH_TOKENS)
    ordered = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]

    def padded(batches):
        return sum(len(b) * max(len(i.input_ids) for i in b) for b in batches)

    return {"response_tokens": sum(i.end - i.start for i in items),
            "input_tokens": sum(len(i.input_ids) for i in items),
            "padded_tokens_sorted_batches": padded(sorted_batches),
            "padded_tokens_input_order_batches": padded(ordered)}


def max_relative_difference(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                            layer_index: Sequence[int] | None = None) -> float:
    """Max over responses and layers of ``max|a - b| / max|b|`` (per layer vector).

    ``layer_index`` selects rows of the reference (when ``ours`` holds a subset of its layers).
    """
    if set(ours) != set(reference):
        return float("inf")
    worst = 0.0
    for key, ref in reference.items():
        if layer_index is not None:
            ref = ref[list(layer_index)]
        mine = ours[key]
        if mine.shape != ref.shape:
            return float("inf")
        scale = ref.abs().amax(dim=-1).clamp_min(1e-12)
        worst = max(worst, float(((mine - ref).abs().amax(dim=-1) / scale).max()))
    return worst


# ---------------------------------------------------------------- the benchmark

def run(options: Options, log=print) -> dict[str, Any]:
    threads = apply_threads(options)
    machine = machine_info()
    n, max_tokens, rounds = defaults(options)
    log(f"extract: loading models ({options.model_id or 'default SmolLM2-135M-Instruct'}, fp32, cpu, "
        f"{threads} torch threads)")
    model = load_pipeline_model(options.model_id)
    hf_model, hf_tokenizer = load_plain_hf(options.model_id)
    frame = synthesize_responses(model.tokenizer, n, max_tokens=max_tokens, model_name=model.display_name)
    all_layers = list(range(model.n_layers))
    eight = capping_layers(model.n_layers, 8)
    bs = options.batch_size
    log(f"extract: {n} synthesized responses (<= {max_tokens} tokens), batch size {bs}, "
        f"layers: all {model.n_layers} and {len(eight)} ({eight[0]}..{eight[-1]}), {rounds} round(s)")

    variants = {  # each: frame -> step generator (yields after tokenizing and after every batch)
        "baseline (HF hooks, all layers kept)": lambda f: baseline_steps(hf_model, hf_tokenizer, f, all_layers, bs),
        "pipeline, all layers": lambda f: pipeline_steps(model, f, all_layers, bs),
        f"pipeline, {len(eight)} layers": lambda f: pipeline_steps(model, f, eight, bs),
    }
    if options.ablations:
        variants.update({
            "ablation: pipeline, all layers, no logits (proposed fix)":
                lambda f: pipeline_steps(model, f, all_layers, bs, fixed=True),
            "ablation: pipeline, all layers, input-order batches":
                lambda f: pipeline_steps(model, f, all_layers, bs, sort=False),
            "ablation: baseline, sorted batches":
                lambda f: baseline_steps(hf_model, hf_tokenizer, f, all_layers, bs, sort=True),
            "ablation: baseline, sorted + stop after last layer (no logits)":
                lambda f: baseline_steps(hf_model, hf_tokenizer, f, all_layers, bs, sort=True, stop_early=True),
            f"ablation: baseline, sorted + stop after layer {eight[-1]}":
                lambda f: baseline_steps(hf_model, hf_tokenizer, f, eight, bs, sort=True, stop_early=True),
        })
    warm = frame.iloc[: min(len(frame), bs)]
    for fn in variants.values():  # first-call costs (allocator, lazy init) out of the timed rounds
        run_steps(fn(warm))
    # The variants take turns batch by batch, so load spikes of a shared machine hit all of them alike.
    measurements, results = interleave_steps({name: (lambda fn=fn: fn(frame)) for name, fn in variants.items()},
                                             rounds, log=log)
    names = list(variants)
    base, p_all, p_eight = (measurements[k] for k in names[:3])

    diff_all = max_relative_difference(results[names[1]], results[names[0]])
    diff_eight = max_relative_difference(results[names[2]], results[names[0]], layer_index=eight)
    checks = {"max_rel_diff_all_layers": diff_all, "max_rel_diff_8_layers": diff_eight,
              "tolerance": MAX_REL_DIFF, "equivalent": bool(diff_all < MAX_REL_DIFF and diff_eight < MAX_REL_DIFF)}
    for name in names[3:]:
        if name.startswith("ablation: baseline") and name.endswith(f"layer {eight[-1]}"):
            checks[f"max_rel_diff ({name})"] = max_relative_difference(results[name], results[names[0]], eight)
        else:
            checks[f"max_rel_diff ({name})"] = max_relative_difference(results[name], results[names[0]])
    ratios = {
        "speedup_all_layers": ratio(p_all, base),
        "speedup_8_layers": ratio(p_eight, base),
        "pipeline_8_vs_all_layers": ratio(p_eight, p_all),
        "per_round_speedup_all_layers": per_round_ratios(p_all, base),
        "per_round_speedup_8_layers": per_round_ratios(p_eight, base),
    }
    for name in names[3:]:
        ratios[f"{name} vs baseline"] = ratio(measurements[name], base)
    targets = {"speedup_all_layers >= 1.5": ratios["speedup_all_layers"] >= TARGET_SPEEDUP,
               "speedup_8_layers >= 1.5": ratios["speedup_8_layers"] >= TARGET_SPEEDUP}

    rows = [[name, m.units, m.best, m.rate, ratio(m, base)] for name, m in measurements.items()]
    log("")
    log(format_table(["variant", "resp tokens", "best s", "tokens/s", "x baseline"], rows))
    log(f"\nequivalence (fp32): max relative difference vs baseline: all layers {diff_all:.2e}, "
        f"{len(eight)} layers {diff_eight:.2e} (tolerance {MAX_REL_DIFF:.0e}) -> "
        f"{'PASS' if checks['equivalent'] else 'FAIL'}")
    log(f"pipeline vs baseline: {ratios['speedup_all_layers']:.2f}x (all layers), "
        f"{ratios['speedup_8_layers']:.2f}x ({len(eight)} layers); pipeline {len(eight)} layers vs all: "
        f"{ratios['pipeline_8_vs_all_layers']:.2f}x; target >= {TARGET_SPEEDUP}x: "
        f"{'met' if all(targets.values()) else 'MISSED'}")

    payload: dict[str, Any] = {
        "machine": machine,
        "settings": {"model": options.model_id or "default (SmolLM2-135M-Instruct, embedded)", "dtype": "float32",
                     "device": "cpu", "n_responses": n, "max_response_tokens": max_tokens, "batch_size": bs,
                     "pipeline_max_batch_tokens": PIPELINE_MAX_BATCH_TOKENS, "rounds": rounds,
                     "n_layers": model.n_layers, "layers_8": eight, "aggregation": "mean",
                     "corpus": "synthesized (bench.corpus): shipped role prompts + questions, varied lengths",
                     **token_counts(model, frame, bs)},
        "measurements": {name: m.as_dict() for name, m in measurements.items()},
        "ratios": ratios,
        "checks": checks,
        "targets": targets,
    }
    if options.profile:
        subset = frame.iloc[: min(len(frame), 40)]
        payload["profile"] = {
            "pipeline, all layers": profile_call(lambda: pipeline_extract(model, subset, all_layers, bs)),
            "baseline": profile_call(lambda: baseline_extract(hf_model, hf_tokenizer, subset, all_layers, bs)),
        }
        for name, lines in payload["profile"].items():
            log(f"\nprofile ({name}, {len(subset)} responses):\n" + "\n".join(lines))
    path = write_result(options, "extract", payload)
    log(f"wrote {path}")
    return payload
