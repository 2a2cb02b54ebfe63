"""Contrastive arithmetic pairs: one phrasing, small operands (answer directly) and large ones
(call the calculator); the decision metrics by hand."""

import re
from collections import Counter

from tooltune.episode import EndReason, Episode, ToolCall, Turn
from tooltune.tools.builtins import builtin_registry
from tooltune.world_contrast import contrastive_decisions, contrastive_pairs
from tooltune.world_queries import TRIVIAL_FORMS


def shape(query: str) -> str:
    return re.sub(r"\d+", "N", query)


def test_pairs_differ_only_in_their_operands_and_every_phrasing_is_as_frequent():
    pairs = contrastive_pairs(4, seed=3, distractor_tools=2)
    assert len(pairs) == 4 * len(TRIVIAL_FORMS)
    assert Counter(shape(p.trivial.query) for p in pairs) == Counter({shape(f.format(a=1, b=1)): 4 for f, _ in TRIVIAL_FORMS})
    registry = builtin_registry()
    for p in pairs:
        assert shape(p.trivial.query) == shape(p.large.query) and p.trivial.tools == p.large.tools
        assert len(p.trivial.tools) == 3 and "calculator" in {t["function"]["name"] for t in p.trivial.tools}
        assert not p.trivial.needs_tool and p.trivial.category == "no_tool"
        a, b = map(int, re.findall(r"\d+", p.trivial.query))
        assert 12 >= a >= b >= 0
        # The large half's one call computes its answer, and its operands are the query's.
        (call,) = p.large.flat_expected_calls()
        assert call.name == "calculator" and re.findall(r"\d+", call.arguments["expression"]) == re.findall(r"\d+", p.large.query)
        assert str(registry.execute(call, timeout_s=None).content).count(p.large.expected_answer) == 1
        assert int(re.findall(r"\d+", p.large.query)[0]) >= 100
    assert [p.large.query for p in contrastive_pairs(4, seed=3, distractor_tools=2)] == [p.large.query for p in pairs]
    assert [p.large.query for p in contrastive_pairs(4, seed=4, distractor_tools=2)] != [p.large.query for p in pairs]


def episode(task_id, calls=(), answer=None):
    turns = [Turn("call", calls=list(calls))] if calls else []
    turns.append(Turn(answer or ""))
    return Episode(task_id, turns=turns, final_answer=answer, end_reason=EndReason.FINAL_ANSWER)


def test_decisions_by_hand():
    p0, p1 = contrastive_pairs(1, seed=0)[:2]
    call0 = p0.large.flat_expected_calls()[0]
    wrong = ToolCall("calculator", {"expression": "1 + 1"})
    episodes = {
        # Pair 0: direct right answer on the trivial half; the exact call and the right answer on the large one.
        p0.trivial.id: episode(p0.trivial.id, answer=f"The answer is {p0.trivial.expected_answer}."),
        p0.large.id: episode(p0.large.id, [call0], f"The answer is {p0.large.expected_answer}."),
        # Pair 1: a needless call on the trivial half; a direct (wrong) guess, then a wrong call, on the large one.
        p1.trivial.id: episode(p1.trivial.id, [ToolCall("calculator", {"expression": "2 + 2"})], "4"),
        p1.large.id: episode(p1.large.id, [wrong], "2"),
    }
    assert contrastive_decisions([p0, p1], episodes) == {
        "pairs": 2,
        "contrastive_trivial_direct": 0.5, "contrastive_trivial_answered": 0.5,
        "contrastive_large_called": 0.5, "contrastive_large_answered": 0.5,
    }  # fmt: skip


def test_held_out_and_training_pairs_never_share_a_small_operand_query():
    from tooltune.world_contrast import HELDOUT_SEEDS, HELDOUT_TRIVIAL_QUERIES, ContrastSettings

    # 546 small-operand queries in all (6 phrasings, 0 <= b <= a <= 12); about a quarter held out.
    assert 90 < len(HELDOUT_TRIVIAL_QUERIES) < 180
    held = {t.query for seed in HELDOUT_SEEDS.values() for t in ContrastSettings(pairs_per_form=30, seed=seed).tasks() if not t.needs_tool}
    trained = {t.query for seed in (2, 3) for t in ContrastSettings(pairs_per_form=30, seed=seed).tasks() if not t.needs_tool}
    assert held <= HELDOUT_TRIVIAL_QUERIES and not trained & HELDOUT_TRIVIAL_QUERIES
