"""Generation backends on the tiny model: transformers (batched, left-padded) and openai-compatible."""
import json
import sys
import types

import torch

from pipeline.generate import GenerateConfig, TransformersBackend, PendingRollout, run_generate
from pipeline.rollouts import RolloutsConfig, make_rollouts
from pipeline.store import read_responses


def test_left_padded_batch_equals_one_by_one_greedy(tiny_model_dir, tmp_path):
    backend = TransformersBackend(GenerateConfig(run_dir=tmp_path, model_id=str(tiny_model_dir), temperature=0.0,
                                                 max_new_tokens=6))
    prompts = [backend.chat.prompt_ids("You are a pirate.", "Who are you?"),
               backend.chat.prompt_ids(None, "Describe your morning routine in detail, please.")]
    items = [PendingRollout(row={"rollout_id": f"r{i}"}, messages=[], prompt_ids=p) for i, p in enumerate(prompts)]
    batched = backend.generate(items)
    single = [backend.generate([item])[0] for item in items]
    assert [b[0] for b in batched] == [s[0] for s in single]
    assert all(n <= 6 and finish in {"stop", "length"} for _, finish, n in batched)
    # and the same as HF generate on the single prompt
    out = backend.model.generate(torch.tensor([prompts[0]]), max_new_tokens=6, do_sample=False,
                                 pad_token_id=backend.pad_id)
    ids = [t for t in out[0, len(prompts[0]):].tolist()]
    stop = next((i for i, t in enumerate(ids) if t in backend.stop_ids), len(ids))
    assert backend.tokenizer.decode(ids[:stop], skip_special_tokens=True) == single[0][0]


def test_openai_compatible_backend_against_local_server(tiny_model_dir, tmp_path, openai_server):
    run_dir = tmp_path / "run"
    make_rollouts(RolloutsConfig(run_dir=run_dir, roles=("pirate",), question_count=2, prompt_count=2))
    openai_server.handler = lambda request: f"answer to: {request.last_user_text[:30]}"
    config = GenerateConfig(run_dir=run_dir, model_id=str(tiny_model_dir), backend="openai-compatible",
                            base_url=openai_server.base_url, served_model_name="served-model", batch_size=3,
                            max_new_tokens=32, api_key="test-key")
    report = run_generate(config)
    assert report.generated == 8 and report.remaining == 0
    responses = read_responses(run_dir)
    assert len(responses) == 8
    for row in responses.to_dict("records"):
        assert row["response"] == f"answer to: {row['question'][:30]}"
        convo = json.loads(row["conversation"])
        assert convo[-2] == {"role": "user", "content": row["question"]}
    bodies = [r.body for r in openai_server.chat_requests]
    assert all(b["model"] == "served-model" and b["max_tokens"] == 32 for b in bodies)
    assert len({b["seed"] for b in bodies}) == 8  # one seed per rollout
    assert all("top_p" not in b for b in bodies)  # top_p=1.0 leaves the server's default
    systems = {b["messages"][0]["content"] for b in bodies if b["messages"][0]["role"] == "system"}
    assert "{model_name}" not in "".join(systems)
    assert run_generate(config).generated == 0


def test_reusing_the_loaded_model_generates_the_same(tiny_model, tiny_model_dir, tmp_path):
    config = GenerateConfig(run_dir=tmp_path, model_id=str(tiny_model_dir), temperature=0.0, max_new_tokens=6)
    plain = TransformersBackend(config)
    reused = TransformersBackend(config, loaded=tiny_model)
    # It generates on the loaded model's weights (the plain twin), not on a second copy.
    assert reused.model is tiny_model.decoder.model
    assert reused.model.lm_head.weight is tiny_model.hf_model.lm_head.weight
    prompts = [plain.chat.prompt_ids("You are a ghost.", "Where do you live?"),
               plain.chat.prompt_ids(None, "What do you value most, and why does it matter to you?")]
    items = [PendingRollout(row={"rollout_id": f"r{i}"}, messages=[], prompt_ids=p) for i, p in enumerate(prompts)]
    assert reused.generate(items) == plain.generate(items)


class _FakeVLLM:
    """A stand-in module speaking vLLM's offline API (LLM, SamplingParams, RequestOutput shapes)."""

    def __init__(self):
        self.engines = []
        fake = self

        class SamplingParams:
            def __init__(self, **kwargs):
                self.kwargs = kwargs

        class LLM:
            def __init__(self, **kwargs):
                self.kwargs = kwargs
                self.calls = []
                fake.engines.append(self)

            def generate(self, prompts, params, use_tqdm=True):
                # vLLM takes one SamplingParams for all prompts or a list with one per prompt.
                per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
                if len(per_prompt) != len(prompts):
                    raise ValueError("The lengths of prompts and sampling_params must be the same.")
                self.calls.append((prompts, per_prompt))
                outputs = []
                for prompt, param in zip(prompts, per_prompt):
                    ids = prompt["prompt_token_ids"]
                    n = min(param.kwargs["max_tokens"], len(ids) % 5 + 1)
                    completion = types.SimpleNamespace(text=f"reply to {len(ids)} tokens", token_ids=list(range(n)),
                                                       finish_reason="length" if n == param.kwargs["max_tokens"]
                                                       else "stop")
                    outputs.append(types.SimpleNamespace(outputs=[completion]))
                return outputs

        self.module = types.ModuleType("vllm")
        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams


def test_vllm_backend_drives_the_engine_with_templated_token_ids(tiny_model_dir, tmp_path, monkeypatch):
    fake = _FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    run_dir = tmp_path / "run"
    make_rollouts(RolloutsConfig(run_dir=run_dir, roles=("ghost",), question_count=3, prompt_count=2))
    config = GenerateConfig(run_dir=run_dir, model_id=str(tiny_model_dir), backend="vllm", batch_size=5,
                            max_new_tokens=3, temperature=0.5, top_p=0.9, tensor_parallel_size=2,
                            gpu_memory_utilization=0.8, max_model_len=2048)
    report = run_generate(config)
    assert report.generated == 12
    engine = fake.engines[0]
    assert engine.kwargs["tensor_parallel_size"] == 2 and engine.kwargs["gpu_memory_utilization"] == 0.8
    assert engine.kwargs["max_model_len"] == 2048 and engine.kwargs["model"] == str(tiny_model_dir)
    assert [len(prompts) for prompts, _ in engine.calls] == [5, 5, 2]
    params = engine.calls[0][1][0].kwargs
    assert params["temperature"] == 0.5 and params["top_p"] == 0.9 and params["max_tokens"] == 3
    # One seed per rollout, so repeated samples of one prompt do not come out identical.
    seeds = [p.kwargs["seed"] for _, per_prompt in engine.calls for p in per_prompt]
    assert len(set(seeds)) == 12
    from steering.chat_format import ChatFormat
    from transformers import AutoTokenizer
    chat = ChatFormat(AutoTokenizer.from_pretrained(tiny_model_dir))
    responses = read_responses(run_dir)
    sent = {tuple(p["prompt_token_ids"]) for prompts, _ in engine.calls for p in prompts}
    expected = {tuple(chat.encode(json.loads(c)[:-1])) for c in responses["conversation"]}
    assert sent == expected
    assert set(responses["finish_reason"]) <= {"stop", "length"} and (responses["n_tokens"] <= 3).all()
