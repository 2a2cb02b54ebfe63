"""The multi-turn tool loop: generate -> parse -> execute -> feed back, each episode at its own pace.

Every episode is an asyncio task. It asks for its next turn as soon as its own tool results are
in; a worker that takes requests one at a time (``RolloutWorker.generate_one``, continuous
batching) runs the turns of all episodes that are generating at that moment in the same engine
steps, so an episode whose tools are slow holds back no one else. Tool calls run concurrently in
a thread pool, each with the per-call timeout. ``schedule="turn_barrier"`` keeps the older
schedule, for comparison: every live episode finishes its turn before any starts the next one. A
worker that can only generate in batches (``HFRolloutWorker``, a bare callable) is always driven
that way, one batched call per turn.

The running sequence of each episode is built exactly as ``tooltune.chat`` renders it: the
prompt's ids, the generated ids through the turn end ``<|im_end|>``, then the ids of
``chat.tool_messages_text`` (``add_special_tokens=False``), so a trajectory's tokens are those
of a fresh render of its messages (when the model's own tokenization is the canonical one) and
its action mask is the SFT loss mask. A generation that stopped without ``<|im_end|>`` (on
another end-of-sequence id, or a stop string) keeps what it sampled, and the loop appends the
``<|im_end|>`` the template closes the turn with, with action mask 0, log-prob 0 and no version:
the policy did not sample it. Its message is stored verbatim, so the render still matches.

A turn becomes one of:

- a final answer (no call attempted): the episode ends, ``EndReason.FINAL_ANSWER``;
- a parse failure (``Turn.failure``: malformed JSON, unknown tool, arguments that break the
  schema, empty output): the episode ends (``PARSE_FAILURE``), or with
  ``on_parse_failure="continue"`` the turn is handled like calls, its error fed back as one more
  tool result, and the model tries again;
- calls: the valid ones are executed (a failing tool becomes an ``{"error": ...}`` result and a
  ``Turn.tool_errors`` entry) and their results appended; the episode ends after ``max_turns``
  model turns (``TURN_LIMIT``; its last results are still appended when they fit);
- cut by a token budget (``max_new_tokens``, or ``max_total_tokens`` for the whole sequence,
  tool results included): ``LENGTH``.

Nothing a model writes and no tool aborts the batch. A call the task's data answers
(``Task.tool_results``, from a user's eval file) gets that result. Tools the task offers that the
registry lacks (BFCL's functions) are checked against the task's schema by the parser and answered
with ``LoopConfig.simulated_tool_result``.

Messages follow OpenAI's format. An assistant turn whose text is exactly the canonical rendering
of its calls (what SFT teaches) is stored with ``tool_calls``; any other turn is stored as its
verbatim text, so that the messages always render to the tokens the model produced.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from rollout.scheduler import Scheduler, Workers
from tooltune.chat import TURN_END, render_prompt, tool_messages_text
from tooltune.config import StrictModel
from tooltune.episode import EndReason, Episode, Task, ToolCall, Turn
from tooltune.parser import ParseResult, format_tool_calls, parse_assistant_text
from tooltune.tools import ToolRegistry, ToolResult
from tooltune.tools.builtins import builtin_registry


class SamplingConfig(StrictModel):
    temperature: float = Field(1.0, ge=0)  # 0 is greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0 is off
    # Each request's seed is derived from this one, the episode and the turn: a worker that takes
    # requests one at a time then samples the same episodes whatever the schedule and the batch
    # (one seed per batched call on a batch-only worker). None: the engine's own random stream.
    seed: int | None = None


class LoopConfig(StrictModel):
    max_turns: int = Field(4, ge=1)
    max_new_tokens: int = Field(256, ge=1)  # per model turn
    max_total_tokens: int = Field(2048, ge=16)  # prompt + generations + tool results
    sampling: SamplingConfig = SamplingConfig()
    # Each sample is its own episode (n=1 per request): k samples of a task are k episodes.
    samples_per_task: int = Field(1, ge=1)
    on_parse_failure: Literal["end", "continue"] = "end"
    schedule: Literal["episode", "turn_barrier"] = "episode"
    tool_timeout_s: float | None = Field(2.0, gt=0)
    tool_threads: int = Field(32, ge=1)  # tool calls running at once, over all episodes
    simulated_tool_result: str = '{"status": "ok"}'


@dataclass
class Trajectory:
    """One episode and its token-level record, ready for rewards and a policy-gradient step.

    ``token_ids`` is the whole sequence; ``action_mask`` is 1 on the tokens the model generated
    (stop tokens included) and 0 on prompt and tool-result tokens and on a turn end the loop
    appended; ``logprobs`` is aligned with ``token_ids``: each generated token's log-prob under
    the distribution it was sampled from, 0.0 where the mask is 0; ``versions`` too: the policy
    version that sampled each generated token, None where the mask is 0 (and where the worker
    cannot tell). ``policy_version`` is the newest of them (the worker's version when no token
    carries one).
    """

    task: Task
    episode: Episode
    token_ids: list[int]
    logprobs: list[float]
    action_mask: list[int]
    prompt_length: int
    policy_version: int | None = None
    versions: list[int | None] = field(default_factory=list)


Generate = Callable[[list[list[int]], dict[str, Any]], list[Any]]
"""``(prompts as token ids, sampling dict) -> one PromptResult per prompt`` (``RolloutWorker.generate``)."""


def run_episodes(
    tasks: list[Task],
    worker: Any,
    tokenizer: Any,
    cfg: LoopConfig,
    registry: ToolRegistry | None = None,
) -> list[Trajectory]:
    """Run the tool loop on every task (``cfg.samples_per_task`` episodes each, task-major order).

    ``worker`` is a ``RolloutWorker`` (or another worker with its interface: ``generate_one``
    for continuous batching, else ``generate`` in batches), a Ray actor handle of one, a list of
    either (episodes spread over them), or a bare ``Generate`` callable. ``registry`` runs the
    calls (the built-in tools when None). Runs ``arun_episodes`` in a fresh event loop.
    """
    return asyncio.run(arun_episodes(tasks, worker, tokenizer, cfg, registry))


async def arun_episodes(
    tasks: list[Task],
    worker: Any,
    tokenizer: Any,
    cfg: LoopConfig,
    registry: ToolRegistry | None = None,
) -> list[Trajectory]:
    """``run_episodes`` for a caller already in an event loop (a local ``RolloutWorker`` is then
    stepped on that loop, on the thread that made it)."""
    registry = registry if registry is not None else builtin_registry()
    workers = Workers(worker)
    version = await workers.policy_version()
    turn_end = _turn_end_id(tokenizer)
    states = [_State.start(task, tokenizer, cfg) for task in tasks for _ in range(cfg.samples_per_task)]
    barrier = cfg.schedule == "turn_barrier" or not workers.per_request
    scheduler = Scheduler(workers, cfg.sampling, turn_end, live=len(states), barrier=barrier)
    with ThreadPoolExecutor(cfg.tool_threads, thread_name_prefix="tool") as pool:
        episodes = [_play(i, s, scheduler, pool, tokenizer, registry, cfg, version) for i, s in enumerate(states)]
        await asyncio.gather(*episodes)
    return [s.trajectory(version) for s in states]


async def _play(
    index: int, state: _State, scheduler: Scheduler, pool: ThreadPoolExecutor,
    tokenizer: Any, registry: ToolRegistry, cfg: LoopConfig, version: int | None,
) -> None:  # fmt: skip
    """One episode, turn after turn, until it ends."""
    try:
        while not state.done:
            budget = min(cfg.max_new_tokens, cfg.max_total_tokens - len(state.token_ids))
            generation = await scheduler.generate(index, len(state.episode.turns), state.token_ids, budget)
            calls = state.take_generation(generation, tokenizer, cfg, scheduler.turn_end, version)
            if state.done:
                break
            loop = asyncio.get_running_loop()
            results = await asyncio.gather(
                *(loop.run_in_executor(pool, _execute, call, state.task, registry, cfg) for call in calls)
            )
            state.feed_back(results, tokenizer, cfg)
    finally:
        scheduler.leave()


# ---- one episode ------------------------------------------------------------------------------


@dataclass
class _State:
    task: Task
    episode: Episode
    token_ids: list[int]
    logprobs: list[float]
    action_mask: list[int]
    versions: list[int | None]
    prompt_length: int
    done: bool = False
    calls_made: int = 0
    # Between take_generation and feed_back: the turn's message, parse and call ids.
    pending: tuple[dict[str, Any], ParseResult, list[str]] | None = None

    @classmethod
    def start(cls, task: Task, tokenizer: Any, cfg: LoopConfig) -> _State:
        messages = [{"role": "system", "content": task.system}] if task.system else []
        messages.append({"role": "user", "content": task.query})
        ids = _encode(tokenizer, render_prompt(tokenizer, messages, task.tools))
        n = len(ids)
        state = cls(task, Episode(task.id, messages=messages), ids, [0.0] * n, [0] * n, [None] * n, n)
        if n >= cfg.max_total_tokens:
            state.end(EndReason.LENGTH)
        return state

    def end(self, reason: EndReason) -> None:
        self.episode.end_reason, self.done = reason, True

    def append(self, ids: list[int], logprobs: list[float], mask: int, versions: list[int | None]) -> None:
        self.token_ids += ids
        self.logprobs += logprobs
        self.action_mask += [mask] * len(ids)
        self.versions += versions

    def take_generation(
        self, generation: Any, tokenizer: Any, cfg: LoopConfig, turn_end: int, version: int | None
    ) -> list[ToolCall]:
        """Record a generated turn and parse it; returns the calls to execute (none if it ended)."""
        ids, logprobs = list(generation.token_ids), list(generation.logprobs)
        versions = list(getattr(generation, "versions", None) or [version] * len(ids))
        if not len(logprobs) == len(versions) == len(ids):
            counts = f"{len(ids)} tokens, {len(logprobs)} log-probs, {len(versions)} versions"
            raise ValueError(f"task {self.task.id}: {counts}")
        self.append(ids, logprobs, 1, versions)
        self.episode.num_generated_tokens += len(ids)
        stopped = generation.finish_reason == "stop"
        closed = stopped and bool(ids) and ids[-1] == turn_end
        # Stopped otherwise, the template's turn end must follow; without room for it, the turn is cut.
        if stopped and not closed and len(self.token_ids) >= cfg.max_total_tokens:
            stopped = False
        body, tail = (ids[:-1], []) if closed else (ids, [])
        if stopped and not closed:
            # An end-of-sequence id the turn stopped on is part of what was sampled, not of the
            # text to parse.
            special = set(tokenizer.all_special_ids)
            cut = len(ids) - 1 if ids and ids[-1] in special else len(ids)
            body, tail = ids[:cut], ids[cut:]
            self.append([turn_end], [0.0], 0, [None])
        text = _decode(tokenizer, body)
        parsed = parse_assistant_text(text, self.task.tools)
        turn = Turn(text, calls=list(parsed.calls), failure=parsed.failure, failure_detail=parsed.detail)
        self.episode.turns.append(turn)
        call_ids = [f"call_{self.calls_made + i}" for i in range(len(parsed.calls))]
        self.calls_made += len(parsed.calls)
        assistant = _assistant_message(text, parsed, call_ids)
        if tail:
            assistant = {"role": "assistant", "content": text + _decode(tokenizer, tail)}
        if not stopped:
            self.episode.messages.append(assistant)
            self.end(EndReason.LENGTH)
        elif parsed.is_final_answer:
            self.episode.messages.append(assistant)
            self.episode.final_answer = parsed.content
            self.end(EndReason.FINAL_ANSWER)
        elif parsed.failure is not None and cfg.on_parse_failure == "end":
            self.episode.messages.append(assistant)
            self.end(EndReason.PARSE_FAILURE)
        else:
            self.pending = (assistant, parsed, call_ids)
            return list(parsed.calls)
        return []

    def feed_back(self, results: list[ToolResult], tokenizer: Any, cfg: LoopConfig) -> None:
        """Append the turn's tool results (and its parse error), if they fit."""
        assert self.pending is not None
        assistant, parsed, call_ids = self.pending
        self.pending = None
        turn = self.episode.turns[-1]
        feedback = []
        for call, call_id, result in zip(parsed.calls, call_ids, results):
            if result.error is not None:
                turn.tool_errors.append(f"{call.name}: {result.error}")
            feedback.append({"role": "tool", "tool_call_id": call_id, "name": call.name, "content": result.content})
        if parsed.failure is not None:
            error = json.dumps({"error": f"{parsed.failure.value}: {parsed.detail}"}, ensure_ascii=False)
            feedback.append({"role": "tool", "content": error})
        messages = [*self.episode.messages, assistant]
        tool_ids = _encode(tokenizer, tool_messages_text(tokenizer, [*messages, *feedback], self.task.tools))
        fits = len(self.token_ids) + len(tool_ids) <= cfg.max_total_tokens
        if fits:
            messages += feedback
            self.append(tool_ids, [0.0] * len(tool_ids), 0, [None] * len(tool_ids))
        # Results that do not fit are left out of both the messages and the tokens.
        self.episode.messages = messages
        if len(self.episode.turns) >= cfg.max_turns:
            self.end(EndReason.TURN_LIMIT)
        elif not fits or len(self.token_ids) >= cfg.max_total_tokens:
            self.end(EndReason.LENGTH)

    def trajectory(self, version: int | None) -> Trajectory:
        sampled = [v for v in self.versions if v is not None]
        newest = max(sampled) if sampled else version
        return Trajectory(
            self.task, self.episode, self.token_ids, self.logprobs, self.action_mask, self.prompt_length, newest,
            self.versions,
        )  # fmt: skip


def _assistant_message(text: str, parsed: ParseResult, call_ids: list[str]) -> dict[str, Any]:
    if parsed.failure is None:
        separator = "\n" if parsed.content and parsed.calls else ""
        if parsed.content + separator + format_tool_calls(parsed.calls) == text:
            message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
            if parsed.calls:
                message["tool_calls"] = [c.to_openai(i) for c, i in zip(parsed.calls, call_ids)]
            return message
    return {"role": "assistant", "content": text}


def _execute(call: ToolCall, task: Task, registry: ToolRegistry, cfg: LoopConfig) -> ToolResult:
    """The task's own result for this call, if its data has one; else run a registry tool; a tool
    only the task defines (or defines differently) is simulated."""
    if call.key() in task.tool_results:
        return ToolResult(content=task.tool_results[call.key()])
    offered = next(t for t in task.tools if t["function"]["name"] == call.name)
    if call.name in registry and registry.get(call.name).schema == offered:
        return registry.execute(call, timeout_s=cfg.tool_timeout_s)
    # The parser already checked the arguments against the task's schema.
    return ToolResult(content=cfg.simulated_tool_result)


def _encode(tokenizer: Any, text: str) -> list[int]:
    # The chat template writes every control token itself (see tooltune.chat).
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _turn_end_id(tokenizer: Any) -> int:
    im_end = tokenizer.convert_tokens_to_ids(TURN_END)
    if not isinstance(im_end, int) or im_end == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {TURN_END} token: the tool loop needs a ChatML template")
    return im_end
