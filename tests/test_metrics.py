"""Metrics on a hand-built set of seven episodes, every number computed by hand."""

from __future__ import annotations

import pytest

from tooltune.episode import EndReason, Episode, FailureReason, Task, ToolCall, Turn
from tooltune.metrics import METRIC_KEYS, compute_metrics, metrics_markdown


def weather(city):
    return ToolCall("get_weather", {"city": city})


CALC = ToolCall("calculator", {"expression": "1+1"})


def task(tid, calls=(), answer="", unseen=False):
    return Task(
        id=tid,
        query=tid,
        tools=[],
        expected_calls=[list(s) for s in calls],
        expected_answer=answer,
        unseen_tools=unseen,
    )


def episode(tid, *turns, final=None, tokens=0, end=EndReason.FINAL_ANSWER):
    return Episode(task_id=tid, turns=list(turns), final_answer=final, end_reason=end, num_generated_tokens=tokens)


TASKS = [
    task("t1", [[weather("Paris")]], "sunny"),
    task("t2", [[weather("Paris")]], "sunny"),
    task("t3", [[weather("Paris")]], "sunny"),
    task("t4", [], "2"),
    task("t5", [], ""),
    task("t6", [[weather("Paris"), weather("Oslo")]], "sunny", unseen=True),
    task("t7", [[weather("Paris")]], "sunny", unseen=True),
]
EPISODES = [
    # right call, right answer
    episode("t1", Turn("", [weather("Paris")]), Turn("Sunny in Paris"), final="Sunny in Paris", tokens=20),
    # right tool, wrong argument, wrong answer
    episode("t2", Turn("", [weather("Lyon")]), Turn("Rainy"), final="Rainy", tokens=30),
    # no call where one was needed (the answer happens to be right)
    episode("t3", Turn("It is sunny"), final="It is sunny", tokens=10),
    # no call needed, none made, right answer
    episode("t4", Turn("2"), final="2", tokens=5),
    # no call needed, a malformed attempt, then any answer (expected_answer is empty)
    episode("t5", Turn("<tool_call>{", failure=FailureReason.MALFORMED_JSON), Turn("hello"), final="hello", tokens=15),
    # an invalid attempt, then both parallel calls in the other order: exact
    episode(
        "t6",
        Turn("...", failure=FailureReason.INVALID_ARGUMENTS),
        Turn("", [weather("Oslo"), weather("Paris")]),
        Turn("Both SUNNY"),
        final="Both SUNNY",
        tokens=40,
    ),
    # wrong tool, then out of turns
    episode("t7", Turn("", [CALC]), final=None, tokens=30, end=EndReason.TURN_LIMIT),
]


def test_every_metric_by_hand():
    m = compute_metrics(TASKS, list(reversed(EPISODES)))
    # 6 turns attempted a call (t1, t2, t5, t6 x2, t7); t5's and t6's first failed.
    assert m["call_validity"] == pytest.approx(4 / 6)
    # needed: t1 t2 t3 t6 t7. names match: t1 t2 t6.
    assert m["tool_selection_accuracy"] == pytest.approx(3 / 5)
    # exact: t1 t6.
    assert m["argument_accuracy"] == pytest.approx(2 / 5)
    # not needed: t4 t5; t5 attempted.
    assert m["over_call_rate"] == pytest.approx(1 / 2)
    # needed and no attempt: t3.
    assert m["under_call_rate"] == pytest.approx(1 / 5)
    # right final answers: t1 t3 t4 t5 t6.
    assert m["final_answer_accuracy"] == pytest.approx(5 / 7)
    assert m["calls_per_query"] == pytest.approx(5 / 7)
    assert m["tokens_per_query"] == pytest.approx(150 / 7)
    assert m["n_tasks"] == 7


def test_seen_and_unseen_breakdown():
    m = compute_metrics(TASKS, EPISODES)
    assert m["seen"] == pytest.approx(
        {
            "n_tasks": 5,
            "call_validity": 2 / 3,
            "tool_selection_accuracy": 2 / 3,
            "argument_accuracy": 1 / 3,
            "over_call_rate": 1 / 2,
            "under_call_rate": 1 / 3,
            "final_answer_accuracy": 4 / 5,
            "calls_per_query": 2 / 5,
            "tokens_per_query": 16.0,
        }
    )
    unseen = m["unseen"]
    assert unseen["over_call_rate"] is None  # no unseen task that needs no tool
    assert {k: v for k, v in unseen.items() if k != "over_call_rate"} == pytest.approx(
        {
            "n_tasks": 2,
            "call_validity": 2 / 3,
            "tool_selection_accuracy": 1 / 2,
            "argument_accuracy": 1 / 2,
            "under_call_rate": 0.0,
            "final_answer_accuracy": 1 / 2,
            "calls_per_query": 3 / 2,
            "tokens_per_query": 35.0,
        }
    )


def test_parallel_calls_made_one_per_turn_are_not_exact():
    t = task("p", [[weather("Paris"), weather("Oslo")]], "")
    e = episode("p", Turn("", [weather("Paris")]), Turn("", [weather("Oslo")]), Turn("done"), final="done")
    m = compute_metrics([t], [e])
    assert m["tool_selection_accuracy"] == 1.0 and m["argument_accuracy"] == 0.0


def test_empty_and_degenerate_sets_give_none_not_nan():
    m = compute_metrics([], [])
    assert m["n_tasks"] == 0 and all(m[k] is None for k in METRIC_KEYS if k != "n_tasks")
    only_chat = compute_metrics([task("c", [], "")], [episode("c", Turn("hi"), final="hi")])
    assert only_chat["call_validity"] is None and only_chat["tool_selection_accuracy"] is None
    assert only_chat["over_call_rate"] == 0.0 and only_chat["final_answer_accuracy"] == 1.0


def test_tasks_and_episodes_must_pair_up():
    with pytest.raises(ValueError, match="no episode for"):
        compute_metrics(TASKS, EPISODES[:-1])
    with pytest.raises(ValueError, match="two episodes"):
        compute_metrics(TASKS, EPISODES + EPISODES[:1])


def test_markdown_table():
    base = compute_metrics(TASKS, EPISODES)
    table = metrics_markdown({"sft": base, "ppo": compute_metrics(TASKS[3:4], EPISODES[3:4])})
    lines = table.splitlines()
    assert lines[0] == (
        "| run | tasks | call validity | tool selection | arguments (exact) | over-call | under-call | "
        "final answer | calls/query | tokens/query |"
    )
    assert lines[1] == "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    assert lines[2] == "| sft | 7 | 66.7% | 60.0% | 40.0% | 50.0% | 20.0% | 71.4% | 0.71 | 21.4 |"
    assert lines[3] == "| ppo | 1 | n/a | n/a | n/a | 0.0% | n/a | 100.0% | 0.00 | 5.0 |"
    assert metrics_markdown({"sft": base}, subset="unseen").splitlines()[2].startswith("| sft | 2 | 66.7% | 50.0%")


# ---- where exact calls fail -------------------------------------------------------------------
def test_first_missed_calls_and_miss_breakdown():
    from tooltune.metrics import first_missed_calls, miss_breakdown, pair_episodes

    two = ToolCall("calculator", {"expression": "2 * 3"})
    tasks = [
        Task(id="ok", query="", tools=[], expected_calls=[[weather("Paris")]], category="single"),
        Task(id="arg", query="", tools=[], expected_calls=[[weather("Paris"), weather("Oslo")]], category="parallel"),
        Task(id="step2", query="", tools=[], expected_calls=[[weather("Paris")], [two]], category="multi_step"),
        Task(id="extra", query="", tools=[], expected_calls=[[weather("Paris")]], category="single"),
        Task(id="none", query="", tools=[], expected_calls=[], category="no_tool"),
    ]
    episodes = [
        episode("ok", Turn("", [weather("Paris")])),
        # Oslo right, Paris copied wrong: only Paris is missed.
        episode("arg", Turn("", [weather("Pari"), weather("Oslo")])),
        # Step 1 right, step 2 never made.
        episode("step2", Turn("", [weather("Paris")])),
        # Every expected call made, then one more turn of calls.
        episode("extra", Turn("", [weather("Paris")]), Turn("", [CALC])),
        episode("none", Turn("", [CALC])),
    ]
    by_id = dict(zip([t.id for t in tasks], zip(tasks, episodes)))
    assert first_missed_calls(*by_id["ok"]) == []
    assert first_missed_calls(*by_id["arg"]) == [weather("Paris")]
    assert first_missed_calls(*by_id["step2"]) == [two]
    assert first_missed_calls(*by_id["extra"]) == []

    got = miss_breakdown(pair_episodes(tasks, episodes))
    assert got["by_category"] == {
        "multi_step": {"missed": 1, "tasks": 1},
        "parallel": {"missed": 1, "tasks": 1},
        "single": {"missed": 1, "tasks": 2},
    }
    # Expected: get_weather 5 (ok 1, arg 2, step2 1, extra 1), calculator 1; the no-tool task counts nowhere.
    assert got["by_tool"] == {
        "(extra call)": {"first_wrong": 1, "expected_calls": 0},
        "calculator": {"first_wrong": 1, "expected_calls": 1},
        "get_weather": {"first_wrong": 1, "expected_calls": 5},
    }
    assert got["missed_task_ids"] == ["arg", "step2", "extra"]


def test_episode_from_dict_inverts_to_dict():
    ep = Episode(
        task_id="t",
        turns=[Turn("x", [weather("Paris")]), Turn("bad", failure=FailureReason.MALFORMED_JSON, failure_detail="d")],
        final_answer=None,
        end_reason=EndReason.TURN_LIMIT,
        num_generated_tokens=7,
        messages=[{"role": "user", "content": "hi"}],
    )
    assert Episode.from_dict(ep.to_dict()) == ep
    assert Episode.from_dict(ep.to_dict() | {"source": "test", "category": "single"}) == ep


def test_bootstrap_interval_by_hand():
    from tooltune.metrics import bootstrap_interval

    # Two tasks, one hit: a resample holds 0, 1 or 2 hits with odds 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% quantiles of {0, 0.5, 1} are 0 and 1.
    assert bootstrap_interval([1, 0], [1, 1], resamples=4000) == (0.0, 1.0)
    # Every task a hit: no resample can differ.
    assert bootstrap_interval([1, 1, 1], [1, 1, 1]) == (1.0, 1.0)
    # A ratio of sums: a task with two turns weighs twice (3 of 4 turns valid in every resample
    # of the one task).
    assert bootstrap_interval([3], [4]) == (0.75, 0.75)
    assert bootstrap_interval([0, 0], [0, 0]) is None
    # 40 hits of 100 tasks: the normal approximation gives 0.40 +- 1.96 * sqrt(.4 * .6 / 100) = +-0.096.
    lo, hi = bootstrap_interval([1] * 40 + [0] * 60, [1] * 100, resamples=4000)
    assert lo == pytest.approx(0.304, abs=0.02) and hi == pytest.approx(0.496, abs=0.02)


def test_metric_intervals_cover_the_point_estimate_and_count_their_tasks():
    from tooltune.metrics import metric_intervals, pair_episodes

    pairs = pair_episodes(TASKS, EPISODES)
    m, ci = compute_metrics(TASKS, EPISODES), metric_intervals(pairs)
    assert ci["argument_accuracy"]["n"] == 5 and ci["over_call_rate"]["n"] == 2 and ci["final_answer_accuracy"]["n"] == 7
    assert ci["call_validity"]["n"] == 5  # tasks with an attempted call: t1 t2 t5 t6 t7
    for key, value in ci.items():
        lo, hi = value["ci"]
        assert lo <= m[key] <= hi, key
    assert ci["argument_accuracy"]["ci"][0] < ci["argument_accuracy"]["ci"][1]
