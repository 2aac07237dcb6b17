"""Async chat-completion clients for the LLM-backed steps (role builder, judge).

One interface over three back ends:

* ``anthropic``          – the Anthropic Messages API (``anthropic.AsyncAnthropic``),
* ``openai``             – the OpenAI chat-completions API (``openai.AsyncOpenAI``),
* ``openai-compatible``  – any server speaking the OpenAI protocol (vLLM, llama.cpp,
  a proxy…); ``base_url`` is required and an API key is optional.

Retries, concurrency and rate limiting are done here, not by the SDKs (their own
retries are switched off), so every provider behaves the same and the behaviour can
be tested against local fake servers:

* at most ``max_concurrency`` requests in flight (an ``asyncio.Semaphore``),
* at most ``requests_per_second`` request starts per second (a small async limiter),
* 408/409/429/5xx answers, connection errors, timeouts and malformed answers are
  retried up to ``max_retries`` times with exponential backoff and jitter; a
  ``Retry-After`` / ``retry-after-ms`` header sent by the server is honoured,
* other HTTP errors (400, 401, 403, 404, 422…) fail at once.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any, Callable, Literal, Mapping, Sequence

log = logging.getLogger(__name__)

Provider = Literal["anthropic", "openai", "openai-compatible"]
PROVIDERS: tuple[str, ...] = ("anthropic", "openai", "openai-compatible")

#: Environment variable read for the API key of each provider.
API_KEY_ENV: dict[str, str] = {
    "anthropic": "ANTHROPIC_API_KEY",
    "openai": "OPENAI_API_KEY",
    "openai-compatible": "OPENAI_API_KEY",
}

#: Default model per provider, used by the command-line steps when --model is not given.
DEFAULT_MODELS: dict[str, str] = {
    "anthropic": "claude-sonnet-4-6",
    "openai": "gpt-4.1-mini",
}

#: HTTP statuses worth another try.
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429})

ProgressCallback = Callable[[int, int, str], None]


# --------------------------------------------------------------------------- errors


class LLMError(RuntimeError):
    """Any failure of an LLM call that the caller should report to the user."""


class MissingAPIKeyError(LLMError):
    """No API key in the config nor in the provider's environment variable."""

    def __init__(self, provider: str, env_var: str):
        self.provider = provider
        self.env_var = env_var
        super().__init__(
            f"no API key for provider {provider!r}: set the environment variable "
            f"{env_var} (or pass api_key in the LLM config)"
        )


class LLMRequestError(LLMError):
    """A request failed for good: a non-retryable HTTP error, or retries exhausted."""

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        model: str,
        status_code: int | None = None,
        provider_message: str | None = None,
        attempts: int = 1,
        retryable: bool = False,
    ):
        self.provider = provider
        self.model = model
        self.status_code = status_code
        self.provider_message = provider_message
        self.attempts = attempts
        self.retryable = retryable
        super().__init__(message)

    @property
    def request_specific(self) -> bool:
        """True when the server rejected this particular request (400/413/422): other
        requests may still succeed, so a batch job can record it and carry on."""
        return self.status_code in (400, 413, 422)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class LLMConfig:
    """How to reach one chat model, and how hard to push it."""

    provider: Provider
    model: str
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)  # never shown in logs or tracebacks
    max_concurrency: int = 8
    requests_per_second: float | None = None
    max_retries: int = 5
    timeout_s: float = 120.0
    #: ``None`` leaves the provider's default (some recent models reject the parameter).
    temperature: float | None = 0.0
    #: ``None`` leaves the provider's default.
    top_p: float | None = None
    max_tokens: int = 1024
    #: First backoff delay; doubles with each retry (with jitter), capped at backoff_max_s.
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    #: Upper bound on a server's Retry-After that we are willing to wait.
    retry_after_max_s: float = 300.0

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ValueError(
                f"LLMConfig.provider must be one of {', '.join(PROVIDERS)}; got {self.provider!r}"
            )
        if not self.model or not self.model.strip():
            raise ValueError("LLMConfig.model must be a non-empty model name")
        if self.provider == "openai-compatible" and not self.base_url:
            raise ValueError(
                "LLMConfig.base_url is required for provider 'openai-compatible' "
                "(e.g. http://localhost:8000/v1)"
            )
        if self.max_concurrency < 1:
            raise ValueError(f"LLMConfig.max_concurrency must be >= 1; got {self.max_concurrency}")
        if self.requests_per_second is not None and not self.requests_per_second > 0:
            raise ValueError(
                f"LLMConfig.requests_per_second must be > 0 or None; got {self.requests_per_second}"
            )
        if self.max_retries < 0:
            raise ValueError(f"LLMConfig.max_retries must be >= 0; got {self.max_retries}")
        if not self.timeout_s > 0:
            raise ValueError(f"LLMConfig.timeout_s must be > 0; got {self.timeout_s}")
        if self.max_tokens < 1:
            raise ValueError(f"LLMConfig.max_tokens must be >= 1; got {self.max_tokens}")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0 or self.retry_after_max_s < 0:
            raise ValueError("LLMConfig backoff settings must be >= 0")

    @property
    def api_key_env(self) -> str:
        return API_KEY_ENV[self.provider]

    def resolve_api_key(self) -> str:
        """The key to use; raises MissingAPIKeyError if the provider needs one and none is set."""
        if self.api_key:
            return self.api_key
        from_env = os.environ.get(self.api_key_env, "").strip()
        if from_env:
            return from_env
        if self.provider == "openai-compatible":
            # Local servers (vLLM, llama.cpp) usually accept any key.
            return "EMPTY"
        raise MissingAPIKeyError(self.provider, self.api_key_env)

    def public_settings(self) -> dict[str, Any]:
        """The settings worth recording in a run manifest (no API key)."""
        return {
            "provider": self.provider,
            "model": self.model,
            "base_url": self.base_url,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
        }

    def describe(self) -> str:
        where = f" at {self.base_url}" if self.base_url else ""
        return f"{self.provider}:{self.model}{where}"


def check_api_key(config: LLMConfig) -> None:
    """Raise MissingAPIKeyError now, before any work is started, if no key is available."""
    config.resolve_api_key()


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Completion:
    text: str
    input_tokens: int
    output_tokens: int
    stop_reason: str | None


@dataclass
class Usage:
    """Running totals of one client."""

    requests: int = 0  # successful requests
    input_tokens: int = 0
    output_tokens: int = 0
    retries: int = 0
    failures: int = 0  # requests that failed for good

    def as_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "retries": self.retries,
            "failures": self.failures,
        }


# --------------------------------------------------------------------------- prices

#: USD per million tokens (input, output): published list prices at the time of writing,
#: for estimates only (check the provider's price page before a large run).
#: Keys are model-name prefixes; the longest matching prefix wins, so dated snapshot
#: names ("claude-sonnet-4-5-20250929", "gpt-4o-2024-08-06") resolve too.
_PRICES_PER_MTOK: dict[str, dict[str, tuple[float, float]]] = {
    "anthropic": {
        "claude-opus-4-6": (5.0, 25.0),
        "claude-opus-4-5": (5.0, 25.0),
        "claude-opus-4-1": (15.0, 75.0),
        "claude-opus-4": (15.0, 75.0),
        "claude-sonnet-4-6": (3.0, 15.0),
        "claude-sonnet-4-5": (3.0, 15.0),
        "claude-sonnet-4": (3.0, 15.0),
        "claude-3-7-sonnet": (3.0, 15.0),
        "claude-3-5-sonnet": (3.0, 15.0),
        "claude-haiku-4-5": (1.0, 5.0),
        "claude-3-5-haiku": (0.8, 4.0),
        "claude-3-haiku": (0.25, 1.25),
    },
    "openai": {
        "gpt-4.1-nano": (0.10, 0.40),
        "gpt-4.1-mini": (0.40, 1.60),
        "gpt-4.1": (2.0, 8.0),
        "gpt-4o-mini": (0.15, 0.60),
        "gpt-4o": (2.50, 10.0),
        "gpt-5-nano": (0.05, 0.40),
        "gpt-5-mini": (0.25, 2.0),
        "gpt-5": (1.25, 10.0),
        "o4-mini": (1.10, 4.40),
        "o3-mini": (1.10, 4.40),
        "o3": (2.0, 8.0),
    },
}


def model_price(provider: str, model: str) -> tuple[float, float] | None:
    """(input, output) USD per million tokens, or None for an unknown model."""
    table = _PRICES_PER_MTOK.get("openai" if provider == "openai-compatible" else provider)
    if not table:
        return None
    name = model.strip().lower()
    if "/" in name:  # "openai/gpt-4o" style names used by proxies
        name = name.rsplit("/", 1)[1]
    best = None
    for prefix in table:
        if name == prefix or name.startswith(prefix + "-"):
            if best is None or len(prefix) > len(best):
                best = prefix
    return table[best] if best else None


def estimate_cost(provider: str, model: str, input_tokens: int, output_tokens: int) -> float | None:
    """Estimated cost in USD, or None when the model's price is unknown."""
    price = model_price(provider, model)
    if price is None:
        return None
    return (input_tokens * price[0] + output_tokens * price[1]) / 1_000_000


# --------------------------------------------------------------------------- rate limiting


class RateLimiter:
    """Spaces request starts at least ``1 / rate`` seconds apart (no bursts)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic):
        if not rate > 0:
            raise ValueError(f"rate must be > 0; got {rate}")
        self.interval = 1.0 / rate
        self._clock = clock
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            now = self._clock()
            wait = self._next - now
            self._next = max(now, self._next) + self.interval
        if wait > 0:
            await asyncio.sleep(wait)


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds asked by ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    if not headers:
        return None
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    raw_ms = lowered.get("retry-after-ms")
    if raw_ms:
        try:
            value = float(raw_ms) / 1000.0
            if math.isfinite(value) and value >= 0:
                return value
        except ValueError:
            pass
    raw = lowered.get("retry-after")
    if not raw:
        return None
    try:
        value = float(raw)
        return value if math.isfinite(value) and value >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(config: LLMConfig, attempt: int, retry_after: float | None) -> float:
    """Delay before retry number ``attempt`` (0-based)."""
    if retry_after is not None:
        return min(retry_after, config.retry_after_max_s)
    ceiling = min(config.backoff_max_s, config.backoff_base_s * (2**attempt))
    return random.uniform(ceiling / 2, ceiling)


# --------------------------------------------------------------------------- client


@dataclass
class _Failure:
    """A failed attempt, classified."""

    retryable: bool
    status_code: int | None
    message: str
    retry_after: float | None = None


class LLMClient:
    """Async chat client with concurrency limit, rate limit and retries.

    Use as ``async with make_client(cfg) as client: await client.complete(...)``,
    or call ``await client.close()`` when done.
    """

    def __init__(self, config: LLMConfig):
        self.config = config
        self._api_key = config.resolve_api_key()  # MissingAPIKeyError before any request
        self._semaphore = asyncio.Semaphore(config.max_concurrency)
        self._limiter = RateLimiter(config.requests_per_second) if config.requests_per_second else None
        self._usage = Usage()
        self._sdk: Any = None
        self._closed = False

    # -- public ---------------------------------------------------------------

    @property
    def usage(self) -> Usage:
        """A copy of the running totals."""
        return Usage(**self._usage.as_dict())

    def estimated_cost(self) -> float | None:
        return estimate_cost(
            self.config.provider,
            self.config.model,
            self._usage.input_tokens,
            self._usage.output_tokens,
        )

    async def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        system: str | None = None,
        *,
        max_tokens: int | None = None,
        seed: int | None = None,
    ) -> Completion:
        """Send one conversation, return the model's reply.

        ``messages`` are ``{"role": "user"|"assistant"|"system", "content": str}``;
        leading system messages are merged into ``system``. ``seed`` (OpenAI and OpenAI-compatible
        servers such as vLLM; Anthropic has none) makes sampling repeatable where the server supports it.
        """
        if self._closed:
            raise LLMError("this LLM client was closed; create a new one with make_client()")
        system, turns = _split_system(messages, system)
        if not turns:
            raise ValueError("complete() needs at least one user or assistant message")
        limit = max_tokens or self.config.max_tokens
        attempt = 0
        while True:
            async with self._semaphore:
                if self._limiter is not None:
                    await self._limiter.acquire()
                try:
                    completion = await self._send(turns, system, limit, seed)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # classified below; programming errors re-raised
                    failure = self._classify(exc)
                else:
                    failure = None
            if failure is None:
                self._usage.requests += 1
                self._usage.input_tokens += completion.input_tokens
                self._usage.output_tokens += completion.output_tokens
                return completion
            if not failure.retryable or attempt >= self.config.max_retries:
                self._usage.failures += 1
                raise self._final_error(failure, attempt + 1)
            delay = backoff_delay(self.config, attempt, failure.retry_after)
            log.warning(
                "%s: %s; retry %d/%d in %.2fs",
                self.config.describe(),
                failure.message,
                attempt + 1,
                self.config.max_retries,
                delay,
            )
            self._usage.retries += 1
            attempt += 1
            await asyncio.sleep(delay)

    async def close(self) -> None:
        self._closed = True
        if self._sdk is not None:
            sdk, self._sdk = self._sdk, None
            await sdk.close()

    async def __aenter__(self) -> "LLMClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- provider plumbing ----------------------------------------------------

    def _client(self) -> Any:
        if self._sdk is None:
            cfg = self.config
            if cfg.provider == "anthropic":
                import anthropic

                self._sdk = anthropic.AsyncAnthropic(
                    api_key=self._api_key,
                    base_url=cfg.base_url,
                    timeout=cfg.timeout_s,
                    max_retries=0,
                )
            else:
                import openai

                kwargs: dict[str, Any] = {}
                if cfg.base_url:
                    kwargs["base_url"] = cfg.base_url
                self._sdk = openai.AsyncOpenAI(
                    api_key=self._api_key, timeout=cfg.timeout_s, max_retries=0, **kwargs
                )
        return self._sdk

    async def _send(self, turns: list[dict[str, Any]], system: str | None, max_tokens: int,
                    seed: int | None = None) -> Completion:
        cfg = self.config
        client = self._client()
        if cfg.provider == "anthropic":
            kwargs: dict[str, Any] = {}
            if system:
                kwargs["system"] = system
            sampling = {name: value for name, value in (("temperature", cfg.temperature), ("top_p", cfg.top_p))
                        if value is not None}
            if sampling:
                # Not typed arguments of every SDK version; the API accepts them.
                kwargs["extra_body"] = sampling
            message = await client.messages.create(
                model=cfg.model, max_tokens=max_tokens, messages=turns, **kwargs
            )
            return _anthropic_completion(message)
        full = ([{"role": "system", "content": system}] if system else []) + turns
        kwargs = {}
        if cfg.temperature is not None:
            kwargs["temperature"] = cfg.temperature
        if cfg.top_p is not None:
            kwargs["top_p"] = cfg.top_p
        if seed is not None:
            kwargs["seed"] = seed
        if cfg.provider == "openai":
            kwargs["max_completion_tokens"] = max_tokens
        else:  # servers implementing the older protocol know only max_tokens
            kwargs["max_tokens"] = max_tokens
        response = await client.chat.completions.create(model=cfg.model, messages=full, **kwargs)
        return _openai_completion(response)

    def _classify(self, exc: Exception) -> _Failure:
        status = getattr(exc, "status_code", None)
        response = getattr(exc, "response", None)
        module = type(exc).__module__.split(".")[0]
        if module in ("openai", "anthropic"):
            if _is_connection_error(exc):
                return _Failure(True, None, f"connection error: {exc}")
            if isinstance(status, int) and response is not None and _is_status_error(exc):
                headers = getattr(response, "headers", None)
                retryable = status in RETRYABLE_STATUSES or status >= 500
                return _Failure(
                    retryable, status, _provider_message(exc), parse_retry_after(headers) if retryable else None
                )
            # APIResponseValidationError and friends: the server answered nonsense.
            return _Failure(True, status, f"malformed response: {exc}")
        if isinstance(exc, (_MalformedResponse, json.JSONDecodeError)):
            # A 200 whose body is not the protocol's JSON (a proxy's HTML page, a cut body).
            return _Failure(True, None, f"malformed response: {exc}")
        raise exc

    def _final_error(self, failure: _Failure, attempts: int) -> LLMRequestError:
        cfg = self.config
        what = f"HTTP {failure.status_code}: " if failure.status_code is not None else ""
        tail = f" (gave up after {attempts} attempts)" if failure.retryable else ""
        hint = ""
        if failure.status_code == 401:
            hint = f"; check the API key ({cfg.api_key_env})"
        elif failure.status_code == 404:
            hint = f"; check the model name {cfg.model!r} and the base URL"
        elif failure.status_code == 400 and "temperature" in failure.message.lower():
            hint = "; this model may not accept a temperature: set it to None (--temperature -1)"
        return LLMRequestError(
            f"{cfg.describe()} request failed: {what}{failure.message}{hint}{tail}",
            provider=cfg.provider,
            model=cfg.model,
            status_code=failure.status_code,
            provider_message=failure.message,
            attempts=attempts,
            retryable=failure.retryable,
        )


def make_client(config: LLMConfig) -> LLMClient:
    """An LLMClient for ``config``; raises MissingAPIKeyError at once if no key is available."""
    return LLMClient(config)


# --------------------------------------------------------------------------- helpers


class _MalformedResponse(Exception):
    """The SDK parsed a response that lacks what we need."""


def _split_system(
    messages: Sequence[Mapping[str, Any]], system: str | None
) -> tuple[str | None, list[dict[str, Any]]]:
    parts = [system] if system else []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        content = message.get("content")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} has role {role!r}; expected system, user or assistant")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}) must have string content")
        if role == "system":
            if turns:
                raise ValueError(f"message {i}: system messages must come before the conversation")
            parts.append(content)
        else:
            turns.append({"role": role, "content": content})
    return ("\n\n".join(parts) if parts else None), turns


def _is_connection_error(exc: Exception) -> bool:
    return any(cls.__name__ == "APIConnectionError" for cls in type(exc).__mro__)


def _is_status_error(exc: Exception) -> bool:
    return any(cls.__name__ == "APIStatusError" for cls in type(exc).__mro__)


def _provider_message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(body.get("message"), str):
            return body["message"]
    message = getattr(exc, "message", None)
    return str(message or exc)


def _openai_completion(response: Any) -> Completion:
    choices = getattr(response, "choices", None)
    if not choices:
        raise _MalformedResponse("no choices in chat-completion response")
    choice = choices[0]
    message = getattr(choice, "message", None)
    if message is None:
        raise _MalformedResponse("chat-completion choice has no message")
    text = message.content
    if text is None:
        text = getattr(message, "refusal", None) or ""
    usage = getattr(response, "usage", None)
    return Completion(
        text=text,
        input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
        output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
        stop_reason=getattr(choice, "finish_reason", None),
    )


def _anthropic_completion(message: Any) -> Completion:
    content = getattr(message, "content", None)
    if content is None or isinstance(content, (str, bytes)):
        raise _MalformedResponse("messages response has no content blocks")
    text = "".join(getattr(block, "text", "") or "" for block in content if getattr(block, "type", None) == "text")
    usage = getattr(message, "usage", None)
    return Completion(
        text=text,
        input_tokens=int(getattr(usage, "input_tokens", 0) or 0),
        output_tokens=int(getattr(usage, "output_tokens", 0) or 0),
        stop_reason=getattr(message, "stop_reason", None),
    )


# --------------------------------------------------------------------------- command line


def add_llm_arguments(
    parser: Any,
    *,
    default_provider: str = "anthropic",
    default_concurrency: int = 8,
    default_max_tokens: int = 1024,
    default_temperature: float = 0.0,
) -> None:
    """Add the flags that choose and pace the LLM (--provider, --model, --base-url, ...)."""
    group = parser.add_argument_group("LLM")
    group.add_argument(
        "--provider",
        choices=PROVIDERS,
        default=default_provider,
        help=f"LLM API to call (default: {default_provider}); 'openai-compatible' needs --base-url",
    )
    group.add_argument(
        "--model",
        default=None,
        help="model name (default: "
        + ", ".join(f"{k}: {v}" for k, v in DEFAULT_MODELS.items())
        + "; required for openai-compatible)",
    )
    group.add_argument(
        "--base-url",
        default=None,
        help="API base URL, e.g. http://localhost:8000/v1 for a vLLM server (default: the provider's)",
    )
    group.add_argument(
        "--concurrency",
        type=int,
        default=default_concurrency,
        help=f"maximum requests in flight (default: {default_concurrency})",
    )
    group.add_argument(
        "--rps",
        type=float,
        default=None,
        help="maximum requests started per second (default: no limit)",
    )
    group.add_argument(
        "--max-retries",
        type=int,
        default=5,
        help="retries per request on HTTP 429/5xx, timeouts and connection errors (default: 5)",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for one response (default: 120)",
    )
    group.add_argument(
        "--max-tokens",
        type=int,
        default=default_max_tokens,
        help=f"maximum tokens the model may generate per request (default: {default_max_tokens})",
    )
    group.add_argument(
        "--temperature",
        type=float,
        default=default_temperature,
        help=f"sampling temperature (default: {default_temperature}); a negative value leaves "
        "the provider's default",
    )


def llm_config_from_args(args: Any, **overrides: Any) -> LLMConfig:
    """Build an LLMConfig from the flags added by add_llm_arguments (ValueError if inconsistent)."""
    model = args.model or DEFAULT_MODELS.get(args.provider)
    if not model:
        raise ValueError(f"--model is required with --provider {args.provider}")
    values: dict[str, Any] = dict(
        provider=args.provider,
        model=model,
        base_url=args.base_url,
        max_concurrency=args.concurrency,
        requests_per_second=args.rps,
        max_retries=args.max_retries,
        timeout_s=args.timeout,
        max_tokens=args.max_tokens,
        temperature=None if args.temperature is not None and args.temperature < 0 else args.temperature,
    )
    values.update(overrides)
    return LLMConfig(**values)


# --------------------------------------------------------------------------- prompt templates

#: Our prompt templates (plain text, ``string.Template`` syntax: ``$name``), so JSON
#: braces and the ``{question}``/``{answer}`` placeholders in them need no escaping.
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"


def render_prompt(name: str, **values: object) -> str:
    """Fill the template ``pipeline/prompts/<name>``; every ``$placeholder`` must be given."""
    path = PROMPTS_DIR / name
    try:
        template = Template(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt template {path} is missing") from None
    try:
        return template.substitute({k: str(v) for k, v in values.items()})
    except KeyError as exc:
        raise KeyError(f"prompt template {path.name} needs a value for ${exc.args[0]}") from None


# --------------------------------------------------------------------------- answers and batches

_FENCE_RE = re.compile(r"```(?:json|JSON)?\s*\n(.*?)```", re.DOTALL)


def extract_json_object(text: str) -> Any | None:
    """The first JSON object in a model's reply (inside ``` fences or bare), or None."""
    decoder = json.JSONDecoder()
    candidates = [m.group(1) for m in _FENCE_RE.finditer(text)] + [text]
    for chunk in candidates:
        start = chunk.find("{")
        while start != -1:
            try:
                value, _ = decoder.raw_decode(chunk, start)
            except json.JSONDecodeError:
                start = chunk.find("{", start + 1)
                continue
            if isinstance(value, dict):
                return value
            start = chunk.find("{", start + 1)
    return None


class FailureStreak:
    """Stops a batch job when ``limit`` requests in a row were rejected (HTTP 400/413/422):
    one bad request is recorded and skipped, but a rejected *setting* would reject all."""

    def __init__(self, limit: int = 5):
        self.limit = limit
        self.count = 0

    def success(self) -> None:
        self.count = 0

    def failure(self, error: LLMRequestError) -> None:
        self.count += 1
        if self.count >= self.limit:
            raise LLMRequestError(
                f"{self.count} requests in a row were rejected; the last error: {error}",
                provider=error.provider,
                model=error.model,
                status_code=error.status_code,
                provider_message=error.provider_message,
                attempts=error.attempts,
            )


async def run_workers(items: Sequence[Any], handle: Callable[[Any], Any], n_workers: int) -> None:
    """Await ``handle(item)`` for every item with at most ``n_workers`` running at once.

    The first exception cancels the remaining work and is re-raised; cancelling the
    caller cancels the workers.
    """
    if not items:
        return
    shared = iter(items)

    async def worker() -> None:
        for item in shared:  # next() runs without awaiting, so workers never take the same item
            await handle(item)

    tasks = [asyncio.create_task(worker()) for _ in range(max(1, min(n_workers, len(items))))]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


# --------------------------------------------------------------------------- progress


@dataclass
class JobProgress:
    """Counts finished items, forwards them to a progress callback, logs rate and ETA."""

    total: int
    label: str
    callback: ProgressCallback | None = None
    log_every_s: float = 10.0
    logger: logging.Logger = field(default=log)
    done: int = 0
    _start: float = field(default_factory=time.monotonic)
    _last_log: float = 0.0

    def advance(self, message: str = "", n: int = 1) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.done, self.total, message)
        now = time.monotonic()
        if self.done >= self.total or now - self._last_log >= self.log_every_s:
            self._last_log = now
            self.logger.info("%s: %s", self.label, self.status_line(now))

    def status_line(self, now: float | None = None) -> str:
        elapsed = max(1e-9, (now or time.monotonic()) - self._start)
        rate = self.done / elapsed
        left = self.total - self.done
        eta = f"{left / rate:.0f}s" if rate > 0 and left > 0 else ("0s" if left <= 0 else "?")
        return f"{self.done}/{self.total} done, {rate:.2f}/s, ETA {eta}"
