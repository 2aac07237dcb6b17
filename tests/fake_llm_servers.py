"""Real local HTTP servers that speak just enough of the OpenAI chat-completions and
Anthropic Messages protocols for the official SDKs.

Each server runs in a thread on 127.0.0.1 with a random port. What it answers is
scripted per test:

* ``server.enqueue(...)`` – answers used first, in order (text, or FakeResponse),
* ``server.handler = fn`` – called with the RecordedRequest once the queue is empty;
  returns a str (a normal reply with that text) or a FakeResponse,
* otherwise it answers ``server.default_text``.

Every request is recorded in ``server.requests`` (RecordedRequest: path, headers,
parsed JSON body, and helpers to get the system prompt and the messages).

The fixtures are registered for every test module by ``pytest_plugins`` in ``tests/conftest.py``.

``llm_server`` is parametrized over both protocols.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator, Literal

import pytest

from pipeline.llm import LLMConfig

Protocol = Literal["openai", "anthropic"]


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    raw: bytes
    body: Any  # parsed JSON, or None if the body was not JSON

    @property
    def system(self) -> str | None:
        """The system prompt, whichever protocol carried it."""
        if not isinstance(self.body, dict):
            return None
        if "system" in self.body:
            system = self.body["system"]
            if isinstance(system, list):
                return "".join(part.get("text", "") for part in system)
            return system
        for message in self.body.get("messages", []):
            if message.get("role") == "system":
                return message.get("content")
        return None

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The non-system messages with plain string content."""
        if not isinstance(self.body, dict):
            return []
        out = []
        for message in self.body.get("messages", []):
            if message.get("role") == "system":
                continue
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(part.get("text", "") for part in content)
            out.append({"role": message.get("role"), "content": content})
        return out

    @property
    def last_user_text(self) -> str:
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else ""


@dataclass
class FakeResponse:
    """A scripted answer. Use the helpers below rather than building it by hand."""

    status: int = 200
    json_body: Any = None
    raw_body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    text: str | None = None  # a success reply with this text, rendered for the protocol
    input_tokens: int = 10
    output_tokens: int = 5
    stop_reason: str | None = None


def reply(text: str, *, input_tokens: int = 10, output_tokens: int = 5, delay_s: float = 0.0,
          stop_reason: str | None = None) -> FakeResponse:
    """A normal successful reply carrying ``text``."""
    return FakeResponse(text=text, input_tokens=input_tokens, output_tokens=output_tokens,
                        delay_s=delay_s, stop_reason=stop_reason)


def error(status: int, message: str = "fake error", *, retry_after: float | None = None,
          retry_after_ms: int | None = None, delay_s: float = 0.0) -> FakeResponse:
    """An HTTP error in the protocol's JSON error format (filled in at send time)."""
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if retry_after_ms is not None:
        headers["retry-after-ms"] = str(retry_after_ms)
    return FakeResponse(status=status, json_body={"__error__": message}, headers=headers, delay_s=delay_s)


def garbage(body: bytes = b"<html>not json at all", status: int = 200) -> FakeResponse:
    """A body that is not what the protocol promises."""
    return FakeResponse(status=status, raw_body=body, headers={"Content-Type": "application/json"})


Handler = Callable[[RecordedRequest], "str | FakeResponse"]


class FakeLLMServer:
    def __init__(self, protocol: Protocol):
        self.protocol: Protocol = protocol
        self.requests: list[RecordedRequest] = []
        self.handler: Handler | None = None
        self.default_text = "ok"
        self._queue: list[str | FakeResponse] = []
        self._lock = threading.Lock()
        self._counter = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._make_handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> "FakeLLMServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """The base URL the SDK expects (OpenAI's includes /v1, Anthropic's does not)."""
        root = f"http://127.0.0.1:{self.port}"
        return root + "/v1" if self.protocol == "openai" else root

    @property
    def provider(self) -> str:
        return "anthropic" if self.protocol == "anthropic" else "openai"

    def config(self, **overrides: Any) -> LLMConfig:
        """An LLMConfig pointing at this server, with a test key and short backoffs."""
        values: dict[str, Any] = dict(
            provider=self.provider,
            model="claude-sonnet-4-6" if self.protocol == "anthropic" else "gpt-4.1-mini",
            base_url=self.base_url,
            api_key="test-key",
            max_retries=3,
            timeout_s=10.0,
            backoff_base_s=0.01,
            backoff_max_s=0.05,
        )
        values.update(overrides)
        return LLMConfig(**values)

    # -- scripting ------------------------------------------------------------

    def enqueue(self, *answers: "str | FakeResponse") -> None:
        with self._lock:
            self._queue.extend(answers)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        """Recorded requests to the completion endpoint only."""
        return [r for r in self.requests if r.path.endswith(("/chat/completions", "/messages"))]

    # -- internals ------------------------------------------------------------

    def _next_answer(self, request: RecordedRequest) -> FakeResponse:
        with self._lock:
            queued = self._queue.pop(0) if self._queue else None
        if queued is None:
            queued = self.handler(request) if self.handler is not None else self.default_text
        if isinstance(queued, str):
            return reply(queued)
        return queued

    def _render(self, request: RecordedRequest, answer: FakeResponse) -> tuple[int, dict[str, str], bytes]:
        headers = {"Content-Type": "application/json", **answer.headers}
        if answer.raw_body is not None:
            return answer.status, headers, answer.raw_body
        if isinstance(answer.json_body, dict) and "__error__" in answer.json_body:
            message = answer.json_body["__error__"]
            if self.protocol == "anthropic":
                kind = {429: "rate_limit_error", 529: "overloaded_error"}.get(answer.status, "api_error")
                body = {"type": "error", "error": {"type": kind, "message": message}}
            else:
                body = {"error": {"message": message, "type": "server_error", "code": None, "param": None}}
            return answer.status, headers, json.dumps(body).encode()
        if answer.json_body is not None:
            return answer.status, headers, json.dumps(answer.json_body).encode()
        with self._lock:
            self._counter += 1
            n = self._counter
        model = request.body.get("model", "fake") if isinstance(request.body, dict) else "fake"
        if self.protocol == "anthropic":
            body = {
                "id": f"msg_fake_{n}",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": answer.text or ""}],
                "stop_reason": answer.stop_reason or "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": answer.input_tokens, "output_tokens": answer.output_tokens},
            }
        else:
            body = {
                "id": f"chatcmpl-fake-{n}",
                "object": "chat.completion",
                "created": 1700000000,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer.text or ""},
                        "finish_reason": answer.stop_reason or "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": answer.input_tokens,
                    "completion_tokens": answer.output_tokens,
                    "total_tokens": answer.input_tokens + answer.output_tokens,
                },
            }
        return answer.status, headers, json.dumps(body).encode()

    def _make_handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                request = RecordedRequest(
                    method="POST",
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    raw=raw,
                    body=body,
                )
                expected = "/v1/chat/completions" if server.protocol == "openai" else "/v1/messages"
                with server._lock:
                    server.requests.append(request)
                if self.path.split("?")[0] != expected:
                    self._send(404, {"Content-Type": "application/json"},
                               json.dumps({"error": {"message": f"no route {self.path}"}}).encode())
                    return
                try:
                    answer = server._next_answer(request)
                except Exception as exc:  # a broken test handler: show it as a 599
                    self._send(599, {"Content-Type": "text/plain"}, f"handler raised {exc!r}".encode())
                    return
                if answer.delay_s:
                    threading.Event().wait(answer.delay_s)
                status, headers, payload = server._render(request, answer)
                self._send(status, headers, payload)

            def _send(self, status: int, headers: dict[str, str], payload: bytes) -> None:
                try:
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # client gave up (cancelled test)
                    pass

        return _Handler


@pytest.fixture
def openai_server() -> Iterator[FakeLLMServer]:
    server = FakeLLMServer("openai").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def anthropic_server() -> Iterator[FakeLLMServer]:
    server = FakeLLMServer("anthropic").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["openai", "anthropic"])
def llm_server(request: pytest.FixtureRequest) -> Iterator[FakeLLMServer]:
    """One fake server per protocol (the test runs twice)."""
    server = FakeLLMServer(request.param).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def no_llm_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset the API-key variables so tests do not depend on the developer's shell."""
    for name in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
