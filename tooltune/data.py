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

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, Iterator, TypeVar

from tooltune.chat import normalize_messages
from tooltune.formats import CONVERTERS, detect, json_field
from tooltune.schema import tools_by_name, validate_arguments, validate_tool_definition

T = TypeVar("T")

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
    fmt = detect(row) if fmt == "auto" else fmt
    try:
        return validate_conversation(*CONVERTERS[fmt](row))
    # Rows are untrusted: a missing field or a value of the wrong kind deep inside is a row error.
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"malformed {fmt} row: {type(e).__name__}: {e}") from None


def validate_conversation(messages: Any, tools: Any = ()) -> dict[str, Any]:
    """Normalize and check a conversation: role order, every call answered by id, called tools
    offered and their arguments valid for the schema, an assistant turn last."""
    tools = [_as_openai_tool(t) for t in json_field(tools or [], "tools", list)]
    for tool in tools:
        validate_tool_definition(tool)
    offered = tools_by_name(tools)
    messages = json_field(messages, "messages", list)
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


def usable_rows(path: str | Path, parse: Callable[[Any, str, int], T], on_error: str = "fail") -> tuple[list[T], list[RowError]]:
    """``parse(row, file, number)`` of every row under ``path`` (a file, or a folder of them), in
    order, and the rows that could not be used. A row that cannot be read, or that ``parse``
    refuses with ``ValueError``, is ``file:row: reason``: ``on_error="skip"`` collects it and goes
    on, ``"fail"`` raises ``DataError`` with that one line."""
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    items: list[T] = []
    errors: list[RowError] = []
    for file, number, row in _rows(Path(path), None):
        try:
            if isinstance(row, Exception):
                raise row
            items.append(parse(row, file, number))
        except ValueError as e:
            error = RowError(file, number, " ".join(str(e).split()))
            if on_error == "fail":
                raise DataError(str(error)) from None
            errors.append(error)
    return items, errors


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
