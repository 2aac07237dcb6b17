"""Conversation drift: per-token projections vs a plain forward pass, and capped vs uncapped scripted runs."""
from __future__ import annotations

import argparse
import json

import pandas as pd
import pytest
import torch

from pipeline import drift
from steering.axis_io import AxisBundle, AxisMetadata, save_axis
from steering.axis_math import unit
from steering.generation import GenerationSettings

MESSAGES = [
    {"role": "system", "content": "You are a pirate."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "Arr, I be a pirate of the seven seas!"},
    {"role": "user", "content": "What do you value most?"},
    {"role": "assistant", "content": "I value honesty, curiosity and kindness."},
    {"role": "user", "content": "Thanks."},
]
SCRIPT = ["Who are you?", "Describe your morning routine."]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _axis(n_layers: int, d_model: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n_layers, d_model, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _hidden_projections(model, ids, axis, layer):
    """Block ``layer`` output = HF ``hidden_states[layer + 1]`` (not the last layer: HF applies the final norm there)."""
    out = model.hf_model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer + 1][0].float() @ unit(axis[layer])


def test_transcript_projection_matches_forward_pass(tiny_model):
    m = tiny_model
    axis = _axis(m.n_layers, m.d_model)
    result = drift.project_transcript(m, MESSAGES, axis, layers=[0, 2])
    assert result.layers == [0, 2] and sorted(result.turns["turn"].unique()) == [1, 2]
    full = m.chat.encode(MESSAGES, add_generation_prompt=False)
    for turn, index in ((1, 2), (2, 4)):
        span = m.chat.response_span(MESSAGES[: index + 1])
        for layer in (0, 2):
            expected = _hidden_projections(m, full, axis, layer)[span.start: span.end]
            got = result.tokens[(result.tokens["turn"] == turn) & (result.tokens["layer"] == layer)]
            assert list(got["position"]) == list(range(span.start, span.end))
            assert list(got["token_id"]) == full[span.start: span.end]
            assert torch.allclose(torch.tensor(got["projection"].values, dtype=torch.float32), expected, atol=1e-4)
            row = result.turns[(result.turns["turn"] == turn) & (result.turns["layer"] == layer)]
            assert row["mean_projection"].item() == pytest.approx(float(expected.mean()), abs=1e-4)
            assert row["n_tokens"].item() == span.length and row["message_index"].item() == index
    # steps run on across turns; the figure has one trace per layer
    assert list(result.tokens[result.tokens["layer"] == 0]["step"]) == list(range(len(result.tokens) // 2))
    assert len(drift.drift_figure(result).data) == 2
    assert len(drift.drift_figure(result, layer=2, per="turn").data) == 1


def test_transcript_fallback_per_turn(tiny_model, monkeypatch):
    """A template that renders earlier turns differently inside the full conversation: one pass per turn."""
    m = tiny_model
    axis = _axis(m.n_layers, m.d_model)
    reference = drift.project_transcript(m, MESSAGES, axis, layers=[1])
    real = type(m.chat).encode
    passes = []

    def encode(self, messages, add_generation_prompt=True):
        ids = real(self, messages, add_generation_prompt)
        if len(messages) == len(MESSAGES) and not add_generation_prompt:
            ids = [ids[1]] + ids[1:]  # the full rendering no longer starts like each turn's prefix
        return ids

    real_forward = drift.forward_projections
    monkeypatch.setattr(type(m.chat), "encode", encode)
    monkeypatch.setattr(drift, "forward_projections", lambda *a: passes.append(len(a[1])) or real_forward(*a))
    fallback = drift.project_transcript(m, MESSAGES, axis, layers=[1])
    assert len(passes) == 2  # one forward per assistant turn, each on its own prefix
    pd.testing.assert_frame_equal(fallback.tokens, reference.tokens, atol=1e-5)


def test_transcript_formats(tmp_path, tiny_model):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(MESSAGES))
    export = tmp_path / "export.json"
    export.write_text(json.dumps({"system_prompt": "You are a pirate.", "messages": [
        {"role": m["role"], "content": [{"type": "text", "text": m["content"]}], "metadata": {"x": 1}}
        for m in MESSAGES[1:]]}))
    assert drift.load_transcript(plain) == drift.load_transcript(export) == MESSAGES
    # the chat tab's export (app/transcripts.py): turns with steered/baseline replies and settings
    chat = {"format": "assistant-axis-lab/chat-transcript", "version": 1, "turns": [
        {"index": 0, "user": "Who are you?", "settings": {"system_prompt": "You are a pirate."},
         "steered": {"text": MESSAGES[2]["content"], "token_ids": []}, "baseline": {"text": "I am an AI."}},
        {"index": 1, "user": "What do you value most?", "settings": {"system_prompt": "You are a pirate."},
         "steered": {"text": MESSAGES[4]["content"]}, "baseline": None},
        {"index": 2, "user": "Thanks.", "settings": {"system_prompt": "You are a pirate."},
         "steered": {"text": ""}, "baseline": None}]}
    assert drift.load_transcript(chat)[:-1] == MESSAGES
    baseline = drift.load_transcript(chat, side="baseline")
    assert baseline[2]["content"] == "I am an AI." and baseline[4] == MESSAGES[4]
    with pytest.raises(ValueError, match="no assistant"):
        drift.load_transcript([{"role": "user", "content": "hi"}])
    assert drift.load_script(SCRIPT) == (None, SCRIPT)
    assert drift.load_script({"system_prompt": "S", "turns": [{"role": "user", "content": "a"}, "b"]}) == ("S", ["a", "b"])
    result = drift.project_transcript(tiny_model, drift.load_transcript(export), _axis(4, 64), layers="1")
    files = drift.save_drift(result, tmp_path / "out", "t")
    assert all(path.exists() for path in files.values())
    back = drift.load_drift(files["json"])
    pd.testing.assert_frame_equal(back.tokens, result.tokens, check_dtype=False)


def test_capping_comparison(tiny_model, tmp_path):
    m = tiny_model
    axis = _axis(m.n_layers, m.d_model, seed=3)
    settings = GenerationSettings(max_new_tokens=8)
    plain = drift.run_script(m, SCRIPT, axis, [1, 2], system_prompt="You are a ghost.", settings=settings)
    assert len(plain.tokens) > 0
    medians = plain.tokens.groupby("layer")["projection"].median()
    taus = [0.0] * m.n_layers
    for layer, value in medians.items():
        taus[layer] = float(value)
    bundle = AxisBundle(axis=axis, metadata=AxisMetadata(thresholds={"p0.5": taus}))
    thresholds = drift.resolve_thresholds(bundle, "p0.5")
    assert drift.resolve_thresholds(bundle, "1.5").tolist() == [1.5] * m.n_layers
    comp = drift.compare_capping(m, SCRIPT, bundle, thresholds, layers=[1, 2], cap_layers=[1, 2],
                                 system_prompt="You are a ghost.", settings=settings)
    # the uncapped run is the plain run (greedy)
    pd.testing.assert_frame_equal(comp.uncapped.tokens, plain.tokens)
    assert comp.capped.capped_layers == [1, 2] and comp.thresholds == pytest.approx({1: taus[1], 2: taus[2]})
    capped = comp.capped.tokens
    assert len(capped) > 0
    for layer in (1, 2):
        values = capped[capped["layer"] == layer]["projection"]
        assert (values >= taus[layer] - 1e-4).all(), layer
        assert (plain.tokens[plain.tokens["layer"] == layer]["projection"] < taus[layer] - 1e-3).any()
    table = comp.turn_table()
    assert set(table.columns) >= {"turn", "layer", "uncapped", "capped", "difference", "tau", "capped_layer"}
    assert (table["capped"] >= table["tau"] - 1e-4).all()
    assert torch.allclose(torch.tensor((table["capped"] - table["uncapped"]).values),
                          torch.tensor(table["difference"].values))
    fig = drift.comparison_figure(comp)
    assert [t.name for t in fig.data] == ["uncapped", "capped"]
    files = drift.save_drift(comp, tmp_path / "cmp", "capping")
    back = drift.load_drift(files["json"])
    assert isinstance(back, drift.DriftComparison) and back.thresholds == comp.thresholds
    assert "uncapped" in files["html"].read_text()[-200_000:] or files["html"].stat().st_size > 0


def test_cli(tiny_model_dir, tmp_path):
    axis = _axis(4, 64, seed=5)
    axis_path = tmp_path / "axis.safetensors"
    save_axis(axis_path, AxisBundle(axis=axis, metadata=AxisMetadata(model_id=str(tiny_model_dir),
                                                                    thresholds={"p0.25": [0.0, -1.0, 0.5, 0.0]})))
    (tmp_path / "t.json").write_text(json.dumps({"messages": MESSAGES}))
    (tmp_path / "s.json").write_text(json.dumps(SCRIPT[:1]))
    parser = argparse.ArgumentParser()
    drift.add_cli(parser.add_subparsers())
    args = parser.parse_args(["drift", "--axis", str(axis_path), "--layers", "2", "--transcript",
                              str(tmp_path / "t.json"), "--script", str(tmp_path / "s.json"), "--cap", "p0.25",
                              "--max-new-tokens", "4", "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    turns = pd.read_csv(tmp_path / "out" / "transcript_turns.csv")
    assert list(turns["turn"]) == [1, 2]
    cmp = pd.read_csv(tmp_path / "out" / "capping_turns.csv")
    assert (cmp["capped"] >= 0.5 - 1e-4).all() and (tmp_path / "out" / "capping.html").exists()


def test_smollm2_smoke(smollm2):
    m = smollm2
    axis = _axis(m.n_layers, m.d_model, seed=7)
    result = drift.project_transcript(m, MESSAGES[:3], axis)
    assert result.layers == [15] and result.turns["n_tokens"].item() > 5
    tau = float(result.tokens["projection"].quantile(0.75))
    plan = drift.InterventionPlan(drift.cap_on_axis(axis, torch.full((m.n_layers,), tau), [15]))
    capped = drift.run_script(m, ["Who are you?"], axis, [15], system_prompt="You are a pirate.", plan=plan,
                              settings=GenerationSettings(max_new_tokens=3))
    values = capped.tokens["projection"]
    assert capped.capped_layers == [15] and len(values) > 0 and (values >= tau - 1e-2).all()
