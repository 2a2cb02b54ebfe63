"""The tool loop: a scripted generator stands for the model; parsing, tools, tokens and records are real."""

from __future__ import annotations

import asyncio
import json
import time

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


EOS = "<|endoftext|>"  # not the turn end: an engine stopping on it is stopping on an extra EOS id


class ScriptedWorker:
    """Implements ``generate``: each prompt gets its task's next pre-written turn, tokenized with the
    tiny model's tokenizer and closed with ``<|im_end|>`` (cut at ``max_tokens`` like an engine).
    A turn written to end with ``EOS`` stops there instead, and with ``stop`` (a stop string) a
    turn stops right after it, as an engine does."""

    def __init__(self, tokenizer, scripts: dict[str, list[str]], stop: str | None = None):
        self.tokenizer, self.scripts, self.stop, self.calls = tokenizer, scripts, stop, []

    def generate(self, prompts: list[list[int]], sampling: dict) -> list[PromptResult]:
        self.calls.append((len(prompts), dict(sampling)))
        return [PromptResult(list(prompt), [self.turn(prompt, sampling)]) for prompt in prompts]

    def turn(self, prompt: list[int], sampling: dict) -> Generation:
        text = self.tokenizer.decode(prompt)
        key = next(k for k in self.scripts if f"[{k}]" in text)
        turn = text.count("<|im_start|>assistant\n") - 1
        written = self.scripts[key][turn]
        stop_reason = None
        if written.endswith(EOS):
            stop_reason = self.tokenizer.convert_tokens_to_ids(EOS)
        elif self.stop and self.stop in written:
            written, stop_reason = written[: written.index(self.stop) + len(self.stop)], self.stop
        ids = self.tokenizer(written, add_special_tokens=False)["input_ids"]
        if stop_reason is None:
            ids.append(self.tokenizer.convert_tokens_to_ids("<|im_end|>"))
        finish = "stop"
        if len(ids) > sampling["max_tokens"]:
            ids, finish, stop_reason = ids[: sampling["max_tokens"]], "length", None
        logprobs = [-token / 1000 for token in ids]
        return Generation(ids, logprobs, self.tokenizer.decode(ids), finish, stop_reason)

    def version(self) -> tuple[int, str]:
        return 7, "abc"


class StreamingScriptedWorker(ScriptedWorker):
    """Takes one request at a time (``generate_one``, like ``RolloutWorker``), each answered after
    ``engine_s`` seconds; logs when each request for which task and turn came in and went out, and
    tags each turn's tokens with the number of requests answered before it as their version."""

    def __init__(self, tokenizer, scripts: dict[str, list[str]], engine_s: float = 0.01, **kw):
        super().__init__(tokenizer, scripts, **kw)
        self.engine_s, self.log, self.answered = engine_s, [], 0

    async def generate_one(self, prompt: list[int], sampling: dict) -> Generation:
        self.calls.append((1, dict(sampling)))
        text = self.tokenizer.decode(prompt)
        key, turn = next(k for k in self.scripts if f"[{k}]" in text), text.count("<|im_start|>assistant\n") - 1
        await asyncio.sleep(self.engine_s)
        generation = self.turn(prompt, sampling)
        generation.versions = [self.answered] * len(generation.token_ids)
        self.answered += 1
        self.log.append((key, turn, time.perf_counter()))
        return generation


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


def test_episodes_at_their_own_pace_record_what_the_turn_barrier_records(tokenizer, registry):
    """A worker that takes requests one at a time: same episodes, tokens and records as the batched
    turn barrier; each generated token carries the version of the request that sampled it."""
    batched, _ = run(tokenizer, registry, SCRIPTS)
    turns = {k: t for k, (_, t) in SCRIPTS.items()}
    loop = LoopConfig(max_turns=3, max_new_tokens=128, max_total_tokens=4096)
    for schedule in ("episode", "turn_barrier"):
        worker = StreamingScriptedWorker(tokenizer, turns)
        cfg = loop.model_copy(update={"schedule": schedule})
        out = {t.task.id: t for t in run_episodes(make_tasks(registry, SCRIPTS), worker, tokenizer, cfg, registry)}
        assert all(n == 1 for n, _ in worker.calls) and len(worker.calls) == sum(len(t.episode.turns) for t in out.values())
        for key, trajectory in out.items():
            same = batched[key]
            assert (trajectory.token_ids, trajectory.action_mask, trajectory.logprobs) == (same.token_ids, same.action_mask, same.logprobs)
            assert trajectory.episode == same.episode
            check_tokens(tokenizer, trajectory, SCRIPTS[key][1])
            versions = trajectory.versions
            assert len(versions) == len(trajectory.token_ids)
            assert all((v is None) == (m == 0) for v, m in zip(versions, trajectory.action_mask))
            assert trajectory.policy_version == max(v for v in versions if v is not None)
        # Each turn's tokens carry one version, and a later turn's is newer.
        per_turn = [v for i, v in enumerate(out["turn_limit"].versions) if v is not None and (i == 0 or out["turn_limit"].versions[i - 1] != v)]
        assert len(per_turn) == 3 and per_turn == sorted(per_turn)
    # A worker whose generations carry no versions: its version() at the start stands for them.
    assert all(v == (7 if m else None) for t in batched.values() for v, m in zip(t.versions, t.action_mask))


def slow_lookup(key: str) -> dict:
    """A lookup behind a slow API.

    Args:
        key: What to look up.
    """
    time.sleep(0.6)
    return {"key": key, "value": 1}


def test_an_episode_whose_tools_are_slow_holds_back_no_other(tokenizer, registry):
    reg = builtin_registry()
    reg.register(slow_lookup)
    scripts = {
        "slow_a": (["slow_lookup"], [call("slow_lookup", key="a"), "Found a."]),
        "slow_b": (["slow_lookup"], [format_tool_calls([ToolCall("slow_lookup", {"key": "b"}), ToolCall("slow_lookup", {"key": "c"})]), "Found b, c."]),
        **{f"fast_{i}": (["calculator"], [call("calculator", expression=f"{i} + 1"), call("calculator", expression=f"{i} * 2"), f"Done {i}."]) for i in range(4)},
    }
    turns = {k: t for k, (_, t) in scripts.items()}
    loop = LoopConfig(max_turns=3, max_new_tokens=128, max_total_tokens=4096, tool_timeout_s=5)
    logs = {}
    for schedule in ("episode", "turn_barrier"):
        worker = StreamingScriptedWorker(tokenizer, turns)
        start = time.perf_counter()
        out = run_episodes(make_tasks(reg, scripts), worker, tokenizer, loop.model_copy(update={"schedule": schedule}), reg)
        logs[schedule] = (worker.log, time.perf_counter() - start)
        assert [len(t.episode.turns) for t in out] == [2, 2, 3, 3, 3, 3]
        assert all(t.episode.end_reason == EndReason.FINAL_ANSWER and not t.episode.turns[0].tool_errors for t in out)
    # Three 0.6 s calls in two episodes ran at once, not one after another (1.8 s).
    log, wall = logs["episode"]
    assert wall < 1.2
    slow_back = min(t for key, turn, t in log if key.startswith("slow") and turn == 1)
    fast_done = max(t for key, turn, t in log if key.startswith("fast"))
    # The fast episodes took all three of their turns while the slow tools ran.
    assert fast_done < slow_back
    # With a barrier at every turn, they wait for the slow tools before their second turn.
    log, _ = logs["turn_barrier"]
    slow_back = min(t for key, turn, t in log if key.startswith("slow") and turn == 1)
    assert min(t for key, turn, t in log if key.startswith("fast") and turn == 1) > slow_back - 0.05


def test_a_turn_that_stops_without_its_turn_end_gets_it_appended_unsampled(tokenizer, registry):
    """An extra EOS id or a stop string ends the turn: what was sampled stays, the template's
    ``<|im_end|>`` follows with mask 0, log-prob 0 and no version, and the episode goes on."""
    scripts = {
        "eos_call": (["calculator"], [call("calculator", expression="2 + 3") + EOS, "It is 5."]),
        "stop_string": (["calculator"], [call("calculator", expression="2 * 3") + "\nand more", "It is 6."]),
        "eos_answer": (["calculator"], ["All done." + EOS]),
    }
    turns = {k: t for k, (_, t) in scripts.items()}
    worker = StreamingScriptedWorker(tokenizer, turns, stop="</tool_call>")
    loop = LoopConfig(max_turns=3, max_new_tokens=128, max_total_tokens=4096)
    out = {t.task.id: t for t in run_episodes(make_tasks(registry, scripts), worker, tokenizer, loop, registry)}
    im_end, eos = tokenizer.convert_tokens_to_ids(["<|im_end|>", EOS])
    results = {k: [m["content"] for m in t.episode.messages if m["role"] == "tool"] for k, t in out.items()}
    assert results == {"eos_call": ['{"result": 5}'], "stop_string": ['{"result": 6}'], "eos_answer": []}
    assert [t.episode.end_reason for t in out.values()] == [EndReason.FINAL_ANSWER] * 3
    assert out["eos_answer"].episode.final_answer == "All done."
    # The EOS is kept in the message (so the messages render to the tokens), not in the parsed text.
    assert out["eos_call"].episode.messages[1]["content"].endswith(EOS)
    assert out["eos_call"].episode.turns[0].text == call("calculator", expression="2 + 3")
    assert out["stop_string"].episode.messages[1]["tool_calls"][0]["function"]["name"] == "calculator"
    for key, trajectory in out.items():
        ids, mask = trajectory.token_ids, trajectory.action_mask
        appended = [i for i in range(len(ids)) if ids[i] == im_end and mask[i] == 0 and i > 0 and mask[i - 1] == 1]
        assert len(appended) == 1
        (i,) = appended
        assert trajectory.logprobs[i] == 0.0 and trajectory.versions[i] is None
        assert (ids[i - 1] == eos) == key.startswith("eos") and trajectory.versions[i - 1] is not None
        fresh = tokenize_conversation(tokenizer, trajectory.episode.messages, trajectory.task.tools)
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        assert ids == fresh["input_ids"][: -len(newline)]
        # The SFT loss mask, but for the appended turn end: the policy did not sample it.
        assert [m for j, m in enumerate(mask) if j != i] == [m for j, m in enumerate(fresh["loss_mask"][: len(ids)]) if j != i]
        assert fresh["loss_mask"][i] == 1


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

    async def across_a_sync(prompt: list[int]) -> Generation:
        """A request in flight while a new policy version lands between two engine steps."""
        request = asyncio.ensure_future(worker.generate_one(prompt, {"max_tokens": 16, "ignore_eos": True}))
        start = worker.engine_stats()["steps"]
        while worker.engine_stats()["steps"] < start + 6:
            await asyncio.sleep(0)
        worker.policy_version = 1  # what a weight sync leaves behind
        return await request

    try:
        loop = LoopConfig(max_turns=2, max_new_tokens=24, max_total_tokens=2048, sampling=SamplingConfig(temperature=1.0))
        out = run_episodes(tasks, worker, tokenizer, loop)
        crossing = asyncio.run(across_a_sync(out[0].token_ids[: out[0].prompt_length]))
    finally:
        worker.shutdown()
    # Each token carries the version of the step that sampled it.
    assert crossing.versions == [0] * 6 + [1] * 10
    assert [t.task.id for t in out] == [t.id for t in tasks]
    for trajectory in out:
        assert trajectory.policy_version == 0
        assert len(trajectory.token_ids) == len(trajectory.action_mask) == len(trajectory.logprobs)
        assert 0 < sum(trajectory.action_mask) == trajectory.episode.num_generated_tokens
        assert all(lp <= 0 for lp, m in zip(trajectory.logprobs, trajectory.action_mask) if m)
        assert trajectory.episode.turns
    metrics = compute_metrics(tasks, [t.episode for t in out])
    assert metrics["n_tasks"] == len(tasks) and metrics["tokens_per_query"] > 0


class WithSampling:
    """The real worker in a Ray actor, with extra vLLM sampling keys on every request."""

    def __init__(self, actor, **extra):
        self.actor, self.extra = actor, extra

    async def generate_one(self, prompt: list[int], sampling: dict) -> Generation:
        return await self.actor.generate_one.remote(prompt, {**sampling, **self.extra})

    def version(self) -> tuple[int, str | None]:
        import ray

        return ray.get(self.actor.version.remote())


@pytest.mark.slow
def test_real_vllm_turns_that_stop_on_an_extra_eos_or_a_stop_string_are_closed(tiny_model_dir, tmp_path):
    """A copy of the tiny model whose generation config names ``<|endoftext|>`` a second EOS (as
    Qwen's does); a logit bias makes the (random) model sample it, or newlines with a stop string
    "\\n\\n", often. Every episode completes, and each such turn is closed by an appended turn end."""
    import shutil

    import ray
    from transformers import AutoTokenizer

    from cluster.local import RayConfig, local_ray
    from rollout.vllm_worker import RolloutWorker
    from tooltune.world import WorldConfig, generate_world

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [2, 0]}))
    tokenizer = AutoTokenizer.from_pretrained(model)
    im_end, eos, newline = tokenizer.convert_tokens_to_ids(["<|im_end|>", EOS]) + tokenizer("\n", add_special_tokens=False)["input_ids"]
    tasks = generate_world(WorldConfig(n_train=0, n_validation=0, n_test=8, distractor_tools=0))["test"]
    loop = LoopConfig(max_turns=2, max_new_tokens=48, max_total_tokens=2048, on_parse_failure="continue", sampling=SamplingConfig(seed=0))
    with local_ray(RayConfig(object_store_gib=0.5)):
        actor = ray.remote(RolloutWorker).remote({"model": str(model), "max_model_len": 2048})
        try:
            runs = {
                "eos": run_episodes(tasks, WithSampling(actor, logit_bias={eos: 4.0}), tokenizer, loop),
                "stop": run_episodes(tasks, WithSampling(actor, logit_bias={newline: 5.0}, stop=["\n\n"]), tokenizer, loop),
            }
        finally:
            ray.get(actor.shutdown.remote())
            ray.kill(actor)
    for kind, out in runs.items():
        assert [t.task.id for t in out] == [t.id for t in tasks]
        closed_by_loop = 0
        for t in out:
            ids, mask = t.token_ids, t.action_mask
            assert len(ids) == len(mask) == len(t.logprobs) == len(t.versions)
            assert all((v == 0) == bool(m) and (lp <= 0 if m else lp == 0.0) for v, m, lp in zip(t.versions, mask, t.logprobs))
            starts = [i for i in range(1, len(ids)) if mask[i] and not mask[i - 1]]
            ends = [i for i in range(1, len(ids)) if mask[i - 1] and not mask[i]] + ([len(ids)] if mask[-1] else [])
            assert len(starts) == len(ends) == len(t.episode.turns)
            for turn, end in enumerate(ends):
                if ids[end - 1] == im_end:
                    continue  # closed by the model itself
                if end == len(ids):
                    assert t.episode.end_reason == EndReason.LENGTH and turn == len(ends) - 1
                    continue
                # Stopped otherwise: the turn end follows, not sampled.
                assert ids[end] == im_end and t.logprobs[end] == 0.0 and t.versions[end] is None
                last = ids[end - 1]
                assert last == eos if kind == "eos" else "\n\n" in tokenizer.decode(ids[starts[turn] : end])
                closed_by_loop += 1
        assert closed_by_loop >= 4, kind
