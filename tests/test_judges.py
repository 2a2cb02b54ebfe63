"""The AI judge's prompt and the reading of its replies: pure functions, checked by hand and fuzzed."""

import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tooltune.judges import (
    REPLY_FORMAT,
    InvalidReply,
    display_order,
    judge_messages,
    parse_ranking,
    reversal_agreement,
    tally_judgements,
)

FUZZ = settings(max_examples=150, deadline=1000, database=None, suppress_health_check=[HealthCheck.too_slow])
ORDER = [2, 0, 1]  # A shows candidate 2, B candidate 0, C candidate 1
TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.", "parameters": {"type": "object"}}}]


def test_only_the_valid_reply_is_used_and_the_others_are_counted():
    replies = [
        "Candidate B is clearly the best, then A, then C.",
        '```json\n{"ranking": ["B", "A", "C"], "reason": "B calls the calc',
        '{"ranking": ["B", "A"], "reason": "C is bad"}',
        '{"ranking": ["B", "A", "B"], "reason": "twice"}',
        'Here is my verdict:\n```json\n{"ranking": ["B", "C", "A"], "reason": "B answers directly."}\n```',
    ]
    judgements, invalid = tally_judgements(replies, [ORDER] * 5)
    assert [j.ranks for j in judgements] == [None, None, None, None, [0, 1, 2]]
    assert judgements[-1].reason == "B answers directly."
    assert invalid == {"no_json": 1, "truncated_json": 1, "missing_candidate": 1, "repeated_candidate": 1}


def test_labels_map_back_through_the_display_order_by_hand():
    # A=2, B=0, C=1. "A, B, C" puts candidate 2 first, 0 second, 1 third: ranks [1, 2, 0].
    assert parse_ranking('{"ranking": ["A", "B", "C"]}', ORDER).ranks == [1, 2, 0]
    # Reversed order [1, 0, 2]: A=1, B=0, C=2; "B, A, C" ranks candidate 0, then 1, then 2.
    assert parse_ranking('{"ranking": ["B", "A", "C"]}', ORDER[::-1]).ranks == [0, 1, 2]
    # Lenient only on how a label is spelled.
    assert parse_ranking('{"ranking": ["candidate c", " b ", "Candidate A"]}', ORDER).ranks == [1, 0, 2]


def test_reversal_agreement_by_hand():
    consistent = parse_ranking('{"ranking": ["B", "C", "A"]}', ORDER).ranks
    assert consistent == parse_ranking('{"ranking": ["B", "A", "C"]}', ORDER[::-1]).ranks == [0, 1, 2]
    assert reversal_agreement(consistent, consistent) == 1.0
    # A judge that always answers "A, B, C" picks by position: every pair flips when reversed.
    first = parse_ranking('{"ranking": ["A", "B", "C"]}', ORDER).ranks
    second = parse_ranking('{"ranking": ["A", "B", "C"]}', ORDER[::-1]).ranks
    assert (first, second) == ([1, 2, 0], [1, 0, 2])
    assert reversal_agreement(first, second) == 0.0
    # 4 candidates, one of 6 pairs swapped (2 <-> 3); a tie on one side disagrees with an order.
    assert reversal_agreement([0, 1, 2, 3], [0, 1, 3, 2]) == pytest.approx(5 / 6)
    assert reversal_agreement([0, 1, 1], [0, 1, 2]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no pairs"):
        reversal_agreement([0], [0])


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("", InvalidReply.NO_JSON),
        ("I prefer A.", InvalidReply.NO_JSON),
        ('{"ranking": ["A", "B", "C"]', InvalidReply.TRUNCATED_JSON),
        ('{"ranking": ["A", "B", "C"], "reason": "because', InvalidReply.TRUNCATED_JSON),
        ('{"ranking": [A, B, C]} and more', InvalidReply.MALFORMED_JSON),
        ('{"ranking": ["A", "B", "C"], "score": NaN}', InvalidReply.MALFORMED_JSON),
        ('{"order": ["A", "B", "C"]}', InvalidReply.NO_RANKING),
        ('{"answer": {"ranking": ["A", "B", "C"]}}', InvalidReply.NO_RANKING),
        ('{"ranking": "B > A > C"}', InvalidReply.WRONG_TYPE),
        ('{"ranking": [1, 0, 2]}', InvalidReply.WRONG_TYPE),
        ('{"ranking": ["A", "B", "D"]}', InvalidReply.UNKNOWN_CANDIDATE),
        ('{"ranking": ["AB", "C"]}', InvalidReply.UNKNOWN_CANDIDATE),
        ('{"ranking": ["A", "", "B", "C"]}', InvalidReply.UNKNOWN_CANDIDATE),
        ('{"ranking": ["A", "a", "C"]}', InvalidReply.REPEATED_CANDIDATE),
        ('{"ranking": ["C"]}', InvalidReply.MISSING_CANDIDATE),
    ],
)
def test_invalid_replies_say_why(reply, reason):
    judgement = parse_ranking(reply, ORDER)
    assert judgement.ranks is None and judgement.invalid is reason


def test_the_last_ranking_wins_and_the_format_template_is_not_a_ranking():
    reply = 'Draft: {"ranking": ["A", "B", "C"]}. On reflection: {"ranking": ["C", "B", "A"], "reason": "r"}'
    judgement = parse_ranking(reply, [0, 1, 2])
    assert judgement.ranks == [2, 1, 0] and judgement.reason == "r" and judgement.invalid is None
    # A model that echoes the stated format has not ranked anything.
    assert parse_ranking(REPLY_FORMAT, [0, 1, 2]).invalid is InvalidReply.MALFORMED_JSON
    assert parse_ranking(None, [0, 1]).invalid is InvalidReply.NO_JSON


def test_display_order_is_a_seeded_permutation_independent_of_the_process():
    orders = [display_order(5, seed=7, prompt_id=f"p{i}") for i in range(20)]
    assert all(sorted(o) == list(range(5)) for o in orders)
    assert len({tuple(o) for o in orders}) > 5  # shuffled per prompt, not one order for all
    assert display_order(5, 7, "p3") == orders[3]
    assert len({tuple(display_order(5, s, "p3")) for s in range(10)}) > 1  # the seed matters too
    # Python's str hash is salted per process; the order must not depend on it.
    code = "from tooltune.judges import display_order; print([display_order(6, 1, f'q{i}') for i in range(5)])"
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env=os.environ | {"PYTHONHASHSEED": salt}).stdout
        for salt in ("1", "2")
    }
    assert len(outs) == 1 and outs.pop().strip() == str([display_order(6, 1, f"q{i}") for i in range(5)])


def test_judge_messages_show_candidates_under_labels_in_display_order():
    episode = [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "calculator", "arguments": '{"expression": "2+2"}'}}]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "It is 4."},
    ]
    candidates = ["It is 5.", "It is 4.", episode]
    messages = judge_messages(TOOLS, "What is 2+2?", candidates, ORDER)
    assert [m["role"] for m in messages] == ["system", "user"]
    text = messages[1]["content"]
    blocks = {label: text.split(f"[Candidate {label}]\n")[1].split(f"\n[End of candidate {label}]")[0] for label in "ABC"}
    assert blocks["A"] == 'Tool call: calculator {"expression": "2+2"}\nTool result: 4\nAssistant: It is 4.'
    assert (blocks["B"], blocks["C"]) == ("It is 5.", "It is 4.")
    assert text.index("[Candidate A]") < text.index("[Candidate B]") < text.index("[Candidate C]")
    assert "What is 2+2?" in text and json.dumps(TOOLS[0]) in text and REPLY_FORMAT in text
    assert "A, B, C exactly once" in text
    assert "no tools" in judge_messages([], "q", ["x", "y"], [1, 0])[1]["content"]
    with pytest.raises(ValueError, match="not a permutation"):
        judge_messages(TOOLS, "q", ["x", "y"], [0, 0])


@FUZZ
@given(st.text())
def test_fuzz_random_text_never_raises(text):
    check(text, parse_ranking(text, ORDER))


fragments = st.sampled_from(['{', '}', '[', ']', '"ranking"', '"reason"', ':', ',', '"A"', '"B"', '"C"', '"D"', "```json", "NaN", "1", " ", "\n"])


@FUZZ
@given(st.lists(fragments | st.text(max_size=4), max_size=40).map("".join))
def test_fuzz_json_fragments_never_raise(text):
    check(text, parse_ranking(text, ORDER))


@FUZZ
@given(st.integers(2, 8).flatmap(lambda n: st.tuples(st.permutations(range(n)), st.permutations(range(n)))), st.text(max_size=20))
def test_fuzz_a_valid_ranking_round_trips(orders, prose):
    order, preference = orders  # preference: candidates best first
    labels = ["ABCDEFGH"[order.index(c)] for c in preference]
    reply = f"{prose.replace('{', '')}\n```json\n{json.dumps({'ranking': labels, 'reason': prose})}\n```"
    judgement = parse_ranking(reply, order)
    assert judgement.invalid is None and judgement.reason == prose
    assert [judgement.ranks[c] for c in preference] == list(range(len(order)))


def check(text, judgement):
    if judgement.invalid is None:
        assert sorted(judgement.ranks) == [0, 1, 2]
    else:
        assert judgement.ranks is None and isinstance(judgement.invalid, InvalidReply)
