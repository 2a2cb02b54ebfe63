"""The plain records every stage passes around: a call, a task with its ground truth, an episode.

A ``Task`` is what the tool world (or a user's data set) asks; an ``Episode`` is what a model
did with it in the tool loop. Metrics and rewards are pure functions of the two.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    """One call the model asked for, in the OpenAI shape (`name` + JSON `arguments`)."""

    name: str
    arguments: dict[str, Any]

    def key(self) -> tuple[str, str]:
        """A hashable, order-insensitive identity used to compare calls with ground truth."""
        import json

        return (self.name, json.dumps(self.arguments, sort_keys=True, ensure_ascii=False))

    def to_openai(self, call_id: str) -> dict[str, Any]:
        import json

        return {
            "id": call_id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


class FailureReason(str, enum.Enum):
    """Why a model turn could not be turned into valid calls. ``None`` means it parsed."""

    MALFORMED_JSON = "malformed_json"
    UNKNOWN_TOOL = "unknown_tool"
    INVALID_ARGUMENTS = "invalid_arguments"
    EMPTY_OUTPUT = "empty_output"


class EndReason(str, enum.Enum):
    """How an episode of the tool loop ended."""

    FINAL_ANSWER = "final_answer"
    TURN_LIMIT = "turn_limit"
    PARSE_FAILURE = "parse_failure"
    LENGTH = "length"


@dataclass
class Task:
    """A query with its ground truth.

    ``expected_calls`` is a list of steps; each step is the list of calls that may be issued
    together (parallel calls). An empty list means no tool is needed.
    ``expected_answer`` is the text the final answer must contain (case-insensitive); empty when
    any answer is acceptable (small talk).
    """

    id: str
    query: str
    tools: list[dict[str, Any]]
    expected_calls: list[list[ToolCall]] = field(default_factory=list)
    expected_answer: str = ""
    category: str = "single"
    unseen_tools: bool = False
    system: str = ""
    # Results to feed back for calls the task's data answers (a user's eval file), by
    # ``ToolCall.key()``; not part of ``to_row`` (the tool world runs its tools instead).
    tool_results: dict[tuple[str, str], str] = field(default_factory=dict)

    @property
    def needs_tool(self) -> bool:
        return any(self.expected_calls)

    def flat_expected_calls(self) -> list[ToolCall]:
        return [c for step in self.expected_calls for c in step]

    def to_row(self) -> dict[str, Any]:
        """A flat, Parquet-friendly row (nested JSON as strings keeps the Arrow schema stable)."""
        import json

        return {
            "id": self.id,
            "query": self.query,
            "tools": json.dumps(self.tools, ensure_ascii=False),
            "expected_calls": json.dumps(
                [[{"name": c.name, "arguments": c.arguments} for c in step] for step in self.expected_calls],
                ensure_ascii=False,
            ),
            "expected_answer": self.expected_answer,
            "category": self.category,
            "unseen_tools": self.unseen_tools,
            "needs_tool": self.needs_tool,
            "system": self.system,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Task:
        import json

        steps = json.loads(row["expected_calls"]) if isinstance(row["expected_calls"], str) else row["expected_calls"]
        tools = json.loads(row["tools"]) if isinstance(row["tools"], str) else row["tools"]
        return cls(
            id=row["id"],
            query=row["query"],
            tools=tools,
            expected_calls=[[ToolCall(c["name"], c["arguments"]) for c in step] for step in steps],
            expected_answer=row.get("expected_answer", "") or "",
            category=row.get("category", "single"),
            unseen_tools=bool(row.get("unseen_tools", False)),
            system=row.get("system", "") or "",
        )


@dataclass
class Turn:
    """One model turn in an episode: what it wrote and what that parsed to."""

    text: str
    calls: list[ToolCall] = field(default_factory=list)
    failure: FailureReason | None = None
    failure_detail: str = ""
    tool_errors: list[str] = field(default_factory=list)

    @property
    def attempted_call(self) -> bool:
        """This turn tried to call a tool, whether or not the call parsed and fit the schema."""
        return bool(self.calls) or self.failure in _CALL_ATTEMPT_FAILURES


@dataclass
class Episode:
    """What a model did with one task in the tool loop."""

    task_id: str
    turns: list[Turn] = field(default_factory=list)
    final_answer: str | None = None
    end_reason: EndReason = EndReason.FINAL_ANSWER
    num_generated_tokens: int = 0
    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def calls(self) -> list[ToolCall]:
        return [c for t in self.turns for c in t.calls]

    @property
    def attempted_call(self) -> bool:
        """The model tried to call a tool (valid or not): what over-calling is measured on."""
        return any(t.attempted_call for t in self.turns)

    @property
    def failures(self) -> list[FailureReason]:
        return [t.failure for t in self.turns if t.failure is not None]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["end_reason"] = self.end_reason.value
        for t in d["turns"]:
            t["failure"] = t["failure"].value if t["failure"] else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Episode:
        """The inverse of ``to_dict``; keys that are not fields are ignored (the evaluation job's
        ``episodes.jsonl`` adds the task's ``source``, ``category`` and ``unseen_tools``)."""
        turns = [
            Turn(**{**t, "calls": [ToolCall(**c) for c in t["calls"]], "failure": FailureReason(t["failure"]) if t["failure"] else None})
            for t in d["turns"]
        ]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known} | {"turns": turns, "end_reason": EndReason(d["end_reason"])})


_CALL_ATTEMPT_FAILURES = {
    FailureReason.MALFORMED_JSON,
    FailureReason.UNKNOWN_TOOL,
    FailureReason.INVALID_ARGUMENTS,
}
