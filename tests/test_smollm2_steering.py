"""Integration: steering and capping on the embedded SmolLM2-135M-Instruct default."""
import torch

from steering.axis_math import project
from steering.generation import GenerationSettings, Monitor, generate_text, stream_generate
from steering.interventions import AddVector, InterventionPlan, applied, block_output_hook_name, cap_on_axis


def _acts(model, ids, plan=None, prompt_length=0):
    store = {}
    hooks = [(block_output_hook_name(l), lambda x, hook: store.__setitem__(int(hook.name.split(".")[1]), x[0].clone()))
             for l in range(model.n_layers)]
    with torch.no_grad(), applied(model.bridge, plan, prompt_length, extra_hooks=hooks):
        logits = model.hf_model(input_ids=ids).logits
    return torch.stack([store[l] for l in range(model.n_layers)], 1), logits  # [T, L, D]


def _prompt_axis(model):
    """A crude Assistant-minus-pirate direction from prompt activations (enough to exercise capping)."""
    a = torch.tensor([model.chat.prompt_ids("You are an AI assistant.", "Who are you?")])
    p = torch.tensor([model.chat.prompt_ids("You are a pirate captain.", "Who are you?")])
    return _acts(model, a)[0].mean(0) - _acts(model, p)[0].mean(0)  # [L, D]


def test_capped_forward_respects_floor_and_leaves_high_projections(smollm2):
    m = smollm2
    assert (m.n_layers, m.d_model) == (30, 576)
    axis = _prompt_axis(m)
    convo = m.chat.response_span([
        {"role": "system", "content": "You are a pirate captain."},
        {"role": "user", "content": "Tell me about your ship."},
        {"role": "assistant", "content": "Arr, the Black Gull be the swiftest ship on the seven seas!"},
    ])
    ids = torch.tensor([convo.input_ids])
    plain, plain_logits = _acts(m, ids)
    plain_proj = project(plain, axis)  # [T, L]
    layers = list(range(12, 18))
    tau = plain_proj.median(0).values + 1e-3
    capped, capped_logits = _acts(m, ids, InterventionPlan(cap_on_axis(axis, tau, layers)))
    capped_proj = project(capped, axis)
    for l in layers:
        # fp32 rounding on activations with norms in the hundreds
        assert bool((capped_proj[:, l] >= tau[l] - 1e-2).all()), l
    first = layers[0]
    above = plain_proj[:, first] >= tau[first] + 1e-3
    assert above.any() and (~above).any()
    assert torch.equal(capped[above, first], plain[above, first])
    assert torch.equal(capped[:, :first], plain[:, :first])
    assert not torch.allclose(capped_logits, plain_logits)
    # addition with c = 0 is the identity
    _, zero_logits = _acts(m, ids, InterventionPlan([AddVector(layer=l, vector=axis[l], coefficient=0.0)
                                                     for l in layers]))
    assert torch.equal(zero_logits, plain_logits)


def test_generation_plain_steered_and_after_hooks_removed(smollm2):
    m = smollm2
    prompt = m.chat.prompt_ids("You are a pirate.", "Who are you?")
    settings = GenerationSettings(max_new_tokens=16)
    plain_ids, plain_text = generate_text(m, prompt, None, settings)
    hf = m.hf_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
    assert plain_ids == hf[0, len(prompt):].tolist()[: len(plain_ids)]
    assert plain_text.strip()
    axis = _prompt_axis(m)
    layers = list(range(10, 20))
    prompt_proj = project(_acts(m, torch.tensor([prompt]))[0], axis)
    tau = prompt_proj.max(0).values  # a floor above everything seen in the prompt
    plan = InterventionPlan(cap_on_axis(axis, tau, layers), positions="generated")
    steps = list(stream_generate(m, prompt, plan, settings, Monitor(axis=axis, layers=layers)))
    assert steps and all(set(s.projections) == set(layers) for s in steps)
    for s in steps:
        for l in layers:
            assert s.projections[l] >= float(tau[l]) - 1e-2
    assert [s.token_id for s in steps] != plain_ids
    again_ids, _ = generate_text(m, prompt, None, settings)
    assert again_ids == plain_ids
