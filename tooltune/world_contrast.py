"""Contrastive arithmetic: a call decision that must follow the content, not the phrasing.

The tool world's trivial no-tool questions ("What is 7 times 4?", a calculator offered) all have
operands up to 12. A model can learn "this phrasing means answer directly" and then answer
"What is 48213 * 977?" directly, and wrongly. Each contrastive pair holds one phrasing of
``world_queries.TRIVIAL_FORMS`` twice, with the same tools offered: with small operands (no tool
needed: answer directly) and with large ones (the calculator is needed: one exact call). Every
phrasing appears equally often, so the two halves have the same proportions of phrasings. The
large operands are the tool world's own calculator operands (100-9,999 and 10-999): what is
measured is the decision, not the copying of numbers longer than any the world trains on.

The set is its own seeded stream, apart from the world's splits: adding it changes no split.
Small-operand queries come from a space of 546 (6 phrasings, 0 <= b <= a <= 12): seeds alone
would make held-out and training pairs coincide. So a quarter of the query space, fixed by content
(``heldout_operands``, both halves), is held out: pairs of a held-out seed (``HELDOUT_SEEDS``) draw
from it alone, pairs of any other seed and the world's trivially phrased calculator tasks
(``WorldConfig.trivial_phrased_calculator_share``) never do, and ``HELDOUT_TRIVIAL_QUERIES`` lets
a trainer drop such small-operand queries from its own prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pydantic import Field

from tooltune.config import StrictModel
from tooltune.episode import Episode, Task, ToolCall
from tooltune.metrics import answer_is_correct, calls_match_exactly
from tooltune.tools import ToolRegistry
from tooltune.tools.builtins import UNSEEN_TOOLS, builtin_registry
from tooltune.world_queries import TRIVIAL_FORMS, apply_operator, heldout_operands, large_operands


# The pairs' seeds held out for scoring: training prompts must come from other seeds.
HELDOUT_SEEDS = {"test": 0, "validation": 1}


HELDOUT_TRIVIAL_QUERIES = frozenset(
    form.format(a=a, b=b) for form, _ in TRIVIAL_FORMS for a in range(13) for b in range(a + 1) if heldout_operands(form, a, b)
)


class ContrastSettings(StrictModel):
    """A set of contrastive pairs: each trivial no-tool phrasing with small operands (answer
    directly) and with large ones (call the calculator), ``pairs_per_form`` of each phrasing."""

    pairs_per_form: int = Field(0, ge=0)  # 0: none
    seed: int = 0
    distractor_tools: int = Field(1, ge=0)  # other built-in tools offered beside the calculator

    def pairs(self) -> list[ContrastPair]:
        return contrastive_pairs(self.pairs_per_form, self.seed, self.distractor_tools) if self.pairs_per_form else []

    def tasks(self, pairs: list[ContrastPair] | None = None) -> list[Task]:
        """Both halves of every pair (of ``pairs``, or this set's), pair by pair."""
        return [task for pair in (self.pairs() if pairs is None else pairs) for task in (pair.trivial, pair.large)]


@dataclass(frozen=True)
class ContrastPair:
    trivial: Task  # small operands: no call is needed
    large: Task  # the same phrasing with large operands: the calculator is needed


def contrastive_pairs(n_per_form: int, seed: int = 0, distractor_tools: int = 1, registry: ToolRegistry | None = None) -> list[ContrastPair]:
    """``n_per_form`` pairs for each phrasing, in a seeded order; both tasks of a pair offer the
    calculator and the same ``distractor_tools`` other built-in tools, in the same order. The
    operands of both halves come from the held-out quarter for a held-out seed, from the rest otherwise."""
    registry = registry or builtin_registry()
    held = seed in HELDOUT_SEEDS.values()
    rng = random.Random(f"tooltune-contrast:{seed}")
    pool = [n for n in registry.names() if n != "calculator" and n not in UNSEEN_TOOLS]
    plan = [form for form in TRIVIAL_FORMS for _ in range(n_per_form)]
    rng.shuffle(plan)
    pairs = []
    for i, (form, op) in enumerate(plan):
        tools = ["calculator", *rng.sample(pool, min(distractor_tools, len(pool)))]
        rng.shuffle(tools)
        schemas = registry.schemas(tools)
        a, b = sorted((rng.randint(0, 12), rng.randint(0, 12)), reverse=True)
        while heldout_operands(form, a, b) != held:
            a, b = sorted((rng.randint(0, 12), rng.randint(0, 12)), reverse=True)
        trivial = Task(id=f"contrast-{i:04d}-trivial", query=form.format(a=a, b=b), tools=schemas, expected_calls=[],
                       expected_answer=str(apply_operator(op, a, b)), category="no_tool")  # fmt: skip
        a, b = large_operands(rng)
        while heldout_operands(form, a, b) != held:
            a, b = large_operands(rng)
        call = ToolCall("calculator", {"expression": f"{a} {op} {b}"})
        result = registry.execute(call, timeout_s=None)
        if result.error is not None:
            raise RuntimeError(f"contrast call {call} failed: {result.error}")
        answer = str(apply_operator(op, a, b))
        large = Task(id=f"contrast-{i:04d}-large", query=form.format(a=a, b=b), tools=schemas, expected_calls=[[call]],
                     expected_answer=answer, category="single")  # fmt: skip
        pairs.append(ContrastPair(trivial, large))
    return pairs


def contrastive_decisions(pairs: list[ContrastPair], episodes: dict[str, Episode]) -> dict[str, float | int]:
    """``contrastive_trivial_direct``: the share of trivial halves answered with no call attempted;
    ``contrastive_large_called``: the share of large halves whose calls are exactly the expected
    calculator call; with the right answer besides, ``..._answered`` for each. ``episodes`` by task id."""
    n = len(pairs)
    if not n:
        return {"pairs": 0}
    trivial = [episodes[p.trivial.id] for p in pairs]
    large = [episodes[p.large.id] for p in pairs]
    return {
        "pairs": n,
        "contrastive_trivial_direct": sum(not e.attempted_call for e in trivial) / n,
        "contrastive_trivial_answered": sum(not e.attempted_call and answer_is_correct(p.trivial, e) for p, e in zip(pairs, trivial)) / n,
        "contrastive_large_called": sum(calls_match_exactly(p.large, e) for p, e in zip(pairs, large)) / n,
        "contrastive_large_answered": sum(calls_match_exactly(p.large, e) and answer_is_correct(p.large, e) for p, e in zip(pairs, large)) / n,
    }
