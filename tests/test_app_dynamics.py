"""Persona dynamics tab on the tiny random model: the calls behind its callbacks, then the launched app."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from app import dynamics_steps as ds
from tests.test_app_gradio import free_port
from tests.test_checkpoints import _make_run

MESSAGES = [
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "Arr, I be a pirate of the seven seas!"},
    {"role": "user", "content": "What do you value most?"},
    {"role": "assistant", "content": "I value honesty, curiosity and kindness."},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir, tiny_model):
    """A judged tiny run with its axis, an app context sharing the tiny model, and one checkpoint run as a job."""
    from app.context import AppContext
    from app.settings import AppConfig

    workspace = tmp_path_factory.mktemp("dyn-workspace")
    run = workspace / "runs" / "tiny"
    _make_run(run, tiny_model_dir, tiny_model)
    ctx = AppContext(config=AppConfig(workspace=workspace, run_dir=str(run), model_id=str(tiny_model_dir),
                                      device="cpu", dtype="float32"))
    ctx.models.adopt(tiny_model)
    checkpoints = f"early={tiny_model_dir}\n# a comment\n\nfinal={tiny_model_dir}\n"
    config = ds.checkpoints_config(str(run), checkpoints, "", "1,2", 3, ctx.models)
    job = ctx.jobs.wait(ctx.jobs.submit(ds.CHECKPOINTS_JOB, ds.checkpoints_function(config, ctx.models), heavy=True),
                        timeout=60)
    try:
        yield SimpleNamespace(ctx=ctx, run=run, workspace=workspace, model_dir=tiny_model_dir, job=job,
                              checkpoints=checkpoints)
    finally:
        ctx.jobs.close()
        ctx.llm_jobs.close()


# --------------------------------------------------------------------------- library calls behind the callbacks


def test_parsers(tmp_path: Path) -> None:
    assert ds.checkpoint_lines(" a=org/m@rev \n\n# skip\n/x/y\n") == ("a=org/m@rev", "/x/y")
    assert ds.parse_cap("p0.25") == "p0.25" and ds.parse_cap(" -3.5 ") == -3.5
    for bad in ("", "pxx", "high"):
        with pytest.raises(ValueError, match="p0.25"):
            ds.parse_cap(bad)
    assert ds.read_script(None, "Who are you?\n\n  Tell me more. \n") == (None, ["Who are you?", "Tell me more."])
    assert ds.read_script(None, '{"system_prompt": "Be brief.", "turns": ["Hi"]}') == ("Be brief.", ["Hi"])
    with pytest.raises(ValueError, match="not valid JSON"):
        ds.read_script(None, '["unclosed"')
    with pytest.raises(ValueError, match="upload a script"):
        ds.read_script(None, "  ")
    assert ds.read_transcript(None, json.dumps({"messages": MESSAGES}))[1]["role"] == "assistant"
    export = {"format": "assistant-axis-lab/chat-transcript", "turns": [
        {"user": "Hi", "steered": {"text": "Steered hello"}, "baseline": {"text": "Plain hello"},
         "settings": {"system_prompt": "Be kind."}}]}
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(export))
    assert ds.read_transcript(str(path), None, "baseline") == [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Plain hello"}]
    with pytest.raises(ValueError, match="upload a transcript"):
        ds.read_transcript(None, "")
    assert ds.latest_chat_export(tmp_path) == path and ds.latest_chat_export(tmp_path / "none") is None
    assert ds.pick_layer([1, 2], "2") == 2 and ds.pick_layer([1, 2], None) == 1 and ds.pick_layer([1, 2], 7) == 1
    with pytest.raises(ValueError, match="list the checkpoints"):
        ds.checkpoints_config(str(tmp_path), "\n# none\n")
    with pytest.raises(ValueError, match="does not exist"):
        ds.checkpoints_config(str(tmp_path / "missing"), "a")


def test_checkpoint_loader_shares_the_app_model(monkeypatch) -> None:
    from app.model_store import ModelStore
    from steering import models as model_module
    from steering.models import ModelSpec

    store = ModelStore()
    shared = SimpleNamespace(spec=ModelSpec(model_id="/m/final"), model_id="/m/final", n_layers=4, d_model=8,
                             device="cpu", revision_label=None)
    store.adopt(shared)
    loads = []
    monkeypatch.setattr(model_module, "load_model", lambda spec: loads.append(spec) or SimpleNamespace(spec=spec))
    loader = ds.checkpoint_loader(store)
    assert loader(ModelSpec(model_id="/m/final")) is shared and not loads  # the app's model is reused
    other = loader(ModelSpec(model_id="/m/early"))
    assert other.spec.model_id == "/m/early" and store.loaded is None  # the app's model was dropped first
    loader(ModelSpec(model_id="/m/final", revision="abc"))
    assert [s.model_id for s in loads] == ["/m/early", "/m/final"]


def test_checkpoints_job_and_views(env) -> None:
    job = env.job
    assert job.status == "done", (job.error, job.log_tail())
    report = job.result
    assert [c["name"] for c in report["checkpoints"]] == ["early", "final"] and report["layers"] == [1, 2]
    # both checkpoints are the run's own model: their activations come from the run
    assert all(c["reused_from_run"] == c["responses"] > 0 and c["extracted"] == 0 for c in report["checkpoints"])
    assert env.ctx.models.loaded is not None  # both checkpoints are the app's model: nothing was reloaded
    view = ds.checkpoint_results(env.run)
    assert view.layers == [1, 2] and view.checkpoints == ["early", "final"]
    trajectory, pcs, summary = ds.checkpoint_figures(view, 2)
    assert {t.name for t in trajectory.data} == {"ghost", "pirate", "stoic", "default (Assistant)"}
    assert list(trajectory.data[0].x) == ["early", "final"] and "layer 2" in trajectory.layout.title.text
    assert len(pcs.data) == 4 and len(summary.data) >= 4
    table = ds.display_table(view.summary)
    assert len(table) == 4 and not any(isinstance(v, float) and math.isnan(v) for v in table.to_numpy().ravel())
    with pytest.raises(FileNotFoundError, match="project-checkpoints"):
        ds.checkpoint_results(env.workspace)


def test_transcript_projection_views(env, tiny_model) -> None:
    from pipeline.drift import project_transcript

    bundle, source = ds.choose_axis(str(env.run))
    assert source == f"run {env.run}" and ds.drift_model_id("", bundle, "x") == str(env.model_dir)
    chat_axis = SimpleNamespace(bundle=bundle, source="the chat's axis")
    assert ds.choose_axis("", None, chat_axis) == (bundle, "the chat's axis")
    with pytest.raises(ValueError, match="choose an axis"):
        ds.choose_axis("", None, None)
    result = project_transcript(tiny_model, ds.read_transcript(None, json.dumps(MESSAGES)), bundle, "1,3")
    token_fig, turn_fig, table = ds.drift_views(result)
    assert [t.name for t in token_fig.data] == ["layer 1", "layer 3"] and len(turn_fig.data) == 2
    assert list(table["turn"]) == [1, 2, 1, 2] and list(table["layer"]) == [1, 1, 3, 3]
    assert table["text"].iloc[0].startswith("Arr") and (table["n_tokens"] > 0).all()


def test_capping_job_and_cancel(env) -> None:
    ctx = env.ctx
    bundle, _ = ds.choose_axis(str(env.run))
    fn = ds.capping_function(ctx.models, str(env.model_dir), bundle, ["Who are you?", "Tell me more."], "p0.5",
                             "2", None, max_new_tokens=4, out_dir=env.workspace / "drift")
    job = ctx.jobs.wait(ctx.jobs.submit(ds.CAPPING_JOB, fn, heavy=True), timeout=60)
    assert job.status == "done", (job.error, job.log_tail())
    assert (job.done, job.total) == (4, 4)  # uncapped turns, then capped ones
    comparison = job.result["comparison"]
    assert Path(job.result["files"]["json"]).exists()
    token_fig, turn_fig, table = ds.comparison_views(comparison)
    assert {t.name for t in token_fig.data} == {"uncapped", "capped"}
    tau = bundle.threshold(0.5)[2].item()
    capped = table[table["capped_layer"]]
    assert list(capped["layer"].unique()) == [2] and all(v == pytest.approx(tau, abs=1e-4) for v in capped["tau"])
    assert (capped["capped"] >= tau - 1e-3).all()
    assert ds.comparison_layers(comparison) == [2]
    # cancel before it starts: no model work, the job reports itself cancelled
    blocked = ctx.heavy.try_acquire("test")
    try:
        job = ctx.jobs.submit(ds.CAPPING_JOB, fn, heavy=True)
        ctx.jobs.cancel(job.id)
    finally:
        if blocked:
            ctx.heavy.release()
    assert ctx.jobs.wait(job, timeout=30).status == "cancelled"


# --------------------------------------------------------------------------- the launched app


@pytest.fixture(scope="module")
def app(env):
    from app.main import build_demo, launch

    demo = build_demo(ctx=env.ctx)
    port = free_port()
    launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", **vars(env))
    finally:
        demo.close()


def _plot(value) -> dict:
    return json.loads(value["plot"])


def _values(array) -> list:
    """A plotly JSON array: a plain list, or (numeric arrays from pandas) base64 ``bdata`` with a dtype."""
    if isinstance(array, dict) and "bdata" in array:
        import base64

        import numpy as np

        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return list(array)


def test_app_checkpoint_results_and_transcript_projection(app, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file

    c = Client(app.url, verbose=False)
    # Load results: the run's checkpoints folder, layer 2 chosen
    status, layer, summary, trajectory, pcs, summary_plot = c.predict(str(app.run), 2, api_name="/checkpoints_results")
    assert "2 checkpoints (early, final) at layers [1, 2]" in status
    assert layer["value"] == 2 and [v for _, v in layer["choices"]] == [1, 2]
    frame = pd.DataFrame(summary["data"], columns=summary["headers"])
    assert list(frame["checkpoint"]) == ["early", "final", "early", "final"] and set(frame["layer"]) == {1, 2}
    traces = _plot(trajectory)["data"]
    assert {t["name"] for t in traces} == {"ghost", "pirate", "stoic", "default (Assistant)"}
    assert _values(traces[0]["x"]) == ["early", "final"] and "layer 2" in _plot(trajectory)["layout"]["title"]["text"]
    assert len(_plot(pcs)["data"]) == 4 and _plot(summary_plot)["data"]
    with pytest.raises(Exception, match="project-checkpoints"):
        c.predict(str(tmp_path), None, api_name="/checkpoints_results")

    # Run again through the job: every activation is stored, so it resumes without loading a model
    status, log, layer, summary, *_ = c.predict(str(app.run), app.checkpoints, "", "1,2", 3, 1,
                                                api_name="/checkpoints_run")
    assert status.startswith("**Done**") and "Results of 2 checkpoints" in status, (status, log)
    assert "started project-checkpoints" in log and layer["value"] == 1
    assert "No job is running" in c.predict(api_name="/checkpoints_cancel")

    # Project an uploaded transcript onto the run's axis at layers 1 and 3
    path = tmp_path / "talk.json"
    path.write_text(json.dumps({"system_prompt": "You are a pirate.", "messages": MESSAGES}))
    status, token_plot, turn_plot, table = c.predict(
        handle_file(str(path)), "", "steered", str(app.run), None, "", "1,3", api_name="/drift_project")
    assert status.startswith("2 assistant turns") and "layers [1, 3]" in status and str(app.model_dir) in status
    turns = pd.DataFrame(table["data"], columns=table["headers"])
    assert list(turns["turn"]) == [1, 2, 1, 2] and list(turns["layer"]) == [1, 1, 3, 3]
    assert turns["text"].iloc[1].startswith("I value") and (turns["n_tokens"] > 0).all()
    token_traces = _plot(token_plot)["data"]
    assert [t["name"] for t in token_traces] == ["layer 1", "layer 3"]
    assert len(_values(token_traces[0]["y"])) == int(turns[turns["layer"] == 1]["n_tokens"].sum())
    turn_traces = _plot(turn_plot)["data"]
    assert _values(turn_traces[0]["x"]) == [1, 2]
    assert _values(turn_traces[0]["y"]) == pytest.approx(list(turns[turns["layer"] == 1]["mean_projection"]), abs=1e-3)
    with pytest.raises(Exception, match="outside the model"):
        c.predict(handle_file(str(path)), "", "steered", str(app.run), None, "", "9", api_name="/drift_project")


def test_app_scripted_capping_comparison(app) -> None:
    from gradio_client import Client

    c = Client(app.url, verbose=False)
    status, log, layer, token_plot, turn_plot, table = c.predict(
        None, '["Who are you?", "Tell me more."]', "", str(app.run), None, "", "2", "p0.5", "", 4, None,
        api_name="/drift_compare")
    assert status.startswith("**Done**") and "Saved to" in status, (status, log)
    assert layer["value"] == 2
    frame = pd.DataFrame(table["data"], columns=table["headers"])
    capped = frame[frame["capped_layer"]]
    assert list(capped["turn"]) == [1, 2] and (capped["capped"] >= capped["tau"] - 1e-3).all()
    assert {t["name"] for t in _plot(token_plot)["data"]} == {"uncapped", "capped"}
    assert [_values(t["x"]) for t in _plot(turn_plot)["data"]] == [[1, 2], [1, 2]]
    with pytest.raises(Exception, match="no thresholds at p0.33"):
        c.predict(None, "Hi", "", str(app.run), None, "", "2", "p0.33", "", 4, None, api_name="/drift_compare")
