"""Preference records, the pairs a ranking gives, the rules judge, the files and the judges' agreement,
against numbers worked out by hand."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from tooltune.data import DataError
from tooltune.episode import Episode, Task, ToolCall, Turn
from tooltune.preferences import (
    Candidate,
    PreferenceRecord,
    judge_agreement,
    kendall_tau,
    load_human_labels,
    pairwise_agreement,
    ranking_pairs,
    read_preferences,
    rule_ranks,
    write_preferences,
)
from tooltune.rewards import RewardConfig
from tooltune.world import world_registry

TOOLS = world_registry().schemas(["get_weather", "calculator"])
PARIS, LYON, ROME = (ToolCall("get_weather", {"city": c, "date": "2024-06-01"}) for c in ("Paris", "Lyon", "Rome"))
CALC = ToolCall("calculator", {"expression": "1+1"})
WEATHER = Task(
    id="w", query="Weather in Paris on 2024-06-01?", tools=TOOLS, expected_calls=[[PARIS]], expected_answer="sunny"
)
ONE_PLUS_ONE = Task(id="sum", query="What is 1+1?", tools=TOOLS, expected_calls=[], expected_answer="2")


def answered(text, *call_turns):
    return Episode(task_id="x", turns=[Turn("", list(c)) for c in call_turns] + [Turn(text)], final_answer=text)


def record(**changes):
    fields = dict(
        prompt_id="p1",
        tools=TOOLS,
        prompt=[{"role": "user", "content": "Weather in Paris?"}],
        candidates=[
            Candidate(id="a", messages=[{"role": "assistant", "content": "Sunny, 24°C."}]),
            Candidate(id="b", messages=[{"role": "assistant", "content": "No idea."}]),
        ],
        ranks=[0, 1],
        judge="rules",
    )
    return PreferenceRecord(**(fields | changes))


@pytest.mark.parametrize(
    ("ranks", "pairs"),
    [
        ([0, 1, 2], [(0, 1), (0, 2), (1, 2)]),
        ([2, 0, 1], [(1, 0), (2, 0), (1, 2)]),
        ([0, 0, 1], [(0, 2), (1, 2)]),
        ([1, 0, 1, 0], [(1, 0), (3, 0), (1, 2), (3, 2)]),
        ([3, 3, 3], []),
        ([0], []),
    ],
)
def test_ranking_pairs_by_hand(ranks, pairs):
    assert ranking_pairs(ranks) == pairs


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_a_ranking_of_k_without_ties_gives_k_choose_2_pairs(k):
    ranks = [(7 * i) % k for i in range(k)]  # a permutation of 0..k-1 (7 is prime to each k)
    assert sorted(ranks) == list(range(k))
    pairs = ranking_pairs(ranks)
    assert len(pairs) == k * (k - 1) // 2
    assert all(ranks[better] < ranks[worse] for better, worse in pairs)


def test_rules_judge_ranks_the_weather_candidates_by_hand_computed_totals():
    episodes = [
        answered("Sunny", [PARIS]),  # exact call, right answer: +10 +2 = 12
        answered("sunny", [PARIS, LYON, ROME]),  # spray: -2 right tool, +0 answer, 2 extras x -0.5 = -3
        answered("rain", [LYON]),  # wrong city: -2 +0 -0.5 = -2.5
        answered("rain", [ROME]),  # another wrong city: -2.5, tied with the one before
        answered("rain", [PARIS]),  # exact call, wrong answer: +10 +0 = 10
    ]
    ranks, reasons = rule_ranks(WEATHER, episodes)
    assert ranks == [0, 3, 2, 2, 1]
    assert reasons[0] == "12: correct_call +10, correct_answer_bonus +2"
    assert reasons[1] == "-3: wrong_arguments -2, answer_after_wrong_calls +0, extra_call_cost -1"
    assert reasons[2] == reasons[3] == "-2.5: wrong_arguments -2, answer_after_wrong_calls +0, extra_call_cost -0.5"
    # Five candidates, one tied pair: 10 - 1 pairs to learn from.
    assert len(ranking_pairs(ranks)) == 9
    assert (2, 3) not in ranking_pairs(ranks) and (3, 2) not in ranking_pairs(ranks)


def test_rules_judge_prefers_a_direct_answer_when_no_tool_is_needed():
    # "2" directly: +5; "2" after a calculator call: -5 unneeded +2 right -0.5 extra = -3.5.
    ranks, reasons = rule_ranks(ONE_PLUS_ONE, [answered("It is 2.", [CALC]), answered("2")])
    assert ranks == [1, 0]
    assert reasons == [
        "-3.5: unneeded_call -5, correct_answer_bonus +2, extra_call_cost -0.5",
        "5: correct_direct_answer +5",
    ]


def test_rules_judge_follows_the_reward_config():
    # With calls free and the bonus raised, the calculator route (-5 + 20) beats the direct answer (+5).
    cfg = RewardConfig(extra_call_cost=0.0, correct_answer_bonus=20.0)
    assert rule_ranks(ONE_PLUS_ONE, [answered("2", [CALC]), answered("2")], cfg)[0] == [0, 1]


def test_record_validation_names_the_field():
    with pytest.raises(ValidationError, match="ranks: 3 ranks for 2 candidates"):
        record(ranks=[0, 1, 2])
    with pytest.raises(ValidationError, match=r"ranks\.1\n.*greater than or equal to 0"):
        record(ranks=[0, -1])
    with pytest.raises(ValidationError, match="reasons: 1 reasons for 2 candidates"):
        record(reasons=["good"])
    with pytest.raises(ValidationError, match="candidates: ids must be distinct"):
        record(candidates=[Candidate(id="a", messages=[]), Candidate(id="a", messages=[])])
    with pytest.raises(ValidationError, match="score\n.*Extra inputs are not permitted"):
        record(score=1.0)


def test_preferences_round_trip_through_parquet(tmp_path):
    records = [
        record(reasons=["right call", "no call"], category="single"),
        record(
            prompt_id="p2",
            judge="human",
            ranks=[0, 0],
            candidates=[
                Candidate(id="x", messages=[
                    {"role": "assistant", "content": "", "tool_calls": [PARIS.to_openai("call_0")]},
                    {"role": "tool", "tool_call_id": "call_0", "name": "get_weather", "content": '{"sky": "sunny"}'},
                    {"role": "assistant", "content": "Sunny — 24°C."},
                ]),
                Candidate(id="y", messages=[{"role": "assistant", "content": "Probably sunny."}]),
            ],
        ),  # fmt: skip
    ]
    path = write_preferences(tmp_path / "out" / "preferences.parquet", records)
    assert read_preferences(path) == records
    table = pq.read_table(path)
    # Nested chat is stored as JSON strings, so rows of different shapes share one schema.
    assert table.schema.field("candidate_messages").type == pa.list_(pa.string())
    assert json.loads(table.column("tools")[0].as_py()) == TOOLS
    assert table.column("ranks").to_pylist() == [[0, 1], [0, 0]]


CANDIDATES = {"p1": ["a", "b", "c"], "p2": ["x", "y"]}


def test_human_labels_skip_bad_rows_and_report_file_and_row(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text(
        '{"prompt_id": "p1", "ranking": [["b"], ["a", "c"]]}\n'
        '{"prompt_id": "p2", "ranking": [["y"]\n'
        '{"prompt_id": "p9", "ranking": [["a"]]}\n'
        "\n"
        '{"prompt_id": "p2", "ranking": "[\\"y\\", \\"x\\"]", "annotator": "ann-3"}\n'
    )
    labels, errors = load_human_labels(path, CANDIDATES)
    assert labels == {"p1": [1, 0, 1], "p2": [1, 0]}
    assert [e.row for e in errors] == [2, 3]
    assert str(errors[0]).startswith(f"{path}:2: invalid JSON:")
    assert str(errors[1]) == f"{path}:3: unknown prompt id 'p9'"


def test_human_labels_fail_on_the_first_bad_row_with_one_line(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"prompt_id": "p1", "ranking": ["a", "b", "c"]}\n{"prompt_id": "p9", "ranking": ["a"]}\n')
    with pytest.raises(DataError) as caught:
        load_human_labels(path, CANDIDATES, on_error="fail")
    assert str(caught.value) == f"{path}:2: unknown prompt id 'p9'"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"ranking": [["a"]]}, "missing key 'prompt_id'"),
        ({"prompt_id": "p2"}, "missing key 'ranking'"),
        ({"prompt_id": "p2", "ranking": [["x"], ["z"]]}, "ranking: unknown candidate id 'z' for prompt 'p2'"),
        ({"prompt_id": "p2", "ranking": [["x"], ["x", "y"]]}, "ranking: candidate id 'x' appears twice"),
        ({"prompt_id": "p1", "ranking": [["a", "c"]]}, "ranking: candidates ['b'] of prompt 'p1' are not ranked"),
        ({"prompt_id": "p2", "ranking": [["x"], []]}, "ranking: group 2 must be a candidate id or a non-empty list"),
        ({"prompt_id": "p2", "ranking": "x > y"}, "'ranking' is not valid JSON"),
        ({"prompt_id": 2, "ranking": [["x"]]}, "'prompt_id' must be a string, got int"),
        ([1, 2], "a row must be a JSON object, got list"),
    ],
)
def test_human_label_row_errors(tmp_path, row, reason):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"prompt_id": "p1", "ranking": ["a", "b", "c"]}\n' + json.dumps(row) + "\n")
    labels, errors = load_human_labels(path, CANDIDATES)
    assert labels == {"p1": [0, 1, 2]}
    assert len(errors) == 1 and str(errors[0]).startswith(f"{path}:2: {reason}")


def test_human_labels_ranking_a_prompt_twice_is_an_error(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"prompt_id": "p2", "ranking": ["x", "y"]}\n{"prompt_id": "p2", "ranking": ["y", "x"]}\n')
    labels, errors = load_human_labels(path, CANDIDATES)
    assert labels == {"p2": [0, 1]}
    assert [str(e) for e in errors] == [f"{path}:2: prompt id 'p2' is ranked by an earlier row"]


def test_human_labels_from_parquet(tmp_path):
    path = tmp_path / "labels.parquet"
    rows = {"prompt_id": ["p2", "p9", "p1"], "ranking": [[["y", "x"]], [["a"]], [["c"], ["a"], ["b"]]]}
    pq.write_table(pa.table(rows), path)
    labels, errors = load_human_labels(path, CANDIDATES)
    assert labels == {"p2": [0, 0], "p1": [1, 2, 0]}
    assert [str(e) for e in errors] == [f"{path}:2: unknown prompt id 'p9'"]


@pytest.mark.parametrize(
    ("a", "b", "agreement", "tau"),
    [
        ([0, 1, 2, 3], [0, 1, 2, 3], 1.0, 1.0),
        ([0, 1, 2, 3], [3, 2, 1, 0], 0.0, -1.0),
        # one swap of three: pairs (0,1) discordant, (0,2) and (1,2) concordant: tau = (2 - 1) / 3.
        ([0, 1, 2], [1, 0, 2], 2 / 3, 1 / 3),
        # a ties 0 and 1: both order (0,2) and (1,2) alike; tau-b = 2 / sqrt((3 - 1) (3 - 0)).
        ([0, 0, 1], [0, 1, 2], 1.0, 2 / math.sqrt(6)),
        # ties on both sides: 3 concordant, none discordant, a ties 2 pairs, b ties 1: 3 / sqrt(4 x 5).
        ([0, 0, 1, 1], [0, 1, 1, 2], 1.0, 3 / math.sqrt(20)),
    ],
)
def test_agreement_by_hand(a, b, agreement, tau):
    assert pairwise_agreement(a, b) == pytest.approx(agreement)
    assert kendall_tau(a, b) == pytest.approx(tau)
    assert kendall_tau(b, a) == pytest.approx(tau)


def test_agreement_is_undefined_without_ordered_pairs():
    assert math.isnan(kendall_tau([0, 0, 0], [0, 1, 2]))
    assert math.isnan(pairwise_agreement([0, 0], [0, 1]))
    with pytest.raises(ValueError, match="3 and 2 candidates"):
        kendall_tau([0, 1, 2], [0, 1])


def test_judge_agreement_pools_pairs_over_shared_prompts():
    rules = {"p": [0, 1, 2], "q": [0, 1], "only_rules": [0, 1]}
    ai = {"p": [1, 0, 2], "q": [1, 0], "only_ai": [1, 0]}
    summary = judge_agreement(rules, ai)
    # p agrees on 2 of 3 pairs, q on 0 of 1: 2 / 4; tau is 1/3 on p and -1 on q.
    assert summary == {"prompts": 2, "pairs": 4, "pairwise_agreement": 0.5, "kendall_tau": pytest.approx(-1 / 3)}
