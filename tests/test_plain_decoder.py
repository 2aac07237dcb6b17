"""The weight-sharing plain twin used for generation: same weights, same hook points, same results as the bridge."""
import dataclasses

import pytest
import torch

from steering.axis_math import project
from steering.generation import GenerationSettings, Monitor, stream_generate
from steering.interventions import AddVector, InterventionPlan, applied, block_output_hook_name, cap_on_axis
from steering.plain_decoder import PlainDecoderError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _run(model, host, ids, plan=None, prompt_length=0):
    """Block outputs ``[T, L, D]`` (after interventions) and logits of one forward on ``host``."""
    store = {}
    hooks = [(block_output_hook_name(l), lambda x, hook: store.__setitem__(hook.name, x[0].clone()))
             for l in range(model.n_layers)]
    forward = model.hf_model if host is model.bridge else model.decoder.model
    with torch.no_grad(), applied(host, plan, prompt_length, extra_hooks=hooks):
        logits = forward(input_ids=ids).logits
    return torch.stack([store[block_output_hook_name(l)] for l in range(model.n_layers)], 1), logits[0]


def _tensor_ptrs(module, buffers=False):
    tensors = module.named_buffers() if buffers else module.named_parameters()
    return {t.data_ptr() for _, t in tensors}


def test_twin_shares_every_weight_and_keeps_the_bridge_config(tiny_model):
    m = tiny_model
    twin = m.decoder.model
    assert _tensor_ptrs(twin) == _tensor_ptrs(m.hf_model)
    assert _tensor_ptrs(twin, buffers=True) <= _tensor_ptrs(m.hf_model, buffers=True)
    assert not any(t.is_meta for t in list(twin.parameters()) + list(twin.buffers()))
    assert m.decoder.attn_implementation == "sdpa"
    assert m.hf_model.config._attn_implementation == "eager"  # the bridge's own config is untouched
    assert twin.config is not m.hf_model.config
    tied = twin.lm_head.weight.data_ptr() == twin.model.embed_tokens.weight.data_ptr()
    assert tied == bool(twin.config.tie_word_embeddings)


def test_tied_embeddings_stay_tied(smollm2):
    twin = smollm2.decoder.model
    assert twin.config.tie_word_embeddings
    assert twin.lm_head.weight is twin.model.embed_tokens.weight
    assert _tensor_ptrs(twin) == _tensor_ptrs(smollm2.hf_model)


def test_twin_hook_points_see_what_the_bridge_sees(tiny_model):
    m = tiny_model
    ids = torch.tensor([m.chat.prompt_ids("You are a ghost.", "Where do you live?")])
    bridge_acts, bridge_logits = _run(m, m.bridge, ids)
    twin_acts, twin_logits = _run(m, m.decoder, ids)
    assert torch.allclose(twin_acts, bridge_acts, atol=1e-5, rtol=1e-5)
    assert torch.allclose(twin_logits, bridge_logits, atol=1e-5, rtol=1e-5)
    hidden = m.hf_model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.allclose(twin_acts[:, 0], hidden[1][0], atol=1e-5)


def test_plans_act_the_same_on_the_twin_and_on_the_bridge(tiny_model):
    m = tiny_model
    prompt = m.chat.prompt_ids("You are a pirate.", "Who are you?")
    ids = torch.tensor([prompt + [5, 6, 7]])
    axis = _rand(m.n_layers, m.d_model, seed=3)
    plain, _ = _run(m, m.bridge, ids)
    tau = project(plain, axis).median(0).values + 1e-3
    plans = [
        InterventionPlan(cap_on_axis(axis, tau, [1, 2])),
        InterventionPlan([AddVector(layer=2, vector=axis[2], coefficient=6.0)], positions="generated"),
    ]
    for plan in plans:
        on_bridge, bridge_logits = _run(m, m.bridge, ids, plan, prompt_length=len(prompt))
        on_twin, twin_logits = _run(m, m.decoder, ids, plan, prompt_length=len(prompt))
        assert not torch.allclose(on_bridge, plain)
        assert torch.allclose(on_twin, on_bridge, atol=1e-4, rtol=1e-5)
        assert torch.allclose(twin_logits, bridge_logits, atol=1e-4, rtol=1e-5)


def test_unknown_hook_points_are_refused_and_hooks_are_removed(tiny_model):
    m = tiny_model
    with pytest.raises(PlainDecoderError, match="blocks.0.attn.hook_pattern"):
        with m.decoder.hooks(fwd_hooks=[("blocks.0.hook_out", lambda x, hook: x * 0),
                                        ("blocks.0.attn.hook_pattern", lambda x, hook: x)]):
            pass
    with pytest.raises(PlainDecoderError, match="blocks"):
        with m.decoder.hooks(fwd_hooks=[(block_output_hook_name(m.n_layers), lambda x, hook: x)]):
            pass
    assert all(not layer._forward_hooks for layer in m.decoder.model.model.layers)
    ids = torch.tensor([m.chat.prompt_ids(None, "Who are you?")])
    with pytest.raises(RuntimeError, match="boom"):
        with m.decoder.hooks(fwd_hooks=[(block_output_hook_name(1), lambda x, hook: x * 2)]):
            raise RuntimeError("boom")
    assert all(not layer._forward_hooks for layer in m.decoder.model.model.layers)
    _, after = _run(m, m.decoder, ids)
    _, bridge = _run(m, m.bridge, ids)
    assert torch.allclose(after, bridge, atol=1e-5, rtol=1e-5)


def _bridge_reference_decode(model, prompt, plan, n_tokens, monitor_layers, axis):
    """Greedy decoding through the TransformerLens bridge, recomputing the whole sequence each step (no cache)."""
    ids, projections = list(prompt), []
    for _ in range(n_tokens + 1):
        acts, logits = _run(model, model.bridge, torch.tensor([ids]), plan, prompt_length=len(prompt))
        if len(ids) > len(prompt):  # each generated token's own activation, as stream_generate reports it
            projections.append({l: float(project(acts[-1, l], axis[l])) for l in monitor_layers})
        ids.append(int(logits[-1].argmax()))
    return ids[len(prompt):-1], projections


def test_stream_generate_on_the_twin_equals_decoding_through_the_bridge(tiny_model, monkeypatch):
    import steering.generation as generation

    monkeypatch.setattr(generation, "stop_token_ids", lambda hf_model, tokenizer: set())
    m = tiny_model
    prompt = m.chat.prompt_ids("You are a pirate.", "Who are you?")
    axis = _rand(m.n_layers, m.d_model, seed=5)
    prompt_acts, _ = _run(m, m.bridge, torch.tensor([prompt]))
    layers = [1, 2, 3]
    tau = project(prompt_acts, axis).quantile(0.7, dim=0)
    plan = InterventionPlan(cap_on_axis(axis, tau, layers), positions="generated")
    n = 10
    steps = list(stream_generate(m, prompt, plan, GenerationSettings(max_new_tokens=n), Monitor(axis, layers)))
    expected_ids, expected_projections = _bridge_reference_decode(m, prompt, plan, n, layers, axis)
    assert [s.token_id for s in steps] == expected_ids
    for step, expected in zip(steps, expected_projections):
        for layer in layers:
            assert step.projections[layer] == pytest.approx(expected[layer], abs=1e-3)
            assert step.projections[layer] >= float(tau[layer]) - 1e-3
    unsteered = [s.token_id for s in stream_generate(m, prompt, None, GenerationSettings(max_new_tokens=n))]
    assert unsteered != expected_ids  # the cap changed the text


def test_without_a_twin_generation_falls_back_to_the_bridge(tiny_model, monkeypatch, caplog):
    import steering.plain_decoder as plain_decoder

    def refuse(*args, **kwargs):
        raise PlainDecoderError("2 tensors have no counterpart")

    monkeypatch.setattr(plain_decoder, "weight_sharing_twin", refuse)
    m = tiny_model
    with caplog.at_level("WARNING", logger="steering.plain_decoder"):
        decoder = plain_decoder.make_decoder(m.bridge, m.hf_model)
    assert isinstance(decoder, plain_decoder.BridgeDecoder) and decoder.model is m.hf_model
    assert "through the TransformerLens bridge" in caplog.text and "no counterpart" in caplog.text
    fallback = dataclasses.replace(m, decoder=decoder)
    prompt = m.chat.prompt_ids("You are a pirate.", "Who are you?")
    plan = InterventionPlan([AddVector(layer=1, vector=_rand(m.d_model, seed=4), coefficient=30.0)])
    settings = GenerationSettings(max_new_tokens=8)
    assert [s.token_id for s in stream_generate(fallback, prompt, plan, settings)] == \
        [s.token_id for s in stream_generate(m, prompt, plan, settings)]


def _tiny_architecture(name):
    import transformers as tf

    small = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2)
    return {
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**small)),
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**small, head_dim=16)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=400, n_embd=64, n_layer=3, n_head=4,
                                                         bos_token_id=0, eos_token_id=0)),
    }[name]()


@pytest.mark.parametrize("architecture", ["qwen2", "gemma2", "gpt2"])
def test_twin_of_other_architectures_matches_the_bridge(architecture, tmp_path):
    from steering.models import load_model
    from steering.plain_decoder import PlainDecoder
    from tests.tiny_models import build_tokenizer

    torch.manual_seed(0)
    _tiny_architecture(architecture).save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    m = load_model(str(tmp_path))
    assert isinstance(m.decoder, PlainDecoder)
    # every twin tensor is one of the bridged model's (the GPT-2 bridge adds split q/k/v weights of its own)
    assert _tensor_ptrs(m.decoder.model) <= _tensor_ptrs(m.hf_model)
    ids = torch.tensor([m.chat.prompt_ids("You are a ghost.", "Where do you live?")])
    bridge_acts, bridge_logits = _run(m, m.bridge, ids)
    twin_acts, twin_logits = _run(m, m.decoder, ids)
    assert torch.allclose(twin_acts, bridge_acts, atol=1e-5, rtol=1e-5)
    assert torch.allclose(twin_logits, bridge_logits, atol=1e-5, rtol=1e-5)
