"""Rule rewards: what calling a tool earns and costs, as a pure function of a task and an episode.

The default values are the tool-cost table; every one is a ``RewardConfig`` field, and each
part of a ``RewardBreakdown`` is keyed by the field that produced it (zeros included, so a
breakdown always shows which case applied). The total is the sum of:

- Calls, on a task that needs a tool: ``correct_call`` if every expected call was made (name
  and arguments, as a multiset over the episode: steps and order are free, extra calls are
  charged below); else ``wrong_arguments`` if every expected tool name was called at least once
  (right tools, wrong or missing arguments); else ``wrong_tool``. With no call attempted at
  all: ``missed_call``, answered or not (so running out of tokens is no escape from it).
- Calls, on a task that needs none: ``unneeded_call`` if a call was attempted (even malformed).
- Answer, after parsed calls: ``correct_answer_bonus`` if the final answer is right
  (``metrics.answer_is_correct``), else ``wrong_answer_after_calls`` (no answer is wrong).
- Answer, with no call needed and none attempted: ``correct_direct_answer`` if right, else
  ``wrong_direct_answer``.
- Format: ``malformed_output`` once if any turn failed to parse (any ``FailureReason``).
- Cost: ``extra_call_cost`` per parsed call beyond the number of expected calls.

So "1+1" answered "2" directly earns +5, and answered "2" after a calculator call earns
-5 + 2 - 0.5 = -3.5.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tooltune.config import StrictModel
from tooltune.episode import Episode, Task
from tooltune.metrics import answer_is_correct


class RewardConfig(StrictModel):
    unneeded_call: float = -5.0
    correct_direct_answer: float = 5.0
    wrong_direct_answer: float = 0.0
    correct_call: float = 10.0
    wrong_arguments: float = -2.0
    wrong_tool: float = -3.0
    missed_call: float = -5.0
    malformed_output: float = -5.0
    wrong_answer_after_calls: float = 0.0
    correct_answer_bonus: float = 2.0
    extra_call_cost: float = -0.5


@dataclass(frozen=True)
class RewardBreakdown:
    total: float
    parts: dict[str, float] = field(default_factory=dict)


def rule_reward(task: Task, episode: Episode, cfg: RewardConfig | None = None) -> RewardBreakdown:
    """The reward of ``episode`` on ``task`` under ``cfg`` (the defaults when None); see the module docstring."""
    cfg = cfg or RewardConfig()
    made, expected = episode.calls, task.flat_expected_calls()
    parts: dict[str, float] = {}
    if task.needs_tool:
        if not episode.attempted_call:
            parts["missed_call"] = cfg.missed_call
        elif made and not Counter(c.key() for c in expected) - Counter(c.key() for c in made):
            parts["correct_call"] = cfg.correct_call
        elif made and {c.name for c in expected} <= {c.name for c in made}:
            parts["wrong_arguments"] = cfg.wrong_arguments
        elif made:
            parts["wrong_tool"] = cfg.wrong_tool
    elif episode.attempted_call:
        parts["unneeded_call"] = cfg.unneeded_call
    correct = answer_is_correct(task, episode)
    if made:
        key = "correct_answer_bonus" if correct else "wrong_answer_after_calls"
        parts[key] = getattr(cfg, key)
    elif not episode.attempted_call and not task.needs_tool:
        key = "correct_direct_answer" if correct else "wrong_direct_answer"
        parts[key] = getattr(cfg, key)
    if episode.failures:
        parts["malformed_output"] = cfg.malformed_output
    extra = len(made) - len(expected)
    if extra > 0:
        parts["extra_call_cost"] = extra * cfg.extra_call_cost
    return RewardBreakdown(total=sum(parts.values()), parts=parts)
