"""The benchmark's responses: synthesized chat conversations of varied lengths (deterministic).

Why synthesized rather than generated: generating 200 responses with the default model costs
minutes on a small CPU and the token lengths would differ from one machine to the next; the
extraction cost depends only on the token ids and their lengths, not on who wrote the text.

Each conversation is ``[system, user, assistant]`` like the pipeline's rollouts: a system prompt
of a shipped role, one of the shipped extraction questions, and an assistant response made of
real English (the shipped role prompts and questions, shuffled) cut to a target token length.
Target lengths mimic a ``max_new_tokens=256`` generation run: about a third of the responses
hit the cap, the rest are spread uniformly between 8 and 255 tokens.
"""
from __future__ import annotations

import json
import random

import pandas as pd

from pipeline.role_schema import shipped_role_set

CAP_FRACTION = 0.35


def _text_pool(seed: int) -> list[str]:
    role_set = shipped_role_set()
    sentences = [q.question for q in role_set.questions]
    for role in role_set.all_roles():
        sentences += list(role.instructions) + list(role.questions)
    rng = random.Random(seed)
    rng.shuffle(sentences)
    return sentences


def response_lengths(n: int, max_tokens: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed + 1)
    low = min(8, max_tokens)
    return [max_tokens if rng.random() < CAP_FRACTION else rng.randint(low, max_tokens) for _ in range(n)]


def synthesize_responses(tokenizer, n: int, max_tokens: int = 256, seed: int = 0,
                         model_name: str = "SmolLM2-135M-Instruct") -> pd.DataFrame:
    """A responses table (``rollout_id``, ``role``, ``conversation``, ``response``) of ``n`` rows, input order."""
    role_set = shipped_role_set()
    roles = role_set.all_roles()
    questions = [q.question for q in role_set.questions]
    pool = _text_pool(seed)
    pool_ids: list[int] = tokenizer(" ".join(pool), add_special_tokens=False)["input_ids"]
    rng = random.Random(seed + 2)
    rows = []
    for index, length in enumerate(response_lengths(n, max_tokens, seed)):
        role = roles[index % len(roles)]
        prompt_index = (index // len(roles)) % len(role.instructions)
        question = questions[(index * 7) % len(questions)]
        start = rng.randrange(0, max(1, len(pool_ids) - length))
        response = tokenizer.decode(pool_ids[start:start + length], skip_special_tokens=True).strip()
        system = role.instructions[prompt_index].replace("{model_name}", model_name)
        conversation = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": question}, {"role": "assistant", "content": response}]
        rows.append({"rollout_id": f"{role.name}/p{prompt_index}/q{index}/s0", "role": role.name,
                     "conversation": json.dumps(conversation), "response": response})
    return pd.DataFrame(rows)
