"""Which of a teacher's episodes are good enough to train a student on (response-based distillation).

An episode is dropped for the first of these that holds, and the counts say how many fell to each:

- ``format_error``: a turn the parser could not read (malformed JSON, empty output);
- ``hallucinated_tool``: a call to a tool the task does not offer;
- ``schema_violation``: a call whose arguments break the tool's schema;
- ``no_final_answer``: the loop ended without a final answer (turn or token limit);
- ``wrong_calls``: the episode's calls are not exactly the task's expected ones (a call on a
  task that needs none included);
- ``wrong_answer``: the task has an expected answer and the final answer does not contain it as
  a whole (``answer_matches``: "47" does not pass for "7").

What is left is kept as a conversation (the episode's messages and the task's tools), the form
the SFT data loader reads.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from tooltune.episode import EndReason, Episode, FailureReason, Task
from tooltune.metrics import calls_match_exactly

REASONS = ("format_error", "hallucinated_tool", "schema_violation", "no_final_answer", "wrong_calls", "wrong_answer")
_FAILURE_REASON = {
    FailureReason.MALFORMED_JSON: "format_error",
    FailureReason.EMPTY_OUTPUT: "format_error",
    FailureReason.UNKNOWN_TOOL: "hallucinated_tool",
    FailureReason.INVALID_ARGUMENTS: "schema_violation",
}


def rejection(task: Task, episode: Episode, check_calls: bool = True) -> str | None:
    """Why ``episode`` is not kept (one of ``REASONS``), or None to keep it."""
    failures = {_FAILURE_REASON[f] for f in episode.failures}
    for reason in REASONS[:3]:
        if reason in failures:
            return reason
    if episode.end_reason != EndReason.FINAL_ANSWER or episode.final_answer is None:
        return "no_final_answer"
    if check_calls and not calls_match_exactly(task, episode):
        return "wrong_calls"
    if task.expected_answer and not answer_matches(task.expected_answer, episode.final_answer):
        return "wrong_answer"
    return None


def answer_matches(expected: str, answer: str) -> bool:
    """``expected`` appears in ``answer`` as a whole (case-insensitive): not inside a longer
    number or word, so "47" or "7.5" do not pass for "7" (the evaluation's metric is a plain
    substring test; training data is held to more)."""
    pattern = r"(?<![\w.])" + re.escape(expected.strip().lower()) + r"(?!\w|\.\d)"
    return re.search(pattern, answer.lower()) is not None


def filter_episodes(
    tasks: list[Task], episodes: list[Episode], check_calls: bool = True
) -> tuple[list[tuple[list[dict[str, Any]], list[dict[str, Any]]]], dict[str, int]]:
    """The kept episodes as (messages, tools) conversations, and counts: ``episodes``, ``kept``
    and one per reason of ``REASONS``."""
    kept, dropped = [], Counter()
    for task, episode in zip(tasks, episodes, strict=True):
        reason = rejection(task, episode, check_calls)
        if reason is None:
            kept.append((list(episode.messages), list(task.tools)))
        else:
            dropped[reason] += 1
    return kept, {"episodes": len(episodes), "kept": len(kept), **{r: dropped[r] for r in REASONS}}
