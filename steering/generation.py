"""Token-by-token generation with interventions and a live projection monitor.

A plain KV-cached decode loop on ``LoadedModel.decoder``: the plain HF twin of the bridged model,
sharing its weights (``steering.plain_decoder``), with the plan's bridge-style hooks
(``blocks.{i}.hook_out``) applied by :func:`steering.interventions.applied` at every step. Decoding
through the TransformerLens bridge itself gives the same tokens at about 0.75x the speed (see
BENCHMARKS.md). Each yielded :class:`TokenStep` carries the projection of that token's own
activation (after the interventions) onto the monitored axis at every monitored layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor

from steering.axis_math import unit
from steering.interventions import InterventionPlan, applied, block_output_hook_name
from steering.models import LoadedModel


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class TokenStep:
    token_id: int
    text: str  # the response decoded so far
    projections: dict[int, float] = field(default_factory=dict)  # layer -> projection on the unit axis


@dataclass(frozen=True)
class Monitor:
    """Record the projection onto ``axis[layer]`` at each of ``layers``. ``axis``: ``[L, D]``."""

    axis: Tensor
    layers: Sequence[int]


def _sample(logits: Tensor, settings: GenerationSettings, generator: torch.Generator | None) -> int:
    if settings.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < settings.top_p
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def stop_token_ids(hf_model, tokenizer) -> set[int]:
    """Token ids that end a reply: the generation config's eos ids and the tokenizer's eos."""
    ids: set[int] = set()
    eos = hf_model.generation_config.eos_token_id
    for value in (eos if isinstance(eos, (list, tuple)) else [eos]):
        if value is not None:
            ids.add(int(value))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


@torch.no_grad()
def stream_generate(model: LoadedModel, prompt_ids: Sequence[int], plan: InterventionPlan | None = None,
                    settings: GenerationSettings = GenerationSettings(),
                    monitor: Monitor | None = None) -> Iterator[TokenStep]:
    """Generate from ``prompt_ids`` (already chat-templated), yielding one :class:`TokenStep` per token.

    The stop token itself is not yielded. Hooks are removed when the generator finishes or is closed.
    """
    if plan is not None:
        plan.validate(model.n_layers, model.d_model)
    device = model.device
    generator = None
    if settings.seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    stops = stop_token_ids(model.decoder.model, model.tokenizer)
    recorded: dict[int, Tensor] = {}  # layer -> 0-dim projection of the latest position
    monitor_hooks = []
    if monitor is not None:
        directions = {layer: unit(monitor.axis[layer]).to(device) for layer in monitor.layers}

        def make_hook(layer: int):
            def record(x: Tensor, hook) -> Tensor:
                recorded[layer] = x[0, -1].to(torch.float32) @ directions[layer]  # no device sync here
                return x
            return record

        monitor_hooks = [(block_output_hook_name(layer), make_hook(layer)) for layer in monitor.layers]

    ids = torch.tensor([list(prompt_ids)], device=device)
    generated: list[int] = []
    decoder = model.decoder.model
    with applied(model.decoder, plan, prompt_length=len(prompt_ids), extra_hooks=monitor_hooks):
        out = decoder(input_ids=ids, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1]
        for _ in range(settings.max_new_tokens):
            token = _sample(logits, settings, generator)
            if token in stops:
                return
            generated.append(token)
            # Feed the token: its own activation (and its projection) and the next logits.
            out = decoder(input_ids=torch.tensor([[token]], device=device), past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1]
            text = model.tokenizer.decode(generated, skip_special_tokens=True)
            projections = {}
            if recorded:
                layers = list(recorded)
                projections = dict(zip(layers, torch.stack([recorded[l] for l in layers]).tolist()))  # one sync
            yield TokenStep(token_id=token, text=text, projections=projections)


def generate_text(model: LoadedModel, prompt_ids: Sequence[int], plan: InterventionPlan | None = None,
                  settings: GenerationSettings = GenerationSettings()) -> tuple[list[int], str]:
    """Run :func:`stream_generate` to the end; returns (generated ids, text)."""
    steps = list(stream_generate(model, prompt_ids, plan, settings))
    return [s.token_id for s in steps], (steps[-1].text if steps else "")
