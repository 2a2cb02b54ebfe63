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

ONE_PLUS_ONE = Task(id="sum", query="What is 1+1?", tools=[], expected_calls=[], expected_answer="2")
WEATHER = Task(id="w", query="Weather in Paris?", tools=[], expected_calls=[[PARIS]], expected_answer="sunny")
TWO_CITIES = Task(id="w2", query="Paris and Oslo?", tools=[], expected_calls=[[PARIS, OSLO]], expected_answer="")


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
        # the needed call twice: +10 +2 -0.5.
        (
            WEATHER,
            answered("sunny", [PARIS], [PARIS]),
            11.5,
            {"correct_call": 10.0, "correct_answer_bonus": 2.0, "extra_call_cost": -0.5},
        ),
        # right tool, wrong city, wrong answer: -2 +0.
        (WEATHER, answered("rain", [LYON]), -2.0, {"wrong_arguments": -2.0, "wrong_answer_after_calls": 0.0}),
        # wrong tool, then out of turns: -3 +0.
        (WEATHER, unfinished([CALC]), -3.0, {"wrong_tool": -3.0, "wrong_answer_after_calls": 0.0}),
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
        # parallel calls made one per turn, any answer accepted: +10 +2.
        (TWO_CITIES, answered("ok", [OSLO], [PARIS]), 12.0, {"correct_call": 10.0, "correct_answer_bonus": 2.0}),
        # one of two needed calls: the right tool, an argument set missing: -2 +2.
        (TWO_CITIES, answered("ok", [PARIS]), 0.0, {"wrong_arguments": -2.0, "correct_answer_bonus": 2.0}),
    ],
)
def test_cost_table(task, episode, total, parts):
    reward = rule_reward(task, episode)
    assert reward.parts == parts
    assert reward.total == pytest.approx(total)


def test_every_value_is_configurable():
    cfg = RewardConfig(unneeded_call=-1.0, correct_answer_bonus=1.0, extra_call_cost=-2.0)
    assert rule_reward(ONE_PLUS_ONE, answered("2", [CALC]), cfg).total == pytest.approx(-1.0 + 1.0 - 2.0)
    with pytest.raises(ValidationError):
        RewardConfig(unneded_call=-1.0)


def test_reward_is_pure():
    episode = answered("2", [CALC])
    before = episode.to_dict()
    assert rule_reward(ONE_PLUS_ONE, episode) == rule_reward(ONE_PLUS_ONE, episode)
    assert episode.to_dict() == before
