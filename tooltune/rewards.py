"""Rule rewards: what calling a tool earns and costs, as a pure function of a task and an episode.

The default values are the tool-cost table; every one is a ``RewardConfig`` field, and each
part of a ``RewardBreakdown`` is keyed by the field that produced it (zeros included, so a
breakdown always shows which case applied). The total is the sum of:

- Calls, on a task that needs a tool: ``correct_call`` only if the calls made equal the expected
  ones exactly, as the exact-call metric reads them (``metrics.calls_match_exactly``: the
  calling turns match the expected steps one to one, order free within a step; a duplicate, an
  extra call or a parallel step split over two turns is not exact); else ``wrong_arguments`` if
  every expected tool name was called at least once; else ``wrong_tool``. With no call attempted
  at all: ``missed_call``, answered or not (so running out of tokens is no escape from it).
- Calls, on a task that needs none: ``unneeded_call`` if a call was attempted (even malformed).
- Answer, after parsed calls: ``answer_after_wrong_calls`` if the task needs a tool and the
  calls were not exact, whatever the answer (an answer read off the one right result in a spray
  of guesses must not pay for the spray); otherwise ``correct_answer_bonus`` if the final answer
  is right (``metrics.answer_is_correct``), else ``wrong_answer_after_calls`` (no answer is wrong).
- Answer, with no call needed and none attempted: ``correct_direct_answer`` if right, else
  ``wrong_direct_answer``.
- Format: ``malformed_output`` once if any turn failed to parse (any ``FailureReason``).
- Cost: ``extra_call_cost`` per parsed call that no expected call accounts for (the calls made
  less the expected ones, as multisets over the episode): each extra, duplicate or wrong call.

So "1+1" answered "2" directly earns +5, and answered "2" after a calculator call earns
-5 + 2 - 0.5 = -3.5. On "weather in Paris?" the exact call and a right answer earn 10 + 2 = 12;
one guess with the wrong city earns -2 - 0.5 = -2.5; five guesses that include Paris earn
-2 + 0 - 4 x 0.5 = -4, whatever they answer. Against guessing one of n candidate calls,
calling all n is never better: the spray earns -2 - 0.5 (n - 1), the guess at least -2.5.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tooltune.config import StrictModel
from tooltune.episode import Episode, Task
from tooltune.metrics import answer_is_correct, calls_match_exactly


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
    answer_after_wrong_calls: float = 0.0
    extra_call_cost: float = -0.5


@dataclass(frozen=True)
class RewardBreakdown:
    total: float
    parts: dict[str, float] = field(default_factory=dict)


def rule_reward(task: Task, episode: Episode, cfg: RewardConfig | None = None) -> RewardBreakdown:
    """The reward of ``episode`` on ``task`` under ``cfg`` (the defaults when None); see the module docstring."""
    cfg = cfg or RewardConfig()
    made, expected = episode.calls, task.flat_expected_calls()
    exact = calls_match_exactly(task, episode)
    parts: dict[str, float] = {}
    if task.needs_tool:
        if not episode.attempted_call:
            parts["missed_call"] = cfg.missed_call
        elif exact:
            parts["correct_call"] = cfg.correct_call
        elif made and {c.name for c in expected} <= {c.name for c in made}:
            parts["wrong_arguments"] = cfg.wrong_arguments
        elif made:
            parts["wrong_tool"] = cfg.wrong_tool
    elif episode.attempted_call:
        parts["unneeded_call"] = cfg.unneeded_call
    correct = answer_is_correct(task, episode)
    if made:
        if task.needs_tool and not exact:
            key = "answer_after_wrong_calls"
        else:
            key = "correct_answer_bonus" if correct else "wrong_answer_after_calls"
        parts[key] = getattr(cfg, key)
    elif not episode.attempted_call and not task.needs_tool:
        key = "correct_direct_answer" if correct else "wrong_direct_answer"
        parts[key] = getattr(cfg, key)
    if episode.failures:
        parts["malformed_output"] = cfg.malformed_output
    unaccounted = sum((Counter(c.key() for c in made) - Counter(c.key() for c in expected)).values())
    if unaccounted:
        parts["extra_call_cost"] = unaccounted * cfg.extra_call_cost
    return RewardBreakdown(total=sum(parts.values()), parts=parts)
