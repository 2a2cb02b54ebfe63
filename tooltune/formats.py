"""Converters from the common public tool-calling layouts to OpenAI messages + tools.

Each converter takes one row and returns ``(messages, tools)``; ``tooltune.data`` checks the
result. Formats: ``openai``, ``sharegpt`` (Hermes / ShareGPT, LLaMA-Factory turns), ``xlam``,
``glaive`` (see ``tooltune.data`` for the details of each). Errors are ``ValueError`` naming the
turn or field; the caller adds the file and row.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any


def detect(row: dict[str, Any]) -> str:
    if "messages" in row:
        return "openai"
    if "conversations" in row or "conversation" in row:
        return "sharegpt"
    if "query" in row and "answers" in row:
        return "xlam"
    if "chat" in row:
        return "glaive"
    raise ValueError(
        f"unknown row format with keys {sorted(row)[:8]}: expected messages, conversations, query+answers or chat"
    )


def json_field(value: Any, name: str, kind: type | None = None) -> Any:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name!r} is not valid JSON: {e.msg} (char {e.pos})") from None
    if kind is not None and not isinstance(value, kind):
        raise ValueError(f"{name!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def lenient_literal(text: str, what: str) -> Any:
    """JSON, or the Python-literal dicts (single quotes, True/None) Hermes data is full of."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as json_error:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise ValueError(f"{what} is neither JSON nor a Python literal: {json_error.msg}") from None


def _from_openai(row: dict[str, Any]) -> tuple[Any, Any]:
    return row["messages"], row.get("tools") or []


_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "observation": "tool",
}
_BLOCK = r"<{tag}>(.*?)</{tag}>"


def _from_sharegpt(row: dict[str, Any]) -> tuple[list, Any]:
    turns = json_field(row.get("conversations", row.get("conversation")), "conversations", list)
    tools = json_field(row["tools"], "tools", list) if row.get("tools") else None
    messages: list[dict[str, Any]] = []
    for k, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {k}: expected {{'from': ..., 'value': <text>}}")
        speaker, value = turn.get("from"), turn["value"]
        role = _SHAREGPT_ROLES.get(speaker)
        if role is None:
            raise ValueError(f"turn {k}: unknown speaker {speaker!r}")
        if role == "system":
            listed = _tools_in_system(value, k)
            if listed is None:
                messages.append({"role": "system", "content": value})
            elif tools is None:
                tools = listed
        elif speaker == "function_call":
            calls = lenient_literal(value, f"turn {k} function_call")
            messages.append(
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": _calls(calls if isinstance(calls, list) else [calls], k),
                }
            )
        elif role == "assistant":
            content, calls = _hermes_calls(value, k)
            messages.append({"role": "assistant", "content": content, "tool_calls": calls})
        elif role == "tool":
            blocks = re.findall(_BLOCK.format(tag="tool_response"), value, re.S) or [value]
            messages += [{"role": "tool", "content": b.strip()} for b in blocks]
        else:
            messages.append({"role": "user", "content": value})
    return messages, tools or []


def _tools_in_system(text: str, turn: int) -> list | None:
    """The tools of a ``<tools>`` block (a list, or one schema per line); None when there is none."""
    # Hermes system prompts also say "within <tools> </tools> XML tags": skip blank blocks.
    blocks = [b.strip() for b in re.findall(_BLOCK.format(tag="tools"), text, re.S) if b.strip()]
    if not blocks:
        return None
    try:
        listed = lenient_literal(blocks[0], "the <tools> block")
    except ValueError:
        listed = [
            lenient_literal(line, f"turn {turn}: a <tools> line") for line in blocks[0].splitlines() if line.strip()
        ]
    return listed if isinstance(listed, list) else [listed]


def _hermes_calls(text: str, turn: int) -> tuple[str, list[dict[str, Any]]]:
    payloads = re.findall(_BLOCK.format(tag="tool_call"), text, re.S)
    content = re.sub(_BLOCK.format(tag="tool_call"), "", text, flags=re.S).strip()
    if "<tool_call>" in content or "</tool_call>" in content:
        raise ValueError(f"turn {turn}: unbalanced <tool_call> tags")
    return content, _calls([lenient_literal(p.strip(), f"turn {turn}: a <tool_call>") for p in payloads], turn)


def _calls(payloads: list[Any], turn: int) -> list[dict[str, Any]]:
    calls = []
    for payload in payloads:
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            raise ValueError(f"turn {turn}: a call must be an object with a 'name'")
        calls.append(
            {"type": "function", "function": {"name": payload["name"], "arguments": payload.get("arguments", {})}}
        )
    return calls


def _from_xlam(row: dict[str, Any]) -> tuple[list, list]:
    tools = [_xlam_tool(t) for t in json_field(row["tools"], "tools", list)]
    answers = json_field(row["answers"], "answers", list)
    messages: list[dict[str, Any]] = [{"role": "user", "content": row["query"]}]
    if answers:
        messages.append({"role": "assistant", "content": "", "tool_calls": _calls(answers, 2)})
    return messages, tools


_PY_TO_JSON = {
    "str": "string",
    "int": "integer",
    "float": "number",
    "bool": "boolean",
    "list": "array",
    "tuple": "array",
    "set": "array",
    "dict": "object",
}


def _xlam_tool(tool: Any) -> dict[str, Any]:
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        raise ValueError("an xLAM tool must be an object with a 'name'")
    params = tool.get("parameters") or {}
    if params.get("type") != "object":
        properties, required = {}, []
        for name, spec in params.items():
            spec = spec if isinstance(spec, dict) else {}
            type_text = str(spec.get("type", "")).strip()
            optional = "optional" in type_text.lower()
            base = re.sub(r"(?i)^optional\[(.*)\]$|,\s*optional$", r"\1", type_text).split("[")[0].strip().lower()
            prop = {"type": _PY_TO_JSON[base]} if base in _PY_TO_JSON else {}
            if spec.get("description"):
                prop["description"] = str(spec["description"])
            if "default" in spec:
                prop["default"] = spec["default"]
            properties[name] = prop
            if not optional and "default" not in spec:
                required.append(name)
        params = {"type": "object", "properties": properties, **({"required": required} if required else {})}
    return {
        "type": "function",
        "function": {
            "name": tool["name"],
            "description": tool.get("description") or tool["name"],
            "parameters": params,
        },
    }


_GLAIVE_TURN = re.compile(r"(?:^|\n)\s*(USER|ASSISTANT|FUNCTION RESPONSE):")
_GLAIVE_QUOTED_ARGS = re.compile(
    r"""\{\s*"name"\s*:\s*"(?P<name>[^"]+)"\s*,\s*"arguments"\s*:\s*'(?P<args>.*)'\s*\}""", re.S
)


def _from_glaive(row: dict[str, Any]) -> tuple[list, list]:
    system = re.sub(r"^\s*SYSTEM:\s*", "", row.get("system") or "")
    tools, intro = _glaive_functions(system)
    # With functions, the intro only announces them, and the template does that itself.
    messages: list[dict[str, Any]] = [] if tools or not intro else [{"role": "system", "content": intro}]
    parts = _GLAIVE_TURN.split(row["chat"] or "")
    if parts[0].strip():
        raise ValueError("'chat' must start with USER:, ASSISTANT: or FUNCTION RESPONSE:")
    for speaker, text in zip(parts[1::2], parts[2::2]):
        text = text.replace("<|endoftext|>", "").strip()
        if speaker == "USER":
            messages.append({"role": "user", "content": text})
        elif speaker == "FUNCTION RESPONSE":
            messages.append({"role": "tool", "content": text})
        else:
            content, _, call = text.partition("<functioncall>")
            calls = [_glaive_call(call.strip())] if call.strip() else []
            messages.append(
                {"role": "assistant", "content": content.strip(), "tool_calls": _calls(calls, len(messages) + 1)}
            )
    return messages, tools


def _glaive_functions(system: str) -> tuple[list[dict[str, Any]], str]:
    """The function objects written one after another in Glaive's system text, and the text before."""
    start = system.find("{")
    if start < 0:
        return [], system.strip()
    decoder, functions, position = json.JSONDecoder(), [], start
    while position < len(system):
        try:
            obj, position = decoder.raw_decode(system, position)
        except json.JSONDecodeError as e:
            raise ValueError(f"'system' function {len(functions) + 1} is not valid JSON: {e.msg}") from None
        functions.append(obj)
        position = len(system) - len(system[position:].lstrip())
    return functions, system[:start].strip()


def _glaive_call(text: str) -> dict[str, Any]:
    # Glaive quotes the arguments JSON in single quotes, which is not JSON.
    match = _GLAIVE_QUOTED_ARGS.fullmatch(text)
    if match:
        return {"name": match["name"], "arguments": json_field(match["args"], "arguments")}
    return json_field(text, "<functioncall>", dict)


CONVERTERS = {"openai": _from_openai, "sharegpt": _from_sharegpt, "xlam": _from_xlam, "glaive": _from_glaive}
