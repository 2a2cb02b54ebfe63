"""Scripted candidate answers built from a task's ground truth: contrasts for the preference data.

A policy that has not learned much yet (on CI, an untrained tiny model) samples k answers that
are all alike, and alike answers give a judge nothing to rank. Each variant here is a list of
assistant turn texts, exactly what a model would write (calls as ``format_tool_calls`` writes
them, the final answer as ``gold_final_answer`` does); played through the real tool loop
(``rollout.scripted``) a script becomes an episode like any sampled one.

Variants, what they apply to, and their rule reward under the default ``RewardConfig`` (the
table in ``tooltune.rewards``):

- ``gold`` (every task): one turn per expected step with that step's calls, then the gold
  answer. 10 (correct_call) + 2 (correct_answer_bonus) = 12; on a no-tool task the gold direct
  answer alone, 5 (correct_direct_answer).
- ``direct_guess`` (tasks that need a tool): a final answer with no call, the gold answer with
  its numbers changed, or ``UNSURE_ANSWER`` when it has none. -5 (missed_call).
- ``unneeded_call`` (no-tool arithmetic such as "What is 7 plus 3?" with a calculator offered):
  a calculator call on the query's expression, then the right answer: the "calculator for 1+1"
  case. -5 (unneeded_call) + 2 (correct_answer_bonus) - 0.5 (extra_call_cost) = -3.5.
- ``wrong_arguments`` (tasks that need a tool): the first step's calls with one argument value
  changed (still schema-valid, and a built-in tool still executes it), then the gold answer.
  Single and parallel: -2 (wrong_arguments) + 0 (answer_after_wrong_calls) - 0.5 = -2.5.
  Multi-step: the script stops after its first step (the later steps' arguments come from
  results it did not get), so the later tools are never called: -3 (wrong_tool) + 0 - 0.5 = -3.5.
  It does not apply where no argument has a known alternative (a generated tool's free-text title).

Everything is deterministic: what randomness there is is seeded by the task id.
"""

from __future__ import annotations

import datetime as dt
import random
import re
from typing import Any

from tooltune.episode import Task, ToolCall
from tooltune.parser import format_tool_calls
from tooltune.schema import tools_by_name, validate_arguments
from tooltune.tools import ToolRegistry
from tooltune.tools.builtins import FACTS, TRANSLATIONS, builtin_registry
from tooltune.world import gold_final_answer
from tooltune.world_queries import CITIES, NAMES, SYMBOLS

VARIANTS = ("gold", "direct_guess", "unneeded_call", "wrong_arguments")

UNSURE_ANSWER = "I don't know the answer to that, sorry."

# Trivial arithmetic as the tool world phrases it ("7+3", "7 plus 3", "7 minus 3", "7 times 3").
_ARITHMETIC = re.compile(r"(\d+)\s*(\+|-|plus|minus|times)\s*(\d+)")
_OPERATORS = {"+": "+", "-": "-", "plus": "+", "minus": "-", "times": "*"}
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_CLOCK = re.compile(r"(\d{2}):(\d{2})")
# Values of free-text arguments with known alternatives: a changed value stays plausible.
_POOLS = (CITIES, tuple(sorted(FACTS)), SYMBOLS, tuple(sorted(TRANSLATIONS)), NAMES)


def scripted_turns(task: Task, variant: str, registry: ToolRegistry | None = None) -> list[str] | None:
    """The assistant turn texts of ``variant`` on ``task``, or None when it does not apply.

    ``registry`` (the built-in tools when None) checks that a changed call still executes; a tool
    it does not hold is only checked against the task's schema.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
    rng = random.Random(f"tooltune-contrast:{task.id}:{variant}")
    answer = gold_final_answer(task)
    if variant == "gold":
        return [format_tool_calls(step) for step in task.expected_calls if step] + [answer]
    if variant == "unneeded_call":
        call = _arithmetic_call(task)
        return None if call is None else [format_tool_calls([call]), answer]
    if not task.needs_tool:
        return None
    if variant == "direct_guess":
        return [wrong_guess(task, rng)]
    first = next(step for step in task.expected_calls if step)
    changed = _change_one_argument(task, first, rng, registry if registry is not None else builtin_registry())
    return None if changed is None else [format_tool_calls(changed), answer]


def wrong_guess(task: Task, rng: random.Random) -> str:
    """A final answer that misses: the gold answer with every number shifted, or ``UNSURE_ANSWER``
    when it has no number (or shifting left the expected answer in it)."""
    gold = gold_final_answer(task)
    guess = _shift_numbers(gold, rng.randint(1, 9)) if re.search(r"\d", gold) else UNSURE_ANSWER
    expected = task.expected_answer.lower()
    return UNSURE_ANSWER if expected in guess.lower() else guess


def _arithmetic_call(task: Task) -> ToolCall | None:
    """A calculator call on a no-tool query's arithmetic, when a calculator is offered."""
    offered = tools_by_name(task.tools)
    match = _ARITHMETIC.search(task.query)
    if task.needs_tool or "calculator" not in offered or match is None:
        return None
    a, op, b = match.groups()
    call = ToolCall("calculator", {"expression": f"{a} {_OPERATORS[op]} {b}"})
    return None if validate_arguments(offered["calculator"], call.arguments) else call


def _change_one_argument(
    task: Task, step: list[ToolCall], rng: random.Random, registry: ToolRegistry
) -> list[ToolCall] | None:
    """``step`` with one argument of one call changed: the first change (calls and arguments in
    a seeded order) that fits the schema, executes without error and is no expected call."""
    offered = tools_by_name(task.tools)
    expected = {c.key() for c in task.flat_expected_calls()}
    for index in rng.sample(range(len(step)), len(step)):
        call = step[index]
        schema = offered[call.name]
        properties = schema["function"].get("parameters", {}).get("properties", {})
        for name in rng.sample(sorted(call.arguments), len(call.arguments)):
            for value in _other_values(call.arguments[name], properties.get(name, {}), rng):
                changed = ToolCall(call.name, {**call.arguments, name: value})
                if changed.key() in expected or validate_arguments(schema, changed.arguments):
                    continue
                if _executes(changed, schema, registry):
                    return [*step[:index], changed, *step[index + 1 :]]
    return None


def _other_values(value: Any, schema: dict[str, Any], rng: random.Random) -> list[Any]:
    """Alternatives to an argument value, most plausible first (the caller keeps the first that works)."""
    shifts = [rng.randint(1, 9), -rng.randint(1, 9)]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + s for s in shifts]
    if isinstance(value, float):
        return [round(value + s, 6) for s in shifts]
    if not isinstance(value, str):
        return []
    if "enum" in schema:
        return rng.sample([v for v in schema["enum"] if v != value], len(schema["enum"]) - (value in schema["enum"]))
    if _ISO_DATE.fullmatch(value):
        day = dt.date.fromisoformat(value)
        return [(day + dt.timedelta(days=s)).isoformat() for s in shifts]
    if clock := _CLOCK.fullmatch(value):
        hour = (int(clock.group(1)) + shifts[0]) % 24
        return [f"{hour:02d}:{clock.group(2)}"]
    for pool in _POOLS:
        if value in pool:
            return rng.sample([v for v in pool if v != value], len(pool) - 1)
    if re.search(r"\d", value):
        return [_shift_numbers(value, shifts[0], first_only=True)]
    return []


def _shift_numbers(text: str, shift: int, first_only: bool = False) -> str:
    """``text`` with each run of digits (or the first) raised by ``shift``, its width kept."""

    def shifted(match: re.Match) -> str:
        digits = match.group(0)
        return str(int(digits) + shift).zfill(len(digits))

    return re.sub(r"\d+", shifted, text, count=1 if first_only else 0)


def _executes(call: ToolCall, schema: dict[str, Any], registry: ToolRegistry) -> bool:
    # A tool the registry lacks (or defines otherwise) is simulated by the tool loop: it cannot fail.
    if call.name not in registry or registry.get(call.name).schema != schema:
        return True
    return registry.execute(call, timeout_s=None).error is None
