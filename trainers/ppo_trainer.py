"""One PPO step over learner groups: old, reference and value passes, advantages, the actor's and
the critic's updates in mini-batches and epochs; checkpoints of both, exact resume.

The samples come from a callable the driver passes (``ray_jobs.ppo`` rolls out and scores: this
package does not import ``rollout``), as plain token lists (``Samples``). So does the weight sync.
Every per-token column sent to a learner is aligned with ``input_ids`` (entry t belongs to token
t; see ``trainers.ppo``): a learner's log-probs (one per token from t = 1) get a 0.0 in front.

With ``max_staleness`` 1, step s trains on the rollout of version s - 1 while the workers roll
out step s + 1 with version s (a driver thread); the sync to s + 1 waits for that rollout to end,
so no episode mixes two versions. The ratio is taken against the learners' log-probs at version s
(as below), so the one version between the sampler and them is not reweighted: the usual
one-step off-policy approximation, fine while a step moves the policy little
(``policy/vllm_logprob_gap`` then holds that step's change besides the engines' precision gap). A
resumed run samples its first step on-policy (the rollout in flight at the checkpoint is not
saved): its metrics then differ from an uninterrupted run's; with ``max_staleness`` 0 they are
the same.

The ratio's denominator, ``old_logprobs``, is the actor learners' own log-prob of each sampled
token before the update, computed once per step, not the log-prob vLLM sampled it with: the two
engines' kernels differ in precision (more so in bf16), and that gap would read as a policy change
in the ratio, in the clip fraction and in the approximate KL. The gap is logged as
``policy/vllm_logprob_gap``. With one on-policy update per step (``fused_old``) that pass is
the training pass itself: its detached log-probs are the denominator, no pass of their own.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from tooltune.config import StrictModel
from tooltune.tracking import MetricsLogger
from trainers.forward import pad_columns
from trainers.group import LearnerGroup, per_rank, shares
from trainers.loop import StepTrainer
from trainers.losses import kl_estimate, loss_units, ppo_policy_loss, value_loss
from trainers.ppo import PPOAlgorithmConfig, compute_advantages, explained_variance, masked_mean, token_values


class PPOTrainConfig(StrictModel):
    steps: int = Field(10, ge=1)
    prompts_per_step: int = Field(8, ge=1)
    ppo_epochs: int = Field(1, ge=1)
    # Each epoch's rows are shuffled and cut into this many actor (and critic) optimizer steps.
    mini_batches: int = Field(1, ge=1)
    # Trajectories may come from a policy this many versions behind the learners. 0: strictly
    # on-policy, rollout then training. 1: the next step's rollout runs while this step trains
    # (one-step off-policy), the weights synced between rollouts.
    max_staleness: int = Field(0, ge=0, le=1)
    eval_every: int = Field(50, ge=1)
    eval_limit: int = Field(50, ge=1)  # validation tasks evaluated
    save_every: int = Field(50, ge=1)
    keep_last: int = Field(2, ge=1)
    merged: bool = True
    seed: int = 0


@dataclass
class Samples:
    """A step's trajectories as the learners need them. ``logprobs`` are the behaviour policy's
    (token-aligned, 0.0 off the mask), ``versions`` the oldest policy version that sampled a token
    of each row, ``group_ids``
    which rows sample the same prompt; ``metrics`` what the driver measured (rewards, calls,
    rollout and scoring times)."""

    token_ids: list[list[int]]
    action_mask: list[list[int]]
    logprobs: list[list[float]]
    rewards: list[float]
    group_ids: list[int]
    versions: list[int | None]
    metrics: dict[str, float] = field(default_factory=dict)


def check_staleness(versions: list[int | None], learner_version: int, max_staleness: int) -> None:
    """Refuse rows sampled by a policy older than ``learner_version - max_staleness`` (or by one
    that is unknown, or newer than the learners: a worker that is ahead means a broken sync)."""
    oldest = learner_version - max_staleness
    bad = [(i, v) for i, v in enumerate(versions) if v is None or not oldest <= v <= learner_version]
    if bad:
        shown = ", ".join(f"row {i}: {v}" for i, v in bad[:5])
        raise ValueError(
            f"{len(bad)} trajectories outside policy versions {oldest}..{learner_version} "
            f"(learners at {learner_version}, max_staleness {max_staleness}): {shown}"
        )


def minibatch_plan(rows: int, mini_batches: int, seed: int, step: int, epoch: int) -> list[list[int]]:
    """Row indices of each mini-batch of one epoch: a permutation that depends only on the seed,
    the step and the epoch (a resumed run replays it), cut into equal parts."""
    order = list(range(rows))
    random.Random(f"ppo-{seed}-{step}-{epoch}").shuffle(order)
    return shares(order, mini_batches)


def token_aligned(per_position: list[list[float]]) -> list[list[float]]:
    """A learner's log-probs (entry t-1 belongs to token t) as a column aligned with the tokens."""
    return [[0.0, *row] for row in per_position]


class PPOTrainer(StepTrainer):
    desc = "ppo"

    def __init__(
        self,
        actor: LearnerGroup,
        reference: LearnerGroup | None,
        critic: LearnerGroup | None,
        tokenizer,
        cfg: PPOTrainConfig,
        algorithm: PPOAlgorithmConfig,
        temperature: float,
        sample: Callable[[int], Samples],
        sync: Callable[[int], dict[str, Any]],
        output_dir: str | Path,
        logger: MetricsLogger | None = None,
        evaluate: Callable[[], dict[str, float]] | None = None,
    ):
        """``reference``: a frozen group, or None for the actor's LoRA base (its adapter disabled);
        ``sample(step)``: the step's scored trajectories from the rollout workers;
        ``sync(version)``: the actor's weights to the workers as ``version``; ``evaluate()``:
        validation metrics of the policy the workers serve."""
        if algorithm.needs_critic != (critic is not None):
            raise ValueError(f"estimator {algorithm.estimator!r} {'needs' if algorithm.needs_critic else 'takes no'} critic")
        super().__init__(actor, tokenizer, cfg, output_dir, logger, cfg.steps)
        self.reference, self.critic, self.algo = reference, critic, algorithm
        self.temperature, self.sample, self.sync, self.evaluate = temperature, sample, sync, evaluate
        # With max_staleness 1: the next step's samples, rolled out while this step trained.
        self._ahead: dict[int, Samples] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._last = cfg.steps  # the last step this fit runs to (fit sets it)
        # One on-policy update per step (one epoch, one mini-batch, nothing stale) and no KL in the
        # reward: the training pass runs on the weights that sampled, so its own log-probs are the
        # ratio's denominator and no pass of their own is needed (TRL's way with one update per
        # generation); the KL to the reference and the engines' gap are read off that pass.
        self.fused_old = (
            cfg.ppo_epochs * cfg.mini_batches == 1 and cfg.max_staleness == 0 and not (algorithm.kl_in_reward and algorithm.kl_coef > 0)
        )

    def fit(self, resume: bool = True, stop_after: int | None = None, on_step=None) -> list[dict]:
        self._last = min(self.total_steps, stop_after) if stop_after else self.total_steps
        try:
            return super().fit(resume=resume, stop_after=stop_after, on_step=on_step)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None

    # ---- one step -----------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        t_step = time.perf_counter()
        samples = self._ahead.pop(step, None) or self.sample(step)
        check_staleness(samples.versions, step, self.cfg.max_staleness)
        ahead = None
        if self.cfg.max_staleness and step + 1 < self._last:
            self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="ppo-rollout")
            ahead = self._pool.submit(self.sample, step + 1)
        try:
            return self._train_on(step, samples, ahead, t_step)
        except BaseException:
            if ahead is not None:
                # Let the rollout in flight end before the caller tears the workers down.
                ahead.cancel()
                wait([ahead])
            raise

    def _train_on(self, step: int, samples: Samples, ahead: Future | None, t_step: float) -> dict[str, float]:
        ids = samples.token_ids

        # Forward passes before the update, timed together as "reference": the actor's own
        # log-probs (the ratio's denominator), the reference's, and the critic's values.
        t = time.perf_counter()
        old = None if self.fused_old else token_aligned(per_rank(self.group, "logprobs", ids, self.temperature))
        if self.reference is not None:
            ref = token_aligned(per_rank(self.reference, "logprobs", ids, self.temperature))
        else:
            ref = token_aligned(per_rank(self.group, "logprobs", ids, self.temperature, True))
        head_values = per_rank(self.critic, "values", ids) if self.critic else None
        reference_s = time.perf_counter() - t

        batch = pad_columns({"input_ids": ids, "action_mask": samples.action_mask, "ref": ref} | ({"old": old} if old is not None else {}))
        mask = batch["action_mask"]
        values = token_values(pad_columns({"input_ids": ids, "v": head_values})["v"]) if head_values else None
        advantages, returns = compute_advantages(
            self.algo, torch.tensor(samples.rewards), mask, old_logp=batch.get("old"), ref_logp=batch["ref"],
            values=values, group_ids=samples.group_ids,
        )
        lengths = [len(row) for row in ids]
        columns = {
            "input_ids": ids, "action_mask": samples.action_mask, "ref_logprobs": ref, "advantages": _unpad(advantages, lengths),
        }  # fmt: skip
        columns |= {"old_logprobs": old} if old is not None else {"behaviour_logprobs": samples.logprobs}
        if head_values:
            columns |= {"returns": _unpad(returns, lengths), "old_values": head_values}

        t = time.perf_counter()
        actor_stats, critic_stats, updates = self.update(columns, step)
        train_s = time.perf_counter() - t

        t = time.perf_counter()
        if ahead is not None:
            self._ahead[step + 1] = ahead.result()
        wait_s = time.perf_counter() - t

        t = time.perf_counter()
        self.sync(step + 1)
        sync_s = time.perf_counter() - t

        tokens = float(mask.sum())
        if old is not None:
            behaviour = pad_columns({"input_ids": ids, "lp": samples.logprobs})["lp"]
            kl_ref = float(masked_mean(kl_estimate(batch["old"], batch["ref"], self.algo.kl_kind), mask))
            gap = float(masked_mean((behaviour - batch["old"]).abs(), mask))
        else:  # the one training pass measured both (on the sampling weights)
            kl_ref, gap = actor_stats["kl_sum"] / actor_stats["tokens"], actor_stats["behaviour_gap_sum"] / actor_stats["tokens"]
        metrics = dict(samples.metrics) | {
            "train/loss": actor_stats["loss_sum"] / updates,
            "policy/kl_ref": kl_ref,
            "policy/entropy": actor_stats["entropy_sum"] / actor_stats["tokens"],
            "policy/clip_fraction": actor_stats["clipped"] / actor_stats["tokens"],
            "policy/approx_kl": actor_stats["approx_kl_sum"] / actor_stats["tokens"],
            "policy/ratio": actor_stats["ratio_sum"] / actor_stats["tokens"],
            "policy/vllm_logprob_gap": gap,
            "policy/advantage": float(masked_mean(advantages, mask)),
            "policy/version": step + 1,
            "policy/staleness": float(step - min(samples.versions)),
            "train/lr": actor_stats["lr"],
            "batch/action_tokens": tokens,
            "time/reference_s": reference_s,
            "time/train_s": train_s,
            "time/sync_s": sync_s,
            # With rollout overlapping training: how long the learners waited for it after the update.
            "time/rollout_wait_s": wait_s,
            "perf/action_tokens_per_s": tokens / (time.perf_counter() - t_step),
        }
        if critic_stats:
            metrics |= {
                "critic/value_loss": critic_stats["value_loss_sum"] / updates,
                "critic/explained_variance": explained_variance(values, returns, mask),
                "critic/value": float(masked_mean(values, mask)),
                "critic/return": float(masked_mean(returns, mask)),
            }
        return metrics

    def update(self, columns: dict[str, list], step: int) -> tuple[dict[str, float], dict[str, float], int]:
        """The actor's (and critic's) optimizer steps of this step: every epoch, every mini-batch,
        each rank its contiguous share of the mini-batch's rows. Each loss is divided by its
        mini-batch's units over all ranks. Returns the stats summed over updates and ranks, with
        ``loss_sum`` and ``value_loss_sum`` already per unit, and the number of updates."""
        actor_loss = partial(ppo_policy_loss, temperature=self.temperature, **self.algo.policy_loss_kwargs())
        critic_loss = partial(value_loss, **self.algo.value_loss_kwargs())
        rows = len(columns["input_ids"])
        actor_totals: dict[str, float] = {}
        critic_totals: dict[str, float] = {}
        updates = 0
        for epoch in range(self.cfg.ppo_epochs):
            for indices in minibatch_plan(rows, self.cfg.mini_batches, self.cfg.seed, step, epoch):
                part = {k: [v[i] for i in indices] for k, v in columns.items()}
                mask = pad_columns({"input_ids": part["input_ids"], "m": part["action_mask"]})["m"]
                units = loss_units(mask, self.algo.loss_agg)
                _add(actor_totals, self._train(self.group, part, actor_loss, units), units, "loss_sum")
                if self.critic:
                    _add(critic_totals, self._train(self.critic, part, critic_loss, units), units, "value_loss_sum")
                updates += 1
        return actor_totals, critic_totals, updates

    @staticmethod
    def _train(group: LearnerGroup, part: dict[str, list], loss: Callable, units: float) -> list[dict[str, float]]:
        ranks = [dict(zip(part, cols)) for cols in zip(*(shares(v, group.world_size) for v in part.values()))]
        return group.each("train_step", [(r, loss, units) for r in ranks])

    def validate(self) -> dict[str, float]:
        return self.evaluate() if self.evaluate else {}

    # ---- checkpoints: the actor as the model, the critic beside it --------------------------
    def save(self, step: int) -> Path:
        staging = self.ckpt.staging(step)
        self.group.all("save_state", str(staging / "state"), {"step": step})
        self.group.all("save_pretrained", str(staging / "model"), self.cfg.merged)
        self.tok.save_pretrained(staging / "model")
        if self.critic:
            self.critic.all("save_state", str(staging / "critic_state"), {"step": step})
            self.critic.all("save_pretrained", str(staging / "critic"), True)
        state = {"step": step, "total_steps": self.total_steps, "seed": self.cfg.seed, "policy_version": step}
        return self.ckpt.commit(step, state)

    def resume(self) -> int:
        """The next step, with the actor and critic restored and the workers serving the actor's
        weights as version ``step`` (a fresh worker holds the starting checkpoint, version 0)."""
        latest = self.ckpt.latest()
        if latest is None:
            return 0
        step = int(self.group.all("load_state", str(latest / "state"))[0]["step"])
        if self.critic:
            self.critic.all("load_state", str(latest / "critic_state"))
        self.sync(step)
        return step


def _unpad(padded: torch.Tensor, lengths: list[int]) -> list[list[float]]:
    return [row[:n].tolist() for row, n in zip(padded.float(), lengths)]


def _add(totals: dict[str, float], stats: list[dict[str, float]], units: float, loss_key: str) -> None:
    """Sum the ranks' stats into ``totals``; the loss as its mean per unit of the mini-batch."""
    for rank in stats:
        for k, v in rank.items():
            if k == "lr":
                totals[k] = v
            else:
                totals[k] = totals.get(k, 0.0) + (v / max(1.0, units) if k == loss_key else v)
