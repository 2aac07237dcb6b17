"""build-roles against the fake OpenAI / Anthropic servers."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from pathlib import Path

import pytest

from pipeline import build_roles as br
from pipeline.build_roles import (
    BuildRolesAborted,
    BuildRolesConfig,
    build_roles,
    build_roles_async,
    parse_role_answer,
)
from pipeline.llm import Completion, MissingAPIKeyError
from pipeline.role_schema import CatalogEntry, RoleDataError, load_role_file
from tests.fake_llm_servers import FakeLLMServer, error, reply  # fixtures come from tests/conftest.py

CATALOG = [
    {"name": "pirate", "category": "fiction", "description": "a swashbuckling sea robber"},
    {"name": "librarian", "category": "occupation", "description": "a quiet keeper of books"},
    {"name": "stoic", "category": "philosophy", "description": "a follower of Stoic philosophy"},
]


def role_json(name: str, n_questions: int = 40, **changes) -> str:
    data = {
        "instruction": [{"pos": f"You are a {name}. Prompt variant {i}."} for i in range(5)],
        "questions": [f"As a {name}, what is your view on topic number {i}?" for i in range(n_questions)],
        "eval_prompt": (
            f"Decide whether the answer stays in the role of a {name}.\nQuestion: {{question}}\n"
            "Answer: {answer}\nScores: 0 refuses, 1 says it is an AI and helps, 2 AI with some "
            "traits of the role, 3 fully in role. Reply with the digit only."
        ),
    }
    data.update(changes)
    return json.dumps(data)


def persona(request) -> str:
    """The catalog name a build request is about."""
    first_user = next(m["content"] for m in request.messages if m["role"] == "user")
    return re.search(r"Persona name: (\S+)", first_user).group(1)


def good_handler(request) -> str:
    return role_json(persona(request))


def write_catalog(path: Path, entries=CATALOG) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
    return path


def make_config(tmp_path: Path, server: FakeLLMServer, **kw) -> BuildRolesConfig:
    catalog = write_catalog(tmp_path / "catalog.jsonl")
    llm = server.config(**kw.pop("llm", {}))
    return BuildRolesConfig(llm=llm, output_dir=tmp_path / "roles", catalog_path=catalog, **kw)


def test_good_path_both_protocols(tmp_path: Path, llm_server: FakeLLMServer) -> None:
    llm_server.handler = lambda req: reply(role_json(persona(req)), input_tokens=1000, output_tokens=2000)
    config = make_config(tmp_path, llm_server)
    seen: list[tuple[int, int, str]] = []
    report = build_roles(config, progress=lambda d, t, m: seen.append((d, t, m)))

    assert sorted(report.built) == ["librarian", "pirate", "stoic"]
    assert not report.failed and not report.refused and not report.skipped
    for name in ("pirate", "librarian", "stoic"):
        role = load_role_file(tmp_path / "roles" / f"{name}.json")
        assert len(role.instructions) == 5 and len(role.questions) == 40
    assert [d for d, _, _ in seen] == [1, 2, 3] and {t for _, t, _ in seen} == {3}

    prompts = {persona(r): r.messages[0]["content"] for r in llm_server.chat_requests}
    assert "a swashbuckling sea robber" in prompts["pirate"] and "{question}" in prompts["pirate"]

    summary = json.loads((tmp_path / "roles.build_summary.json").read_text())
    assert summary["done"] == ["librarian", "pirate", "stoic"]
    assert summary["usage"]["input_tokens"] == 3000 and summary["usage"]["output_tokens"] == 6000
    expected_cost = 3 * (1000 * 3.0 + 2000 * 15.0) / 1e6 if llm_server.protocol == "anthropic" \
        else 3 * (1000 * 0.4 + 2000 * 1.6) / 1e6
    assert summary["estimated_cost_usd"] == pytest.approx(expected_cost)
    assert report.usage["requests"] == 3


def test_malformed_then_good_feeds_back_the_problem(tmp_path: Path, openai_server: FakeLLMServer) -> None:
    bad_eval = role_json("pirate", eval_prompt="Rate the pirate answer {answer} from 0 to 3.")
    openai_server.enqueue("Sure! Here is a lovely pirate, arr.", bad_eval, role_json("pirate"))
    config = make_config(tmp_path, openai_server, roles=("pirate",))
    report = build_roles(config)

    assert report.built == ["pirate"]
    first, second, third = openai_server.chat_requests
    assert len(first.messages) == 1
    assert second.messages[1] == {"role": "assistant", "content": "Sure! Here is a lovely pirate, arr."}
    assert "does not contain a JSON object" in second.messages[2]["content"]
    assert "{question}" in third.messages[-1]["content"]  # validation error names the missing placeholder
    assert "eval_prompt" in third.messages[-1]["content"]


def test_gives_up_after_max_attempts(tmp_path: Path, anthropic_server: FakeLLMServer) -> None:
    anthropic_server.handler = lambda req: role_json(persona(req), n_questions=12)
    config = make_config(tmp_path, anthropic_server, roles=("stoic",), max_attempts=2)
    report = build_roles(config)
    assert report.built == [] and "exactly 40" in report.failed["stoic"]
    assert "after 2 attempts" in report.failed["stoic"]
    assert len(anthropic_server.chat_requests) == 2
    assert not (tmp_path / "roles" / "stoic.json").exists()


def test_refusals_are_reported_and_others_continue(tmp_path: Path, llm_server: FakeLLMServer) -> None:
    def handler(request):
        name = persona(request)
        if name == "pirate":
            return json.dumps({"refusal": "Piracy glorifies violence at sea."})
        if name == "librarian":
            return "I'm sorry, but I can't help with creating this persona. It is against my rules."
        return role_json(name)

    llm_server.handler = handler
    report = build_roles(make_config(tmp_path, llm_server))
    assert report.built == ["stoic"]
    assert report.refused["pirate"] == "Piracy glorifies violence at sea."
    assert report.refused["librarian"].startswith("I'm sorry, but I can't help")
    summary = json.loads((tmp_path / "roles.build_summary.json").read_text())
    assert set(summary["refused"]) == {"pirate", "librarian"} and summary["done"] == ["stoic"]
    assert len(llm_server.chat_requests) == 3  # refusals are not retried


def test_refusal_stop_reason() -> None:
    entry = CatalogEntry("pirate", "fiction", "a sea robber")
    answer = parse_role_answer(entry, Completion("", 5, 0, "refusal"))
    assert answer.refusal and "refusal" in answer.refusal
    cut = parse_role_answer(entry, Completion('{"instruction": [', 5, 10, "max_tokens"))
    assert cut.problem and "token limit" in cut.problem
    named = parse_role_answer(
        entry, Completion(role_json("pirate", eval_prompt="Is this Claude? {question} {answer} 0 1 2 3"), 1, 1, "end_turn")
    )
    assert named.problem and "Claude" in named.problem


def test_resume_skips_valid_files_and_rebuilds_invalid(tmp_path: Path, openai_server: FakeLLMServer) -> None:
    roles = tmp_path / "roles"
    roles.mkdir()
    (roles / "pirate.json").write_text(role_json("pirate"), encoding="utf-8")
    (roles / "librarian.json").write_text('{"instruction": []}', encoding="utf-8")
    openai_server.handler = good_handler

    report = build_roles(make_config(tmp_path, openai_server))
    assert report.skipped == ["pirate"] and sorted(report.built) == ["librarian", "stoic"]
    assert sorted(persona(r) for r in openai_server.chat_requests) == ["librarian", "stoic"]

    openai_server.requests.clear()
    again = build_roles(make_config(tmp_path, openai_server))
    assert sorted(again.skipped) == ["librarian", "pirate", "stoic"] and openai_server.requests == []

    forced = build_roles(make_config(tmp_path, openai_server, resume=False, start=1, end=2))
    assert forced.built == ["librarian"]


def test_resume_after_kill(tmp_path: Path, anthropic_server: FakeLLMServer) -> None:
    def slow(request):
        name = persona(request)
        return reply(role_json(name), delay_s=0.05 if name == "pirate" else 5.0)

    anthropic_server.handler = slow
    config = make_config(tmp_path, anthropic_server, llm={"max_concurrency": 1})

    async def run_until_first_role() -> None:
        task = asyncio.create_task(build_roles_async(config))
        while not (tmp_path / "roles" / "pirate.json").exists():
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # the librarian request is now in flight
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run_until_first_role())
    assert sorted(p.name for p in (tmp_path / "roles").glob("*.json")) == ["pirate.json"]
    summary = json.loads((tmp_path / "roles.build_summary.json").read_text())
    assert summary["stopped"] == "interrupted" and summary["done"] == ["pirate"]

    anthropic_server.requests.clear()
    anthropic_server.handler = good_handler
    report = build_roles(config)
    assert report.skipped == ["pirate"] and sorted(report.built) == ["librarian", "stoic"]
    assert "pirate" not in [persona(r) for r in anthropic_server.chat_requests]


def test_api_that_keeps_failing_stops_the_run(tmp_path: Path, openai_server: FakeLLMServer) -> None:
    openai_server.enqueue(role_json("pirate"))
    openai_server.handler = lambda req: error(503, "service unavailable")
    config = make_config(tmp_path, openai_server, llm={"max_concurrency": 1, "max_retries": 2})
    with pytest.raises(BuildRolesAborted) as info:
        build_roles(config)
    assert "503" in str(info.value) and "run again" in str(info.value)
    assert info.value.report.built == ["pirate"]
    assert (tmp_path / "roles" / "pirate.json").exists()
    summary = json.loads((tmp_path / "roles.build_summary.json").read_text())
    assert summary["stopped"] and summary["done"] == ["pirate"] and "librarian" in summary["failed"]
    assert summary["pending"] == ["stoic"]


def test_request_specific_error_fails_only_that_role(tmp_path: Path, openai_server: FakeLLMServer) -> None:
    openai_server.handler = lambda req: error(400, "flagged") if persona(req) == "pirate" else good_handler(req)
    report = build_roles(make_config(tmp_path, openai_server))
    assert "flagged" in report.failed["pirate"] and sorted(report.built) == ["librarian", "stoic"]


def test_missing_api_key(tmp_path: Path, anthropic_server: FakeLLMServer, no_llm_keys) -> None:
    config = make_config(tmp_path, anthropic_server, llm={"api_key": None})
    with pytest.raises(MissingAPIKeyError, match="ANTHROPIC_API_KEY"):
        build_roles(config)
    assert anthropic_server.requests == []


def test_unknown_role_names(tmp_path: Path, openai_server: FakeLLMServer) -> None:
    with pytest.raises(RoleDataError, match="wizard"):
        build_roles(make_config(tmp_path, openai_server, roles=("pirate", "wizard")))


def test_cli(tmp_path: Path, openai_server: FakeLLMServer, monkeypatch, capsys) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "cli-key")
    openai_server.handler = good_handler
    catalog = write_catalog(tmp_path / "catalog.jsonl")
    parser = argparse.ArgumentParser()
    br.add_cli(parser.add_subparsers())
    args = parser.parse_args([
        "build-roles", "--output-dir", str(tmp_path / "out"), "--catalog", str(catalog),
        "--roles", "pirate,stoic", "--provider", "openai", "--base-url", openai_server.base_url,
        "--concurrency", "2", "--max-retries", "1",
    ])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "2 built" in out
    assert sorted(p.name for p in (tmp_path / "out").glob("*.json")) == ["pirate.json", "stoic.json"]
    assert openai_server.chat_requests[0].body["temperature"] == 1.0

    bad = parser.parse_args(["build-roles", "--catalog", str(tmp_path / "missing.jsonl"),
                             "--output-dir", str(tmp_path / "out")])
    assert bad.func(bad) == 2
    assert "missing.jsonl" in capsys.readouterr().err


# =========================================================================== extract-questions

from pipeline import question_extraction as qe  # noqa: E402
from pipeline.question_extraction import (  # noqa: E402
    Candidate,
    ExtractQuestionsConfig,
    content_tokens,
    deduplicate,
    extract_questions,
    parse_labels,
)
from pipeline.role_schema import load_questions  # noqa: E402


def test_deduplicate_exact_and_near() -> None:
    pool = [
        Candidate("a", "What is your favorite food?"),
        Candidate("b", "what is your FAVORITE food"),  # exact after normalisation
        Candidate("c", "What's your favorite food?"),  # near: same content words
        Candidate("d", "What is your favorite food to cook on holidays?"),
        Candidate("e", "How do you handle criticism?"),
        Candidate("f", "How do you usually handle harsh criticism?"),
    ]
    kept, exact, near = deduplicate(pool, threshold=0.8)
    assert [c.role for c in kept] == ["a", "d", "e", "f"] and (exact, near) == (1, 1)
    kept, _, near = deduplicate(pool, threshold=0.5)  # 2 shared of 4 content words is enough now
    assert [c.role for c in kept] == ["a", "e"] and near == 3


def test_deduplicate_matches_brute_force() -> None:
    import random

    rng = random.Random(7)
    words = [f"w{i}" for i in range(30)]
    pool = [Candidate(str(i), " ".join(rng.sample(words, rng.randint(2, 7)))) for i in range(400)]
    for threshold in (0.5, 0.7, 0.9):
        kept, _, _ = deduplicate(pool, threshold)
        expected: list[Candidate] = []
        seen: set[str] = set()
        for cand in pool:
            key = " ".join(cand.question.split())
            if key in seen:
                continue
            seen.add(key)
            toks = content_tokens(cand.question)
            if all(len(toks & content_tokens(k.question)) / len(toks | content_tokens(k.question)) < threshold
                   for k in expected):
                expected.append(cand)
        assert kept == expected


def test_parse_labels() -> None:
    labels, problem = parse_labels('{"1": "general", "2": "Specific", "3": true}', 3)
    assert labels == {1: True, 2: False, 3: True} and problem is None
    labels, problem = parse_labels('{"1": "general", "3": "maybe"}', 3)
    assert labels == {1: True} and "2, 3" in problem


def write_question_roles(roles_dir: Path, n_roles: int = 4, n_questions: int = 10) -> None:
    """Roles whose even-numbered questions are marked GEN (general) for the fake labeller."""
    roles_dir.mkdir(parents=True)
    (roles_dir / "default.json").write_text(json.dumps({"instruction": [{"pos": ""}]}), encoding="utf-8")
    for r in range(n_roles):
        name = f"role{r}"
        questions = [
            f"GEN {name} asks about value number {i}?" if i % 2 == 0 else f"SPEC {name} tool {i}?"
            for i in range(n_questions)
        ]
        questions.append("How do you handle criticism?")  # shared by every role: exact duplicate
        (roles_dir / f"{name}.json").write_text(role_json(name, questions=questions), encoding="utf-8")


def label_handler(request) -> str:
    lines = re.findall(r"^(\d+)\. (.*)$", request.messages[0]["content"], flags=re.MULTILINE)
    return json.dumps({n: ("specific" if q.startswith("SPEC") else "general") for n, q in lines})


def test_extract_questions_end_to_end(tmp_path: Path, llm_server: FakeLLMServer) -> None:
    write_question_roles(tmp_path / "roles")
    llm_server.handler = label_handler
    config = ExtractQuestionsConfig(
        llm=llm_server.config(), roles_dir=tmp_path / "roles", n_questions=9, batch_size=7, oversample=0,
    )
    report = extract_questions(config)
    assert (report.roles, report.pooled, report.exact_duplicates) == (4, 44, 3)
    assert report.after_dedup == 41 and report.labelled == 41 and report.unlabelled == 0
    assert report.judged_general == 21 and report.written == 9
    out = tmp_path / "roles" / "extraction_questions.jsonl"
    assert report.output_path == out
    questions = load_questions(out)
    assert [q.id for q in questions] == list(range(9))
    assert all(not q.question.startswith("SPEC") for q in questions)
    counts = sorted(report.per_role.values())
    assert counts[-1] - counts[0] <= 1 and len(counts) == 4  # spread over the source roles
    assert len(llm_server.chat_requests) == 6  # ceil(41 / 7) batches


def test_extract_questions_stops_labelling_when_enough(tmp_path: Path, openai_server: FakeLLMServer) -> None:
    write_question_roles(tmp_path / "roles")
    openai_server.handler = label_handler
    config = ExtractQuestionsConfig(
        llm=openai_server.config(max_concurrency=1), roles_dir=tmp_path / "roles",
        n_questions=4, batch_size=5, oversample=1.0,
    )
    report = extract_questions(config)
    assert report.written == 4 and len(openai_server.chat_requests) < 9


def test_extract_questions_retries_malformed_labels(tmp_path: Path, anthropic_server: FakeLLMServer) -> None:
    write_question_roles(tmp_path / "roles", n_roles=1, n_questions=4)
    anthropic_server.enqueue("I think most are general.", '{"1": "general"}')
    anthropic_server.handler = label_handler
    config = ExtractQuestionsConfig(
        llm=anthropic_server.config(), roles_dir=tmp_path / "roles", n_questions=2, batch_size=10,
    )
    report = extract_questions(config)
    assert report.written == 2 and report.labelled == 5
    third = anthropic_server.chat_requests[2]
    assert "no valid label" in third.last_user_text and "2, 3, 4, 5" in third.last_user_text


def test_extract_questions_refuses_to_overwrite(tmp_path: Path, openai_server: FakeLLMServer, capsys,
                                                monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "cli-key")
    write_question_roles(tmp_path / "roles")
    out = tmp_path / "q.jsonl"
    out.write_text('{"id": 0, "question": "Keep me?"}\n', encoding="utf-8")
    parser = argparse.ArgumentParser()
    qe.add_cli(parser.add_subparsers())
    argv = ["extract-questions", "--roles-dir", str(tmp_path / "roles"), "--output", str(out), "--n", "3",
            "--provider", "openai", "--base-url", openai_server.base_url]
    args = parser.parse_args(argv)
    assert args.func(args) == 2
    assert "already exists" in capsys.readouterr().err and openai_server.requests == []

    openai_server.handler = label_handler
    args = parser.parse_args([*argv, "--force", "--max-retries", "0"])
    assert args.func(args) == 0
    assert "3 written" in capsys.readouterr().out and len(load_questions(out)) == 3


def test_build_roles_stop_event(tmp_path: Path, openai_server: FakeLLMServer) -> None:
    import threading

    stop = threading.Event()

    def handler(request):
        stop.set()
        return role_json(persona(request))

    openai_server.handler = handler
    report = build_roles(make_config(tmp_path, openai_server, llm={"max_concurrency": 1}), stop_event=stop)
    assert report.stopped == "stopped on request" and len(report.built) == 1
    summary = json.loads((tmp_path / "roles.build_summary.json").read_text())
    assert len(summary["pending"]) == 2
