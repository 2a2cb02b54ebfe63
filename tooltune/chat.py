"""Chat rendering with tools: the ChatML + Hermes template, prompts, and token-exact loss masks.

The template follows Qwen2.5's: the tools go into the system turn inside ``<tools></tools>``,
one JSON schema per line; an assistant call is rendered exactly as
``tooltune.parser.format_tool_calls`` writes it (``<tool_call>\\n{"name": ..., "arguments": ...}
\\n</tool_call>``, calls joined by a newline, after the content and a newline when there is
content); tool results go back as one user turn of ``<tool_response>`` blocks. A checkpoint
saved with this template serves unchanged with vLLM's OpenAI server and its ``hermes`` parser.

Masks are computed from the rendered text, not from ``{% generation %}`` markers (which some
template engines outside transformers reject): rendering the conversation cut just before and
just after each assistant message gives that message's exact character span, and each span
and the text between spans are tokenized separately, so no token straddles a mask boundary.
The rollout loop builds its sequences the same way (prompt ids + generated ids + the ids of
``tool_messages_text``), so SFT and RL see the same token layout.
"""

from __future__ import annotations

import copy
import json
from typing import Any

TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"

TOOL_CHAT_TEMPLATE = (
    "{%- macro render_call(call) -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{%- if fn.arguments is string -%}"
    # A JSON string is emitted verbatim; tooltune's own renderers always pass a dict.
    """{{- '<tool_call>\\n{"name": ' ~ (fn.name | tojson) ~ ', "arguments": ' ~ fn.arguments ~ '}\\n</tool_call>' -}}"""
    "{%- else -%}"
    """{{- '<tool_call>\\n' ~ ({"name": fn.name, "arguments": fn.arguments} | tojson) ~ '\\n</tool_call>' -}}"""
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{- content -}}{%- elif content -%}{{- content | tojson -}}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0].role == 'system' -%}{{- text(messages[0].content) ~ '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' ~ (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    """{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' -}}"""
    "{%- elif messages[0].role == 'system' -%}"
    "{{- '<|im_start|>system\\n' ~ text(messages[0].content) ~ '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) -%}"
    "{{- '<|im_start|>' ~ message.role ~ '\\n' ~ text(message.content) ~ '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' ~ text(message.content) -}}"
    "{%- for call in message.tool_calls or [] -%}"
    "{%- if message.content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- render_call(call) -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' ~ text(message.content) ~ '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_PROBE_NAME = "tooltune_probe_tool"
_PROBE_DESCRIPTION = "tooltune probe: is this tool listed?"
_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": _PROBE_NAME,
        "description": _PROBE_DESCRIPTION,
        "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}},
    },
}
_PROBE_RESULT = "tooltune probe result 7361"
_PROBE_CONVERSATION = [
    {"role": "user", "content": "probe"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": _PROBE_NAME, "arguments": {"x": 1}}}],
    },
    {"role": "tool", "tool_call_id": "call_0", "content": _PROBE_RESULT},
]
_PROBE_EXPECTED = [
    _PROBE_DESCRIPTION,
    '<tool_call>\n{"name": "tooltune_probe_tool", "arguments": {"x": 1}}\n</tool_call>',
    f"<tool_response>\n{_PROBE_RESULT}\n</tool_response>",
]


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p.get("text", "") for p in content)
    return json.dumps(content, ensure_ascii=False)


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``messages`` in the one shape the template renders exactly.

    Content becomes a string (OpenAI text parts are joined, other values JSON-encoded); each call
    becomes ``{"id", "type": "function", "function": {"name", "arguments": dict}}``, whether it
    arrived as OpenAI (arguments a JSON string) or bare ``{"name", "arguments"}``; an empty
    ``tool_calls`` is dropped.
    """
    out = []
    for message in messages:
        m = copy.deepcopy(message)
        m["content"] = _text(m.get("content"))
        if m.get("tool_calls"):
            m["tool_calls"] = [_normalize_call(call, i) for i, call in enumerate(m["tool_calls"])]
        else:
            m.pop("tool_calls", None)
        out.append(m)
    return out


def _normalize_call(call: dict[str, Any], index: int) -> dict[str, Any]:
    fn = call.get("function", call)
    arguments = fn.get("arguments")
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"call {fn.get('name')!r}: arguments are not valid JSON: {e.msg}") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"call {fn.get('name')!r}: arguments must be a JSON object, got {type(arguments).__name__}")
    return {
        "id": call.get("id") or f"call_{index}",
        "type": "function",
        "function": {"name": fn.get("name"), "arguments": arguments},
    }


def _render(
    tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, generation_prompt: bool
) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools or None, add_generation_prompt=generation_prompt, tokenize=False
    )


def needs_tool_template(tokenizer) -> bool:
    """True unless the tokenizer's own template lists tools, renders Hermes calls exactly, and
    renders tool results as ``<tool_response>`` blocks."""
    if not getattr(tokenizer, "chat_template", None):
        return True
    try:
        text = _render(tokenizer, _PROBE_CONVERSATION, [_PROBE_TOOL], True)
    # Any template may raise anything on a tool conversation; each failure means "ours is needed".
    except Exception:  # noqa: BLE001
        return True
    return not all(piece in text for piece in _PROBE_EXPECTED)


def install_tool_template(tokenizer) -> None:
    """Make ``TOOL_CHAT_TEMPLATE`` the tokenizer's template (``save_pretrained`` writes it)."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (TURN_START, TURN_END) if t not in vocab]
    if missing:
        raise ValueError(f"the tokenizer has no {missing} tokens: add them (and resize the embeddings) first")
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE


def render_prompt(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """The text a model continues: ``messages`` rendered, then the assistant generation prompt."""
    return _render(tokenizer, normalize_messages(messages), tools, True)


def assistant_spans(
    tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, per assistant message, the ``[start, end)`` characters the
    model writes: after the ``<|im_start|>assistant\\n`` header, through its closing ``<|im_end|>``."""
    msgs = normalize_messages(messages)
    text = _render(tokenizer, msgs, tools, False)
    spans = []
    for i, message in enumerate(msgs):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("a conversation cannot start with an assistant message")
        start = len(_prefix(text, _render(tokenizer, msgs[:i], tools, True)))
        end = _turn_end(_prefix(text, _render(tokenizer, msgs[: i + 1], tools, False)), start)
        spans.append((start, end))
    return text, spans


def _prefix(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise ValueError(
            "the chat template renders earlier turns differently once later turns follow; "
            "exact loss masks need a prefix-stable template such as TOOL_CHAT_TEMPLATE"
        )
    return prefix


def _turn_end(rendered: str, start: int) -> int:
    end = rendered.rfind(TURN_END)
    if end < start:
        raise ValueError(f"the chat template does not close assistant turns with {TURN_END}")
    return end + len(TURN_END)


def _encode(tokenizer, text: str) -> list[int]:
    # The template writes every control token itself, so the tokenizer must add none.
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def tokenize_conversation(
    tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, max_length: int | None = None
) -> dict[str, list[int]]:
    """``input_ids`` and a ``loss_mask`` that is 1 exactly on what the model writes: each assistant
    message's content and calls and its closing ``<|im_end|>``; 0 on system, user and tool text
    and on the assistant header. ``max_length`` keeps the first tokens (a cut assistant turn
    then trains without its stop token; filter by length upstream to avoid that)."""
    text, spans = assistant_spans(tokenizer, messages, tools)
    input_ids: list[int] = []
    loss_mask: list[int] = []
    position = 0
    for start, end in [*spans, (len(text), len(text))]:
        for segment, label in ((text[position:start], 0), (text[start:end], 1)):
            ids = _encode(tokenizer, segment)
            input_ids += ids
            loss_mask += [label] * len(ids)
        position = end
    if max_length is not None:
        input_ids, loss_mask = input_ids[:max_length], loss_mask[:max_length]
    return {"input_ids": input_ids, "loss_mask": loss_mask}


def tool_messages_text(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """The text that follows the last assistant turn's ``<|im_end|>`` once the messages after it
    (tool results) are added, through the next generation prompt. The rollout loop appends its
    tokens (``add_special_tokens=False``) to the running sequence after the model stopped."""
    msgs = normalize_messages(messages)
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None or last == len(msgs) - 1:
        raise ValueError("tool_messages_text needs messages after an assistant turn")
    text = _render(tokenizer, msgs, tools, True)
    upto = _prefix(text, _render(tokenizer, msgs[: last + 1], tools, False))
    return text[_turn_end(upto, 0) :]



def reward_ids(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
    """An episode's tokens as a reward model reads them: its messages rendered with the template
    (``tokenize_conversation``), through the last turn end and without it, so the score sits on
    the last token the episode wrote (the final answer's, or a tool result's when it ended on
    one). Training and scoring both read episodes this way, from their messages. The same
    position is the one transformers' sequence classifiers pool (the rightmost non-pad token)
    when given these ids, whatever the pad token."""
    ids = tokenize_conversation(tokenizer, messages, tools)["input_ids"]
    end = tokenizer.convert_tokens_to_ids(TURN_END)
    last = max((i for i, t in enumerate(ids) if t == end), default=len(ids))
    return ids[:last]
