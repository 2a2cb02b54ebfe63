"""Scripted candidates played through the real tool loop: a written answer becomes an episode.

``ScriptedPolicy`` stands where a rollout worker stands and "generates" a fixed list of turn
texts, one per call; everything else is the loop's own work: the parser reads each turn, the
tools run, their results are fed back. So a scripted candidate (``tooltune.contrasts``) is an
``Episode`` exactly like a sampled one, with real tool results in its messages.
"""

from __future__ import annotations

from typing import Any

from rollout.agent_loop import LoopConfig, Trajectory, run_episodes
from rollout.vllm_worker import Generation, PromptResult
from tooltune.chat import TURN_END
from tooltune.episode import Task
from tooltune.tools import ToolRegistry


class ScriptedPolicy:
    """A bare batch ``Generate`` callable that answers its n-th call with ``turns[n]``, tokenized
    and closed with ``<|im_end|>``, for every prompt of the batch (log-probs 0.0, finish "stop").

    Like an engine it stops at the request's ``max_tokens`` (finish "length"); sampling settings
    are otherwise ignored. Asked for more turns than it holds (its last turn was not a final answer),
    it writes an empty turn: the loop scores that a parse failure and the episode does not end in
    a final answer, which the preferences job counts as an incomplete script.
    """

    def __init__(self, turns: list[str], tokenizer: Any):
        self.turns, self.tokenizer, self.calls = list(turns), tokenizer, 0
        self.turn_end = tokenizer.convert_tokens_to_ids(TURN_END)

    def __call__(self, prompts: list[list[int]], sampling: dict[str, Any]) -> list[PromptResult]:
        text = self.turns[self.calls] if self.calls < len(self.turns) else ""
        self.calls += 1
        ids = [*self.tokenizer(text, add_special_tokens=False)["input_ids"], self.turn_end]
        finish, stop_reason = "stop", self.turn_end
        if len(ids) > sampling["max_tokens"]:
            ids, finish, stop_reason = ids[: sampling["max_tokens"]], "length", None
        written = self.tokenizer.decode(ids, skip_special_tokens=True)
        return [
            PromptResult(list(prompt), [Generation(list(ids), [0.0] * len(ids), written, finish, stop_reason)])
            for prompt in prompts
        ]


def run_scripted(
    tasks_and_turns: list[tuple[Task, list[str]]], tokenizer: Any, loop_cfg: LoopConfig, registry: ToolRegistry | None
) -> list[Trajectory]:
    """One episode per ``(task, turns)``, each played by its own ``ScriptedPolicy`` through the
    tool loop under ``loop_cfg`` (one sample per task), in order."""
    loop_cfg = loop_cfg.model_copy(update={"samples_per_task": 1})
    out = []
    for task, turns in tasks_and_turns:
        out += run_episodes([task], ScriptedPolicy(turns, tokenizer), tokenizer, loop_cfg, registry)
    return out
