"""OpenAI function schemas: check a tool definition, and check a call's arguments against it.

A tool is ``{"type": "function", "function": {"name", "description", "parameters"}}`` where
``parameters`` is a JSON Schema object. Every message here names the tool and the rule broken,
because these strings end up in logs and in failure details a person reads.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator

# The name rule OpenAI enforces; vLLM and most chat templates assume it too.
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ToolSchemaError(ValueError):
    """A tool definition breaks a rule; the message names the tool and the rule."""


def tool_name(tool: dict[str, Any]) -> str:
    """The function name of a tool definition (``"?"`` when it has none, for messages)."""
    function = tool.get("function") if isinstance(tool, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else "?"


def validate_tool_definition(tool: dict[str, Any]) -> None:
    """Raise ``ToolSchemaError`` unless ``tool`` is a well-formed OpenAI function schema."""
    name = tool_name(tool)
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise ToolSchemaError(f"tool {name!r}: 'type' must be 'function'")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise ToolSchemaError(f"tool {name!r}: 'function' must be an object")
    if not isinstance(function.get("name"), str) or not _NAME_RE.match(function["name"]):
        raise ToolSchemaError(f"tool {name!r}: 'name' must match {_NAME_RE.pattern}")
    description = function.get("description")
    if not isinstance(description, str) or not description.strip():
        raise ToolSchemaError(f"tool {name!r}: 'description' must be a non-empty string")
    parameters = function.get("parameters")
    if not isinstance(parameters, dict) or parameters.get("type") != "object":
        raise ToolSchemaError(f"tool {name!r}: 'parameters' must be a JSON Schema with type 'object'")
    try:
        Draft202012Validator.check_schema(parameters)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ToolSchemaError(f"tool {name!r}: 'parameters' is not a valid JSON Schema at {where}: {e.message}") from e
    properties = parameters.get("properties", {})
    missing = [p for p in parameters.get("required", []) if p not in properties]
    if missing:
        raise ToolSchemaError(f"tool {name!r}: 'required' lists arguments not in 'properties': {missing}")


def validate_arguments(tool: dict[str, Any], arguments: Any) -> list[str]:
    """Every way ``arguments`` breaks the tool's ``parameters`` schema; empty when they fit.

    Each string reads ``"<tool>: argument <json path>: <what is wrong> [rule: <keyword>]"``.
    """
    name = tool_name(tool)
    if not isinstance(arguments, dict):
        return [f"{name}: argument $: arguments must be a JSON object, got {type(arguments).__name__} [rule: type]"]
    parameters = tool["function"].get("parameters", {"type": "object"})
    validator = _validator(json.dumps(parameters, sort_keys=True))
    # A stable sort by path keeps jsonschema's order within one object, which _argument_path relies on.
    errors = sorted(validator.iter_errors(arguments), key=lambda e: [str(p) for p in e.absolute_path])
    seen_required: dict[str, int] = {}
    messages = []
    for error in errors:
        path = _argument_path(error, seen_required)
        messages.append(f"{name}: argument {path}: {error.message} [rule: {error.validator}]")
    return messages


def tools_by_name(tools: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Index tool definitions by function name; two tools with one name is an error."""
    index: dict[str, dict[str, Any]] = {}
    for tool in tools:
        name = tool_name(tool)
        if name in index:
            raise ToolSchemaError(f"tool {name!r}: defined twice")
        index[name] = tool
    return index


@functools.lru_cache(maxsize=256)
def _validator(parameters_json: str) -> Draft202012Validator:
    # Keyed by the schema's JSON text: the rollout loop checks the same few schemas millions of times.
    return Draft202012Validator(json.loads(parameters_json), format_checker=Draft202012Validator.FORMAT_CHECKER)


def _argument_path(error: jsonschema.ValidationError, seen_required: dict[str, int]) -> str:
    """A JSON path naming the offending argument, also for errors jsonschema reports on the parent."""
    path = error.json_path
    if error.validator == "required" and isinstance(error.instance, dict):
        # jsonschema yields one error per missing property, in the order of the `required` list.
        missing = [p for p in error.validator_value if p not in error.instance]
        index = seen_required.get(path, 0)
        seen_required[path] = index + 1
        if index < len(missing):
            return _child_path(path, missing[index])
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        extras = [k for k in error.instance if k not in error.schema.get("properties", {})]
        if len(extras) == 1:
            return _child_path(path, extras[0])
    return path


def _child_path(path: str, key: str) -> str:
    return f"{path}.{key}" if _IDENTIFIER_RE.match(key) else f"{path}[{json.dumps(key)}]"
