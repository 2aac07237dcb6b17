"""The app's library modules without Gradio: chat engine, transcripts, plots, jobs, roles data, run views."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from app.chat_engine import (
    AxisChoice,
    ChatSettings,
    ChatSetupError,
    Conversation,
    SteerSettings,
    load_axis_from_path,
    parse_layers,
    resolve_intervention,
    run_turn,
)
from app.jobs import HeavySlot, JobManager
from app.transcripts import FORMAT, build_transcript, load_transcript, save_transcript
from steering.axis_io import AxisBundle, AxisFileError, AxisMetadata, save_axis


def make_axis(n_layers: int, d_model: int, tau: float = 0.5, seed: int = 0) -> AxisChoice:
    torch.manual_seed(seed)
    bundle = AxisBundle(axis=torch.randn(n_layers, d_model),
                        metadata=AxisMetadata(model_id="tiny", thresholds={"p0.25": [tau] * n_layers}))
    return AxisChoice(bundle, source="test")


# --------------------------------------------------------------------------- settings -> plan


def test_layer_text_errors_reach_the_chat_as_setup_errors() -> None:
    assert parse_layers("0, 2-3, -1", 6) == [0, 2, 3, 5]
    with pytest.raises(ChatSetupError, match="outside"):
        parse_layers("7", 6)


def test_resolve_intervention_modes() -> None:
    axis = make_axis(4, 8, tau=0.5)
    assert resolve_intervention(axis, SteerSettings(), 4)[0] is None
    plan, taus, layers, note = resolve_intervention(axis, SteerSettings(mode="cap", layers="1-2"), 4)
    assert layers == [1, 2] and taus == {1: 0.5, 2: 0.5} and [i.lo for i in plan.interventions] == [0.5, 0.5]
    assert "p0.25" in note
    plan, taus, _, _ = resolve_intervention(axis, SteerSettings(mode="cap", layers="0", tau_source="value",
                                                                tau_value=-2.0, positions="generated"), 4)
    assert taus == {0: -2.0} and plan.positions == "generated"
    calibration = torch.arange(12, dtype=torch.float32).reshape(3, 4)  # 3 tokens x 4 layers
    _, taus, _, note = resolve_intervention(axis, SteerSettings(mode="cap", layers="3", tau_source="calibrate",
                                                                quantile=0.5), 4, calibration)
    assert taus == {3: 7.0} and "3 unsteered tokens" in note
    plan, taus, _, _ = resolve_intervention(axis, SteerSettings(mode="add", layers="2", coefficient=-3), 4)
    assert taus == {} and plan.interventions[0].coefficient == -3
    with pytest.raises(ChatSetupError, match="no thresholds at p0.5"):
        resolve_intervention(axis, SteerSettings(mode="cap", quantile=0.5), 4)
    with pytest.raises(ChatSetupError, match="needs an axis"):
        resolve_intervention(None, SteerSettings(mode="add"), 4)
    with pytest.raises(ChatSetupError, match="no paper capping config"):
        resolve_intervention(axis, SteerSettings(mode="paper-cap", experiment="x"), 4)
    with pytest.raises(ChatSetupError, match="calibration needs"):
        resolve_intervention(axis, SteerSettings(mode="cap", tau_source="calibrate"), 4)
    with pytest.raises(ChatSetupError, match="positions"):
        SteerSettings(positions="middle")


def test_paper_capping_config_floors() -> None:
    from steering.capping_config import parse_capping_config

    axis = make_axis(4, 8)
    direction = -axis.bundle.axis[2] / axis.bundle.axis[2].norm()
    axis.capping = parse_capping_config({"vectors": {"v": {"layer": 2, "vector": direction}},
                                         "experiments": [{"id": "layers_2:3-p0.25",
                                                          "interventions": [{"vector": "v", "cap": 1.5}]}]})
    plan, taus, layers, _ = resolve_intervention(axis, SteerSettings(mode="paper-cap", experiment="layers_2:3-p0.25"), 4)
    assert layers == [2] and taus == {2: pytest.approx(-1.5)} and plan.interventions[0].lo == pytest.approx(-1.5)
    with pytest.raises(ChatSetupError, match="no experiment"):
        resolve_intervention(axis, SteerSettings(mode="paper-cap", experiment="nope"), 4)


def test_load_axis_from_path(tmp_path: Path) -> None:
    with pytest.raises(AxisFileError, match="run the axis step"):
        load_axis_from_path(tmp_path)
    save_axis(tmp_path / "axis.safetensors", make_axis(3, 4).bundle)
    assert load_axis_from_path(tmp_path).source == f"run {tmp_path}"
    assert load_axis_from_path(tmp_path / "axis.safetensors").bundle.axis.shape == (3, 4)


# --------------------------------------------------------------------------- a turn on the tiny model


def test_run_turn_caps_and_keeps_two_threads(tiny_model) -> None:
    axis = make_axis(tiny_model.n_layers, tiny_model.d_model, tau=3.0)
    conversation = Conversation()
    settings = ChatSettings(max_new_tokens=6, steer=SteerSettings(mode="cap", layers="1-2"), system_prompt="Be brief.")
    events = list(run_turn(tiny_model, conversation, "Who are you?", settings, axis))
    assert events[-1].done and {e.side for e in events} == {None, "baseline", "steered"}
    turn = conversation.turns[0]
    assert len(turn.steered.token_ids) == len(turn.steered.projections) > 0
    assert turn.baseline is not None and turn.baseline.projections
    for layer in (1, 2):  # the monitor sees the capped activations: never below tau
        assert min(turn.steered.series(layer)) >= 3.0 - 1e-4
    assert set(turn.steered.projections[0]) == set(range(tiny_model.n_layers))
    # second turn: each thread continues its own answers; calibration uses both turns' unsteered tokens
    settings2 = ChatSettings(max_new_tokens=4, compare=False,
                             steer=SteerSettings(mode="cap", layers="3", tau_source="calibrate", quantile=0.9))
    list(run_turn(tiny_model, conversation, "And then?", settings2, axis))
    second = conversation.turns[1]
    assert second.baseline is not None  # calibration needs the unsteered answer even without compare
    assert conversation.thread("baseline")[1]["content"] == turn.baseline.text
    assert conversation.thread("steered")[1]["content"] == turn.steered.text
    calib = conversation.calibration_projections()
    assert calib.shape == (len(turn.baseline.token_ids) + len(second.baseline.token_ids), tiny_model.n_layers)
    assert second.thresholds[3] == pytest.approx(float(torch.quantile(calib[:, 3], 0.9)), rel=1e-5)


def test_run_turn_errors_leave_conversation_unchanged(tiny_model) -> None:
    conversation = Conversation()
    wrong = make_axis(tiny_model.n_layers + 1, tiny_model.d_model)
    with pytest.raises(ChatSetupError, match="does not fit model"):
        list(run_turn(tiny_model, conversation, "hi", ChatSettings(), wrong))
    with pytest.raises(ChatSetupError, match="layer 9 is outside"):
        list(run_turn(tiny_model, conversation, "hi", ChatSettings(steer=SteerSettings(mode="cap", layers="9")),
                      make_axis(tiny_model.n_layers, tiny_model.d_model)))
    assert conversation.turns == []
    # no axis and no intervention: a plain chat without projections
    list(run_turn(tiny_model, conversation, "hi", ChatSettings(max_new_tokens=3)))
    assert conversation.turns[0].baseline is None and conversation.turns[0].steered.projections[0] == {}


# --------------------------------------------------------------------------- transcripts and plots


def test_transcript_json(tiny_model, tmp_path: Path) -> None:
    axis = make_axis(tiny_model.n_layers, tiny_model.d_model, tau=0.0)
    conversation = Conversation()
    list(run_turn(tiny_model, conversation, "Hello", ChatSettings(max_new_tokens=4, steer=SteerSettings(
        mode="cap", layers="1")), axis))
    data = build_transcript(conversation, model={"model_id": "tiny"}, axis=axis, monitor_layer=1,
                            tokenizer=tiny_model.tokenizer)
    turn = data["turns"][0]
    assert data["format"] == FORMAT and data["axis"]["shape"] == [tiny_model.n_layers, tiny_model.d_model]
    assert turn["settings"]["steer"]["mode"] == "cap" and turn["intervention"]["thresholds"] == {"1": 0.0}
    steered = turn["steered"]
    assert len(steered["tokens"]) == len(steered["token_ids"]) == len(steered["projections"]["1"])
    assert steered["mean_projection"]["1"] == pytest.approx(sum(steered["projections"]["1"]) / len(steered["token_ids"]))
    assert turn["baseline"]["text"]
    path = save_transcript(tmp_path, data, name="t")
    assert load_transcript(path) == json.loads(path.read_text())
    with pytest.raises(ValueError, match="not a chat transcript"):
        (tmp_path / "x.json").write_text("{}")
        load_transcript(tmp_path / "x.json")


def test_plots() -> None:
    from app.chat_engine import Reply, Turn
    from app.plots import drift_figure, layer_summary_figure, pca_figure, projection_figure, score_histogram
    from steering.axis_math import summarize_layers

    conversation = Conversation([Turn(user="a", steered=Reply("x", [1, 2], [{0: 1.0}, {0: 2.0}]),
                                      baseline=Reply("y", [3], [{0: -1.0}]), thresholds={0: 1.0})])
    fig = projection_figure(conversation, 0)
    assert {t.name for t in fig.data} == {"steered", "unsteered", "tau (cap floor)"}
    assert list(drift_figure(conversation, 0).data[1].y) == [1.5]
    torch.manual_seed(0)
    roles, axis = torch.randn(5, 3, 8), torch.randn(3, 8)
    fig, result = pca_figure(list("abcde"), roles[:, 1], axis[1], 1, default_vector=torch.randn(8))
    assert list(fig.data[0].text) == list("abcde") and "PC1" in fig.layout.title.text and result.pc1_axis_cosine >= 0
    assert len(layer_summary_figure(summarize_layers(roles, axis)).data) == 4
    hist = score_histogram(["a", "a", "b"], [3, 1, None])
    assert [sum(t.y) for t in hist.data] == [0, 1, 0, 1]


# --------------------------------------------------------------------------- jobs


def test_heavy_slot_and_jobs() -> None:
    slot = HeavySlot()
    assert slot.try_acquire("chat")
    waiting = slot.wait_for("pipeline", poll=0.01)
    assert "busy with chat" in next(waiting)
    slot.release()
    list(waiting)  # acquires now
    assert slot.holder == "pipeline"
    slot.release()

    manager = JobManager(slot)
    try:
        started = threading.Event()

        def slow(job):
            import logging

            logging.getLogger("pipeline.test").info("working")
            started.set()
            for i in range(200):
                job.progress(i, 200, "step")
                if job.stop_event.is_set():
                    return "stopped"
                time.sleep(0.01)
            return "finished"

        job = manager.submit("slow", slow, heavy=True)
        assert started.wait(5)
        with pytest.raises(Exception, match="still running"):
            manager.submit("other", slow)
        manager.cancel()
        manager.wait(job, 5)
        assert job.status == "cancelled" and job.result == "stopped" and "working" in job.log_tail()
        assert slot.holder is None  # released
        failing = manager.submit("bad", lambda j: 1 / 0)
        manager.wait(failing, 5)
        assert failing.status == "failed" and "ZeroDivisionError" in failing.error
    finally:
        manager.close()


# --------------------------------------------------------------------------- roles data and runs


def test_roles_data(tmp_path: Path) -> None:
    from app import roles_data
    from pipeline.role_schema import RoleDataError, load_role_dir

    table = roles_data.catalog_table("pirate")
    assert "pirate" in set(table["name"]) and table[table["name"] == "pirate"]["role file"].iloc[0] == "shipped"
    assert set(roles_data.catalog_table(category="fantastical")["category"]) == {"fantastical"}
    pirate = roles_data.find_role("pirate", [tmp_path, roles_data.ROLES_DIR])
    assert pirate is not None and "### pirate" in roles_data.role_markdown(pirate)
    text = roles_data.role_json(pirate).replace("pirate", "buccaneer")
    path = roles_data.save_role(tmp_path / "mine", "buccaneer", text)
    assert path.name == "buccaneer.json"
    assert load_role_dir(tmp_path / "mine").names == ["buccaneer"]  # a complete role set
    with pytest.raises(RoleDataError, match="invalid JSON"):
        roles_data.save_role(tmp_path / "mine", "x", "{")
    with pytest.raises(RoleDataError, match="exactly 5 prompts"):
        roles_data.save_role(tmp_path / "mine", "x", json.dumps({"instruction": [], "questions": ["q"],
                                                                 "eval_prompt": "{question}{answer}"}))
    template = roles_data.new_role_template("sea-witch", "A witch of the sea.")
    assert roles_data.role_from_json("sea-witch", json.dumps(template)).name == "sea-witch"
    sets = roles_data.role_sets(tmp_path)
    assert roles_data.SHIPPED in sets and roles_data.MINE not in sets  # tmp_path/roles does not exist


def test_run_overview_of_empty_and_new_runs(tmp_path: Path) -> None:
    from app.pipeline_steps import responses_table, run_overview, step_function, PipelineSettings

    assert run_overview(tmp_path / "nope") == {"run_dir": str(tmp_path / "nope"), "exists": False}
    info = run_overview(tmp_path)
    assert info["rollouts"] == 0 and info["responses"] == 0 and info["axis"] is False
    assert responses_table(tmp_path).empty
    with pytest.raises(ValueError, match="unknown step"):
        step_function("train", PipelineSettings(run_dir=str(tmp_path), model_id="m"), None)
    with pytest.raises(ValueError, match="run directory"):
        PipelineSettings(run_dir=" ", model_id="m")


def test_responses_with_scores_filters_and_histogram_lists(tmp_path: Path) -> None:
    from app.pipeline_steps import filter_responses, run_overview, score_lists, scored_responses
    from pipeline.store import JsonlLog, RunPaths, write_response_shard

    rows = []
    for i, (role, text) in enumerate([("default", "I am an assistant."), ("pirate", "Arr, treasure!"),
                                      ("pirate", "I am an AI."), ("ghost", "Boo.")]):
        rows.append({"rollout_id": f"{role}/p0/q{i}/s0", "role": role, "prompt_index": 0, "question_index": i,
                     "sample_index": 0, "system_prompt": "", "question": f"question {i}", "conversation": "[]",
                     "response": text, "finish_reason": "stop", "n_tokens": 3})
    write_response_shard(tmp_path, rows)
    JsonlLog(RunPaths(tmp_path).scores).append_many([
        {"rollout_id": "pirate/p0/q1/s0", "score": 3}, {"rollout_id": "pirate/p0/q2/s0", "score": 1},
        {"rollout_id": "ghost/p0/q3/s0", "score": None}])
    frame = scored_responses(tmp_path)
    assert list(frame["role"]) == ["default", "ghost", "pirate", "pirate"]
    assert list(filter_responses(frame, role="pirate")["score"]) == [3, 1]
    assert list(filter_responses(frame, text="TREASURE")["rollout_id"]) == ["pirate/p0/q1/s0"]
    assert len(filter_responses(frame, limit=2)) == 2
    assert score_lists(frame) == (["ghost", "pirate", "pirate"], [None, 3, 1])
    info = run_overview(tmp_path)
    assert info["responses"] == 4 and info["scores"] == 2
