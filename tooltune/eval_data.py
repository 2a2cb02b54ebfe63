"""A user's evaluation file as tasks: the same metrics as the tool world, on their own data.

A row is one task, in either of two shapes (JSONL, JSON or Parquet; any field may be a JSON string):

- a **reference conversation**, in any format ``tooltune.data`` reads (OpenAI ``messages`` +
  ``tools``, ShareGPT/Hermes, xLAM, Glaive): the prompt is the system and user message before
  the first assistant turn; the expected calls are the assistant turns' ``tool_calls``, one step
  per turn (none: a task that needs no tool); the ``tool`` messages are the results fed back
  when the model makes the same call;
- a **prompt with its answers**: ``messages`` (a system message, optional, and one user
  message), ``tools``, ``expected_calls`` (a list of steps, each a list of ``{"name",
  "arguments"}``; a flat list of calls is one step; ``[]`` when no tool is needed) and,
  optionally, ``tool_results`` (``[{"name", "arguments", "content"}]``).

Either may carry ``expected_answer`` (text the final answer must contain; any answer counts
without it) and ``id``. A call the row has no result for is answered by the loop's
``simulated_tool_result``. A bad row is ``file:row: reason`` (``RowError``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tooltune.data import RowError, convert_row, usable_rows, validate_conversation
from tooltune.episode import Task, ToolCall
from tooltune.formats import json_field

ANSWER_KEYS = ("expected_calls", "tool_results")


def load_eval_tasks(path: str | Path, fmt: str = "auto", on_error: str = "fail") -> tuple[list[Task], list[RowError]]:
    """The tasks of ``path`` and the rows that could not be used (``on_error="skip"``), or
    ``DataError`` naming the first bad row (``"fail"``)."""
    ids: set[str] = set()

    def parse(row: Any, file: str, number: int) -> Task:
        task = row_task(row, f"{Path(file).stem}-{number:05d}", fmt)
        if task.id in ids:
            raise ValueError(f"id {task.id!r} is used by an earlier row")
        ids.add(task.id)
        return task

    return usable_rows(path, parse, on_error)


def row_task(row: Any, default_id: str, fmt: str = "auto") -> Task:
    """One row as a ``Task``; ``ValueError`` says what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    answer = row.get("expected_answer") or ""
    if not isinstance(answer, str):
        raise ValueError("'expected_answer' must be a string")
    task_id = str(row.get("id") or default_id)
    if "expected_calls" in row:
        return _prompt_task(row, task_id, answer)
    conversation = convert_row({k: v for k, v in row.items() if k not in ("expected_answer", "id")}, fmt)
    return _conversation_task(conversation, task_id, answer)


def _prompt(messages: list[dict[str, Any]]) -> tuple[str, str]:
    """(system, user) of the messages before the first assistant turn."""
    head = []
    for m in messages:
        if m["role"] == "assistant":
            break
        head.append(m)
    roles = [m["role"] for m in head]
    if roles not in (["user"], ["system", "user"]):
        raise ValueError(f"the prompt must be one user message (a system message before it optional), got roles {roles}")
    system = head[0]["content"] if roles[0] == "system" else ""
    return system, head[-1]["content"]


def _category(steps: list[list[ToolCall]]) -> str:
    if not steps:
        return "no_tool"
    return "multi_step" if len(steps) > 1 else "parallel" if len(steps[0]) > 1 else "single"


def _conversation_task(conversation: dict[str, Any], task_id: str, answer: str) -> Task:
    messages = conversation["messages"]
    system, query = _prompt(messages)
    steps: list[list[ToolCall]] = []
    by_id: dict[str, ToolCall] = {}
    results: dict[tuple[str, str], str] = {}
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            step = [ToolCall(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            by_id |= {c["id"]: call for c, call in zip(m["tool_calls"], step)}
            steps.append(step)
        elif m["role"] == "tool":
            results[by_id[m["tool_call_id"]].key()] = m["content"]
    return Task(
        id=task_id, query=query, tools=conversation["tools"], expected_calls=steps, expected_answer=answer,
        category=_category(steps), system=system, tool_results=results,
    )  # fmt: skip


def _prompt_task(row: dict[str, Any], task_id: str, answer: str) -> Task:
    raw_steps = json_field(row["expected_calls"], "expected_calls", list)
    if raw_steps and all(isinstance(s, dict) for s in raw_steps):
        raw_steps = [raw_steps]  # a flat list of calls: one parallel step
    steps = [[_call(c, "expected_calls") for c in json_field(s, "expected_calls step", list)] for s in raw_steps]
    steps = [s for s in steps if s]
    results = {}
    for item in json_field(row.get("tool_results") or [], "tool_results", list):
        call = _call(item, "tool_results")
        content = item.get("content")
        results[call.key()] = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    # The prompt and the expected calls checked as a conversation (the tools, every call offered and
    # its arguments valid for the schema): a stand-in result and answer complete it.
    messages = json_field(row.get("messages"), "messages", list)
    reference = list(messages)
    for i, step in enumerate(steps):
        ids = [f"call_{i}_{j}" for j in range(len(step))]
        reference.append({"role": "assistant", "content": "", "tool_calls": [c.to_openai(k) for c, k in zip(step, ids)]})
        reference += [{"role": "tool", "tool_call_id": k, "name": c.name, "content": "{}"} for c, k in zip(step, ids)]
    reference.append({"role": "assistant", "content": answer})
    conversation = validate_conversation(reference, row.get("tools") or [])
    system, query = _prompt(conversation["messages"])
    return Task(
        id=task_id, query=query, tools=conversation["tools"], expected_calls=steps, expected_answer=answer,
        category=_category(steps), system=system, tool_results=results,
    )  # fmt: skip


def _call(item: Any, where: str) -> ToolCall:
    item = json_field(item, where, dict)
    name, arguments = item.get("name"), json_field(item.get("arguments", {}), f"{where} arguments", dict)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: each call needs a 'name'")
    return ToolCall(name, arguments)
