import pytest

from steering.chat_format import ChatFormat, ChatTemplateError
from tests.tiny_models import build_tokenizer, CHATML_TEMPLATE, NO_SYSTEM_TEMPLATE

CONVERSATION = [
    {"role": "system", "content": "You are a pirate."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "Arr, I be Captain Teal of the seven seas!"},
]


def _check_span(tokenizer, span, response):
    inner = span.input_ids[span.start:span.end]
    assert tokenizer.decode(inner) == response
    special = set(tokenizer.all_special_ids)
    assert inner[0] not in special and inner[-1] not in special
    # the span is exactly the tokens of the response
    assert inner == tokenizer(response, add_special_tokens=False)["input_ids"]


def test_chatml_span_and_system_prompt():
    tok = build_tokenizer(CHATML_TEMPLATE)
    chat = ChatFormat(tok)
    assert chat.supports_system_role
    span = chat.response_span(CONVERSATION)
    _check_span(tok, span, CONVERSATION[-1]["content"])
    text = tok.decode(span.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a pirate.<|im_end|>")
    assert tok.decode(span.input_ids[span.end:]) == "<|im_end|>\n"
    assert span.input_ids[: span.start] == chat.prompt_ids("You are a pirate.", "Who are you?")
    # no BOS is prepended to the templated ids
    assert span.input_ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3


def test_template_without_system_role_folds_the_system_prompt():
    tok = build_tokenizer(NO_SYSTEM_TEMPLATE)
    chat = ChatFormat(tok)
    assert not chat.supports_system_role
    messages = chat.build_messages("You are a pirate.", [{"role": "user", "content": "Who are you?"}])
    assert messages == [{"role": "user", "content": "You are a pirate.\n\nWho are you?"}]
    span = chat.response_span(CONVERSATION)
    _check_span(tok, span, CONVERSATION[-1]["content"])
    assert tok.decode(span.input_ids).count("<bos>") == 1
    assert tok.decode(span.input_ids[span.end:]) == "<end_of_turn>\n"


def test_empty_system_prompt_adds_no_system_turn():
    chat = ChatFormat(build_tokenizer(CHATML_TEMPLATE))
    assert chat.build_messages("", [{"role": "user", "content": "hi"}]) == [{"role": "user", "content": "hi"}]
    assert chat.build_messages(None, [{"role": "user", "content": "hi"}])[0]["role"] == "user"


def test_multi_turn_span_is_the_last_assistant_turn():
    tok = build_tokenizer(CHATML_TEMPLATE)
    chat = ChatFormat(tok)
    convo = CONVERSATION + [{"role": "user", "content": "And your ship?"},
                            {"role": "assistant", "content": "The Salty Gull, fastest in the bay."}]
    span = chat.response_span(convo)
    _check_span(tok, span, convo[-1]["content"])


def test_missing_template_and_bad_conversation_errors():
    tok = build_tokenizer(CHATML_TEMPLATE)
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ChatFormat(tok).prompt_ids("x", "y")
    chat = ChatFormat(build_tokenizer(CHATML_TEMPLATE))
    with pytest.raises(ChatTemplateError, match="assistant turn"):
        chat.response_span(CONVERSATION[:2])


# A Qwen3-like template: thinking is on unless enable_thinking=false, which writes an empty think block.
QWEN3_LIKE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and loop.last %}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)


def test_qwen3_style_thinking_is_switched_off():
    tok = build_tokenizer(QWEN3_LIKE_TEMPLATE)
    chat = ChatFormat(tok)
    prompt = tok.decode(chat.prompt_ids("You are a pirate.", "Who are you?"))
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    span = chat.response_span(CONVERSATION)
    _check_span(tok, span, CONVERSATION[-1]["content"])
