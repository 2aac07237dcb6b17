"""Generation backends on the tiny model: transformers (batched, left-padded) and openai-compatible."""
import json

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
    systems = {b["messages"][0]["content"] for b in bodies if b["messages"][0]["role"] == "system"}
    assert "{model_name}" not in "".join(systems)
    assert run_generate(config).generated == 0


def test_reusing_the_loaded_bridged_model_generates_the_same(tiny_model, tiny_model_dir, tmp_path):
    config = GenerateConfig(run_dir=tmp_path, model_id=str(tiny_model_dir), temperature=0.0, max_new_tokens=6)
    plain = TransformersBackend(config)
    reused = TransformersBackend(config, loaded=tiny_model)
    assert reused.model is tiny_model.hf_model
    prompts = [plain.chat.prompt_ids("You are a ghost.", "Where do you live?"),
               plain.chat.prompt_ids(None, "What do you value most, and why does it matter to you?")]
    items = [PendingRollout(row={"rollout_id": f"r{i}"}, messages=[], prompt_ids=p) for i, p in enumerate(prompts)]
    assert reused.generate(items) == plain.generate(items)
