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


def test_world_uses_them_in_train_only():
    world = generate_world(CFG)
    names = {t.name for t in synthetic_tools(CFG.synthetic_tools, CFG.seed)}
    needed = [t for t in world["train"] if t.needs_tool]
    calling = [t for t in needed if t.expected_calls[0][0].name in names]
    # Exact counts: the share of the needed-tool tasks, rounded once.
    assert len(calling) == round(len(needed) * CFG.synthetic_share)
    for task in world["validation"] + world["test"]:
        assert not {tool["function"]["name"] for tool in task.tools} & names
    registry = world_registry(CFG)
    task = next(t for t in world["train"] if t.needs_tool and t.expected_calls[0][0].name in names)
    messages = gold_messages(task, registry)
    assert json.loads(messages[-2]["content"])["reference"] in messages[-1]["content"] == f"The answer is {task.expected_answer}."


def test_share_without_tools_is_a_config_error():
    with pytest.raises(ValueError, match="synthetic_tools"):
        WorldConfig(synthetic_share=0.2)



def test_pick_distractors_draws_built_ins_at_the_given_odds():
    import random

    from tooltune.world import pick_distractors

    pool, generated = ["calculator", "get_weather", "g1", "g2", "g3"], {"g1", "g2", "g3"}
    rng = random.Random(0)
    assert set(pick_distractors(rng, pool, 2, generated, 1.0)) == {"calculator", "get_weather"}
    assert set(pick_distractors(rng, pool, 3, generated, 0.0)) == generated
    # One side runs out: the picks go on from the other, never twice the same tool.
    four = pick_distractors(rng, pool, 4, generated, 1.0)
    assert len(set(four)) == 4 and {"calculator", "get_weather"} <= set(four)
    for share in (0.0, 1.0, 0.5):
        picked = pick_distractors(rng, pool, 5, generated, share)
        assert sorted(picked) == sorted(pool)
    assert pick_distractors(rng, [], 0, generated, 0.5) == []
    assert pick_distractors(rng, ["g1", "g2"], 1, generated, 1.0)[0] in {"g1", "g2"}  # no built-in to offer
    draws = [pick_distractors(rng, pool, 1, generated, 0.25)[0] for _ in range(4000)]
    assert sum(d not in generated for d in draws) / len(draws) == pytest.approx(0.25, abs=0.03)


@pytest.mark.parametrize("share", [None, 0.5])
def test_world_offers_built_in_distractors_at_the_configured_odds(share):
    """Uniform draws (None) from 50 generated tools and seven built-ins almost never offer a
    built-in beside another; with a share, a built-in is offered at those odds."""
    cfg = CFG.model_copy(update={"builtin_distractor_share": share, "n_train": 600, "distractor_tools": 1})
    names = {t.name for t in synthetic_tools(cfg.synthetic_tools, cfg.seed)}
    world = generate_world(cfg)
    distractors = [
        tool["function"]["name"] not in names
        for task in world["train"]
        if task.needs_tool
        for tool in task.tools
        if tool["function"]["name"] not in {c.name for step in task.expected_calls for c in step}
    ]
    builtin_rate = sum(distractors) / len(distractors)
    assert builtin_rate < 0.15 if share is None else builtin_rate == pytest.approx(share, abs=0.05)
