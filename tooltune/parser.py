"""Model text <-> tool calls, in the Hermes wire format that vLLM's ``hermes`` tool parser reads.

One call is ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``; parallel calls
are joined by a newline. Text outside the tags is the assistant's content, and it is the
final answer when there are no calls. Parsing never raises: whatever a model writes becomes
either calls, a final answer, or a ``FailureReason`` with a detail a person can read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tooltune.episode import FailureReason, ToolCall
from tooltune.schema import tools_by_name, validate_arguments

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Strict JSON: NaN/Infinity would parse in Python but no other consumer of the arguments accepts them.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


@dataclass
class ParseResult:
    """What one assistant turn said: valid calls, the text around them, and the first failure."""

    calls: list[ToolCall] = field(default_factory=list)
    content: str = ""
    failure: FailureReason | None = None
    detail: str = ""

    @property
    def is_final_answer(self) -> bool:
        """No call was attempted and the text is usable as the answer."""
        return not self.calls and self.failure is None


def format_tool_calls(calls: list[ToolCall]) -> str:
    """The exact text a model should emit for ``calls`` (the inverse of ``parse_assistant_text``)."""
    return "\n".join(
        f"{TOOL_CALL_OPEN}\n"
        + json.dumps({"name": c.name, "arguments": c.arguments}, ensure_ascii=False)
        + f"\n{TOOL_CALL_CLOSE}"
        for c in calls
    )


def parse_assistant_text(text: str, tools: list[dict[str, Any]]) -> ParseResult:
    """Split ``text`` into calls (checked against ``tools``) and content; never raises on any text."""
    if not isinstance(text, str) or not text.strip():
        return ParseResult(failure=FailureReason.EMPTY_OUTPUT, detail="the model wrote nothing")
    offered = tools_by_name(tools)
    result = ParseResult()
    content_parts = []
    position = 0
    for number, (start, end, call, error) in enumerate(_decoded_calls(text), start=1):
        content_parts.append(text[position:start])
        position = end
        if call is None:
            failure = FailureReason.MALFORMED_JSON
        else:
            failure, error = _check_call(call, offered)
        if failure is None:
            result.calls.append(call)
        elif result.failure is None:
            result.failure, result.detail = failure, f"call {number}: {error}"
    content_parts.append(text[position:])
    result.content = "".join(content_parts).strip()
    return result


def decode_tool_calls(text: str) -> tuple[list[ToolCall], str]:
    """Every call ``text`` emits, unchecked: ``(calls, malformed)``; never raises on any text.

    A call that names a tool nobody offered or breaks its tool's schema is still a call here, as it
    is for a function-calling server (which hands it to the client) and for BFCL's checker (which
    judges it); ``parse_assistant_text`` rejects those. ``malformed`` is the detail of the first
    payload that does not decode to a name and an arguments object ("" when every one does),
    worded as ``parse_assistant_text`` words it.
    """
    if not isinstance(text, str):
        return [], ""
    calls, malformed = [], ""
    for number, (_, _, call, error) in enumerate(_decoded_calls(text), start=1):
        if call is not None:
            calls.append(call)
        elif not malformed:
            malformed = f"call {number}: {error}"
    return calls, malformed


def _decoded_calls(text: str) -> Iterator[tuple[int, int, ToolCall | None, str]]:
    """``(tag start, call end, call or None, error)`` for each ``<tool_call>`` in ``text``, in order."""
    position = 0
    while (start := text.find(TOOL_CALL_OPEN, position)) >= 0:
        payload, position, error = _read_payload(text, start + len(TOOL_CALL_OPEN))
        call = None
        if error is None:
            call, error = _decode_call(payload)
        yield start, position, call, error


def _read_payload(text: str, body_start: int) -> tuple[Any, int, str | None]:
    """Decode the JSON after an opening tag: ``(value, end of the tag, error or None)``.

    The value must be followed by the closing tag or by the end of the text, since generation
    stops at the ``</tool_call>`` stop string or runs out of tokens. Decoding from the start
    (instead of cutting at the first closing tag) keeps a ``</tool_call>`` inside a JSON string intact.
    """
    begin = _skip_space(text, body_start)
    try:
        value, end = _DECODER.raw_decode(text, begin)
    except (ValueError, RecursionError) as e:
        return None, _segment_end(text, body_start), f"malformed JSON: {_short(e)}"
    after = _skip_space(text, end)
    if text.startswith(TOOL_CALL_CLOSE, after):
        return value, after + len(TOOL_CALL_CLOSE), None
    if after == len(text):
        return value, after, None
    return None, _segment_end(text, body_start), f"malformed JSON: unexpected text after the JSON value at char {after}"


def _decode_call(payload: Any) -> tuple[ToolCall | None, str]:
    """The call a decoded payload asks for, or ``(None, why it is malformed)``; no schema involved."""
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return None, 'malformed JSON: expected an object with a string "name"'
    name = payload["name"]
    arguments = payload.get("arguments", {})
    if isinstance(arguments, str):
        # Some models (and the OpenAI API itself) encode the arguments object as a JSON string.
        try:
            arguments = _DECODER.decode(arguments)
        except (ValueError, RecursionError) as e:
            return None, f"{name}: malformed JSON in arguments string: {_short(e)}"
    if not isinstance(arguments, dict):
        return None, f'{name}: "arguments" must be a JSON object'
    return ToolCall(name, arguments), ""


def _check_call(call: ToolCall, offered: dict[str, dict[str, Any]]) -> tuple[FailureReason | None, str]:
    """Whether a decoded call names an offered tool and fits its schema: ``(None, "")`` when it does."""
    if call.name not in offered:
        return FailureReason.UNKNOWN_TOOL, f"unknown tool {call.name!r}; offered: {sorted(offered)}"
    try:
        errors = validate_arguments(offered[call.name], call.arguments)
    except RecursionError:
        errors = [f"{call.name}: argument $: nested too deeply to check [rule: depth]"]
    if errors:
        return FailureReason.INVALID_ARGUMENTS, "; ".join(errors)
    return None, ""


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def _segment_end(text: str, body_start: int) -> int:
    """Where a broken call ends: after its closing tag, or at the end of the text."""
    close = text.find(TOOL_CALL_CLOSE, body_start)
    return len(text) if close < 0 else close + len(TOOL_CALL_CLOSE)


def _short(error: BaseException) -> str:
    message = str(error) or type(error).__name__
    return message if len(message) <= 200 else message[:200] + "..."
