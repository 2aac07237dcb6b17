"""The judge step against the fake OpenAI / Anthropic servers, on a small run directory."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from pathlib import Path

import pytest

from pipeline import judge as judge_mod
from pipeline.judge import (
    JudgeAborted,
    JudgeConfig,
    judge_run,
    judge_run_async,
    latest_score_records,
    parse_score,
    plan_judge,
    read_scores,
)
from pipeline.llm import MissingAPIKeyError
from pipeline.role_schema import RoleDataError
from pipeline.store import JsonlLog, RunPaths, write_response_shard
from tests.fake_llm_servers import FakeLLMServer, error, reply  # fixtures come from tests/conftest.py

EVAL = (
    "Judge whether the answer is in the role of a {role}.\nQUESTION<<{question}>>\nANSWER<<{answer}>>\n"
    "0 refuses, 1 AI that helps, 2 AI with some role traits, 3 fully in role. Reply with the digit only."
)


def role_file(name: str) -> dict:
    return {
        "instruction": [{"pos": f"You are a {name}, variant {i}."} for i in range(5)],
        "questions": [f"{name} question {i}?" for i in range(3)],
        "eval_prompt": EVAL.replace("{role}", name),
    }


def make_run(tmp_path: Path, roles=("pirate", "stoic"), per_role: int = 3, n_default: int = 2) -> Path:
    run = tmp_path / "run"
    roles_dir = RunPaths(run).roles_dir
    roles_dir.mkdir(parents=True)
    (roles_dir / "default.json").write_text(json.dumps({"instruction": [{"pos": ""}]}), encoding="utf-8")
    for name in roles:
        (roles_dir / f"{name}.json").write_text(json.dumps(role_file(name)), encoding="utf-8")
    (roles_dir / "extraction_questions.jsonl").write_text(
        "".join(json.dumps({"id": i, "question": f"General question {i}?"}) + "\n" for i in range(per_role)),
        encoding="utf-8",
    )
    rows = []
    for name in roles:
        for q in range(per_role):
            rows.append(_row(f"{name}-{q}", name, q))
    for q in range(n_default):
        rows.append(_row(f"default-{q}", "default", q))
    # two shards, as the generation step would write them
    write_response_shard(run, rows[: len(rows) // 2])
    write_response_shard(run, rows[len(rows) // 2 :])
    return run


def _row(rollout_id: str, role: str, q: int) -> dict:
    question = f"General question {q}?"
    response = f"RESPONSE[{rollout_id}]"
    return {
        "rollout_id": rollout_id, "role": role, "prompt_index": 0, "question_index": q, "sample_index": 0,
        "system_prompt": f"You are a {role}.", "question": question,
        "conversation": json.dumps([{"role": "user", "content": question}, {"role": "assistant", "content": response}]),
        "response": response, "finish_reason": "stop", "n_tokens": 7,
    }


def rollout_of(request) -> str:
    return re.search(r"RESPONSE\[([^\]]+)\]", request.last_user_text).group(1)


def score_by_question(request) -> str:
    """Deterministic fake judge: the score is the question index (0-2)."""
    return rollout_of(request).rsplit("-", 1)[1]


def test_good_path_both_protocols(tmp_path: Path, llm_server: FakeLLMServer) -> None:
    run = make_run(tmp_path)
    llm_server.handler = score_by_question
    seen = []
    report = judge_run(run, JudgeConfig(llm=llm_server.config()), progress=lambda d, t, m: seen.append((d, t)))

    assert report.requested == 6 and report.scored == 6 and report.unscored == 0
    assert report.default_responses == 2 and report.already_scored == 0
    assert report.score_counts == {0: 2, 1: 2, 2: 2, 3: 0}
    assert seen[-1] == (6, 6)
    assert read_scores(run) == {f"{r}-{q}": q for r in ("pirate", "stoic") for q in range(3)}

    prompts = {rollout_of(r): r.last_user_text for r in llm_server.chat_requests}
    assert set(prompts) == set(read_scores(run))  # default responses are not judged
    assert "QUESTION<<General question 1?>>" in prompts["stoic-1"]
    assert "ANSWER<<RESPONSE[stoic-1]>>" in prompts["stoic-1"] and "role of a stoic" in prompts["stoic-1"]

    record = JsonlLog(RunPaths(run).scores).read()[0]
    assert set(record) == {"rollout_id", "role", "score", "raw", "judge_model", "error"}
    assert record["judge_model"] == llm_server.config().model and record["error"] is None

    # nothing left to do on a second run
    llm_server.requests.clear()
    again = judge_run(run, JudgeConfig(llm=llm_server.config()))
    assert again.requested == 0 and again.already_scored == 6 and llm_server.requests == []


@pytest.mark.parametrize(
    ("text", "score"),
    [("2", 2), (" 3\n", 3), ("**1**", 1), ("0.", 0), ("Score: 2", 2), ("score = 3", 3),
     ("The answer stays in role.\nScore: **1**", 1), ("Final score is 2", 2)],
)
def test_parse_score_accepts(text: str, score: int) -> None:
    assert parse_score(text) == (score, None)


@pytest.mark.parametrize(
    ("text", "reason"),
    [("", "empty"), ("4", "outside 0-3"), ("Score: 7", "outside 0-3"), ("It is quite good", "no score"),
     ("2 or 3", "no score")],
)
def test_parse_score_rejects(text: str, reason: str) -> None:
    score, problem = parse_score(text)
    assert score is None and reason in problem


def test_garbage_scores_are_stored_unscored_and_retried(tmp_path: Path, openai_server: FakeLLMServer) -> None:
    run = make_run(tmp_path, roles=("pirate",))
    bad = {"pirate-0": "I would rate this highly.", "pirate-2": "5"}
    openai_server.handler = lambda req: bad.get(rollout_of(req), "3")
    report = judge_run(run, JudgeConfig(llm=openai_server.config()))
    assert report.scored == 1 and report.unscored == 2

    latest = latest_score_records(run)
    assert latest["pirate-0"]["score"] is None and latest["pirate-0"]["raw"] == "I would rate this highly."
    assert "no score" in latest["pirate-0"]["error"]
    assert "outside 0-3" in latest["pirate-2"]["error"]
    assert read_scores(run) == {"pirate-1": 3}

    openai_server.requests.clear()
    openai_server.handler = lambda req: "Score: 2"
    again = judge_run(run, JudgeConfig(llm=openai_server.config()))
    assert again.requested == 2 and again.already_scored == 1
    assert sorted(rollout_of(r) for r in openai_server.chat_requests) == ["pirate-0", "pirate-2"]
    assert read_scores(run) == {"pirate-0": 2, "pirate-1": 3, "pirate-2": 2}


def test_429_then_success_with_backoff(tmp_path: Path, anthropic_server: FakeLLMServer) -> None:
    run = make_run(tmp_path, roles=("pirate",), per_role=2)
    anthropic_server.enqueue(error(429, "rate limited", retry_after_ms=150))
    anthropic_server.handler = lambda req: "1"
    report = judge_run(run, JudgeConfig(llm=anthropic_server.config(max_concurrency=1)))
    assert report.scored == 2 and report.usage["retries"] == 1
    assert len(anthropic_server.chat_requests) == 3
    assert read_scores(run) == {"pirate-0": 1, "pirate-1": 1}


def test_api_that_keeps_failing_stops_with_scores_kept(tmp_path: Path, openai_server: FakeLLMServer) -> None:
    run = make_run(tmp_path)
    openai_server.enqueue("3", "2")
    openai_server.handler = lambda req: error(500, "internal meltdown")
    config = JudgeConfig(llm=openai_server.config(max_concurrency=1, max_retries=2))
    with pytest.raises(JudgeAborted) as info:
        judge_run(run, config)
    message = str(info.value)
    assert "500" in message and "internal meltdown" in message and "run the judge again" in message
    assert info.value.report.scored == 2
    assert len(read_scores(run)) == 2
    assert len(openai_server.chat_requests) == 2 + 3  # two answers, then 1 try + 2 retries


def test_rejected_request_is_recorded_and_the_run_continues(tmp_path: Path, openai_server: FakeLLMServer) -> None:
    run = make_run(tmp_path, roles=("pirate",))
    openai_server.handler = lambda req: error(400, "context too long") if rollout_of(req) == "pirate-1" else "2"
    report = judge_run(run, JudgeConfig(llm=openai_server.config()))
    assert report.scored == 2 and report.failed == 1
    assert "context too long" in latest_score_records(run)["pirate-1"]["error"]


def test_resume_after_kill(tmp_path: Path, anthropic_server: FakeLLMServer) -> None:
    run = make_run(tmp_path)
    calls = {"n": 0}

    def slow(request):
        calls["n"] += 1
        return reply("2", delay_s=0.02 if calls["n"] <= 2 else 5.0)

    anthropic_server.handler = slow
    config = JudgeConfig(llm=anthropic_server.config(max_concurrency=1))

    async def run_until_two_scores() -> None:
        task = asyncio.create_task(judge_run_async(run, config))
        while len(read_scores(run)) < 2:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run_until_two_scores())
    first = read_scores(run)
    assert len(first) == 2

    anthropic_server.requests.clear()
    anthropic_server.handler = lambda req: "3"
    report = judge_run(run, config)
    assert report.already_scored == 2 and report.requested == 4
    assert not set(first) & {rollout_of(r) for r in anthropic_server.chat_requests}
    assert len(read_scores(run)) == 6


def test_latest_record_wins(tmp_path: Path) -> None:
    run = make_run(tmp_path, roles=("pirate",))
    log = JsonlLog(RunPaths(run).scores)
    log.append({"rollout_id": "pirate-0", "role": "pirate", "score": None, "raw": "?", "judge_model": "m", "error": "x"})
    log.append({"rollout_id": "pirate-0", "role": "pirate", "score": 2, "raw": "2", "judge_model": "m", "error": None})
    log.append({"rollout_id": "pirate-1", "role": "pirate", "score": 3, "raw": "3", "judge_model": "m", "error": None})
    log.append({"rollout_id": "pirate-1", "role": "pirate", "score": None, "raw": "", "judge_model": "m", "error": "x"})
    with open(log.path, "a", encoding="utf-8") as handle:
        handle.write('{"rollout_id": "pirate-2", "score": 1')  # torn line from a crash
    assert read_scores(run) == {"pirate-0": 2}


def test_missing_api_key(tmp_path: Path, llm_server: FakeLLMServer, no_llm_keys) -> None:
    run = make_run(tmp_path)
    with pytest.raises(MissingAPIKeyError) as info:
        judge_run(run, JudgeConfig(llm=llm_server.config(api_key=None)))
    assert info.value.env_var in str(info.value)
    assert llm_server.requests == [] and not RunPaths(run).scores.exists()


def test_missing_role_in_snapshot(tmp_path: Path, openai_server: FakeLLMServer) -> None:
    run = make_run(tmp_path)
    (RunPaths(run).roles_dir / "stoic.json").unlink()
    with pytest.raises(RoleDataError, match="stoic"):
        judge_run(run, JudgeConfig(llm=openai_server.config()))
    assert openai_server.requests == []


def test_role_filter_and_limit(tmp_path: Path, openai_server: FakeLLMServer) -> None:
    run = make_run(tmp_path)
    openai_server.handler = lambda req: "1"
    report = judge_run(run, JudgeConfig(llm=openai_server.config(), roles=("stoic",), limit=2))
    assert report.requested == 2 and set(read_scores(run)) <= {"stoic-0", "stoic-1", "stoic-2"}
    with pytest.raises(RoleDataError, match="wizard"):
        judge_run(run, JudgeConfig(llm=openai_server.config(), roles=("wizard",)))


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    judge_mod.add_cli(parser.add_subparsers())
    return parser.parse_args(["judge", *argv])


def test_dry_run_makes_no_request(tmp_path: Path, openai_server: FakeLLMServer, no_llm_keys, capsys) -> None:
    run = make_run(tmp_path)
    args = _cli(["--run-dir", str(run), "--dry-run", "--provider", "openai", "--base-url", openai_server.base_url])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "6 requests" in out and "2 default" in out and "estimated cost $" in out
    assert openai_server.requests == [] and not RunPaths(run).scores.exists()

    plan = plan_judge(run, JudgeConfig(llm=openai_server.config()))
    assert plan.pending == 6 and plan.est_input_tokens > 6 * 40 and plan.est_cost_usd > 0


def test_cli_good_path_and_errors(tmp_path: Path, openai_server: FakeLLMServer, no_llm_keys, capsys) -> None:
    run = make_run(tmp_path)
    openai_server.handler = lambda req: "3"
    args = _cli(["--run-dir", str(run), "--provider", "openai-compatible", "--model", "local-judge",
                 "--base-url", openai_server.base_url, "--concurrency", "4"])
    assert args.func(args) == 0
    assert "6 scored" in capsys.readouterr().out
    assert openai_server.chat_requests[0].body["model"] == "local-judge"

    missing_key = _cli(["--run-dir", str(run), "--provider", "anthropic"])
    assert missing_key.func(missing_key) == 2
    assert "ANTHROPIC_API_KEY" in capsys.readouterr().err


def test_every_request_rejected_stops_the_run(tmp_path: Path, openai_server: FakeLLMServer) -> None:
    run = make_run(tmp_path, per_role=5)
    openai_server.handler = lambda req: error(400, "Unsupported value: 'temperature' does not support 0.0")
    config = JudgeConfig(llm=openai_server.config(max_concurrency=1), max_rejected_in_a_row=3)
    with pytest.raises(JudgeAborted, match="3 requests in a row were rejected") as info:
        judge_run(run, config)
    assert "--temperature -1" in str(info.value)
    assert len(openai_server.chat_requests) == 3 and info.value.report.failed == 3


def test_stop_event_and_manifest(tmp_path: Path, openai_server: FakeLLMServer) -> None:
    import threading

    from pipeline.manifest import read_manifest

    run = make_run(tmp_path)
    stop = threading.Event()

    def handler(request):
        stop.set()  # ask to stop as soon as the first request arrives
        return "2"

    openai_server.handler = handler
    config = JudgeConfig(llm=openai_server.config(max_concurrency=1, api_key="sk-secret"))
    report = judge_run(run, config, stop_event=stop)
    assert report.stopped and "stopped on request" in report.stopped
    assert report.scored == 1 and report.remaining == 5
    step = read_manifest(run)["steps"]["judge"]
    assert "finished" not in step and step["settings"]["llm"]["model"] == "gpt-4.1-mini"
    assert "sk-secret" not in RunPaths(run).manifest.read_text()

    report = judge_run(run, config)
    assert report.remaining == 0 and "finished" in read_manifest(run)["steps"]["judge"]
    assert read_manifest(run)["steps"]["judge"]["scored"] == 6
    assert "sk-secret" not in repr(config)
