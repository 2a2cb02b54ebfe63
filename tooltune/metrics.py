"""Evaluation metrics, always reported together: how well a model calls, and when it should not.

``compute_metrics(tasks, episodes)`` pairs each task with its episode (by ``task_id``) and
returns these keys. Rates are shares in [0, 1]; a rate whose denominator is empty is ``None``
(never NaN), so "no such tasks" cannot read as 0% or 100%.

- ``n_tasks``: the number of tasks.
- ``call_validity``: of all model turns that attempted a call (wrote a call, or a call that was
  malformed, named an unknown tool or broke the schema), the share with no failure: every call
  in the turn parsed and fit its schema.
- ``tool_selection_accuracy``: of tasks that need a tool, the share whose called tool names,
  as a multiset over the episode, equal the expected ones.
- ``argument_accuracy`` (exact-call accuracy): of tasks that need a tool, the share whose calls
  equal the expected calls exactly. The turns that made calls, in order, must match the expected
  steps one to one; within a step the calls are compared as a multiset of name + arguments
  (``ToolCall.key``: JSON-equal, so ``2`` and ``2.0`` differ). Calls the expected step issues
  together but the model issues in two turns do not match.
- ``over_call_rate``: of tasks that need no tool, the share where the model attempted a call.
- ``under_call_rate``: of tasks that need a tool, the share where it attempted none.
- ``final_answer_accuracy``: of all tasks, the share whose episode ended with a final answer
  (``EndReason.FINAL_ANSWER``) containing ``expected_answer``, case-insensitively; when
  ``expected_answer`` is empty, any final answer counts.
- ``calls_per_query``: parsed calls per task, averaged over tasks.
- ``tokens_per_query``: generated tokens per task, averaged over tasks.
- ``seen`` / ``unseen``: the same keys over tasks whose tools were seen in training
  (``unseen_tools`` False) or not.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from tooltune.episode import EndReason, Episode, Task, ToolCall

METRIC_KEYS = (
    "n_tasks",
    "call_validity",
    "tool_selection_accuracy",
    "argument_accuracy",
    "over_call_rate",
    "under_call_rate",
    "final_answer_accuracy",
    "calls_per_query",
    "tokens_per_query",
)

_COLUMNS = {
    "n_tasks": "tasks",
    "call_validity": "call validity",
    "tool_selection_accuracy": "tool selection",
    "argument_accuracy": "arguments (exact)",
    "over_call_rate": "over-call",
    "under_call_rate": "under-call",
    "final_answer_accuracy": "final answer",
    "calls_per_query": "calls/query",
    "tokens_per_query": "tokens/query",
}


def answer_is_correct(task: Task, episode: Episode) -> bool:
    """The episode ended with a final answer that contains the expected one (any, if none is set)."""
    if episode.end_reason != EndReason.FINAL_ANSWER or episode.final_answer is None:
        return False
    return task.expected_answer.lower() in episode.final_answer.lower()


def tool_names_match(task: Task, episode: Episode) -> bool:
    """The called tool names, as a multiset, equal the expected ones."""
    return Counter(c.name for c in episode.calls) == Counter(c.name for c in task.flat_expected_calls())


def _made_steps(episode: Episode) -> list[Counter]:
    return [Counter(c.key() for c in t.calls) for t in episode.turns if t.calls]


def calls_match_exactly(task: Task, episode: Episode) -> bool:
    """The calling turns match the expected steps one to one, each step order-insensitive."""
    return _made_steps(episode) == [Counter(c.key() for c in step) for step in task.expected_calls if step]


def first_missed_calls(task: Task, episode: Episode) -> list[ToolCall]:
    """The expected calls of the first step the episode got wrong (compared as
    ``calls_match_exactly`` does), less those it made right there. A step with no calling turn
    to match misses all its calls. ``[]`` when no expected call was wrong or missing: every step
    matched, or the model only added calls (to a step, or in turns past the last step)."""
    made = _made_steps(episode)
    for i, step in enumerate(s for s in task.expected_calls if s):
        got = made[i] if i < len(made) else Counter()
        if Counter(c.key() for c in step) != got:
            return [c for c in step if got[c.key()] == 0]
    return []


def miss_breakdown(pairs: list[tuple[Task, Episode]]) -> dict[str, Any]:
    """Where exact calls fail, over the tasks that need a tool: per task category, the tasks
    missed and in all; per tool, how many of its calls were wrong or missing in a task's first
    wrong step (a miss that only added calls counts under ``(extra call)``) and how many calls
    of it were expected in all; and the missed tasks' ids."""
    by_category: dict[str, list[int]] = {}
    by_tool: Counter = Counter()
    expected: Counter = Counter(c.name for t, _ in pairs if t.needs_tool for c in t.flat_expected_calls())
    missed: list[str] = []
    for task, episode in pairs:
        if not task.needs_tool:
            continue
        row = by_category.setdefault(task.category, [0, 0])
        row[1] += 1
        if calls_match_exactly(task, episode):
            continue
        row[0] += 1
        missed.append(task.id)
        wrong = first_missed_calls(task, episode)
        by_tool.update([c.name for c in wrong] or ["(extra call)"])
    return {
        "by_category": {k: {"missed": m, "tasks": n} for k, (m, n) in sorted(by_category.items())},
        "by_tool": {k: {"first_wrong": by_tool[k], "expected_calls": expected[k]} for k in sorted(set(by_tool) | set(expected))},
        "missed_task_ids": missed,
    }


def _share(hits: int, total: int) -> float | None:
    return hits / total if total else None


def _summary(pairs: list[tuple[Task, Episode]]) -> dict[str, Any]:
    needed = [(t, e) for t, e in pairs if t.needs_tool]
    not_needed = [(t, e) for t, e in pairs if not t.needs_tool]
    attempts = [turn for _, e in pairs for turn in e.turns if turn.attempted_call]
    return {
        "n_tasks": len(pairs),
        "call_validity": _share(sum(turn.failure is None for turn in attempts), len(attempts)),
        "tool_selection_accuracy": _share(sum(tool_names_match(t, e) for t, e in needed), len(needed)),
        "argument_accuracy": _share(sum(calls_match_exactly(t, e) for t, e in needed), len(needed)),
        "over_call_rate": _share(sum(e.attempted_call for _, e in not_needed), len(not_needed)),
        "under_call_rate": _share(sum(not e.attempted_call for _, e in needed), len(needed)),
        "final_answer_accuracy": _share(sum(answer_is_correct(t, e) for t, e in pairs), len(pairs)),
        "calls_per_query": _share(sum(len(e.calls) for _, e in pairs), len(pairs)),
        "tokens_per_query": _share(sum(e.num_generated_tokens for _, e in pairs), len(pairs)),
    }


# The rates of ``_summary`` as per-task (hits, denominator) counts, so tasks can be resampled.
def _task_counts(task: Task, episode: Episode) -> dict[str, tuple[int, int]]:
    needed = int(task.needs_tool)
    attempts = [turn for turn in episode.turns if turn.attempted_call]
    return {
        "call_validity": (sum(turn.failure is None for turn in attempts), len(attempts)),
        "tool_selection_accuracy": (needed and int(tool_names_match(task, episode)), needed),
        "argument_accuracy": (needed and int(calls_match_exactly(task, episode)), needed),
        "over_call_rate": (int(not needed and episode.attempted_call), 1 - needed),
        "under_call_rate": (int(needed and not episode.attempted_call), needed),
        "final_answer_accuracy": (int(answer_is_correct(task, episode)), 1),
    }


def bootstrap_interval(
    hits: list[float], totals: list[float], resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``sum(hits) / sum(totals)`` over items drawn with
    replacement (a task is one item, whatever its denominator). Resamples with an empty
    denominator are dropped; ``None`` when every item's total is 0."""
    import numpy as np

    h, t = np.asarray(hits, dtype=float), np.asarray(totals, dtype=float)
    if not t.sum():
        return None
    idx = np.random.default_rng(seed).integers(0, len(h), size=(resamples, len(h)))
    num, den = h[idx].sum(axis=1), t[idx].sum(axis=1)
    stats = num[den > 0] / den[den > 0]
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def metric_intervals(pairs: list[tuple[Task, Episode]], resamples: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """A bootstrap interval over tasks (``bootstrap_interval``) for each rate of the module
    docstring, with the tasks behind it (``n``: those with a non-empty denominator)."""
    counts = [_task_counts(t, e) for t, e in pairs]
    out: dict[str, Any] = {}
    for key in counts[0] if counts else ():
        hits, totals = [c[key][0] for c in counts], [c[key][1] for c in counts]
        interval = bootstrap_interval(hits, totals, resamples, level, seed)
        out[key] = {"ci": None if interval is None else [round(interval[0], 4), round(interval[1], 4)], "n": sum(t > 0 for t in totals)}
    return out


def pair_episodes(tasks: list[Task], episodes: list[Episode]) -> list[tuple[Task, Episode]]:
    """Each task with its one episode; a missing, extra or repeated episode is an error."""
    by_id: dict[str, Episode] = {}
    for episode in episodes:
        if episode.task_id in by_id:
            raise ValueError(f"two episodes for task {episode.task_id!r}")
        by_id[episode.task_id] = episode
    task_ids = [t.id for t in tasks]
    missing = [i for i in task_ids if i not in by_id]
    extra = sorted(set(by_id) - set(task_ids))
    if missing or extra or len(set(task_ids)) != len(task_ids):
        raise ValueError(
            f"tasks and episodes do not pair up: no episode for {missing[:5]}, no task for {extra[:5]}, "
            f"{len(task_ids) - len(set(task_ids))} repeated task ids"
        )
    return [(t, by_id[t.id]) for t in tasks]


def compute_metrics(tasks: list[Task], episodes: list[Episode]) -> dict[str, Any]:
    """Every metric of the module docstring, overall and for ``seen`` / ``unseen`` tools."""
    pairs = pair_episodes(tasks, episodes)
    result = _summary(pairs)
    result["seen"] = _summary([(t, e) for t, e in pairs if not t.unseen_tools])
    result["unseen"] = _summary([(t, e) for t, e in pairs if t.unseen_tools])
    return result


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if key == "n_tasks":
        return str(value)
    if key.endswith("_per_query"):
        return f"{value:.2f}" if key == "calls_per_query" else f"{value:.1f}"
    return f"{100 * value:.1f}%"


def metrics_markdown(results: dict[str, dict[str, Any]], subset: str | None = None) -> str:
    """A Markdown table, one row per run (the keys of ``results``, in order). ``subset`` picks
    ``"seen"`` or ``"unseen"`` instead of the overall numbers."""
    header = ["run", *(_COLUMNS[k] for k in METRIC_KEYS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(METRIC_KEYS)) + "|"]
    for run, metrics in results.items():
        shown = metrics[subset] if subset else metrics
        lines.append("| " + " | ".join([run, *(_cell(k, shown[k]) for k in METRIC_KEYS)]) + " |")
    return "\n".join(lines)
