"""Loading the two sides of each comparison: the pipeline's model and a plain HF baseline."""
from __future__ import annotations

import torch

from steering.models import DEFAULT_MODEL_ID, LoadedModel, ModelSpec, load_model, resolve_model_source


def spec_for(model_id: str | None) -> ModelSpec:
    return ModelSpec(model_id=model_id or DEFAULT_MODEL_ID, dtype="float32", device="cpu")


def load_pipeline_model(model_id: str | None) -> LoadedModel:
    """The project's model: HF weights inside a TransformerLens bridge (``steering.models.load_model``)."""
    return load_model(spec_for(model_id))


def load_plain_hf(model_id: str | None, attn_implementation: str = "sdpa"):
    """A separately loaded plain HF model + tokenizer from the same checkpoint (no bridge, no hooks)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model_source(spec_for(model_id))
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
    return model.eval(), tokenizer


def parameter_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, tied tensors counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = tensor.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total
