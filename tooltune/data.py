"""Users' conversation data: read files, convert known formats, and check every conversation.

Each conversation comes out in the one OpenAI shape the rest of tooltune uses:
``{"messages": [...], "tools": [...]}`` with string contents, calls as
``{"id", "type": "function", "function": {"name", "arguments": dict}}``, each tool message
naming its ``tool_call_id`` and the called ``name``, and tools as OpenAI function schemas.

Files: ``.jsonl``, ``.json`` (lines or one array), ``.parquet``, a ``datasets.save_to_disk``
directory, or a directory of such files. JSON is read with ``json``, not ``datasets``: a bad
line is then one row error with its line number, and ``arguments`` of different rows are not
merged into one Arrow struct (which adds ``null`` keys). For that reason too, keep nested
fields as JSON strings in Parquet; any field may be a JSON string.

Row formats (``fmt="auto"`` picks one per row from its keys):

- ``openai``: ``messages`` (+ ``tools``).
- ``sharegpt``: Hermes / ShareGPT ``conversations`` of ``{"from", "value"}``; calls as
  ``<tool_call>`` blocks in ``gpt`` turns (JSON or Python-literal dicts), results as
  ``<tool_response>`` blocks in ``tool`` turns; LLaMA-Factory's ``function_call`` and
  ``observation`` turns too. Tools come from ``tools`` or from the ``<tools>`` block of the
  system turn, which is then dropped: the chat template lists the tools itself.
- ``xlam``: ``query``, ``tools`` and ``answers`` (JSON strings); xLAM's Python type names
  (``"str, optional"``, ``"List[int]"``) become JSON Schema.
- ``glaive``: ``system`` (``SYSTEM:`` text then function JSON objects) and ``chat``
  (``USER:`` / ``ASSISTANT:`` / ``<functioncall>`` / ``FUNCTION RESPONSE:``).

A bad row becomes a ``RowError`` (``file:row: reason``; rows count from 1, a JSON line's row
is its line number). ``on_error="skip"`` returns and logs them; ``"fail"`` raises ``DataError``
on the first. A file that cannot be read at all always raises ``DataError``.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tooltune.chat import normalize_messages
from tooltune.schema import tools_by_name, validate_arguments, validate_tool_definition

log = logging.getLogger(__name__)

FORMATS = ("openai", "sharegpt", "xlam", "glaive")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_ERRORS_LOGGED = 10


@dataclass(frozen=True)
class RowError:
    file: str
    row: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.row}: {self.reason}"


class DataError(Exception):
    """A data file that cannot be used; the message is one line, ``file:row: reason`` for a row."""


@dataclass
class LoadResult:
    conversations: list[dict[str, Any]] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)


def load_conversations(
    path: str | Path, fmt: str = "auto", on_error: str = "skip", split: str | None = None
) -> LoadResult:
    """Every conversation in ``path`` (a file or a directory), checked; see the module docstring.

    ``split`` picks a split of a saved ``DatasetDict`` (default ``"train"``, or its only split).
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"fmt must be 'auto' or one of {FORMATS}, got {fmt!r}")
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    result = LoadResult()
    for n_rows, (file, row_number, row) in enumerate(_rows(Path(path), split), 1):
        try:
            if isinstance(row, Exception):
                raise row
            result.conversations.append(convert_row(row, fmt))
        except ValueError as e:
            error = RowError(file, row_number, " ".join(str(e).split()))
            if on_error == "fail":
                raise DataError(str(error)) from None
            result.errors.append(error)
    for error in result.errors[:_ERRORS_LOGGED]:
        log.warning("%s", error)
    if result.errors:
        log.warning("%s: skipped %d of %d rows (all listed in LoadResult.errors)", path, len(result.errors), n_rows)
    return result


def convert_row(row: dict[str, Any], fmt: str = "auto") -> dict[str, Any]:
    """One row in any supported format as a checked OpenAI conversation; ``ValueError`` says why not."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    fmt = _detect(row) if fmt == "auto" else fmt
    try:
        return validate_conversation(*_CONVERTERS[fmt](row))
    # Rows are untrusted: a missing field or a value of the wrong kind deep inside is a row error.
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"malformed {fmt} row: {type(e).__name__}: {e}") from None


def validate_conversation(messages: Any, tools: Any = ()) -> dict[str, Any]:
    """Normalize and check a conversation: role order, every call answered by id, called tools
    offered and their arguments valid for the schema, an assistant turn last."""
    tools = [_as_openai_tool(t) for t in _json_field(tools or [], "tools", list)]
    for tool in tools:
        validate_tool_definition(tool)
    offered = tools_by_name(tools)
    messages = _json_field(messages, "messages", list)
    if not messages:
        raise ValueError("no messages")
    if not all(isinstance(m, dict) and isinstance(m.get("tool_calls") or [], list) for m in messages):
        raise ValueError("each message must be an object, and its tool_calls a list")
    messages = normalize_messages(messages)
    pending: dict[str, str] = {}
    previous = None
    for i, m in enumerate(messages, 1):
        role = m.get("role")
        expected = _NEXT_ROLES[previous] if not pending else {"tool"}
        if role not in expected:
            after = f"after {previous!r}" if previous else "first"
            if pending:
                raise ValueError(
                    f"message {i}: calls {sorted(pending)} have no tool result before this {role!r} message"
                )
            raise ValueError(f"message {i}: role {role!r} cannot come {after} (expected one of {sorted(expected)})")
        if role == "assistant":
            for call in m.get("tool_calls") or []:
                name, arguments = call["function"]["name"], call["function"]["arguments"]
                if name not in offered:
                    raise ValueError(f"message {i}: call to {name!r}, which is not among the tools {sorted(offered)}")
                problems = validate_arguments(offered[name], arguments)
                if problems:
                    raise ValueError(f"message {i}: {problems[0]}")
                if call["id"] in pending:
                    raise ValueError(f"message {i}: two calls share the id {call['id']!r}")
                pending[call["id"]] = name
        elif role == "tool":
            m["tool_call_id"] = _answered_call(m, pending, i)
            m["name"] = pending.pop(m["tool_call_id"])
        previous = role
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"the conversation ends with a {messages[-1]['role']!r} message, not an assistant reply")
    return {"messages": messages, "tools": tools}


# Which role may follow which (while calls await results, only tool messages may).
_NEXT_ROLES: dict[str | None, set[str]] = {
    None: {"system", "user"},
    "system": {"user"},
    "user": {"assistant"},
    "assistant": {"user"},
    "tool": {"assistant"},
}


def _answered_call(message: dict[str, Any], pending: dict[str, str], index: int) -> str:
    """The id a tool message answers; without one, the first pending call (of its ``name``, if given)."""
    call_id = message.get("tool_call_id")
    if call_id:
        if call_id not in pending:
            raise ValueError(f"message {index}: tool_call_id {call_id!r} answers no pending call {sorted(pending)}")
        return call_id
    name = message.get("name")
    for pending_id, pending_name in pending.items():
        if not name or name == pending_name:
            return pending_id
    raise ValueError(f"message {index}: tool result for {name!r}, which no pending call made")


def _as_openai_tool(tool: Any) -> dict[str, Any]:
    if not isinstance(tool, dict):
        raise ValueError(f"a tool must be an object, got {type(tool).__name__}")
    function = tool.get("function") if "function" in tool else tool
    if not isinstance(function, dict):
        raise ValueError("a tool's 'function' must be an object")
    function = dict(function)
    # An empty or missing schema means "no arguments"; say so in JSON Schema.
    if not function.get("parameters"):
        function["parameters"] = {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


def _detect(row: dict[str, Any]) -> str:
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


def _json_field(value: Any, name: str, kind: type | None = None) -> Any:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name!r} is not valid JSON: {e.msg} (char {e.pos})") from None
    if kind is not None and not isinstance(value, kind):
        raise ValueError(f"{name!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _lenient_literal(text: str, what: str) -> Any:
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
    turns = _json_field(row.get("conversations", row.get("conversation")), "conversations", list)
    tools = _json_field(row["tools"], "tools", list) if row.get("tools") else None
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
            calls = _lenient_literal(value, f"turn {k} function_call")
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
        listed = _lenient_literal(blocks[0], "the <tools> block")
    except ValueError:
        listed = [
            _lenient_literal(line, f"turn {turn}: a <tools> line") for line in blocks[0].splitlines() if line.strip()
        ]
    return listed if isinstance(listed, list) else [listed]


def _hermes_calls(text: str, turn: int) -> tuple[str, list[dict[str, Any]]]:
    payloads = re.findall(_BLOCK.format(tag="tool_call"), text, re.S)
    content = re.sub(_BLOCK.format(tag="tool_call"), "", text, flags=re.S).strip()
    if "<tool_call>" in content or "</tool_call>" in content:
        raise ValueError(f"turn {turn}: unbalanced <tool_call> tags")
    return content, _calls([_lenient_literal(p.strip(), f"turn {turn}: a <tool_call>") for p in payloads], turn)


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
    tools = [_xlam_tool(t) for t in _json_field(row["tools"], "tools", list)]
    answers = _json_field(row["answers"], "answers", list)
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
        return {"name": match["name"], "arguments": _json_field(match["args"], "arguments")}
    return _json_field(text, "<functioncall>", dict)


_CONVERTERS = {"openai": _from_openai, "sharegpt": _from_sharegpt, "xlam": _from_xlam, "glaive": _from_glaive}


def _rows(path: Path, split: str | None) -> Iterator[tuple[str, int, Any]]:
    """``(file, row number, row or ValueError)`` for every row under ``path``."""
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            yield from _dataset_rows(path, split)
            return
        files = sorted(p for p in path.rglob("*") if p.suffix in _FILE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{path}: no {'/'.join(_FILE_SUFFIXES)} files and no saved dataset")
        for file in files:
            yield from _rows(file, split)
        return
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
    elif path.suffix in (".jsonl", ".json"):
        yield from _json_rows(path)
    else:
        raise DataError(f"{path}: unsupported file type (expected {', '.join(_FILE_SUFFIXES)} or a dataset directory)")


def _json_rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {' '.join(str(e).split())}") from None
    if path.suffix == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("["):
                raise DataError(f"{path}:{e.lineno}: the JSON array is malformed: {e.msg}") from None
        else:
            for i, row in enumerate(whole if isinstance(whole, list) else [whole], 1):
                yield str(path), i, row
            return
    # Not splitlines(): it also splits on U+2028 and friends, which JSON strings may hold raw.
    for line_number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield str(path), line_number, json.loads(line)
        except json.JSONDecodeError as e:
            yield str(path), line_number, ValueError(f"invalid JSON: {e.msg} (column {e.colno})")


def _parquet_rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = (row for batch in pq.ParquetFile(path).iter_batches() for row in batch.to_pylist())
        for number, row in enumerate(rows, 1):
            yield str(path), number, row
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read Parquet: {' '.join(str(e).split())}") from None


def _dataset_rows(path: Path, split: str | None) -> Iterator[tuple[str, int, Any]]:
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        names = list(data)
        chosen = split or ("train" if "train" in data else names[0] if len(names) == 1 else None)
        if chosen not in data:
            raise DataError(f"{path}: choose a split with split=..., one of {names}")
        data = data[chosen]
    for i, row in enumerate(data, 1):
        yield str(path), i, row
