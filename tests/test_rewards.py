"""Rule rewards against totals computed by hand from the tool-cost table."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tooltune.episode import EndReason, Episode, FailureReason, Task, ToolCall, Turn
from tooltune.rewards import RewardConfig, rule_reward

CALC = ToolCall("calculator", {"expression": "1+1"})
PARIS = ToolCall("get_weather", {"city": "Paris"})
OSLO = ToolCall("get_weather", {"city": "Oslo"})
LYON = ToolCall("get_weather", {"city": "Lyon"})
ROME = ToolCall("get_weather", {"city": "Rome"})
OSAKA = ToolCall("get_weather", {"city": "Osaka"})

ONE_PLUS_ONE = Task(id="sum", query="What is 1+1?", tools=[], expected_calls=[], expected_answer="2")
WEATHER = Task(id="w", query="Weather in Paris?", tools=[], expected_calls=[[PARIS]], expected_answer="sunny")
TWO_CITIES = Task(id="w2", query="Paris and Oslo?", tools=[], expected_calls=[[PARIS, OSLO]], expected_answer="")
THEN_OSLO = Task(id="w3", query="Paris, then Oslo?", tools=[], expected_calls=[[PARIS], [OSLO]], expected_answer="")


def answered(text, *call_turns, failures=()):
    turns = [Turn("", failure=f) for f in failures] + [Turn("", list(c)) for c in call_turns] + [Turn(text)]
    return Episode(task_id="x", turns=turns, final_answer=text)


def unfinished(*call_turns, failures=()):
    turns = [Turn("", failure=f) for f in failures] + [Turn("", list(c)) for c in call_turns]
    return Episode(task_id="x", turns=turns, final_answer=None, end_reason=EndReason.TURN_LIMIT)


@pytest.mark.parametrize(
    ("task", "episode", "total", "parts"),
    [
        # 1+1 answered directly: +5.
        (ONE_PLUS_ONE, answered("It is 2."), 5.0, {"correct_direct_answer": 5.0}),
        # 1+1 with the calculator: -5 unneeded, +2 right answer after calls, -0.5 for one call beyond 0.
        (
            ONE_PLUS_ONE,
            answered("2", [CALC]),
            -3.5,
            {"unneeded_call": -5.0, "correct_answer_bonus": 2.0, "extra_call_cost": -0.5},
        ),
        # 1+1 answered wrong, no call: 0.
        (ONE_PLUS_ONE, answered("3"), 0.0, {"wrong_direct_answer": 0.0}),
        # a malformed attempt at an unneeded call, then the right answer: -5 unneeded -5 malformed.
        (
            ONE_PLUS_ONE,
            answered("2", failures=[FailureReason.MALFORMED_JSON]),
            -10.0,
            {"unneeded_call": -5.0, "malformed_output": -5.0},
        ),
        # the needed call, then the right answer: +10 +2.
        (WEATHER, answered("Sunny!", [PARIS]), 12.0, {"correct_call": 10.0, "correct_answer_bonus": 2.0}),
        # the needed call, then a wrong answer: +10 +0.
        (WEATHER, answered("Rainy", [PARIS]), 10.0, {"correct_call": 10.0, "wrong_answer_after_calls": 0.0}),
        # the needed call twice is not exact: -2 right tool, +0 for any answer after inexact calls, -0.5 duplicate.
        (
            WEATHER,
            answered("sunny", [PARIS], [PARIS]),
            -2.5,
            {"wrong_arguments": -2.0, "answer_after_wrong_calls": 0.0, "extra_call_cost": -0.5},
        ),
        # twice in one turn: the same, -2 +0 -0.5.
        (
            WEATHER,
            answered("sunny", [PARIS, PARIS]),
            -2.5,
            {"wrong_arguments": -2.0, "answer_after_wrong_calls": 0.0, "extra_call_cost": -0.5},
        ),
        # right tool, wrong city, wrong answer: -2 +0 -0.5 for the wrong call.
        (
            WEATHER,
            answered("rain", [LYON]),
            -2.5,
            {"wrong_arguments": -2.0, "answer_after_wrong_calls": 0.0, "extra_call_cost": -0.5},
        ),
        # wrong tool, then out of turns: -3 +0 -0.5.
        (
            WEATHER,
            unfinished([CALC]),
            -3.5,
            {"wrong_tool": -3.0, "answer_after_wrong_calls": 0.0, "extra_call_cost": -0.5},
        ),
        # the right call beside a wrong tool: every expected name called, -2 +0 -0.5.
        (
            WEATHER,
            answered("sunny", [CALC, PARIS]),
            -2.5,
            {"wrong_arguments": -2.0, "answer_after_wrong_calls": 0.0, "extra_call_cost": -0.5},
        ),
        # answered without the needed tool (even if right): -5.
        (WEATHER, answered("sunny"), -5.0, {"missed_call": -5.0}),
        # out of tokens without calling: still a missed call.
        (WEATHER, Episode(task_id="x", turns=[Turn("hmm")], end_reason=EndReason.LENGTH), -5.0, {"missed_call": -5.0}),
        # only a malformed call: -5.
        (WEATHER, unfinished(failures=[FailureReason.MALFORMED_JSON]), -5.0, {"malformed_output": -5.0}),
        # a bad attempt, then the right call and answer: -5 +10 +2.
        (
            WEATHER,
            answered("sunny", [PARIS], failures=[FailureReason.INVALID_ARGUMENTS]),
            7.0,
            {"correct_call": 10.0, "correct_answer_bonus": 2.0, "malformed_output": -5.0},
        ),
        # parallel calls in one turn, in the other order, any answer accepted: +10 +2.
        (TWO_CITIES, answered("ok", [OSLO, PARIS]), 12.0, {"correct_call": 10.0, "correct_answer_bonus": 2.0}),
        # a parallel step split over two turns is not exact (as for the exact-call metric); no call unaccounted: -2 +0.
        (TWO_CITIES, answered("ok", [OSLO], [PARIS]), -2.0, {"wrong_arguments": -2.0, "answer_after_wrong_calls": 0.0}),
        # one of two needed calls: the right tool, an argument set missing: -2 +0.
        (TWO_CITIES, answered("ok", [PARIS]), -2.0, {"wrong_arguments": -2.0, "answer_after_wrong_calls": 0.0}),
        # two steps in their order: +10 +2.
        (THEN_OSLO, answered("ok", [PARIS], [OSLO]), 12.0, {"correct_call": 10.0, "correct_answer_bonus": 2.0}),
        # two steps in the wrong order, or merged into one turn: not exact, -2 +0.
        (THEN_OSLO, answered("ok", [OSLO], [PARIS]), -2.0, {"wrong_arguments": -2.0, "answer_after_wrong_calls": 0.0}),
        (THEN_OSLO, answered("ok", [PARIS, OSLO]), -2.0, {"wrong_arguments": -2.0, "answer_after_wrong_calls": 0.0}),
        # the steps, then the first one again: -2 +0 -0.5.
        (
            THEN_OSLO,
            answered("ok", [PARIS], [OSLO], [PARIS]),
            -2.5,
            {"wrong_arguments": -2.0, "answer_after_wrong_calls": 0.0, "extra_call_cost": -0.5},
        ),
    ],
)
def test_cost_table(task, episode, total, parts):
    reward = rule_reward(task, episode)
    assert reward.parts == parts
    assert reward.total == pytest.approx(total)


SPRAY = [PARIS, LYON, OSLO, ROME, OSAKA]


def test_a_spray_of_guesses_does_not_pay():
    # Five guesses that include Paris, answered right from Paris's result: -2 right tool, +0 for
    # an answer after inexact calls, 4 x -0.5 for the four calls no expected call accounts for.
    spray = rule_reward(WEATHER, answered("sunny", SPRAY))
    assert spray.parts == {"wrong_arguments": -2.0, "answer_after_wrong_calls": 0.0, "extra_call_cost": -2.0}
    assert spray.total == pytest.approx(-4.0)
    assert rule_reward(WEATHER, answered("sunny", SPRAY[:1])).total == pytest.approx(12.0)  # the exact call
    assert rule_reward(ONE_PLUS_ONE, answered("2")).total == pytest.approx(5.0)  # a right direct answer, no tool needed
    assert rule_reward(WEATHER, answered("rain", [LYON])).total == pytest.approx(-2.5)  # one wrong city
    assert rule_reward(WEATHER, answered("sunny", [LYON])).total == pytest.approx(-2.5)  # one wrong city, lucky answer
    assert rule_reward(WEATHER, answered("rain", [CALC])).total == pytest.approx(-3.5)  # one wrong tool
    # The spray spread over turns is no better.
    assert rule_reward(WEATHER, answered("sunny", *([c] for c in SPRAY))).total == pytest.approx(-4.0)


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_guessing_one_of_n_beats_calling_all_n(n):
    """A model unsure which of n calls is right earns more, in expectation, by guessing one (right
    with chance 1/n: 12, else -2.5) than by calling all n (-2 - 0.5 (n - 1))."""
    candidates = SPRAY[:n]
    spray = rule_reward(WEATHER, answered("sunny", candidates)).total
    assert spray == pytest.approx(-2.0 - 0.5 * (n - 1))
    guesses = [rule_reward(WEATHER, answered("sunny" if c == PARIS else "rain", [c])).total for c in candidates]
    assert sum(guesses) / n == pytest.approx((12.0 - 2.5 * (n - 1)) / n)
    assert spray <= min(guesses) < sum(guesses) / n


def test_every_value_is_configurable():
    cfg = RewardConfig(unneeded_call=-1.0, correct_answer_bonus=1.0, extra_call_cost=-2.0)
    assert rule_reward(ONE_PLUS_ONE, answered("2", [CALC]), cfg).total == pytest.approx(-1.0 + 1.0 - 2.0)
    cfg = RewardConfig(answer_after_wrong_calls=1.0, wrong_arguments=-1.0, extra_call_cost=-3.0)
    assert rule_reward(WEATHER, answered("sunny", [PARIS, LYON]), cfg).total == pytest.approx(-1.0 + 1.0 - 3.0)
    with pytest.raises(ValidationError):
        RewardConfig(unneded_call=-1.0)


def test_reward_is_pure():
    episode = answered("2", [CALC])
    before = episode.to_dict()
    assert rule_reward(ONE_PLUS_ONE, episode) == rule_reward(ONE_PLUS_ONE, episode)
    assert episode.to_dict() == before
