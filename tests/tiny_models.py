"""Tiny random-weight chat models built offline for unit tests (seconds, no downloads)."""
from __future__ import annotations

from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A Gemma-2-like template: no system role (raises), turns closed by <end_of_turn>.
NO_SYSTEM_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

_CORPUS = [
    "You are a pirate. Who are you? Arr, I be a pirate of the seven seas!",
    "You are an AI assistant. How can I help you today? I am a helpful assistant.",
    "The ghost drifts through the old house at midnight, whispering secrets.",
    "What do you value most? I value honesty, curiosity and kindness.",
    "Describe your morning routine. I wake early, make tea and read the news.",
    "0123456789 .,;:!?'\"()[]{}-_/\\ abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def build_tokenizer(template: str = CHATML_TEMPLATE):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<pad>"]
    raw = ByteLevelBPETokenizer()
    raw.train_from_iterator(_CORPUS * 4, vocab_size=400, min_frequency=1, special_tokens=specials, show_progress=False)
    chatml = template == CHATML_TEMPLATE
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw._tokenizer,
        bos_token="<|im_start|>" if chatml else "<bos>",
        eos_token="<|im_end|>" if chatml else "<end_of_turn>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = template
    return tokenizer


def build_tiny_model(directory: Path, template: str = CHATML_TEMPLATE, seed: int = 0, n_layers: int = 4) -> Path:
    """Save a random Llama-architecture chat model + tokenizer to ``directory`` and return it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(template)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Larger-than-default weights so random activations and projections are well spread.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
