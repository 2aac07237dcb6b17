"""Chat formatting and the exact token span of a response inside a templated conversation.

Token ids always come from rendering the model's own chat template to text and tokenising
that text with ``add_special_tokens=False``: the template already writes any BOS token
(ChatML models such as SmolLM2 use ``<|im_start|>`` as BOS), so nothing may prepend another.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

Message = dict[str, str]

_SYSTEM_PROBE = "SYSTEM-ROLE-PROBE-7f3a"


class ChatTemplateError(ValueError):
    """The model's chat template is missing or does not render a conversation as expected."""


@dataclass(frozen=True)
class ResponseSpan:
    """Token ids of a whole conversation and the half-open span ``[start, end)`` of the response."""

    input_ids: list[int]
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


class ChatFormat:
    """Renders conversations with a tokenizer's chat template.

    Handles templates without a system role (Gemma 2 style): the system prompt is folded into
    the first user turn. Qwen3-style thinking is switched off (``enable_thinking=False``).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def _render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ChatTemplateError(
                f"tokenizer {getattr(self.tokenizer, 'name_or_path', '?')!r} has no chat template"
            )
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, enable_thinking=False
        )

    @cached_property
    def supports_system_role(self) -> bool:
        probe = [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "hello"}]
        try:
            text = self._render(probe, add_generation_prompt=True)
        except ChatTemplateError:
            raise
        except Exception:  # jinja raise_exception("System role not supported") and the like
            return False
        return _SYSTEM_PROBE in text

    def build_messages(self, system_prompt: str | None, turns: list[Message]) -> list[Message]:
        """Conversation with an optional system prompt; empty/None system prompt adds no system turn."""
        messages = [dict(m) for m in turns]
        if not system_prompt:
            return messages
        if self.supports_system_role:
            return [{"role": "system", "content": system_prompt}] + messages
        if not messages or messages[0]["role"] != "user":
            raise ChatTemplateError("cannot fold a system prompt: the conversation does not start with a user turn")
        messages[0]["content"] = f"{system_prompt}\n\n{messages[0]['content']}"
        return messages

    def normalise(self, messages: list[Message]) -> list[Message]:
        """Fold a leading system message into the first user turn when the template has no system role."""
        if messages and messages[0]["role"] == "system":
            return self.build_messages(messages[0]["content"], messages[1:])
        return [dict(m) for m in messages]

    def encode(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        text = self._render(self.normalise(messages), add_generation_prompt)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, system_prompt: str | None, question: str) -> list[int]:
        """Token ids of a single-question prompt ending with the assistant generation header."""
        return self.encode(self.build_messages(system_prompt, [{"role": "user", "content": question}]))

    def response_span(self, messages: list[Message]) -> ResponseSpan:
        """Ids of ``messages`` (ending with an assistant turn) and the span of that turn's content.

        The span is found from the template: the prompt part is the rendering of the earlier
        turns with the generation header, the closing part is what the template writes after an
        empty assistant turn. Both must match the full rendering token for token, so the span
        holds the response's own tokens and no template or special tokens.
        """
        if not messages or messages[-1]["role"] != "assistant":
            raise ChatTemplateError("response_span needs a conversation that ends with an assistant turn")
        history = self.normalise(messages[:-1])
        full = self.encode(history + [messages[-1]], add_generation_prompt=False)
        prompt = self.encode(history, add_generation_prompt=True)
        empty = self.encode(history + [{"role": "assistant", "content": ""}], add_generation_prompt=False)
        if full[: len(prompt)] != prompt or empty[: len(prompt)] != prompt:
            raise ChatTemplateError(
                "the chat template renders the conversation history differently once an assistant turn "
                "is added, so the response span cannot be located from the template"
            )
        closing = empty[len(prompt):]
        if closing and full[len(full) - len(closing):] != closing:
            raise ChatTemplateError("the chat template closes the assistant turn differently for this response")
        end = len(full) - len(closing)
        if end < len(prompt):
            raise ChatTemplateError("the response span is negative; the template trims the response unexpectedly")
        return ResponseSpan(input_ids=full, start=len(prompt), end=end)
