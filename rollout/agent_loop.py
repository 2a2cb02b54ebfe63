"""The multi-turn tool loop, for a batch of episodes at once: generate -> parse -> execute -> feed back.

Every live episode generates in one batched call per turn; the driver then parses each turn,
runs its calls and appends the results, and the episodes that did not end generate again.
The running sequence of each episode is built exactly as ``tooltune.chat`` renders it: the
prompt's ids, the generated ids through the stop token ``<|im_end|>``, then the ids of
``chat.tool_messages_text`` (``add_special_tokens=False``), so a trajectory's tokens are those
of a fresh render of its messages (when the model's own tokenization is the canonical one) and
its action mask is the SFT loss mask.

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

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from tooltune.chat import TURN_END, render_prompt, tool_messages_text
from tooltune.config import StrictModel
from tooltune.episode import EndReason, Episode, Task, ToolCall, Turn
from tooltune.parser import ParseResult, format_tool_calls, parse_assistant_text
from tooltune.tools import ToolRegistry, ToolResult
from tooltune.tools.builtins import builtin_registry


class SamplingConfig(StrictModel):
    temperature: float = Field(1.0, ge=0)  # 0 is greedy
    top_p: float = Field(1.0, gt=0, le=1)


class LoopConfig(StrictModel):
    max_turns: int = Field(4, ge=1)
    max_new_tokens: int = Field(256, ge=1)  # per model turn
    max_total_tokens: int = Field(2048, ge=16)  # prompt + generations + tool results
    sampling: SamplingConfig = SamplingConfig()
    # Each sample is its own episode (n=1 per request): k samples of a task are k episodes.
    samples_per_task: int = Field(1, ge=1)
    on_parse_failure: Literal["end", "continue"] = "end"
    tool_timeout_s: float | None = Field(2.0, gt=0)
    simulated_tool_result: str = '{"status": "ok"}'


@dataclass
class Trajectory:
    """One episode and its token-level record, ready for rewards and a policy-gradient step.

    ``token_ids`` is the whole sequence; ``action_mask`` is 1 on the tokens the model generated
    (stop tokens included) and 0 on prompt and tool-result tokens; ``logprobs`` is aligned with
    ``token_ids``: the policy's log-prob of each generated token, 0.0 where the mask is 0.
    """

    task: Task
    episode: Episode
    token_ids: list[int]
    logprobs: list[float]
    action_mask: list[int]
    prompt_length: int
    policy_version: int | None = None


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

    ``worker`` is anything with ``generate(prompts, sampling)``: a ``RolloutWorker`` (or another
    worker with its interface), a Ray actor handle of one, a list of either (each turn's prompts
    are spread over them), or a bare ``Generate`` callable. ``registry`` runs the calls
    (the built-in tools when None).
    """
    registry = registry if registry is not None else builtin_registry()
    engine = _Engine(worker)
    version = engine.policy_version()
    stop_ids = _stop_token_ids(tokenizer)
    states = [_State.start(task, tokenizer, cfg) for task in tasks for _ in range(cfg.samples_per_task)]
    live = [s for s in states if not s.done]
    while live:
        budgets = [min(cfg.max_new_tokens, cfg.max_total_tokens - len(s.token_ids)) for s in live]
        generations = engine.generate([s.token_ids for s in live], budgets, _sampling(cfg, stop_ids))
        for state, generation in zip(live, generations):
            state.take_turn(generation, tokenizer, registry, cfg, stop_ids)
        live = [s for s in live if not s.done]
    return [s.trajectory(version) for s in states]


# ---- one episode ------------------------------------------------------------------------------


@dataclass
class _State:
    task: Task
    episode: Episode
    token_ids: list[int]
    logprobs: list[float]
    action_mask: list[int]
    prompt_length: int
    done: bool = False
    calls_made: int = 0

    @classmethod
    def start(cls, task: Task, tokenizer: Any, cfg: LoopConfig) -> _State:
        messages = [{"role": "system", "content": task.system}] if task.system else []
        messages.append({"role": "user", "content": task.query})
        ids = _encode(tokenizer, render_prompt(tokenizer, messages, task.tools))
        state = cls(task, Episode(task.id, messages=messages), ids, [0.0] * len(ids), [0] * len(ids), len(ids))
        if len(ids) >= cfg.max_total_tokens:
            state.end(EndReason.LENGTH)
        return state

    def end(self, reason: EndReason) -> None:
        self.episode.end_reason, self.done = reason, True

    def take_turn(
        self, generation: Any, tokenizer: Any, registry: ToolRegistry, cfg: LoopConfig, stop_ids: list[int]
    ) -> None:
        ids, logprobs = list(generation.token_ids), list(generation.logprobs)
        if len(logprobs) != len(ids):
            raise ValueError(f"task {self.task.id}: {len(ids)} generated tokens but {len(logprobs)} log-probs")
        self.token_ids += ids
        self.logprobs += logprobs
        self.action_mask += [1] * len(ids)
        self.episode.num_generated_tokens += len(ids)
        stopped = generation.finish_reason == "stop"
        if stopped and not (ids and ids[-1] in stop_ids):
            # The template closes every assistant turn with <|im_end|>: the sequence needs it.
            raise ValueError(f"task {self.task.id}: a stopped generation must end with its stop token {stop_ids}")
        text = tokenizer.decode(
            ids[:-1] if stopped else ids,
            skip_special_tokens=False,
            clean_up_tokenization_spaces=False,
        )
        parsed = parse_assistant_text(text, self.task.tools)
        turn = Turn(text, calls=list(parsed.calls), failure=parsed.failure, failure_detail=parsed.detail)
        self.episode.turns.append(turn)
        call_ids = [f"call_{self.calls_made + i}" for i in range(len(parsed.calls))]
        self.calls_made += len(parsed.calls)
        assistant = _assistant_message(text, parsed, call_ids)
        if not stopped:
            self.episode.messages.append(assistant)
            self.end(EndReason.LENGTH)
            return
        if parsed.is_final_answer:
            self.episode.messages.append(assistant)
            self.episode.final_answer = parsed.content
            self.end(EndReason.FINAL_ANSWER)
            return
        if parsed.failure is not None and cfg.on_parse_failure == "end":
            self.episode.messages.append(assistant)
            self.end(EndReason.PARSE_FAILURE)
            return
        feedback = []
        for call, call_id in zip(parsed.calls, call_ids):
            result = _execute(call, self.task, registry, cfg)
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
            self.token_ids += tool_ids
            self.logprobs += [0.0] * len(tool_ids)
            self.action_mask += [0] * len(tool_ids)
        # Results that do not fit are left out of both the messages and the tokens.
        self.episode.messages = messages
        if len(self.episode.turns) >= cfg.max_turns:
            self.end(EndReason.TURN_LIMIT)
        elif not fits or len(self.token_ids) >= cfg.max_total_tokens:
            self.end(EndReason.LENGTH)

    def trajectory(self, version: int | None) -> Trajectory:
        return Trajectory(
            self.task, self.episode, self.token_ids, self.logprobs, self.action_mask, self.prompt_length, version
        )


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


def _stop_token_ids(tokenizer: Any) -> list[int]:
    im_end = tokenizer.convert_tokens_to_ids(TURN_END)
    if not isinstance(im_end, int) or im_end == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {TURN_END} token: the tool loop needs a ChatML template")
    eos = tokenizer.eos_token_id
    return [im_end] if eos is None or eos == im_end else [im_end, eos]


def _sampling(cfg: LoopConfig, stop_ids: list[int]) -> dict[str, Any]:
    return {
        "n": 1,
        "temperature": cfg.sampling.temperature,
        "top_p": cfg.sampling.top_p,
        "stop_token_ids": stop_ids,
    }


# ---- workers ----------------------------------------------------------------------------------


class _Engine:
    """One or more workers (local objects, Ray actor handles, or bare callables) behind one call."""

    def __init__(self, worker: Any):
        self.workers = list(worker) if isinstance(worker, (list, tuple)) else [worker]
        if not self.workers:
            raise ValueError("no rollout worker given")

    def generate(self, prompts: list[list[int]], budgets: list[int], sampling: dict[str, Any]) -> list[Any]:
        """One generation per prompt, ``budgets[i]`` new tokens at most. Episodes near the end of
        their token budget form their own group: a request carries one ``max_tokens``."""
        groups: dict[int, list[int]] = {}
        for index, budget in enumerate(budgets):
            groups.setdefault(budget, []).append(index)
        waits = []
        for budget, indices in groups.items():
            params = {**sampling, "max_tokens": budget}
            shards = _split(indices, len(self.workers))
            for worker, shard in zip(self.workers, shards):
                if shard:
                    waits.append((shard, _submit(worker, [prompts[i] for i in shard], params)))
        out: list[Any] = [None] * len(prompts)
        for shard, wait in waits:
            results = wait()
            if len(results) != len(shard):
                raise RuntimeError(f"a worker returned {len(results)} results for {len(shard)} prompts")
            for index, result in zip(shard, results):
                if len(result.samples) != 1:
                    raise RuntimeError(f"expected 1 sample per prompt, got {len(result.samples)}")
                out[index] = result.samples[0]
        return out

    def policy_version(self) -> int | None:
        """The version every worker serves (``version()``), or None when a worker cannot tell."""
        versions = set()
        for worker in self.workers:
            method = getattr(worker, "version", None)
            if method is None:
                return None
            if hasattr(method, "remote"):
                import ray

                reply = ray.get(method.remote())
            else:
                reply = method()
            versions.add(reply[0] if isinstance(reply, tuple) else reply)
        if len(versions) > 1:
            raise RuntimeError(f"rollout workers serve different policy versions: {sorted(versions)}")
        return versions.pop()


def _submit(worker: Any, prompts: list[list[int]], sampling: dict[str, Any]) -> Callable[[], list[Any]]:
    """Start a generation; the returned function waits for its results."""
    method = getattr(worker, "generate", worker)
    if hasattr(method, "remote"):
        import ray

        ref = method.remote(prompts, sampling)
        return lambda: ray.get(ref)
    results = method(prompts, sampling)
    return lambda: results


def _split(items: list[int], parts: int) -> list[list[int]]:
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for part in range(parts):
        end = start + size + (part < extra)
        out.append(items[start:end])
        start = end
    return out
