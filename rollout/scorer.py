"""Rewards for finished trajectories: a reward model's score served by Ray actors, and the rules.

The reward model runs on scorer actors: the ranks of a frozen learner group with the ``reward``
head (``trainers.learner.Learner``, started by the driver, ``ray_jobs.reward_model.start_scorers``,
on its own placement or colocated with other roles). ``RewardScorer`` is the driver's side: it
splits a batch of trajectories over the actors and reads back one score per trajectory, and adds
the rule reward (``tooltune.rewards``), so that a PPO step's reward is

    reward = rm_weight * reward_model_score + rule_weight * rule_reward

with each part kept, to be reported separately. Several actors serve one job: each takes a
contiguous share of the batch (every actor is called, so a ZeRO-3 group's collectives line up).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from rollout.agent_loop import Trajectory
from tooltune.chat import reward_ids
from tooltune.config import StrictModel
from tooltune.rewards import RewardConfig, rule_reward

logger = logging.getLogger(__name__)


class ScorerConfig(StrictModel):
    rm_weight: float = 1.0
    rule_weight: float = 1.0
    rules: RewardConfig = RewardConfig()
    # Sequences per actor call: bounds what one call holds in memory and in the object store.
    max_batch: int = Field(64, ge=1)


@dataclass(frozen=True)
class Score:
    """A trajectory's reward and its parts (``rm`` is None when no reward model is weighted in)."""

    total: float
    rm: float | None
    rule: float
    rule_parts: dict[str, float]


def combine(rm: float | None, rule: float, cfg: ScorerConfig) -> float:
    """The weighted sum of the parts; a part with weight 0 is left out (and may be None)."""
    return (cfg.rm_weight * rm if cfg.rm_weight else 0.0) + (cfg.rule_weight * rule if cfg.rule_weight else 0.0)


def score_summary(scores: list[Score]) -> dict[str, float]:
    """Per-step report: the mean total reward and the mean of each part."""
    if not scores:
        return {}
    n = len(scores)
    out = {"reward/total": sum(s.total for s in scores) / n, "reward/rule": sum(s.rule for s in scores) / n}
    rm = [s.rm for s in scores if s.rm is not None]
    if rm:
        out["reward/rm"] = sum(rm) / len(rm)
    return out


class RewardScorer:
    def __init__(self, actors: list[Any], tokenizer: Any, cfg: ScorerConfig | None = None, independent: bool = False):
        """``actors``: Ray handles of reward-model ranks (``rewards(list of token ids) -> scores``);
        none when ``cfg.rm_weight`` is 0 (rules only). ``tokenizer``: the reward model's.
        ``independent``: each actor scores alone (no collective: ZeRO-0..2 frozen ranks), so the
        share of one that dies is scored again by the others, which serve on without it."""
        self.actors, self.tokenizer, self.cfg = list(actors), tokenizer, cfg or ScorerConfig()
        self.independent, self.lost = independent, 0
        if self.cfg.rm_weight and not self.actors:
            raise ValueError("rm_weight is not 0 but no reward-model actor was given")

    def rm_scores(self, token_ids: list[list[int]]) -> list[float]:
        """The reward model's score of each sequence (``tooltune.chat.reward_ids``), the batch
        split into contiguous shares over the actors, ``max_batch`` sequences per call."""
        out: list[float] = []
        step = self.cfg.max_batch * len(self.actors)
        start = 0
        while start < len(token_ids):
            chunk = token_ids[start : start + step]
            out += self._chunk(chunk)
            start += len(chunk)
            step = self.cfg.max_batch * len(self.actors)
        return out

    def _chunk(self, chunk: list[list[int]]) -> list[float]:
        import ray
        from ray.exceptions import RayActorError

        while True:
            size = -(-len(chunk) // len(self.actors))
            calls = [actor.rewards.remote(chunk[i * size : (i + 1) * size]) for i, actor in enumerate(self.actors)]
            parts: list[Any] = []
            for actor, call in zip(list(self.actors), calls):
                try:
                    parts.append(ray.get(call))
                except RayActorError as e:
                    if not self.independent or len(self.actors) == 1:
                        raise
                    self.actors.remove(actor)
                    self.lost += 1
                    logger.warning("reward scorer lost (%s): its share goes to the %d left", str(e).splitlines()[0][:200], len(self.actors))
                    parts.append(None)
            if all(p is not None for p in parts):
                return [score for part in parts for score in part]
            # Score the chunk again over the actors left (the shares moved).

    def score(self, trajectories: list[Trajectory]) -> list[Score]:
        """One ``Score`` per trajectory, in order. The reward model reads each episode's messages
        rendered as in its training (``reward_ids``), not the sampled ids: a sample whose ids are
        not the tokenizer's own encoding of its text is still scored on the tokens it was trained on."""
        rules = [rule_reward(t.task, t.episode, self.cfg.rules) for t in trajectories]
        rm: list[float | None] = [None] * len(trajectories)
        if self.cfg.rm_weight:
            rm = self.rm_scores([reward_ids(self.tokenizer, t.episode.messages, t.task.tools) for t in trajectories])
        return [Score(combine(m, r.total, self.cfg), m, r.total, dict(r.parts)) for m, r in zip(rm, rules)]
