"""project-checkpoints on the tiny random model: two checkpoints (a perturbed copy and a git revision), a small run."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline import checkpoints as ck
from pipeline.axis_step import AxisConfig, run_axis
from pipeline.extract import ActivationStore, ExtractConfig, run_extract
from pipeline.manifest import RunMismatchError
from pipeline.store import JsonlLog, RunPaths, write_response_shard
from pipeline.vectors import VectorsConfig, load_vectors, run_vectors
from steering.axis_io import load_axis
from steering.axis_math import compute_axis, pca, project, unit
from steering.models import ModelLoadError

ROLES = {"default": [None] * 3, "pirate": [3, 3, 1], "ghost": [3, 2, 3], "stoic": [3, 3, 3]}
ANSWERS = {
    "default": "I am a helpful assistant. How can I help you today?",
    "pirate": "Arr, I be a pirate of the seven seas!",
    "ghost": "The ghost drifts through the old house at midnight.",
    "stoic": "I value honesty, curiosity and kindness.",
}
QUESTIONS = ["Who are you?", "What do you value most?", "Describe your morning routine."]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def _perturbed_copy(src: Path, dst: Path, seed: int = 1, scale: float = 0.02) -> Path:
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(dst)
    return dst


def _make_run(run: Path, model_dir: Path, model) -> None:
    rows = []
    for role, scores in ROLES.items():
        for i, _ in enumerate(scores):
            system = "" if role == "default" else f"You are a {role}."
            answer = f"{ANSWERS[role]} ({i})"
            convo = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": QUESTIONS[i]}, {"role": "assistant", "content": answer}]
            rows.append({"rollout_id": f"{role}/p0/q{i}/s0", "role": role, "prompt_index": 0, "question_index": i,
                         "sample_index": 0, "system_prompt": system, "question": QUESTIONS[i],
                         "conversation": json.dumps(convo), "response": answer, "finish_reason": "stop",
                         "n_tokens": 8})
    write_response_shard(run, rows[:6])
    write_response_shard(run, rows[6:])
    log = JsonlLog(RunPaths(run).scores)
    for role, scores in ROLES.items():
        for i, score in enumerate(scores):
            if score is not None:
                log.append({"rollout_id": f"{role}/p0/q{i}/s0", "role": role, "score": score, "raw": str(score),
                            "judge_model": "fake", "error": None})
    run_extract(ExtractConfig(run_dir=run, model_id=str(model_dir)), model=model)
    run_vectors(VectorsConfig(run_dir=run))
    run_axis(AxisConfig(run_dir=run))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, tiny_model):
    root = tmp_path_factory.mktemp("ckpt")
    run = root / "run"
    _make_run(run, tiny_model_dir, tiny_model)
    perturbed = _perturbed_copy(tiny_model_dir, root / "perturbed")
    repo = root / "repo"
    shutil.copytree(tiny_model_dir, repo)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "original")
    first = _git(repo, "rev-parse", "HEAD")
    shutil.copy(perturbed / "model.safetensors", repo / "model.safetensors")
    _git(repo, "commit", "-q", "-am", "perturbed")
    return {"root": root, "run": run, "final": tiny_model_dir, "perturbed": perturbed, "repo": repo, "first": first}


def _config(setup, out=None, **kw):
    return ck.CheckpointsConfig(
        run_dir=setup["run"],
        checkpoints=(f"{setup['repo']}@{setup['first']}", str(setup["perturbed"]), str(setup["final"])),
        names=("git-first", "perturbed", "final"), layers="1,2", export_dir=setup["root"] / "exports",
        out_dir=out, **kw)


@pytest.fixture(scope="module")
def models(tiny_model_dir, tiny_model):
    """Loaded models by source path, shared by the tests (loading is the slow part on CPU)."""
    return {str(tiny_model_dir): tiny_model}


def _counting_loader(calls, cache=None):
    def loader(spec):
        calls.append(spec.model_id)
        if cache is None:
            return ck.load_model(spec)
        if spec.model_id not in cache:
            cache[spec.model_id] = ck.load_model(spec)
        return cache[spec.model_id]
    return loader


def _by_hand(folder: Path, layers, axis, scores_ok) -> tuple[dict, torch.Tensor]:
    """Role vectors and default from the stored activations, projected by hand."""
    store = ActivationStore(folder)
    meta = store.meta()
    idx = [meta["layers"].index(l) for l in layers]
    acts = store.load()
    out = {}
    for role in ROLES:
        ids = [k for k in acts if k.startswith(role + "/") and (role == "default" or scores_ok(k))]
        vec = torch.stack([acts[k][idx] for k in ids]).mean(0)
        out[role] = vec
    return out


@pytest.fixture(scope="module")
def first_run(setup, models):
    calls = []
    report = ck.run_project_checkpoints(_config(setup), loader=_counting_loader(calls, models))
    return report, calls


def test_tables_match_direct_computation(setup, first_run):
    report, calls = first_run
    # the final checkpoint is the run's own model: it takes the run's activations and is never loaded
    assert len(calls) == 2 and calls[1] == str(setup["perturbed"]) and str(setup["final"]) not in calls
    assert report.layers == [1, 2] and report.final == "final"
    axis = load_axis(RunPaths(setup["run"]).axis).axis
    table = report.table
    scores = {f"{r}/p0/q{i}/s0": s for r, ss in ROLES.items() for i, s in enumerate(ss) if s is not None}
    # only the responses the vectors need were extracted: default + score >= 3
    needed = 3 + sum(1 for s in scores.values() if s >= 3)
    for c in report.checkpoints:
        assert c.total == needed and c.already_done == 0
        assert (c.extracted, c.reused) == ((0, needed) if c.name == "final" else (needed, 0))
        assert len(ActivationStore(c.folder).entries()) == needed
        parts = ActivationStore(c.folder).dir / "parts"
        assert not parts.exists() or not any(parts.iterdir())  # consolidated per role
    vectors = {}
    for c in report.checkpoints:
        vectors[c.name] = _by_hand(c.folder, [1, 2], axis, lambda k: scores[k] >= 3)
    for name, vecs in vectors.items():
        for role, vec in vecs.items():
            for li, layer in enumerate([1, 2]):
                row = table[(table["checkpoint"] == name) & (table["name"] == role) & (table["layer"] == layer)]
                assert len(row) == 1
                expected = float((vec[li] * axis[layer] / axis[layer].norm()).sum())
                assert row["axis_projection"].item() == pytest.approx(expected, abs=1e-5)
                assert row["dist_to_final"].item() == pytest.approx(
                    float((vec[li] - vectors["final"][role][li]).norm()), abs=1e-5)
    # the final checkpoint is the run's own model: its vectors are the run's vectors
    run_vectors_ = load_vectors(setup["run"])
    final = table[table["checkpoint"] == "final"]
    for role in ("pirate", "ghost", "stoic"):
        for layer in (1, 2):
            got = final[(final["name"] == role) & (final["layer"] == layer)]["axis_projection"].item()
            assert got == pytest.approx(float(project(run_vectors_.roles[role][layer], axis[layer])), abs=1e-4)
    # git revision 'first' = the original weights = the final model; the perturbed copy moved
    first = table[table["checkpoint"] == "git-first"].set_index(["layer", "name"])["axis_projection"]
    fin = final.set_index(["layer", "name"])["axis_projection"]
    assert torch.allclose(torch.tensor(first.sort_index().values), torch.tensor(fin.sort_index().values), atol=1e-5)
    pert = table[table["checkpoint"] == "perturbed"]
    assert (pert["dist_to_final"] > 1e-3).all()
    assert (final["dist_to_final"].abs() < 1e-6).all() and final["dist_to_previous"].notna().all()
    assert table[table["checkpoint"] == "git-first"]["dist_to_previous"].isna().all()
    # persona PCs of the final checkpoint
    names = sorted(["pirate", "ghost", "stoic"])
    for li, layer in enumerate([1, 2]):
        res = pca(torch.stack([vectors["final"][n][li] for n in names]), axis[layer], n_components=2)
        for role in names:
            coords = (vectors["perturbed"][role][li] - res.mean) @ res.components.T
            row = pert[(pert["name"] == role) & (pert["layer"] == layer)]
            assert row["pc1"].item() == pytest.approx(float(coords[0]), abs=1e-4)
            assert row["pc2"].item() == pytest.approx(float(coords[1]), abs=1e-4)
    assert "pc3" not in table.columns  # 3 roles span 2 PCs
    counts = table[(table["checkpoint"] == "final") & (table["layer"] == 1)].set_index("name")["n_responses"]
    assert counts.to_dict() == {"default": 3, "ghost": 2, "pirate": 2, "stoic": 3}
    # summary: the run's axis is the final checkpoint's own axis
    summary = report.summary.set_index(["checkpoint", "layer"])
    for layer in (1, 2):
        assert summary.loc[("final", layer), "own_axis_cosine"] == pytest.approx(1.0, abs=1e-5)
        own = compute_axis(vectors["perturbed"]["default"][[layer - 1]],
                           torch.stack([vectors["perturbed"][n][[layer - 1]] for n in names]))[0]
        assert summary.loc[("perturbed", layer), "own_axis_cosine"] == pytest.approx(
            float(unit(own) @ unit(axis[layer])), abs=1e-5)
        assert summary.loc[("perturbed", layer), "default_projection"] == pytest.approx(
            float(project(vectors["perturbed"]["default"][layer - 1], axis[layer])), abs=1e-5)
    # files
    out = setup["run"] / "checkpoints"
    for name in ("projections.csv", "projections.parquet", "summary.csv", "summary.parquet", "projections.json",
                 "trajectories.html"):
        assert (out / name).exists(), name
    assert pd.read_csv(out / "projections.csv").shape == table.shape
    saved = json.loads((out / "projections.json").read_text())
    assert [c["name"] for c in saved["checkpoints"]] == ["git-first", "perturbed", "final"]
    assert saved["checkpoints"][0]["kind"] == "git" and saved["checkpoints"][0]["revision"] == setup["first"]
    loaded, loaded_summary = ck.load_checkpoint_results(setup["run"])
    pd.testing.assert_frame_equal(loaded, table)
    assert "plotly" in (out / "trajectories.html").read_text()[:5_000_000]


def test_reusing_the_runs_activations_equals_extracting_again(setup, first_run, models, tmp_path):
    report, _ = first_run
    run = tmp_path / "run"
    shutil.copytree(setup["run"], run, ignore=shutil.ignore_patterns("checkpoints"))
    calls = []
    cfg = ck.CheckpointsConfig(**{**_config(setup).__dict__, "run_dir": run, "checkpoints": (str(setup["final"]),),
                                  "names": ("final",), "reuse_run_activations": False})
    extracted = ck.run_project_checkpoints(cfg, loader=_counting_loader(calls, models))
    assert calls == [str(setup["final"])] and extracted.checkpoints[0].reused == 0
    mine = extracted.table.set_index(["layer", "name"])["axis_projection"].sort_index()
    reused = report.table[report.table["checkpoint"] == "final"].set_index(["layer", "name"])["axis_projection"]
    assert torch.allclose(torch.tensor(mine.values), torch.tensor(reused.sort_index().values), atol=1e-5)


def test_only_the_same_model_revision_and_dtype_reuse_the_run(setup):
    final = ck.resolve_checkpoint(ck.parse_checkpoint(str(setup["final"])))
    assert ck.run_store_of_same_model(final, setup["run"], "float32") is not None
    assert ck.run_store_of_same_model(final, setup["run"], "bfloat16") is None
    for other in (str(setup["perturbed"]), f"{setup['repo']}@{setup['first']}", "someone/other-model"):
        resolved = ck.resolve_checkpoint(ck.parse_checkpoint(other), setup["root"] / "exports")
        assert ck.run_store_of_same_model(resolved, setup["run"], "float32") is None, other


def test_rerun_does_no_extraction(setup, first_run):
    report, _ = first_run

    def refuse(spec):
        raise AssertionError(f"model {spec.model_id} loaded on a resumed run")

    again = ck.run_project_checkpoints(_config(setup), loader=refuse)
    assert again.extracted == 0 and all(c.already_done == c.total for c in again.checkpoints)
    pd.testing.assert_frame_equal(again.table, report.table)
    # a subset of the stored layers is fine without reloading; layers never extracted are refused
    sub = ck.run_project_checkpoints(
        ck.CheckpointsConfig(**{**_config(setup, out=setup["root"] / "sub").__dict__, "layers": "2"}), loader=refuse)
    assert sub.layers == [2]
    pd.testing.assert_frame_equal(
        sub.table.drop(columns=["dist_to_previous"]).reset_index(drop=True),
        report.table[report.table["layer"] == 2].drop(columns=["dist_to_previous"]).reset_index(drop=True),
        check_dtype=False)
    with pytest.raises(RunMismatchError, match="layers"):
        ck.run_project_checkpoints(ck.CheckpointsConfig(**{**_config(setup).__dict__, "layers": "0"}), loader=refuse)


def test_crash_and_resume(setup, first_run, models, monkeypatch, tmp_path):
    report, _ = first_run
    run = tmp_path / "run"
    shutil.copytree(setup["run"], run, ignore=shutil.ignore_patterns("checkpoints"))
    cfg = ck.CheckpointsConfig(**{**_config(setup).__dict__, "run_dir": run, "batch_size": 2,
                                  "checkpoints": (str(setup["perturbed"]), str(setup["final"])),
                                  "names": ("perturbed", "final")})
    import pipeline.extract as extract_module

    real = extract_module.extract_batch
    n = {"calls": 0}

    def crashing(*args, **kwargs):
        n["calls"] += 1
        if n["calls"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(extract_module, "extract_batch", crashing)
    with pytest.raises(KeyboardInterrupt):
        ck.run_project_checkpoints(cfg, loader=_counting_loader([], models))
    stored = len(ActivationStore(run / "checkpoints" / "perturbed").entries())
    assert stored == 4  # two batches of two saved before the kill
    monkeypatch.setattr(extract_module, "extract_batch", real)
    calls = []
    resumed = ck.run_project_checkpoints(cfg, loader=_counting_loader(calls, models))
    total = resumed.checkpoints[0].total
    assert resumed.checkpoints[0].already_done == 4 and resumed.checkpoints[0].extracted == total - 4
    assert resumed.checkpoints[1].reused == total and resumed.checkpoints[1].extracted == 0
    expected = report.table[report.table["checkpoint"].isin(["perturbed", "final"])]
    got = resumed.table
    merged = got.merge(expected, on=["checkpoint", "layer", "name"], suffixes=("", "_ref"))
    assert len(merged) == len(got)
    assert (merged["axis_projection"] - merged["axis_projection_ref"]).abs().max() < 1e-5
    # stop_event: stops between batches, resumes later
    import threading
    stop = threading.Event()
    shutil.rmtree(run / "checkpoints")
    seen = []

    def progress(done, total_, message):
        seen.append(done)
        stop.set()

    stopped = ck.run_project_checkpoints(cfg, progress=progress, stop_event=stop, loader=_counting_loader([], models))
    assert stopped.stopped and stopped.table is None and seen
    finished = ck.run_project_checkpoints(cfg, loader=_counting_loader([], models))
    assert finished.table is not None and finished.checkpoints[0].already_done > 0


def test_parse_and_resolve(setup, tmp_path):
    spec = ck.parse_checkpoint("org/model@step-1000")
    assert (spec.model_id, spec.revision, spec.name) == ("org/model", "step-1000", "org/model@step-1000")
    assert ck.resolve_checkpoint(spec).kind == "hub"
    named = ck.parse_checkpoint("early=org/model@abc")
    assert (named.name, named.model_id, named.revision) == ("early", "org/model", "abc")
    assert "/" not in named.safe_name and "/" not in spec.safe_name and spec.safe_name != named.safe_name
    # a revision that is a separate local path, or a subfolder (HF Trainer 'checkpoint-N' layout)
    out = tmp_path / "out"
    (out / "checkpoint-500").mkdir(parents=True)
    r = ck.resolve_checkpoint(ck.parse_checkpoint(f"{out}@checkpoint-500"))
    assert r.kind == "path" and Path(r.source) == out / "checkpoint-500"
    r = ck.resolve_checkpoint(ck.parse_checkpoint(f"{out}@{setup['perturbed']}"))
    assert r.kind == "path" and Path(r.source) == setup["perturbed"]
    with pytest.raises(ModelLoadError, match="not a git repository"):
        ck.resolve_checkpoint(ck.parse_checkpoint(f"{out}@main"))
    with pytest.raises(ModelLoadError, match="no git revision"):
        ck.resolve_checkpoint(ck.parse_checkpoint(f"{setup['repo']}@nope"))
    head = ck.resolve_checkpoint(ck.parse_checkpoint(f"{setup['repo']}@HEAD"), tmp_path / "exp")
    assert head.kind == "git" and head.revision != setup["first"]
    head.prepare()
    assert (Path(head.source) / "model.safetensors").read_bytes() == (setup["perturbed"] / "model.safetensors").read_bytes()
    (tmp_path / "a" / "ckpt").mkdir(parents=True)
    (tmp_path / "b" / "ckpt").mkdir(parents=True)
    specs = ck.parse_checkpoints([str(tmp_path / "a" / "ckpt"), str(tmp_path / "b" / "ckpt")])
    assert len({s.name for s in specs}) == 2 and all(s.name.startswith("ckpt#") for s in specs)
    with pytest.raises(ValueError, match="not distinct"):
        ck.parse_checkpoints([str(setup["final"]), str(setup["final"])])
    assert ck.select_layers(None, 30) == [15] and ck.select_layers("all", 4) == [0, 1, 2, 3]
    assert ck.select_layers("10:14", 30) == [10, 11, 12, 13] and ck.select_layers("-1,3", 8) == [3, 7]
    with pytest.raises(ValueError):
        ck.select_layers("9", 4)


def test_cli_and_figures(setup, first_run, tmp_path):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    ck.add_cli(sub)
    args = parser.parse_args(["project-checkpoints", "--run-dir", str(setup["run"]), "--checkpoints",
                              f"perturbed={setup['perturbed']}", f"final={setup['final']}", "--layers", "2",
                              "--out-dir", str(tmp_path / "cli"), "--no-figures"])
    assert args.func(args) == 0  # already extracted under checkpoints/perturbed and checkpoints/final
    table, summary = ck.load_checkpoint_results(tmp_path / "cli")
    assert set(table["checkpoint"]) == {"perturbed", "final"} and not (tmp_path / "cli" / "trajectories.html").exists()
    report, _ = first_run
    fig = ck.trajectory_figure(report.table, layer=2)
    assert {t.name for t in fig.data} >= {"pirate", "ghost", "stoic", "default (Assistant)"}
    assert list(fig.data[0].x) == ["git-first", "perturbed", "final"]
    assert len(ck.pc_trajectory_figure(report.table).data) == 4
    assert len(ck.summary_figure(report.summary, layer=1).data) >= 4
