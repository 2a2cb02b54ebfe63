"""Chat rendering: the exact text of the tool template, and loss masks exact to the token."""

from __future__ import annotations

import pytest

from tooltune.chat import (
    TOOL_CHAT_TEMPLATE,
    assistant_spans,
    install_tool_template,
    needs_tool_template,
    render_prompt,
    tokenize_conversation,
    tool_messages_text,
)
from tooltune.episode import ToolCall
from tooltune.parser import format_tool_calls, parse_assistant_text

# What SmolLM2-Instruct ships: ChatML that drops `tools` and any tool_calls on the floor.
PLAIN_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + (m['content'] or '') + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOLS = [WEATHER]
WEATHER_JSON = (
    '{"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}'
)

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Zürich?"},
    {
        "role": "assistant",
        "content": "Checking both.",
        "tool_calls": [
            # OpenAI sends arguments as a JSON string; both shapes must render the same dict form.
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21C"},
    {"role": "tool", "tool_call_id": "c2", "content": {"sky": "rain"}},
    {"role": "assistant", "content": "Paris is sunny; Zürich is rainy."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]

CALLS_TURN = (
    "Checking both.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call><|im_end|>'
)
ANSWER_TURN = "Paris is sunny; Zürich is rainy.<|im_end|>"
THANKS_TURN = "You're welcome.<|im_end|>"

SYSTEM_TURN = (
    "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + WEATHER_JSON
    + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n"
)
EXPECTED_TEXT = (
    SYSTEM_TURN
    + "<|im_start|>user\nWeather in Paris and Zürich?<|im_end|>\n"
    + "<|im_start|>assistant\n"
    + CALLS_TURN
    + "\n<|im_start|>user\n<tool_response>\nsunny, 21C\n</tool_response>\n"
    + '<tool_response>\n{"sky": "rain"}\n</tool_response><|im_end|>\n'
    + "<|im_start|>assistant\n"
    + ANSWER_TURN
    + "\n<|im_start|>user\nThanks!<|im_end|>\n"
    + "<|im_start|>assistant\n"
    + THANKS_TURN
    + "\n"
)


def make_tokenizer(template: str | None = None):
    """A byte-level BPE trained on a few strings, with the ChatML control tokens only: the Hermes
    markers are split into several tokens, as in SmolLM2, which is the harder case for masks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([EXPECTED_TEXT] * 3, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok():
    t = make_tokenizer()
    install_tool_template(t)
    return t


def test_full_rendering_is_exact(tok):
    assert render_prompt(tok, MESSAGES, TOOLS) == EXPECTED_TEXT + "<|im_start|>assistant\n"


def test_no_tools_no_system_turn_injected(tok):
    text = render_prompt(tok, [{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    text = render_prompt(tok, [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tools_without_system_message(tok):
    text = render_prompt(tok, [{"role": "user", "content": "hi"}], TOOLS)
    assert text.startswith("<|im_start|>system\n# Tools\n\n") and text.endswith(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_calls_render_exactly_as_the_parser_formats_them(tok):
    calls = [ToolCall("get_weather", {"city": "Paris"}), ToolCall("get_weather", {"city": "Zürich"})]
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [c.to_openai(f"c{i}") for i, c in enumerate(calls)]},
    ]
    text, [(start, end)] = assistant_spans(tok, messages, TOOLS)
    assert text[start:end] == format_tool_calls(calls) + "<|im_end|>"
    with_content = [messages[0], {**messages[1], "content": "Checking both."}]
    text, [(start, end)] = assistant_spans(tok, with_content, TOOLS)
    turn = text[start:end].removesuffix("<|im_end|>")
    assert turn == "Checking both.\n" + format_tool_calls(calls)
    parsed = parse_assistant_text(turn, TOOLS)
    assert parsed.calls == calls and parsed.content == "Checking both." and parsed.failure is None


def test_template_alone_renders_openai_string_arguments_the_same(tok):
    # vLLM hands the template the request's messages: arguments may still be JSON strings there.
    messages = [{"role": "user", "content": "q"}, MESSAGES[2]]
    messages[1]["tool_calls"][0]["function"]["arguments"] = '{"city": "Paris"}'
    raw = tok.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    assert CALLS_TURN in raw


def test_loss_mask_covers_exactly_the_assistant_turns(tok):
    out = tokenize_conversation(tok, MESSAGES, TOOLS)
    ids, mask = out["input_ids"], out["loss_mask"]
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    assert [tok.decode(r) for r in runs] == [CALLS_TURN, ANSWER_TURN, THANKS_TURN]
    assert tok.decode(ids) == EXPECTED_TEXT
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert unmasked == EXPECTED_TEXT.replace(CALLS_TURN, "").replace(ANSWER_TURN, "").replace(THANKS_TURN, "")
    # Each turn's closing <|im_end|> is learned (the stop), the newline after it and the header are not.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert sum(m for i, m in zip(ids, mask) if i == im_end) == 3
    assert all(m == 0 for i, m in zip(ids, mask) if i == im_start)


def test_segment_tokenization_equals_whole_text_tokenization(tok):
    out = tokenize_conversation(tok, MESSAGES, TOOLS)
    assert out["input_ids"] == tok(EXPECTED_TEXT, add_special_tokens=False)["input_ids"]


def test_max_length_keeps_the_first_tokens(tok):
    full = tokenize_conversation(tok, MESSAGES, TOOLS)
    cut = tokenize_conversation(tok, MESSAGES, TOOLS, max_length=50)
    assert cut["input_ids"] == full["input_ids"][:50] and cut["loss_mask"] == full["loss_mask"][:50]


def test_rollout_sequence_equals_the_rendered_prompt(tok):
    # prompt + what the model writes (through <|im_end|>) + tool_messages_text == next prompt.
    first_prompt = render_prompt(tok, MESSAGES[:2], TOOLS)
    tail = tool_messages_text(tok, MESSAGES[:5], TOOLS)
    assert tail == (
        "\n<|im_start|>user\n<tool_response>\nsunny, 21C\n</tool_response>\n"
        '<tool_response>\n{"sky": "rain"}\n</tool_response><|im_end|>\n<|im_start|>assistant\n'
    )
    assert first_prompt + CALLS_TURN + tail == render_prompt(tok, MESSAGES[:5], TOOLS)
    with pytest.raises(ValueError):
        tool_messages_text(tok, MESSAGES[:3], TOOLS)


def test_needs_tool_template():
    assert needs_tool_template(make_tokenizer(None))
    assert needs_tool_template(make_tokenizer(PLAIN_CHATML))
    assert needs_tool_template(make_tokenizer("{{ raise_exception('no tools here') }}"))
    assert not needs_tool_template(make_tokenizer(TOOL_CHAT_TEMPLATE))


def test_installed_template_survives_save_pretrained(tmp_path, tok):
    from transformers import PreTrainedTokenizerFast

    tok.save_pretrained(tmp_path)
    loaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert loaded.chat_template == TOOL_CHAT_TEMPLATE
    assert render_prompt(loaded, MESSAGES, TOOLS) == EXPECTED_TEXT + "<|im_start|>assistant\n"


def test_install_requires_chatml_tokens():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    )
    with pytest.raises(ValueError, match="im_start"):
        install_tool_template(bare)


def test_masks_refuse_a_template_that_rewrites_history(tok):
    counting = make_tokenizer("{{ messages | length }}" + PLAIN_CHATML)
    with pytest.raises(ValueError, match="prefix-stable"):
        tokenize_conversation(counting, MESSAGES[1:2] + [{"role": "assistant", "content": "x"}])


def test_assistant_first_is_rejected(tok):
    with pytest.raises(ValueError, match="cannot start"):
        tokenize_conversation(tok, [{"role": "assistant", "content": "x"}])
