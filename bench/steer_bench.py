"""``steer``: tokens/s of capped chat generation vs plain HF ``generate`` with KV cache.

Measured side: ``steering.generation.stream_generate`` (which decodes on the loaded model's
weight-sharing plain twin, ``LoadedModel.decoder``) with an Assistant-axis cap (``steering.interventions.cap_on_axis``) at 8 layers. The axis is random
(seeded, ``[n_layers, d_model]``) and the floor is 0 at every capped layer, so the cap moves
about half of the positions; the clamp costs the same whether or not it is active.

Baseline: a separately loaded plain HF model (sdpa attention, no bridge, no hooks), ``generate``
with KV cache. Same chat-templated prompt, same number of new tokens, greedy. Stop tokens are
switched off on every side (``eos_token_id=None`` for ``generate``; ``stop_token_ids`` in
``steering.generation`` patched to return nothing while measuring), so every variant generates
exactly the same number of tokens. Prefill is included in every timing.

Also measured, vs plain HF: ``stream_generate`` unsteered; ``stream_generate`` capped and unsteered
decoding through the TransformerLens bridge itself (:func:`through_bridge`, the code before the
twin); HF ``generate`` on the bridged model (``model.hf_model.generate``), unsteered.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Iterator

import torch

from bench.common import (Options, apply_threads, capping_layers, format_table, interleave, machine_info,
                          per_round_ratios, profile_call, ratio, write_result)
from bench.models import load_pipeline_model, load_plain_hf
from pipeline.role_schema import shipped_role_set
from steering import generation as generation_module
from steering.generation import GenerationSettings, stream_generate
from steering.interventions import InterventionPlan, cap_on_axis
from steering.plain_decoder import BridgeDecoder

TARGET_STEERED_VS_PLAIN = 0.8


def defaults(options: Options) -> tuple[int, int]:
    """(new tokens, rounds)."""
    return options.max_tokens or (16 if options.quick else 128), options.repeats or (2 if options.quick else 3)


@contextlib.contextmanager
def no_stop_tokens() -> Iterator[None]:
    """Make ``stream_generate`` run to ``max_new_tokens`` (it stops at ``stop_token_ids(...)``)."""
    original = generation_module.stop_token_ids
    generation_module.stop_token_ids = lambda hf_model, tokenizer: set()
    try:
        yield
    finally:
        generation_module.stop_token_ids = original


def benchmark_prompt(model) -> tuple[str, str, list[int]]:
    role_set = shipped_role_set()
    role = role_set.roles.get("pirate") or next(iter(role_set.roles.values()))
    system = role.instructions[0].replace("{model_name}", model.display_name)
    question = role_set.questions[0].question if role_set.questions else "Who are you?"
    return system, question, model.chat.prompt_ids(system, question)


def hf_generate(hf_model, prompt_ids: list[int], new_tokens: int, pad_id: int) -> list[int]:
    config = copy.deepcopy(hf_model.generation_config)
    config.eos_token_id = None
    config.pad_token_id = pad_id
    config.do_sample = False
    config.max_new_tokens = new_tokens
    config.min_new_tokens = None
    for name in ("temperature", "top_p", "top_k"):
        if hasattr(config, name):
            setattr(config, name, None)
    ids = torch.tensor([prompt_ids], device=next(hf_model.parameters()).device)
    with torch.no_grad():
        out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt_ids):].tolist()


def stream_tokens(model, prompt_ids: list[int], plan, new_tokens: int) -> list[int]:
    with no_stop_tokens():
        return [step.token_id for step in
                stream_generate(model, prompt_ids, plan, GenerationSettings(max_new_tokens=new_tokens))]


@torch.no_grad()
def manual_decode(hf_model, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """stream_generate's loop (greedy, KV cache) on a plain HF model, without hooks or text decoding."""
    ids = torch.tensor([prompt_ids])
    out = hf_model(input_ids=ids, use_cache=True)
    past, logits, tokens = out.past_key_values, out.logits[0, -1], []
    for _ in range(new_tokens):
        token = int(logits.argmax())
        tokens.append(token)
        out = hf_model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
    return tokens


def through_bridge(model):
    """``model`` decoding through the TransformerLens bridge itself: the code before the plain twin."""
    return dataclasses.replace(model, decoder=BridgeDecoder(model=model.hf_model, bridge=model.bridge))


def run(options: Options, log=print) -> dict[str, Any]:
    threads = apply_threads(options)
    machine = machine_info()
    new_tokens, rounds = defaults(options)
    log(f"steer: loading models ({options.model_id or 'default SmolLM2-135M-Instruct'}, fp32, cpu, "
        f"{threads} torch threads)")
    model = load_pipeline_model(options.model_id)
    plain, _ = load_plain_hf(options.model_id, "sdpa")
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    system, question, prompt_ids = benchmark_prompt(model)
    layers = capping_layers(model.n_layers, 8)
    axis = torch.randn(model.n_layers, model.d_model, generator=torch.Generator().manual_seed(0))
    plan = InterventionPlan(cap_on_axis(axis, {layer: 0.0 for layer in layers}, layers))
    log(f"steer: prompt of {len(prompt_ids)} tokens, {new_tokens} new tokens, greedy, cap at layers "
        f"{layers[0]}..{layers[-1]} (random axis, floor 0), {rounds} rounds")

    bridge_model = through_bridge(model)
    names = {"plain": "plain HF generate (sdpa, KV cache)",
             "capped": f"stream_generate + cap at {len(layers)} layers",
             "stream": "stream_generate, unsteered",
             "capped_bridge": "stream_generate + cap, decoding through the TL bridge",
             "stream_bridge": "stream_generate, unsteered, through the TL bridge",
             "bridged": "HF generate on the TL-bridged model, unsteered"}
    variants = {
        names["plain"]: lambda n: hf_generate(plain, prompt_ids, n, pad),
        names["capped"]: lambda n: stream_tokens(model, prompt_ids, plan, n),
        names["stream"]: lambda n: stream_tokens(model, prompt_ids, None, n),
        names["capped_bridge"]: lambda n: stream_tokens(bridge_model, prompt_ids, plan, n),
        names["stream_bridge"]: lambda n: stream_tokens(bridge_model, prompt_ids, None, n),
        names["bridged"]: lambda n: hf_generate(model.hf_model, prompt_ids, n, pad),
    }
    if options.ablations:
        eager, _ = load_plain_hf(options.model_id, "eager")
        variants.update({
            "ablation: plain HF generate, eager attention": lambda n: hf_generate(eager, prompt_ids, n, pad),
            "ablation: plain HF, stream_generate's loop (no hooks)": lambda n: manual_decode(plain, prompt_ids, n),
        })
    for fn in variants.values():  # warm-up
        fn(2)
    measurements, results = interleave(
        {name: (lambda fn=fn: (new_tokens, fn(new_tokens))) for name, fn in variants.items()}, rounds, log=log)
    base = measurements[names["plain"]]
    counts = {name: len(tokens) for name, tokens in results.items()}
    checks = {
        "tokens_generated": counts,
        "all_generated_max_tokens": all(c == new_tokens for c in counts.values()),
        # Greedy, unsteered: the bridge (eager attention) and plain HF (sdpa) should agree token for token
        # (a late divergence is possible from float rounding; the count is what the rates rely on).
        "unsteered_same_tokens_as_plain": results[names["stream"]] == results[names["plain"]],
        "bridged_generate_same_tokens_as_plain": results[names["bridged"]] == results[names["plain"]],
        "capped_differs_from_unsteered": results[names["capped"]] != results[names["stream"]],
        # The plain twin and the bridge run the same plan on the same weights.
        "capped_same_tokens_as_through_bridge": results[names["capped"]] == results[names["capped_bridge"]],
        "unsteered_same_tokens_as_through_bridge": results[names["stream"]] == results[names["stream_bridge"]],
    }
    ratios = {
        "steered_vs_plain": ratio(measurements[names["capped"]], base),
        "stream_unsteered_vs_plain": ratio(measurements[names["stream"]], base),
        "tl_steered_vs_plain (decoding through the bridge)": ratio(measurements[names["capped_bridge"]], base),
        "tl_stream_unsteered_vs_plain": ratio(measurements[names["stream_bridge"]], base),
        "tl_generate_unsteered_vs_plain": ratio(measurements[names["bridged"]], base),
        "cap_overhead (capped vs unsteered stream)": ratio(measurements[names["capped"]], measurements[names["stream"]]),
        "per_round_steered_vs_plain": per_round_ratios(measurements[names["capped"]], base),
    }
    for name in variants:
        if name.startswith("ablation"):
            ratios[f"{name} vs plain"] = ratio(measurements[name], base)
    targets = {"steered_vs_plain >= 0.8": ratios["steered_vs_plain"] >= TARGET_STEERED_VS_PLAIN}

    rows = [[name, m.best, m.rate, ratio(m, base)] for name, m in measurements.items()]
    log("")
    log(format_table(["variant", "best s", "tokens/s", "x plain"], rows))
    log(f"\nsteered (cap at {len(layers)} layers) vs plain HF: {ratios['steered_vs_plain']:.2f}x "
        f"(target >= {TARGET_STEERED_VS_PLAIN}: {'met' if targets['steered_vs_plain >= 0.8'] else 'MISSED'}); "
        f"through the TL bridge: capped {ratios['tl_steered_vs_plain (decoding through the bridge)']:.2f}x, "
        f"unsteered stream_generate {ratios['tl_stream_unsteered_vs_plain']:.2f}x, "
        f"HF generate {ratios['tl_generate_unsteered_vs_plain']:.2f}x")
    log(f"checks: every variant generated {new_tokens} tokens: {checks['all_generated_max_tokens']}; "
        f"unsteered greedy tokens equal plain HF: {checks['unsteered_same_tokens_as_plain']}; "
        f"capped tokens equal decoding through the bridge: {checks['capped_same_tokens_as_through_bridge']}")

    payload: dict[str, Any] = {
        "machine": machine,
        "settings": {"model": options.model_id or "default (SmolLM2-135M-Instruct, embedded)", "dtype": "float32",
                     "device": "cpu", "prompt_tokens": len(prompt_ids), "new_tokens": new_tokens, "greedy": True,
                     "cap_layers": layers, "axis": "random (seed 0), floor 0", "rounds": rounds,
                     "system_prompt": system, "question": question},
        "measurements": {name: m.as_dict() for name, m in measurements.items()},
        "ratios": ratios,
        "checks": checks,
        "targets": targets,
    }
    if options.profile:
        payload["profile"] = {
            "capped stream_generate": profile_call(lambda: stream_tokens(model, prompt_ids, plan, new_tokens), top=30),
            "plain HF generate": profile_call(lambda: hf_generate(plain, prompt_ids, new_tokens, pad), top=30),
        }
        for name, lines in payload["profile"].items():
            log(f"\nprofile ({name}, {new_tokens} tokens):\n" + "\n".join(lines))
    path = write_result(options, "steer", payload)
    log(f"wrote {path}")
    return payload
