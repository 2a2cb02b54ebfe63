"""The tool loop: a scripted generator stands for the model; parsing, tools, tokens and records are real."""

from __future__ import annotations

import json

import pytest

from rollout.agent_loop import LoopConfig, SamplingConfig, Trajectory, run_episodes
from rollout.vllm_worker import Generation, PromptResult
from tooltune.chat import render_prompt, tokenize_conversation
from tooltune.episode import EndReason, FailureReason, Task, ToolCall
from tooltune.metrics import METRIC_KEYS, compute_metrics
from tooltune.parser import format_tool_calls
from tooltune.tools.builtins import builtin_registry


def explode(x: int) -> dict:
    """A tool that always fails.

    Args:
        x: Any number.
    """
    raise RuntimeError(f"boom {x}")


BOOK_FLIGHT = {
    "type": "function",
    "function": {
        "name": "book_flight",
        "description": "Book a flight.",
        "parameters": {
            "type": "object",
            "properties": {"destination": {"type": "string"}, "seats": {"type": "integer"}},
            "required": ["destination"],
        },
    },
}


def call(name: str, **arguments) -> str:
    return format_tool_calls([ToolCall(name, arguments)])


# Per task: the tools it offers and what the "model" writes at each of its turns.
SCRIPTS = {
    "broken_json": (["calculator"], ['<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"\n</tool_call>']),
    "unknown_tool": (["calculator"], [call("send_email", to="bob")]),
    "raising_tool": (["explode", "calculator"], [call("explode", x=3), "The tool failed."]),
    "correct": (["calculator", "get_weather"], [call("calculator", expression="12 * 3"), "The answer is 36."]),
    "parallel": (
        ["get_weather", "calculator"],
        [
            format_tool_calls([
                ToolCall("get_weather", {"city": "Paris", "date": "2026-03-14"}),
                ToolCall("get_weather", {"city": "Oslo", "date": "2026-03-14"}),
            ]),
            "Paris is warmer.",
        ],
    ),
    "turn_limit": (["calculator"], [call("calculator", expression="1 + 1")] * 5),
    "direct_answer": (["calculator"], ["Hello! Nothing to compute here."]),
    "empty": (["calculator"], [""]),
    "too_long": (["calculator"], ["word " * 200]),
    "simulated": ([BOOK_FLIGHT], [call("book_flight", destination="Rome", seats=2), "Booked."]),
    "bad_arguments": ([BOOK_FLIGHT], [call("book_flight", seats="two")]),
    "content_and_call": (["calculator"], ["Let me compute.\n" + call("calculator", expression="2 + 2"), "It is 4."]),
    "loose_json": (["calculator"], ['<tool_call>\n{"name":"calculator","arguments":{"expression":"3 + 3"}}\n</tool_call>', "6"]),
}


class ScriptedWorker:
    """Implements ``generate``: each prompt gets its task's next pre-written turn, tokenized with the
    tiny model's tokenizer and closed with ``<|im_end|>`` (cut at ``max_tokens`` like an engine)."""

    def __init__(self, tokenizer, scripts: dict[str, list[str]]):
        self.tokenizer, self.scripts, self.calls = tokenizer, scripts, []

    def generate(self, prompts: list[list[int]], sampling: dict) -> list[PromptResult]:
        self.calls.append((len(prompts), dict(sampling)))
        results = []
        for prompt in prompts:
            text = self.tokenizer.decode(prompt)
            key = next(k for k in self.scripts if f"[{k}]" in text)
            turn = text.count("<|im_start|>assistant\n") - 1
            ids = self.tokenizer(self.scripts[key][turn], add_special_tokens=False)["input_ids"]
            ids.append(self.tokenizer.convert_tokens_to_ids("<|im_end|>"))
            finish = "stop"
            if len(ids) > sampling["max_tokens"]:
                ids, finish = ids[: sampling["max_tokens"]], "length"
            logprobs = [-token / 1000 for token in ids]
            sample = Generation(ids, logprobs, self.tokenizer.decode(ids), finish)
            results.append(PromptResult(list(prompt), [sample]))
        return results

    def version(self) -> tuple[int, str]:
        return 7, "abc"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def registry():
    reg = builtin_registry()
    reg.register(explode)
    return reg


def make_tasks(registry, scripts) -> list[Task]:
    tasks = []
    for key, (tools, _) in scripts.items():
        schemas = [t if isinstance(t, dict) else registry.get(t).schema for t in tools]
        tasks.append(Task(id=key, query=f"[{key}] please help", tools=schemas))
    return tasks


def run(tokenizer, registry, scripts, **cfg) -> tuple[dict[str, Trajectory], ScriptedWorker]:
    worker = ScriptedWorker(tokenizer, {k: turns for k, (_, turns) in scripts.items()})
    loop = LoopConfig(max_turns=3, max_new_tokens=128, max_total_tokens=4096, **cfg)
    trajectories = run_episodes(make_tasks(registry, scripts), worker, tokenizer, loop, registry)
    return {t.task.id: t for t in trajectories}, worker


def test_one_batch_covers_every_outcome(tokenizer, registry):
    out, worker = run(tokenizer, registry, SCRIPTS)
    ep = {k: t.episode for k, t in out.items()}

    # Every episode generated in the first call: one batch, n=1, stopping at <|im_end|>.
    assert worker.calls[0][0] == len(SCRIPTS)
    assert all(s["n"] == 1 and s["stop_token_ids"] == [tokenizer.convert_tokens_to_ids("<|im_end|>")] for _, s in worker.calls)

    assert ep["broken_json"].end_reason == EndReason.PARSE_FAILURE
    assert ep["broken_json"].failures == [FailureReason.MALFORMED_JSON]
    # "end": the episode stops at the broken turn, kept verbatim; nothing is executed or fed back.
    assert ep["broken_json"].messages[-1] == {"role": "assistant", "content": SCRIPTS["broken_json"][1][0]}
    assert ep["unknown_tool"].failures == [FailureReason.UNKNOWN_TOOL]
    assert ep["unknown_tool"].end_reason == EndReason.PARSE_FAILURE
    assert ep["bad_arguments"].failures == [FailureReason.INVALID_ARGUMENTS]
    assert ep["empty"].failures == [FailureReason.EMPTY_OUTPUT]

    raising = ep["raising_tool"]
    assert raising.end_reason == EndReason.FINAL_ANSWER and raising.final_answer == "The tool failed."
    assert raising.turns[0].calls == [ToolCall("explode", {"x": 3})] and raising.turns[0].failure is None
    assert len(raising.turns[0].tool_errors) == 1 and "boom 3" in raising.turns[0].tool_errors[0]
    assert "boom 3" in json.loads(raising.messages[2]["content"])["error"]

    correct = ep["correct"]
    assert correct.end_reason == EndReason.FINAL_ANSWER and correct.final_answer == "The answer is 36."
    assert [m["role"] for m in correct.messages] == ["user", "assistant", "tool", "assistant"]
    assert correct.messages[1]["tool_calls"][0]["function"]["name"] == "calculator"
    assert json.loads(correct.messages[2]["content"]) == {"result": 36}
    assert correct.turns[0].tool_errors == []

    parallel = ep["parallel"]
    assert len(parallel.turns[0].calls) == 2 and parallel.end_reason == EndReason.FINAL_ANSWER
    assert [m["tool_call_id"] for m in parallel.messages if m["role"] == "tool"] == ["call_0", "call_1"]

    assert ep["turn_limit"].end_reason == EndReason.TURN_LIMIT and len(ep["turn_limit"].turns) == 3
    assert ep["direct_answer"].end_reason == EndReason.FINAL_ANSWER and not ep["direct_answer"].attempted_call
    assert ep["too_long"].end_reason == EndReason.LENGTH and ep["too_long"].final_answer is None
    assert ep["too_long"].num_generated_tokens == 128

    simulated = ep["simulated"]
    assert simulated.end_reason == EndReason.FINAL_ANSWER
    assert simulated.messages[2]["content"] == LoopConfig().simulated_tool_result

    assert ep["content_and_call"].messages[1]["content"] == "Let me compute."
    # A call written in another JSON spacing parses, and is stored verbatim to keep the tokens exact.
    assert ep["loose_json"].turns[0].calls == [ToolCall("calculator", {"expression": "3 + 3"})]
    assert "tool_calls" not in ep["loose_json"].messages[1]

    for key, trajectory in out.items():
        assert trajectory.policy_version == 7
        check_tokens(tokenizer, trajectory, SCRIPTS[key][1])

    tasks = make_tasks(registry, SCRIPTS)
    metrics = compute_metrics(tasks, [out[t.id].episode for t in tasks])
    assert all(k in metrics for k in METRIC_KEYS)


def test_continue_feeds_the_parse_error_back_and_the_model_retries(tokenizer, registry):
    scripts = {
        "retry": (
            ["calculator"],
            ['<tool_call>\n{"name": "calculator", "arguments": {"expression": }\n</tool_call>',
             call("calculator", expression="5 * 5"), "The answer is 25."],
        ),
    }
    scripts["partial"] = (
        ["calculator"],
        [call("calculator", expression="2 * 4") + '\n<tool_call>\n{"name": "calculator"\n</tool_call>', "8"],
    )
    out, _ = run(tokenizer, registry, scripts, on_parse_failure="continue")
    partial = out["partial"].episode
    assert partial.end_reason == EndReason.FINAL_ANSWER and partial.failures == [FailureReason.MALFORMED_JSON]
    # The valid call runs; the broken one is answered with the parse error.
    assert [m.get("content") for m in partial.messages if m["role"] == "tool"][0] == '{"result": 8}'
    assert "call 2: malformed JSON" in json.loads(partial.messages[3]["content"])["error"]
    check_tokens(tokenizer, out["partial"], scripts["partial"][1])

    episode = out["retry"].episode
    assert episode.end_reason == EndReason.FINAL_ANSWER and episode.final_answer == "The answer is 25."
    assert episode.failures == [FailureReason.MALFORMED_JSON]
    assert "malformed_json" in json.loads(episode.messages[2]["content"])["error"]
    assert [t.calls for t in episode.turns] == [[], [ToolCall("calculator", {"expression": "5 * 5"})], []]
    check_tokens(tokenizer, out["retry"], scripts["retry"][1])


def test_several_samples_per_task_and_the_total_budget(tokenizer, registry):
    scripts = {"correct": SCRIPTS["correct"]}
    tasks = make_tasks(registry, scripts)
    scripted = ScriptedWorker(tokenizer, {"correct": scripts["correct"][1]})
    greedy = LoopConfig(samples_per_task=3, sampling=SamplingConfig(temperature=0))
    # A bare generate callable works too; it has no policy version to report.
    out = run_episodes(tasks, scripted.generate, tokenizer, greedy, registry)
    assert [t.task.id for t in out] == ["correct"] * 3 and all(t.policy_version is None for t in out)
    assert scripted.calls[0][0] == 3 and scripted.calls[0][1]["temperature"] == 0

    full = out[0]
    turn_lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 for text in scripts["correct"][1]]
    results = len(full.token_ids) - full.prompt_length - sum(turn_lengths)

    # The tool results do not fit: the episode ends at the model's first turn.
    no_room = LoopConfig(max_total_tokens=full.prompt_length + turn_lengths[0] + results - 1)
    (cut,) = run_episodes(tasks, scripted, tokenizer, no_room, registry)
    assert cut.episode.end_reason == EndReason.LENGTH and len(cut.episode.turns) == 1
    assert cut.episode.messages[-1]["role"] == "assistant"
    assert len(cut.token_ids) == full.prompt_length + turn_lengths[0]

    # The results fit, and the second turn gets the 3 tokens that are left.
    three_left = LoopConfig(max_total_tokens=full.prompt_length + turn_lengths[0] + results + 3)
    (cut,) = run_episodes(tasks, scripted, tokenizer, three_left, registry)
    assert cut.episode.end_reason == EndReason.LENGTH and len(cut.episode.turns) == 2
    assert cut.episode.num_generated_tokens == turn_lengths[0] + 3
    assert len(cut.token_ids) == three_left.max_total_tokens and cut.episode.final_answer is None


def test_prompts_are_spread_over_several_workers(tokenizer, registry):
    scripts = {k: SCRIPTS[k] for k in ("correct", "parallel", "direct_answer", "raising_tool", "turn_limit")}
    turns = {k: t for k, (_, t) in scripts.items()}
    workers = [ScriptedWorker(tokenizer, turns), ScriptedWorker(tokenizer, turns)]
    out = run_episodes(make_tasks(registry, scripts), workers, tokenizer, LoopConfig(max_turns=2), registry)
    assert [c[0] for c in workers[0].calls] == [3, 2] and [c[0] for c in workers[1].calls] == [2, 2]
    assert [t.episode.end_reason for t in out] == [EndReason.FINAL_ANSWER] * 4 + [EndReason.TURN_LIMIT]

    class Stale(ScriptedWorker):
        def version(self):
            return 6, "old"

    with pytest.raises(RuntimeError, match="different policy versions"):
        run_episodes(make_tasks(registry, scripts), [workers[0], Stale(tokenizer, turns)], tokenizer, LoopConfig(), registry)


def check_tokens(tokenizer, trajectory: Trajectory, script: list[str]) -> None:
    """The sequence is a fresh render of the messages; the mask picks exactly the generated turns."""
    ids, mask, episode = trajectory.token_ids, trajectory.action_mask, trajectory.episode
    assert len(ids) == len(mask) == len(trajectory.logprobs)
    assert all(lp == (-t / 1000 if m else 0.0) for t, m, lp in zip(ids, mask, trajectory.logprobs))
    assert sum(mask) == episode.num_generated_tokens
    assert mask[: trajectory.prompt_length] == [0] * trajectory.prompt_length

    runs, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    turns = [tokenizer.decode(r) for r in runs]
    full = [text + "<|im_end|>" for text in script[: len(turns)]]
    if episode.end_reason == EndReason.LENGTH and trajectory.episode.turns:
        assert turns[:-1] == full[:-1] and full[-1].startswith(turns[-1])
    else:
        assert turns == full
    assert [t.text for t in episode.turns] == [d.removesuffix("<|im_end|>") for d in turns]

    if episode.end_reason == EndReason.LENGTH:
        return  # a cut turn is not a message a template can close
    tools = trajectory.task.tools
    fresh = tokenize_conversation(tokenizer, episode.messages, tools)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    if episode.messages[-1]["role"] == "assistant":
        assert fresh["input_ids"][-len(newline):] == newline
        assert ids == fresh["input_ids"][: -len(newline)]
        assert mask == fresh["loss_mask"][: -len(newline)]
    else:
        assert ids == tokenizer(render_prompt(tokenizer, episode.messages, tools), add_special_tokens=False)["input_ids"]
        assert mask == fresh["loss_mask"] + [0] * (len(ids) - len(fresh["loss_mask"]))


@pytest.mark.slow
def test_real_vllm_worker_runs_the_loop_on_tool_world_tasks(tiny_model_dir):
    from transformers import AutoTokenizer

    from rollout.vllm_worker import RolloutWorker
    from tooltune.world import WorldConfig, generate_world

    tasks = generate_world(WorldConfig(n_train=0, n_validation=0, n_test=6, distractor_tools=0))["test"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    worker = RolloutWorker({"model": tiny_model_dir, "max_model_len": 2048})
    try:
        loop = LoopConfig(max_turns=2, max_new_tokens=24, max_total_tokens=2048, sampling=SamplingConfig(temperature=1.0))
        out = run_episodes(tasks, worker, tokenizer, loop)
    finally:
        worker.shutdown()
    assert [t.task.id for t in out] == [t.id for t in tasks]
    for trajectory in out:
        assert trajectory.policy_version == 0
        assert len(trajectory.token_ids) == len(trajectory.action_mask) == len(trajectory.logprobs)
        assert 0 < sum(trajectory.action_mask) == trajectory.episode.num_generated_tokens
        assert all(lp <= 0 for lp, m in zip(trajectory.logprobs, trajectory.action_mask) if m)
        assert trajectory.episode.turns
    metrics = compute_metrics(tasks, [t.episode for t in out])
    assert metrics["n_tasks"] == len(tasks) and metrics["tokens_per_query"] > 0
