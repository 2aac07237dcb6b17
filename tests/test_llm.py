"""pipeline.llm against real local HTTP servers speaking the OpenAI and Anthropic protocols."""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import socket
import threading
import time

import pytest

from pipeline.llm import (
    LLMConfig,
    LLMRequestError,
    MissingAPIKeyError,
    RateLimiter,
    add_llm_arguments,
    estimate_cost,
    extract_json_object,
    llm_config_from_args,
    make_client,
    parse_retry_after,
    render_prompt,
    run_workers,
)
from tests.fake_llm_servers import FakeLLMServer, error, garbage, reply  # fixtures come from tests/conftest.py

USER = [{"role": "user", "content": "Hello there"}]


def complete(config: LLMConfig, messages=USER, system=None, n: int = 1):
    """Run n completions on one client; returns (results, usage)."""

    async def go():
        async with make_client(config) as client:
            results = await asyncio.gather(*(client.complete(messages, system=system) for _ in range(n)))
            return results, client.usage

    return asyncio.run(go())


# --------------------------------------------------------------------------- good path


def test_good_path_both_protocols(llm_server: FakeLLMServer) -> None:
    llm_server.enqueue(reply("Ahoy!", input_tokens=12, output_tokens=3))
    (completion,), usage = complete(llm_server.config(), system="You are a pirate.")
    assert completion.text == "Ahoy!"
    assert (completion.input_tokens, completion.output_tokens) == (12, 3)
    assert completion.stop_reason in ("stop", "end_turn")
    assert usage.requests == 1 and usage.input_tokens == 12 and usage.output_tokens == 3
    (request,) = llm_server.chat_requests
    assert request.system == "You are a pirate."
    assert request.messages == [{"role": "user", "content": "Hello there"}]
    assert request.body["model"] == llm_server.config().model
    assert request.body["temperature"] == 0.0
    assert "test-key" in (request.headers.get("authorization", "") + request.headers.get("x-api-key", ""))


def test_system_messages_are_merged(llm_server: FakeLLMServer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    complete(llm_server.config(), messages=messages)
    (request,) = llm_server.chat_requests
    assert request.system == "Be brief."
    assert [m["content"] for m in request.messages] == ["Q1", "A1", "Q2"]


def test_token_limit_parameter_per_provider(openai_server: FakeLLMServer) -> None:
    complete(openai_server.config(max_tokens=77))
    complete(openai_server.config(provider="openai-compatible", max_tokens=55, temperature=None))
    first, second = openai_server.chat_requests
    assert first.body["max_completion_tokens"] == 77 and "max_tokens" not in first.body
    assert second.body["max_tokens"] == 55 and "max_completion_tokens" not in second.body
    assert "temperature" not in second.body


def test_anthropic_max_tokens(anthropic_server: FakeLLMServer) -> None:
    complete(anthropic_server.config(max_tokens=99, temperature=0.5))
    complete(anthropic_server.config(top_p=0.8))
    first, second = anthropic_server.chat_requests
    assert first.body["max_tokens"] == 99 and first.body["temperature"] == 0.5 and "top_p" not in first.body
    assert second.body["top_p"] == 0.8


def test_top_p_and_per_request_seed_reach_openai_servers(openai_server: FakeLLMServer) -> None:
    async def go():
        async with make_client(openai_server.config(provider="openai-compatible", top_p=0.9)) as client:
            await client.complete(USER, seed=11)
            await client.complete(USER)

    asyncio.run(go())
    first, second = openai_server.chat_requests
    assert first.body["top_p"] == 0.9 and first.body["seed"] == 11
    assert second.body["top_p"] == 0.9 and "seed" not in second.body


# --------------------------------------------------------------------------- retries


def test_429_with_retry_after_ms_then_success(llm_server: FakeLLMServer) -> None:
    llm_server.enqueue(error(429, "slow down", retry_after_ms=300), reply("done"))
    start = time.monotonic()
    (completion,), usage = complete(llm_server.config(backoff_base_s=0.0, backoff_max_s=0.0))
    assert completion.text == "done"
    assert time.monotonic() - start >= 0.3  # the server's delay, not the (zero) backoff
    assert usage.retries == 1 and usage.requests == 1
    assert len(llm_server.chat_requests) == 2


def test_retry_after_in_seconds_is_honoured(anthropic_server: FakeLLMServer) -> None:
    anthropic_server.enqueue(error(429, "rate limited", retry_after=1), reply("ok now"))
    start = time.monotonic()
    (completion,), _ = complete(anthropic_server.config())
    assert completion.text == "ok now"
    assert time.monotonic() - start >= 1.0


def test_500s_until_giving_up(llm_server: FakeLLMServer) -> None:
    llm_server.handler = lambda request: error(500, "the server is on fire")
    with pytest.raises(LLMRequestError) as info:
        complete(llm_server.config(max_retries=2))
    err = info.value
    assert err.status_code == 500 and err.attempts == 3 and err.retryable
    assert "the server is on fire" in str(err) and "gave up after 3 attempts" in str(err)
    assert not err.request_specific
    assert len(llm_server.chat_requests) == 3


def test_529_overloaded_is_retried(anthropic_server: FakeLLMServer) -> None:
    anthropic_server.enqueue(error(529, "overloaded"), reply("fine"))
    (completion,), usage = complete(anthropic_server.config())
    assert completion.text == "fine" and usage.retries == 1


def test_400_is_not_retried(llm_server: FakeLLMServer) -> None:
    llm_server.enqueue(error(400, "prompt is too long"))
    with pytest.raises(LLMRequestError) as info:
        complete(llm_server.config())
    assert info.value.status_code == 400 and info.value.request_specific
    assert "prompt is too long" in str(info.value)
    assert len(llm_server.chat_requests) == 1


def test_401_names_the_key_variable(openai_server: FakeLLMServer) -> None:
    openai_server.enqueue(error(401, "invalid api key"))
    with pytest.raises(LLMRequestError, match="OPENAI_API_KEY"):
        complete(openai_server.config())


def test_garbage_then_good(llm_server: FakeLLMServer) -> None:
    llm_server.enqueue(garbage(), garbage(b'{"unexpected": true}'), reply("real answer"))
    (completion,), usage = complete(llm_server.config())
    assert completion.text == "real answer"
    assert usage.retries == 2


def test_connection_refused_gives_up() -> None:
    with socket.socket() as sock:  # a port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = LLMConfig(
        provider="openai-compatible", model="m", base_url=f"http://127.0.0.1:{port}/v1",
        max_retries=1, backoff_base_s=0.01, backoff_max_s=0.01, timeout_s=2,
    )
    with pytest.raises(LLMRequestError, match="connection error") as info:
        complete(config)
    assert info.value.status_code is None and info.value.attempts == 2


# --------------------------------------------------------------------------- keys


def test_missing_api_key_raises_before_any_request(llm_server: FakeLLMServer, no_llm_keys) -> None:
    config = llm_server.config(api_key=None)
    with pytest.raises(MissingAPIKeyError) as info:
        make_client(config)
    expected = "ANTHROPIC_API_KEY" if llm_server.protocol == "anthropic" else "OPENAI_API_KEY"
    assert expected in str(info.value) and info.value.env_var == expected
    assert llm_server.requests == []


def test_key_from_environment(openai_server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    complete(openai_server.config(api_key=None))
    assert openai_server.chat_requests[0].headers["authorization"] == "Bearer from-env"


def test_openai_compatible_needs_no_key(openai_server: FakeLLMServer, no_llm_keys) -> None:
    complete(openai_server.config(provider="openai-compatible", api_key=None, model="local-model"))
    assert openai_server.chat_requests[0].headers["authorization"] == "Bearer EMPTY"


# --------------------------------------------------------------------------- pacing


def test_concurrency_limit(llm_server: FakeLLMServer) -> None:
    lock = threading.Lock()
    state = {"now": 0, "max": 0}

    def handler(request):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.15)
        with lock:
            state["now"] -= 1
        return "slow"

    llm_server.handler = handler
    results, usage = complete(llm_server.config(max_concurrency=2), n=6)
    assert [r.text for r in results] == ["slow"] * 6
    assert state["max"] == 2
    assert usage.requests == 6


def test_requests_per_second_limit(openai_server: FakeLLMServer) -> None:
    start = time.monotonic()
    complete(openai_server.config(requests_per_second=20), n=5)
    assert time.monotonic() - start >= 4 * 0.05 - 0.01


def test_rate_limiter_spacing() -> None:
    async def go():
        limiter = RateLimiter(50)
        stamps = []
        for _ in range(4):
            await limiter.acquire()
            stamps.append(time.monotonic())
        return stamps

    stamps = asyncio.run(go())
    assert all(b - a >= 0.018 for a, b in zip(stamps, stamps[1:]))


# --------------------------------------------------------------------------- helpers


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="base_url is required"):
        LLMConfig(provider="openai-compatible", model="m")
    with pytest.raises(ValueError, match="provider must be one of"):
        LLMConfig(provider="gemini", model="m")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_concurrency"):
        LLMConfig(provider="openai", model="m", max_concurrency=0)


def test_estimate_cost() -> None:
    assert estimate_cost("anthropic", "claude-sonnet-4-5-20250929", 1_000_000, 0) == pytest.approx(3.0)
    assert estimate_cost("openai", "gpt-4.1-mini", 1_000_000, 1_000_000) == pytest.approx(2.0)
    # the longest prefix wins: gpt-4.1-mini is not priced as gpt-4.1
    assert estimate_cost("openai", "gpt-4.1", 0, 1_000_000) == pytest.approx(8.0)
    assert estimate_cost("openai", "my-finetune", 10, 10) is None
    assert estimate_cost("openai-compatible", "Qwen/Qwen3-8B", 10, 10) is None


def test_parse_retry_after() -> None:
    assert parse_retry_after({"Retry-After": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= parse_retry_after({"Retry-After": future}) <= 31
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None


def test_extract_json_object() -> None:
    assert extract_json_object('Here you go:\n```json\n{"a": [1, 2]}\n```\nEnjoy') == {"a": [1, 2]}
    assert extract_json_object('prefix {"b": "}"} suffix') == {"b": "}"}
    assert extract_json_object("no json {here") is None
    assert extract_json_object("[1, 2]") is None


def test_run_workers_stops_on_first_error() -> None:
    seen: list[int] = []

    async def handle(item: int) -> None:
        await asyncio.sleep(0.01)
        if item == 3:
            raise RuntimeError("item 3 broke")
        seen.append(item)

    with pytest.raises(RuntimeError, match="item 3 broke"):
        asyncio.run(run_workers(list(range(100)), handle, 2))
    assert len(seen) < 10


def test_cli_arguments_build_config() -> None:
    parser = argparse.ArgumentParser()
    add_llm_arguments(parser, default_provider="openai", default_max_tokens=64)
    config = llm_config_from_args(parser.parse_args(["--concurrency", "3", "--rps", "2.5"]))
    assert (config.provider, config.model, config.max_concurrency) == ("openai", "gpt-4.1-mini", 3)
    assert config.requests_per_second == 2.5 and config.max_tokens == 64
    args = parser.parse_args(["--provider", "openai-compatible", "--base-url", "http://x/v1"])
    with pytest.raises(ValueError, match="--model is required"):
        llm_config_from_args(args)
    assert llm_config_from_args(parser.parse_args(["--temperature", "-1"])).temperature is None


def test_prompt_templates_render() -> None:
    text = render_prompt(
        "build_role.txt", role_name="pirate", role_category="fiction",
        role_description="a sea robber", n_prompts=5, n_questions=40,
    )
    assert "pirate" in text and "{question}" in text and "{answer}" in text and "$" not in text
    with pytest.raises(KeyError, match="role_name"):
        render_prompt("build_role_retry.txt", problem="x")
