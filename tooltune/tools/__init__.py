"""Tools as Python functions: a registry that derives each OpenAI schema from the function itself.

``ToolRegistry.register(fn)`` reads the signature (type hints -> JSON types, a default makes an
argument optional, ``Literal`` -> enum) and the Google-style docstring (first line -> the tool's
description, ``Args:`` entries -> argument descriptions), so a tool is written once, as code.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tooltune.episode import ToolCall
from tooltune.schema import validate_arguments, validate_tool_definition
from tooltune.tools.executor import ToolResult, run_tool

__all__ = ["Tool", "ToolRegistry", "ToolResult", "function_schema"]

_SCALARS: dict[Any, str] = {str: "string", bool: "boolean", int: "integer", float: "number"}
_ARG_LINE = re.compile(r"^(\s+)(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


@dataclass(frozen=True)
class Tool:
    """A callable tool: its OpenAI schema parts and the Python function that runs it."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]

    @property
    def schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


class ToolRegistry:
    """Named tools, in registration order; executes calls without ever raising."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def register(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Add ``fn`` as a tool named after it; returns ``fn`` so it also works as a decorator."""
        schema = function_schema(fn)
        name = schema["function"]["name"]
        if name in self._tools:
            raise ValueError(f"tool {name!r} is already registered")
        self._tools[name] = Tool(name, schema["function"]["description"], schema["function"]["parameters"], fn)
        return fn

    def add(self, name: str, description: str, parameters: dict[str, Any], fn: Callable[..., Any]) -> Tool:
        """Add a tool from an explicit JSON schema (``fn`` gets the arguments as keywords)."""
        if name in self._tools:
            raise ValueError(f"tool {name!r} is already registered")
        tool = Tool(name, description, parameters, fn)
        validate_tool_definition(tool.schema)
        self._tools[name] = tool
        return tool

    def get(self, name: str) -> Tool:
        if name not in self._tools:
            raise KeyError(f"unknown tool {name!r}; registered: {self.names()}")
        return self._tools[name]

    def names(self) -> list[str]:
        return list(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def schemas(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        """OpenAI tool definitions, for ``names`` in that order (all tools when ``None``)."""
        return [self.get(n).schema for n in (self.names() if names is None else names)]

    def execute(self, call: ToolCall, timeout_s: float | None = 2.0) -> ToolResult:
        """Run ``call``; an unknown tool, bad arguments, an exception or a hang become an error result.

        ``timeout_s=None`` runs the tool in the calling thread, without a timeout (see ``run_tool``).
        """
        tool = self._tools.get(call.name)
        if tool is None:
            return ToolResult.failed(f"unknown tool {call.name!r}")
        errors = validate_arguments(tool.schema, call.arguments)
        if errors:
            return ToolResult.failed("invalid arguments: " + "; ".join(errors))
        return run_tool(tool.fn, call.arguments, timeout_s)


def function_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The OpenAI tool definition of a Python function, checked by ``validate_tool_definition``."""
    name = fn.__name__
    doc = inspect.getdoc(fn) or ""
    description = doc.strip().splitlines()[0].strip() if doc.strip() else ""
    arg_docs = _docstring_args(doc)
    hints = typing.get_type_hints(fn)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise TypeError(f"tool {name!r}: argument {param.name!r} must be a plain keyword argument")
        if param.name not in hints:
            raise TypeError(f"tool {name!r}: argument {param.name!r} needs a type hint")
        prop = _json_type(hints[param.name], f"tool {name!r}: argument {param.name!r}")
        if param.name in arg_docs:
            prop["description"] = arg_docs[param.name]
        properties[param.name] = prop
        if param.default is inspect.Parameter.empty:
            required.append(param.name)
    # additionalProperties false: an invented argument is a schema error the model is told about.
    parameters = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    schema = {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}
    validate_tool_definition(schema)
    return schema


def _json_type(hint: Any, where: str) -> dict[str, Any]:
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        kinds = {_SCALARS.get(type(a)) for a in args}
        if None in kinds or len(kinds) != 1:
            raise TypeError(f"{where}: Literal values must all be of one of str, int, float, bool")
        return {"type": kinds.pop(), "enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:
            return _json_type(members[0], where)
        return {"anyOf": [_json_type(m, where) for m in members]}
    if hint is list or origin is list:
        return {"type": "array", "items": _json_type(args[0], where)} if args else {"type": "array"}
    if hint is dict or origin is dict:
        return {"type": "object"}
    raise TypeError(f"{where}: unsupported type hint {hint!r}")


def _docstring_args(doc: str) -> dict[str, str]:
    """Argument descriptions from a Google-style ``Args:`` section (continuation lines joined)."""
    descriptions: dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return descriptions
    entry_indent, current = None, None
    for line in lines[start + 1 :]:
        if line.strip() and not line[0].isspace():
            break  # the next section (Returns:, Raises:) starts at column 0
        match = _ARG_LINE.match(line)
        if match and (entry_indent is None or len(match.group(1)) == entry_indent):
            entry_indent, current = len(match.group(1)), match.group(2).lstrip("*")
            descriptions[current] = match.group(3).strip()
        elif current is not None and line.strip():
            descriptions[current] = f"{descriptions[current]} {line.strip()}".strip()
    return descriptions
