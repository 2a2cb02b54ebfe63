"""Generated tools: deterministic, valid schemas, queries that hold every argument, train-only."""

import json

import pytest

from tooltune.schema import validate_arguments
from tooltune.tools.builtins import builtin_registry
from tooltune.world import WorldConfig, generate_world, gold_messages, world_registry
from tooltune.world_synthetic import OBJECTS, VERBS, synthetic_call, synthetic_tools

CFG = WorldConfig(seed=3, n_train=200, n_validation=40, n_test=80, synthetic_tools=50, synthetic_share=0.5)


def test_same_count_and_seed_give_the_same_tools_and_results():
    a, b = synthetic_tools(50, seed=1), synthetic_tools(50, seed=1)
    assert [(t.name, t.parameters) for t in a] == [(t.name, t.parameters) for t in b]
    assert [t.name for t in synthetic_tools(50, seed=2)] != [t.name for t in a]
    assert a[0].run(x=1) == b[0].run(x=1) and a[0].run(x=1) != a[0].run(x=2)


def test_names_are_distinct_and_never_a_builtin():
    tools = synthetic_tools(len(VERBS) * len(OBJECTS))
    names = [t.name for t in tools]
    assert len(set(names)) == len(names)
    assert not set(names) & set(builtin_registry().names())
    with pytest.raises(ValueError, match="at most"):
        synthetic_tools(len(names) + 1)


@pytest.mark.parametrize("seed", range(5))
def test_call_fits_the_schema_and_its_values_are_in_the_query(seed):
    import random

    rng = random.Random(seed)
    for tool in synthetic_tools(40, seed):
        query, call = synthetic_call(rng, tool)
        schema = {"type": "function", "function": {"name": tool.name, "description": tool.description, "parameters": tool.parameters}}
        assert validate_arguments(schema, call.arguments) == []
        assert {p.name for p in tool.required} <= set(call.arguments)
        for value in call.arguments.values():
            assert (value if isinstance(value, str) else json.dumps(value)) in query
        assert tool.obj in query


def test_world_uses_them_in_train_and_validation_only():
    world = generate_world(CFG)
    names = {t.name for t in synthetic_tools(CFG.synthetic_tools, CFG.seed)}
    for split in ("train", "validation"):
        needed = [t for t in world[split] if t.needs_tool]
        calling = [t for t in needed if t.expected_calls[0][0].name in names]
        # Exact counts: the share of the needed-tool tasks, rounded once.
        assert len(calling) == round(len(needed) * CFG.synthetic_share)
    for task in world["test"]:
        assert not {tool["function"]["name"] for tool in task.tools} & names
    registry = world_registry(CFG)
    task = next(t for t in world["train"] if t.needs_tool and t.expected_calls[0][0].name in names)
    messages = gold_messages(task, registry)
    assert json.loads(messages[-2]["content"])["reference"] in messages[-1]["content"] == f"The answer is {task.expected_answer}."


def test_share_without_tools_is_a_config_error():
    with pytest.raises(ValueError, match="synthetic_tools"):
        WorldConfig(synthetic_share=0.2)


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_distractors_are_built_in_tools_at_the_configured_odds(share):
    """Uniform draws from 50 generated tools and a few built-ins would almost never offer a
    built-in beside another built-in, as every test task does."""
    cfg = CFG.model_copy(update={"builtin_distractor_share": share, "n_train": 600, "distractor_tools": 1})
    names = {t.name for t in synthetic_tools(cfg.synthetic_tools, cfg.seed)}
    distractors = [
        tool["function"]["name"] in names
        for task in generate_world(cfg)["train"]
        for tool in task.tools
        if tool["function"]["name"] not in {c.name for step in task.expected_calls for c in step}
    ]
    builtin_rate = 1 - sum(distractors) / len(distractors)
    assert len(distractors) >= 600
    assert builtin_rate == pytest.approx(share, abs=0.05)
