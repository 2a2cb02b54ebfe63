"""The tool world: reproducible files, disjoint splits, ground truth the executor agrees with."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

from tooltune.episode import ToolCall
from tooltune.parser import format_tool_calls, parse_assistant_text
from tooltune.schema import tools_by_name, validate_arguments
from tooltune.tools.builtins import UNSEEN_TOOLS, builtin_registry
from tooltune.world import (
    WorldConfig, format_world_stats, generate_world, gold_final_answer, gold_messages, load_tasks,
    run_world, world_stats, write_world,
)  # fmt: skip
from tooltune.world_queries import SMALL_TALK

CFG = WorldConfig(seed=7, n_train=300, n_validation=60, n_test=120)
REGISTRY = builtin_registry()


@pytest.fixture(scope="module")
def world():
    return generate_world(CFG)


def all_tasks(world):
    return [t for tasks in world.values() for t in tasks]


def rows_digest(world):
    rows = {split: [t.to_row() for t in tasks] for split, tasks in world.items()}
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def test_same_seed_gives_byte_identical_files(tmp_path, world):
    write_world(world, tmp_path / "a")
    write_world(generate_world(CFG), tmp_path / "b")
    for split in ("train", "validation", "test"):
        assert (tmp_path / "a" / f"{split}.parquet").read_bytes() == (tmp_path / "b" / f"{split}.parquet").read_bytes()
    assert generate_world(CFG.model_copy(update={"seed": 8}))["train"] != world["train"]


def test_same_seed_gives_the_same_tasks_in_another_process(world):
    # Another string-hash seed catches any reliance on the order of a set of strings.
    script = (
        "import sys; sys.path.insert(0, 'tests'); from test_world import CFG, rows_digest; "
        "from tooltune.world import generate_world; print(rows_digest(generate_world(CFG)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    root = Path(__file__).parents[1]
    out = subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=root, capture_output=True, text=True)
    assert out.stdout.strip() == rows_digest(world)


@pytest.mark.parametrize(
    "knob",
    [
        {"n_train": 500},
        {"no_tool_fraction": 0.3},
        {"synthetic_tools": 40, "synthetic_share": 0.5},
        {"synthetic_tools": 40, "synthetic_share": 0.3, "builtin_distractor_share": 0.5},
    ],
)
def test_a_training_knob_leaves_validation_and_test_byte_identical(tmp_path, world, knob):
    other = generate_world(CFG.model_copy(update=knob))
    assert other["train"] != world["train"]
    write_world(world, tmp_path / "a")
    write_world(other, tmp_path / "b")
    for split in ("validation", "test"):
        assert (tmp_path / "a" / f"{split}.parquet").read_bytes() == (tmp_path / "b" / f"{split}.parquet").read_bytes()
    # And the test split does not move with validation's size either.
    assert generate_world(CFG.model_copy(update={"n_validation": 10}))["test"] == world["test"]


def test_split_sizes_and_no_tool_shares(world):
    assert [len(world[s]) for s in ("train", "validation", "test")] == [300, 60, 120]
    stats = world_stats(world)
    assert stats["train"]["needs_tool_share"] == pytest.approx(0.9)
    assert stats["validation"]["needs_tool_share"] == pytest.approx(0.7)
    assert stats["test"]["unseen"] == 12
    default_train = generate_world(WorldConfig(n_validation=0, n_test=0))["train"]
    assert sum(not t.needs_tool for t in default_train) / len(default_train) == pytest.approx(0.1)


def test_queries_and_ids_are_unique_across_splits(world):
    tasks = all_tasks(world)
    assert len({t.query for t in tasks}) == len(tasks)
    assert len({t.id for t in tasks}) == len(tasks)
    train, test = {t.query for t in world["train"]}, {t.query for t in world["test"]}
    assert not train & test


def test_unseen_tools_only_in_their_test_tasks(world):
    for task in world["train"] + world["validation"]:
        assert not {s["function"]["name"] for s in task.tools} & UNSEEN_TOOLS
        assert not task.unseen_tools
    unseen = [t for t in world["test"] if t.unseen_tools]
    assert unseen and all({c.name for c in t.flat_expected_calls()} <= UNSEEN_TOOLS for t in unseen)
    for task in world["test"]:
        if not task.unseen_tools:
            assert not {c.name for c in task.flat_expected_calls()} & UNSEEN_TOOLS


def test_every_task_offers_its_tools_plus_distractors(world):
    for task in all_tasks(world):
        offered = set(tools_by_name(task.tools))
        needed = {c.name for c in task.flat_expected_calls()}
        assert needed <= offered
        # A no-tool task is offered one tool more (the calculator, for "What is 1+1?"), as a bait.
        assert len(offered - needed) == (CFG.distractor_tools if needed else CFG.distractor_tools + 1)
        if task.query.startswith("What is") and not task.needs_tool and task.expected_answer.isdigit():
            assert "calculator" in offered


def test_first_call_arguments_appear_verbatim_in_the_query(world):
    for task in all_tasks(world):
        for step_index, step in enumerate(task.expected_calls):
            for call in step:
                for value in call.arguments.values():
                    text = value if isinstance(value, str) else json.dumps(value)
                    if step_index == 0:
                        assert text in task.query, (task.query, call)


def test_gold_conversations_parse_back_and_match_the_executor(world):
    for task in all_tasks(world):
        messages = gold_messages(task, REGISTRY)
        assert messages[0] == {"role": "user", "content": task.query}
        steps, calls_by_id = [], {}
        for message in messages[1:-1]:
            if message["role"] == "assistant":
                openai_calls = message["tool_calls"]
                calls = [ToolCall(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in openai_calls]
                parsed = parse_assistant_text(format_tool_calls(calls), task.tools)
                assert parsed.failure is None and parsed.calls == calls
                for call in calls:
                    assert validate_arguments(tools_by_name(task.tools)[call.name], call.arguments) == []
                calls_by_id.update({c["id"]: call for c, call in zip(openai_calls, calls)})
                steps.append(calls)
            else:
                call = calls_by_id[message["tool_call_id"]]
                assert message["role"] == "tool" and message["name"] == call.name
                assert message["content"] == REGISTRY.execute(call, timeout_s=None).content
        assert steps == task.expected_calls
        assert list(calls_by_id) == [f"call_{i}" for i in range(len(calls_by_id))]
        assert messages[-1] == {"role": "assistant", "content": gold_final_answer(task)}
        assert task.expected_answer.lower() in messages[-1]["content"].lower()


# What a parallel task compares in each tool's result, and how its answer names the winner.
COMPARED_FIELD = {"get_weather": "temperature_c", "lookup_fact": "value", "convert_currency": "amount",
                  "get_stock_price": "price_usd"}  # fmt: skip
WINNER_NAME = {
    "get_weather": lambda args: args["city"],
    "lookup_fact": lambda args: args["entity"],
    "get_stock_price": lambda args: args["symbol"],
    "convert_currency": lambda args: f"{args['amount']} {args['from_currency']}",
}


def tool_values(task, step):
    """Every scalar in the executor's results for one step, as text."""
    results = [json.loads(REGISTRY.execute(c, timeout_s=None).content) for c in step]
    return results, {str(v) for r in results for v in r.values()}


def test_expected_answers_come_from_the_executor(world):
    for task in all_tasks(world):
        if task.category in ("single", "multi_step"):
            _, values = tool_values(task, task.expected_calls[-1])
            answer = task.expected_answer
            assert answer in values or answer.split()[0].removesuffix("°C") in values, task
        elif task.category == "parallel":
            step = task.expected_calls[0]
            results, _ = tool_values(task, step)
            best = max(range(len(step)), key=lambda i: results[i][COMPARED_FIELD[step[i].name]])
            assert task.expected_answer == WINNER_NAME[step[best].name](step[best].arguments)
        else:
            assert not task.needs_tool


def test_small_talk_accepts_any_answer_and_gets_a_fitting_reply(world):
    small_talk = [t for t in all_tasks(world) if t.category == "no_tool" and not t.expected_answer]
    assert small_talk
    for task in small_talk:
        assert gold_final_answer(task) in SMALL_TALK.values()


def test_write_then_load_round_trips(tmp_path, world):
    paths = write_world(world, tmp_path)
    assert load_tasks(paths["test"]) == world["test"]
    jsonl = tmp_path / "test.jsonl"
    jsonl.write_text("\n".join(json.dumps(t.to_row(), ensure_ascii=False) for t in world["test"]), encoding="utf-8")
    assert load_tasks(jsonl) == world["test"]


def test_run_world_writes_and_reports(tmp_path):
    stats = run_world(tmp_path, WorldConfig(n_train=20, n_validation=10, n_test=10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.parquet", "train.parquet", "validation.parquet"]
    assert stats["train"]["count"] == 20 and sum(stats["train"]["categories"].values()) == 20
    text = format_world_stats(stats)
    header = ["split", "count", "needs_tool", "single", "parallel", "multi_step", "no_tool", "unseen"]
    assert text.splitlines()[0].split() == header
    assert text.splitlines()[1].split()[:3] == ["train", "20", "0.90"]


def test_config_rejects_unknown_keys_and_bad_shares():
    with pytest.raises(pydantic.ValidationError, match="n_trian"):
        WorldConfig.model_validate({"n_trian": 5})
    with pytest.raises(pydantic.ValidationError, match="must be 1"):
        WorldConfig(single_share=0.5, parallel_share=0.5, multi_step_share=0.5)
    with pytest.raises(pydantic.ValidationError, match="no_tool_fraction"):
        WorldConfig(no_tool_fraction=1.5)


def test_train_no_tool_kinds_restrict_the_training_split_alone():
    every = generate_world(WorldConfig(n_train=300, n_validation=40, n_test=40))
    chat = generate_world(WorldConfig(n_train=300, n_validation=40, n_test=40, train_no_tool_kinds=["small_talk", "general_fact"]))
    for split in ("validation", "test"):
        assert [t.query for t in chat[split]] == [t.query for t in every[split]]
    no_tool = [t for t in chat["train"] if t.category == "no_tool"]
    assert len(no_tool) == 30
    # No trivial arithmetic: its tasks are the only no-tool ones that offer the calculator as bait.
    assert any("calculator" in [s["function"]["name"] for s in t.tools] for t in every["train"] if t.category == "no_tool")
    assert not any(q in t.query for t in no_tool for q in ("+", " minus ", " times ", " plus "))
    with pytest.raises(ValueError, match="train_no_tool_kinds is empty"):
        WorldConfig(train_no_tool_kinds=[])


def test_trivially_phrased_calculator_tasks_join_the_training_split_alone():
    from tooltune.world_contrast import ContrastSettings
    from tooltune.world_queries import TRIVIAL_FORMS, heldout_operands

    sizes = dict(n_train=400, n_validation=40, n_test=40)
    plain = generate_world(WorldConfig(**sizes))
    mixed = generate_world(WorldConfig(**sizes, trivial_phrased_calculator_share=0.5))
    assert generate_world(WorldConfig(**sizes, trivial_phrased_calculator_share=0.0)) == plain
    for split in ("validation", "test"):
        assert [t.query for t in mixed[split]] == [t.query for t in plain[split]]

    def phrased(task):  # the trivial form and operands a query was written from, if any
        for form, op in TRIVIAL_FORMS:
            head, _, rest = form.partition("{a}")
            mid, _, tail = rest.partition("{b}")
            if task.query.startswith(head) and task.query.endswith(tail) and mid in task.query[len(head) :]:
                a, b = task.query[len(head) : len(task.query) - len(tail)].split(mid, 1)
                if a.isdigit() and b.isdigit():
                    return form, op, int(a), int(b)
        return None

    # The calculator's own template "What is {e}?" writes one trivial phrasing, "What is {a} + {b}?".
    template_form = "What is {a} + {b}?"
    assert {phrased(t)[0] for t in plain["train"] if t.category == "single" and phrased(t)} == {template_form}
    calls = [(t, p) for t in mixed["train"] if t.category == "single" and (p := phrased(t)) and p[0] != template_form]
    # About half the single-call tasks (200 x 0.9 x 0.5 x 5/6 = 75 expected in the other phrasings).
    assert 45 < len(calls) < 105
    for task, (form, op, a, b) in calls:
        assert a >= 100 and b >= 10 and not heldout_operands(form, a, b)
        assert task.expected_calls == [[ToolCall("calculator", {"expression": f"{a} {op} {b}"})]]
    assert {p[0] for _, p in calls} == {form for form, _ in TRIVIAL_FORMS} - {template_form}
    # The held-out contrastive pairs' large halves come from the held-out quarter: never trained on.
    for seed in (0, 1):
        for pair in ContrastSettings(pairs_per_form=10, seed=seed).pairs():
            form, _, a, b = phrased(pair.large)
            assert heldout_operands(form, a, b)
