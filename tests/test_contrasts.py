"""Scripted contrasts: what each variant writes, and the rule reward it earns once played through
the real tool loop (parser, tools, results fed back) by ``rollout.scripted``."""

import json
import random
from collections import Counter

import pytest

from rollout.agent_loop import LoopConfig
from rollout.scripted import ScriptedPolicy, run_scripted
from tooltune.contrasts import UNSURE_ANSWER, VARIANTS, scripted_turns, wrong_guess
from tooltune.episode import EndReason, Episode, Task, ToolCall
from tooltune.metrics import answer_is_correct
from tooltune.parser import format_tool_calls, parse_assistant_text
from tooltune.rewards import rule_reward
from tooltune.schema import validate_arguments
from tooltune.tools.builtins import builtin_registry
from tooltune.world import WorldConfig, generate_world, gold_messages, world_registry

REGISTRY = builtin_registry()
LOOP = LoopConfig(max_turns=4, max_new_tokens=512, max_total_tokens=4096)


def trivial_math(query: str, answer: str, tools=("get_weather", "calculator")) -> Task:
    schemas = REGISTRY.schemas(list(tools))
    return Task(id=f"math:{query}", query=query, tools=schemas, expected_answer=answer, category="no_tool")


WEATHER = ToolCall("get_weather", {"city": "Paris", "date": "2025-03-14"})
PARIS = Task(
    id="weather-paris", query="What's the weather in Paris on 2025-03-14?",
    tools=REGISTRY.schemas(["calculator", "get_weather"]), expected_calls=[[WEATHER]],
    expected_answer=f"{json.loads(REGISTRY.execute(WEATHER, timeout_s=None).content)['temperature_c']}°C",
)  # fmt: skip
WORLD = WorldConfig(
    n_train=300, n_validation=0, n_test=150, no_tool_fraction=0.3, synthetic_tools=40, synthetic_share=0.2
)


@pytest.fixture(scope="module")
def world():
    return [task for split in generate_world(WORLD).values() for task in split]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize(
    ("query", "answer", "expression"),
    [("What is 7 plus 3?", "10", "7 + 3"), ("What is 9-4?", "5", "9 - 4"), ("What is 6 times 7?", "42", "6 * 7")],
)
def test_unneeded_call_calls_the_calculator_on_the_query_then_answers(query, answer, expression):
    task = trivial_math(query, answer)
    call_turn, answer_turn = scripted_turns(task, "unneeded_call")
    parsed = parse_assistant_text(call_turn, task.tools)
    assert parsed.failure is None and parsed.content == ""
    assert parsed.calls == [ToolCall("calculator", {"expression": expression})]
    assert answer_turn == f"The answer is {answer}."


def test_variants_that_do_not_apply_are_none():
    small_talk = Task(id="hi", query="Hi! Tell me a joke.", tools=REGISTRY.schemas(["calculator"]), category="no_tool")
    no_calculator = trivial_math("What is 7 plus 3?", "10", tools=("get_weather",))
    assert [scripted_turns(small_talk, v) is None for v in VARIANTS] == [False, True, True, True]
    assert scripted_turns(no_calculator, "unneeded_call") is None
    assert scripted_turns(PARIS, "unneeded_call") is None
    with pytest.raises(ValueError, match="unknown variant"):
        scripted_turns(PARIS, "golden")


def test_gold_is_each_steps_calls_then_the_gold_answer():
    assert scripted_turns(PARIS, "gold") == [format_tool_calls([WEATHER]), f"The answer is {PARIS.expected_answer}."]
    assert scripted_turns(trivial_math("What is 7 plus 3?", "10"), "gold") == ["The answer is 10."]


def test_wrong_guess_changes_the_numbers_or_says_it_does_not_know():
    guess = wrong_guess(PARIS, random.Random(0))
    assert guess != f"The answer is {PARIS.expected_answer}." and guess.endswith("°C.")
    capital = Task(id="c", query="Capital?", tools=[], expected_calls=[[WEATHER]], expected_answer="Paris")
    assert scripted_turns(capital, "direct_guess") == [UNSURE_ANSWER]


def test_scripts_are_deterministic_and_never_guess_right(world):
    needs_tool = [t for t in world if t.needs_tool]
    assert {t.category for t in needs_tool} == {"single", "parallel", "multi_step"}
    for task in needs_tool:
        (guess,) = scripted_turns(task, "direct_guess")
        assert guess == scripted_turns(task, "direct_guess")[0]
        assert not answer_is_correct(task, Episode(task.id, final_answer=guess)), (task.query, guess)


def test_wrong_arguments_change_one_value_of_one_call_and_still_execute(world):
    applied = Counter()
    for task in (t for t in world if t.needs_tool):
        turns = scripted_turns(task, "wrong_arguments")
        applied[turns is not None] += 1
        if turns is None:
            continue
        first = task.expected_calls[0]
        made = parse_assistant_text(turns[0], task.tools)
        assert made.failure is None and len(made.calls) == len(first)
        changes = [
            (a.name, k) for a, b in zip(first, made.calls) for k in a.arguments if a.arguments[k] != b.arguments[k]
        ]
        assert len(changes) == 1 and [c.name for c in made.calls] == [c.name for c in first], (task.query, turns[0])
        assert not {c.key() for c in made.calls} <= {c.key() for c in task.flat_expected_calls()}
        for call in made.calls:
            schema = next(t for t in task.tools if t["function"]["name"] == call.name)
            assert validate_arguments(schema, call.arguments) == []
            if call.name in REGISTRY:
                assert REGISTRY.execute(call, timeout_s=None).error is None, (task.query, call)
        assert turns[1] == scripted_turns(task, "gold")[-1]
    # Only generated tools with nothing but free text to change are left out.
    assert applied[False] <= applied[True] // 20


def play(tokenizer, task: Task, variant: str, registry=REGISTRY) -> Episode:
    (run,) = run_scripted([(task, scripted_turns(task, variant))], tokenizer, LOOP, registry)
    return run.episode


def test_rule_rewards_of_the_variants_match_the_table(tokenizer, world):
    # The rewards table by hand: correct call 10 + answer 2; missed call -5; wrong arguments -2,
    # answer after wrong calls 0, one unaccounted call -0.5; unneeded call -5 + answer 2 - 0.5.
    math = trivial_math("What is 7 plus 3?", "10")
    expected = [
        (PARIS, "gold", 12.0), (PARIS, "direct_guess", -5.0), (PARIS, "wrong_arguments", -2.5),
        (math, "gold", 5.0), (math, "unneeded_call", -3.5),
    ]  # fmt: skip
    for category, variant, total in [
        ("parallel", "gold", 12.0), ("parallel", "wrong_arguments", -2.5), ("parallel", "direct_guess", -5.0),
        # Multi-step: the script stops after its first (wrong) step, so a needed tool is never called.
        ("multi_step", "gold", 12.0), ("multi_step", "wrong_arguments", -3.5), ("multi_step", "direct_guess", -5.0),
    ]:
        expected.append((next(t for t in world if t.category == category), variant, total))
    for task, variant, total in expected:
        episode = play(tokenizer, task, variant)
        assert episode.end_reason == EndReason.FINAL_ANSWER
        assert rule_reward(task, episode).total == total, (task.category, variant, rule_reward(task, episode))
    calculator = play(tokenizer, math, "unneeded_call")
    assert calculator.calls == [ToolCall("calculator", {"expression": "7 + 3"})]
    result = {"role": "tool", "tool_call_id": "call_0", "name": "calculator", "content": '{"result": 10}'}
    assert calculator.messages[2] == result


def test_a_gold_script_plays_to_the_gold_conversation(tokenizer, world):
    # Generated tools too: the loop runs them from the world's registry, as the job does.
    registry = world_registry(WORLD)
    generated = {t.name for t in registry} - set(REGISTRY.names())
    samples = [next(t for t in world if t.category == c) for c in ("single", "parallel", "multi_step", "no_tool")]
    samples.append(next(t for t in world if {c.name for c in t.flat_expected_calls()} & generated))
    for task in samples:
        assert play(tokenizer, task, "gold", registry).messages == gold_messages(task, registry), task.category


def test_scripted_policy_stops_at_the_token_budget_and_writes_nothing_past_its_script(tokenizer):
    policy = ScriptedPolicy(["The answer is 10."], tokenizer)
    full = policy([[1, 2]], {"max_tokens": 100})
    ids = full[0].samples[0].token_ids
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") and full[0].samples[0].finish_reason == "stop"
    assert full[0].samples[0].logprobs == [0.0] * len(ids)
    # Past its script it writes an empty turn (the loop's parse failure), never a crash.
    assert policy([[1, 2]], {"max_tokens": 100})[0].samples[0].token_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    cut = ScriptedPolicy(["The answer is 10."], tokenizer)([[1, 2]], {"max_tokens": 3})[0].samples[0]
    assert cut.token_ids == ids[:3] and cut.finish_reason == "length"
    # In the loop, a budget too small for the script ends the episode on its length.
    short = LOOP.model_copy(update={"max_new_tokens": 5})
    (run,) = run_scripted([(PARIS, scripted_turns(PARIS, "gold"))], tokenizer, short, REGISTRY)
    assert run.episode.end_reason == EndReason.LENGTH
