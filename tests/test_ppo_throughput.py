"""The GRPO throughput benchmark's pure parts: its timing arithmetic, and the reward both sides call
(what our tool loop makes of one turn, checked against the loop itself)."""

import pytest

from benchmarks.ppo_throughput import completion_reward, throughput
from rollout.agent_loop import LoopConfig
from rollout.scripted import run_scripted
from tooltune.episode import Task, ToolCall
from tooltune.parser import format_tool_calls
from tooltune.rewards import RewardConfig, rule_reward
from tooltune.tools.builtins import builtin_registry

REGISTRY = builtin_registry()
WEATHER = ToolCall("get_weather", {"city": "Paris", "date": "2025-03-14"})
TOOLS = REGISTRY.schemas(["calculator", "get_weather"])
PARIS = Task(
    id="paris", query="Weather in Paris on 2025-03-14?", tools=TOOLS, expected_calls=[[WEATHER]], expected_answer="x"
)
SUM = Task(id="sum", query="What is 7 plus 3?", tools=TOOLS, expected_answer="10", category="no_tool")


def test_throughput_times_the_steps_after_warmup():
    # Step 0 ends at 10 s (warm-up, untimed); steps 1..3 run from 10 s to 18 s: 3 x 16 samples / 8 s.
    out = throughput([10.0, 13.0, 15.0, 18.0], warmup=1, samples_per_step=16)
    assert out == {"timed_steps": 3, "seconds": 8.0, "samples_per_s": 6.0, "step_seconds": [3.0, 2.0, 3.0]}
    assert throughput([10.0, 13.0, 15.0, 18.0], warmup=2, samples_per_step=16)["samples_per_s"] == 6.4
    with pytest.raises(ValueError):
        throughput([10.0, 13.0], warmup=2, samples_per_step=16)
    with pytest.raises(ValueError):
        throughput([10.0, 13.0], warmup=0, samples_per_step=16)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize(
    ("task", "text", "max_new_tokens", "total"),
    [
        (PARIS, format_tool_calls([WEATHER]), 256, 10.0),  # the exact call; its result is never read
        (PARIS, "It is sunny.", 256, -5.0),  # a missed call
        (PARIS, '<tool_call>\n{"name": "get_weather", "arguments": \n</tool_call>', 256, -5.0),  # malformed
        (SUM, "It is 10.", 256, 5.0),  # a right direct answer
        (SUM, format_tool_calls([ToolCall("calculator", {"expression": "7 + 3"})]), 256, -5.5),  # unneeded, no answer
        (SUM, "It is 10, as anyone who can count to ten will tell you.", 3, 0.0),  # cut by the budget: no answer
    ],
)
def test_completion_reward_is_the_tool_loops_reward_of_one_turn(tokenizer, task, text, max_new_tokens, total):
    loop = LoopConfig(max_turns=1, max_new_tokens=max_new_tokens, max_total_tokens=4096)
    (run,) = run_scripted([(task, [text])], tokenizer, loop, REGISTRY)
    finished = run.episode.end_reason.value != "length"
    assert finished == (max_new_tokens > 3)
    assert completion_reward(task, run.episode.turns[0].text, finished) == rule_reward(task, run.episode).total == total


def test_completion_reward_takes_the_reward_config():
    assert completion_reward(SUM, "It is 10.", True, RewardConfig(correct_direct_answer=1.5)) == 1.5
    assert completion_reward(SUM, "", True) == -5.0  # an empty turn is a parse failure
