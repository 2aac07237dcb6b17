"""Intervention math on random tensors and as hooks on the tiny random model."""
import pytest
import torch

from steering.axis_math import project, unit
from steering.capping_config import load_capping_config
from steering.generation import GenerationSettings, generate_text
from steering.interventions import (AblateDirection, AddVector, ClampProjection, InterventionPlan,
                                    MeanAblateDirection, ablate_direction, add_vector, applied,
                                    block_output_hook_name, cap_on_axis, clamp_projection, set_projection)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_floor_lifts_low_projections_and_leaves_the_rest_untouched():
    h = _rand(2, 9, 16)
    v = _rand(16, seed=1) * 5
    tau = 0.3
    out = clamp_projection(h, v, lo=tau)
    before, after = h @ unit(v), out @ unit(v)
    assert bool((after >= tau - 1e-5).all())
    above = before >= tau
    assert torch.equal(out[above], h[above])  # bit-identical where already above tau
    # only the component along v changed
    residual_before = h - before.unsqueeze(-1) * unit(v)
    residual_after = out - after.unsqueeze(-1) * unit(v)
    assert torch.allclose(residual_before, residual_after, atol=1e-5)
    # the formula h + max(tau - h.v, 0) v
    expected = h + torch.clamp(tau - before, min=0).unsqueeze(-1) * unit(v)
    assert torch.allclose(out, expected, atol=1e-6)


def test_two_sided_clamp():
    h = _rand(4, 16, seed=2) * 3
    v = _rand(16, seed=3)
    out = clamp_projection(h, v, lo=-0.5, hi=0.5)
    p = out @ unit(v)
    assert bool((p >= -0.5 - 1e-5).all() and (p <= 0.5 + 1e-5).all())
    with pytest.raises(ValueError):
        ClampProjection(layer=0, vector=v, lo=1.0, hi=0.0)


def test_addition_units_ablation_and_mean_ablation():
    h = _rand(3, 5, 16, seed=4)
    v = _rand(16, seed=5) * 4
    assert torch.equal(add_vector(h, v, 0.0), h)
    unit_added = add_vector(h, v, 2.0)
    assert torch.allclose(unit_added @ unit(v) - h @ unit(v), torch.full((3, 5), 2.0), atol=1e-5)
    raw_added = add_vector(h, v, 2.0, unit_norm=False)
    assert torch.allclose(raw_added - h, (2.0 * v).expand_as(h), atol=1e-5)
    assert torch.allclose(ablate_direction(h, v) @ unit(v), torch.zeros(3, 5), atol=1e-5)
    assert torch.allclose(set_projection(h, v, 1.7) @ unit(v), torch.full((3, 5), 1.7), atol=1e-5)


def test_math_runs_in_fp32_for_low_precision_activations():
    h = (_rand(2, 3, 64, seed=6) * 50).to(torch.bfloat16)
    v = _rand(64, seed=7)
    out = clamp_projection(h, v, lo=10.0)
    assert out.dtype == torch.bfloat16
    expected = clamp_projection(h.float(), v, lo=10.0).to(torch.bfloat16)
    assert torch.equal(out, expected)


def _capture(model, ids, plan, layers, prompt_length=0):
    store = {}

    def make(layer):
        def hook(x, hook):
            store[layer] = x.detach().clone()
            return x
        return hook

    with torch.no_grad(), applied(model.bridge, plan, prompt_length=prompt_length,
                                  extra_hooks=[(block_output_hook_name(l), make(l)) for l in layers]):
        logits = model.hf_model(input_ids=ids).logits
    return store, logits


def test_capped_forward_on_tiny_model(tiny_model):
    m = tiny_model
    ids = torch.tensor([m.chat.prompt_ids("You are a ghost.", "What do you value most?")])
    axis = _rand(m.n_layers, m.d_model, seed=8)
    plain, _ = _capture(m, ids, None, range(m.n_layers))
    # tau between observed values (a tau equal to an observed projection is a rounding-level tie)
    tau = torch.stack([project(plain[l][0], axis[l]).median() + 1e-3 for l in range(m.n_layers)])
    layers = [1, 2]
    capped, _ = _capture(m, ids, InterventionPlan(cap_on_axis(axis, tau, layers)), range(m.n_layers))
    for l in layers:
        assert bool((project(capped[l][0], axis[l]) >= tau[l] - 1e-4).all())
    first = layers[0]
    above = project(plain[first][0], axis[first]) >= tau[first] + 1e-4
    assert above.any() and (~above).any()
    assert torch.equal(capped[first][0][above], plain[first][0][above])
    assert torch.equal(capped[0], plain[0])  # layers before the band are untouched


def test_positions_generated_and_last(tiny_model):
    m = tiny_model
    prompt = m.chat.prompt_ids("You are a pirate.", "Who are you?")
    ids = torch.tensor([prompt + [5, 6, 7]])
    v = _rand(m.d_model, seed=9)
    plain, _ = _capture(m, ids, None, [1])
    gen_plan = InterventionPlan([AddVector(layer=1, vector=v, coefficient=4.0)], positions="generated")
    gen, _ = _capture(m, ids, gen_plan, [1], prompt_length=len(prompt))
    n = len(prompt)
    assert torch.equal(gen[1][0, :n], plain[1][0, :n])
    assert torch.allclose(project(gen[1][0, n:] - plain[1][0, n:], v), torch.full((3,), 4.0), atol=1e-4)
    last_plan = InterventionPlan([AddVector(layer=1, vector=v, coefficient=4.0)], positions="last")
    last, _ = _capture(m, ids, last_plan, [1])
    assert torch.equal(last[1][0, :-1], plain[1][0, :-1])
    assert not torch.equal(last[1][0, -1], plain[1][0, -1])


def test_zero_addition_is_identity_and_hooks_are_removed(tiny_model):
    m = tiny_model
    ids = torch.tensor([m.chat.prompt_ids(None, "Describe your morning routine.")])
    v = _rand(m.d_model, seed=10)
    _, plain_logits = _capture(m, ids, None, [])
    _, zero_logits = _capture(m, ids, InterventionPlan([AddVector(layer=l, vector=v, coefficient=0.0)
                                                         for l in range(m.n_layers)]), [])
    assert torch.equal(plain_logits, zero_logits)
    _, steered = _capture(m, ids, InterventionPlan([AddVector(layer=1, vector=v, coefficient=50.0)]), [])
    assert not torch.allclose(steered, plain_logits)
    _, after = _capture(m, ids, None, [])
    assert torch.equal(after, plain_logits)


def test_generation_with_hooks_removed_equals_plain_generation(tiny_model):
    m = tiny_model
    prompt = m.chat.prompt_ids("You are a pirate.", "Who are you?")
    settings = GenerationSettings(max_new_tokens=12)
    before, _ = generate_text(m, prompt, None, settings)
    hf = m.hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                             eos_token_id=None)
    assert before == hf[0, len(prompt):].tolist()[: len(before)]
    v = _rand(m.d_model, seed=11)
    steered, _ = generate_text(m, prompt, InterventionPlan([AddVector(layer=1, vector=v, coefficient=80.0)]), settings)
    assert steered != before
    after, _ = generate_text(m, prompt, None, settings)
    assert after == before


def test_paper_capping_config_equals_floor_on_axis(tiny_model, tmp_path):
    """A ceiling on role-minus-default (= -axis) vectors is exactly a floor on +axis."""
    m = tiny_model
    axis = _rand(m.n_layers, m.d_model, seed=12)
    ids = torch.tensor([m.chat.prompt_ids("You are an oracle.", "What will tomorrow bring?")])
    plain, _ = _capture(m, ids, None, range(m.n_layers))
    layers = [1, 2, 3]
    tau = {l: float(project(plain[l][0], axis[l]).quantile(0.6)) for l in layers}
    config = {
        # the stored vectors point from default to role, at arbitrary scale
        "vectors": {f"layer_{l}": {"layer": l, "vector": -axis[l] * (l + 0.5)} for l in layers},
        "experiments": [{"id": "layers_1:4-p0.6",
                         "interventions": [{"vector": f"layer_{l}", "cap": -tau[l]} for l in layers]}],
    }
    path = tmp_path / "capping_config.pt"
    torch.save(config, path)
    loaded = load_capping_config(path)
    ceilings = InterventionPlan(loaded.interventions("layers_1:4-p0.6"))
    floors = InterventionPlan(cap_on_axis(axis, tau, layers))
    a, logits_a = _capture(m, ids, ceilings, range(m.n_layers))
    b, logits_b = _capture(m, ids, floors, range(m.n_layers))
    for l in range(m.n_layers):
        assert torch.allclose(a[l], b[l], atol=1e-5, rtol=1e-5)
    assert torch.allclose(logits_a, logits_b, atol=1e-4)
    assert not torch.allclose(logits_a, _capture(m, ids, None, [])[1], atol=1e-4)
    with pytest.raises(KeyError, match="no experiment"):
        loaded.interventions("layers_0:1-p0.5")


def test_plan_validation_names_the_problem(tiny_model):
    plan = InterventionPlan([AddVector(layer=99, vector=torch.zeros(tiny_model.d_model), coefficient=1.0)])
    with pytest.raises(ValueError, match="layer 99"):
        plan.validate(tiny_model.n_layers, tiny_model.d_model)
    plan = InterventionPlan([AblateDirection(layer=0, vector=torch.zeros(3))])
    with pytest.raises(ValueError, match="shape"):
        plan.validate(tiny_model.n_layers, tiny_model.d_model)
    with pytest.raises(ValueError, match="positions"):
        InterventionPlan([], positions="middle")
    assert MeanAblateDirection(layer=0, vector=torch.ones(2), mean_projection=1.0).layer == 0
