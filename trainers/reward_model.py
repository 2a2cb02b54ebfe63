"""Reward model training: judged rankings to (chosen, rejected) pairs, a Bradley–Terry step on a
scalar-head learner, held-out pairwise accuracy per category.

Each ranking gives every pair it orders (``tooltune.preferences.ranking_pairs``: k(k-1)/2 without
ties, none between tied candidates). A candidate is scored on its whole episode rendered with the
chat template (tools in the system message, the prompt, then its calls, tool results and final
answer), at its last token before the closing turn end (``tooltune.chat.reward_ids``); the PPO
scorer reads trajectories the same way, from their messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from tooltune.chat import reward_ids
from tooltune.config import StrictModel
from tooltune.preferences import PreferenceRecord, ranking_pairs
from tooltune.tracking import MetricsLogger
from trainers.group import LearnerGroup, per_rank
from trainers.loop import StepTrainer
from trainers.losses import bradley_terry_loss
from trainers.packing import global_batch_indices, rank_micro_batches, steps_per_epoch


class RewardDataConfig(StrictModel):
    """Preference files (``tooltune.preferences.write_preferences``): the training rankings, and
    held-out ones (other prompts) whose pairwise accuracy is logged per category."""

    train_files: list[str] = Field(min_length=1)
    validation_files: list[str] = []
    # A candidate longer than this (tokens) drops its pairs: cutting it would cut the scored end.
    max_length: int = Field(1024, ge=8)
    # "rank_gap": each pair must be won by a margin of (rank of the worse - rank of the better)
    # x ``margin_scale`` (Llama 2's margin loss, on ranks); "none": plain Bradley–Terry.
    margin: Literal["none", "rank_gap"] = "none"
    margin_scale: float = Field(1.0, ge=0)


class RewardTrainConfig(StrictModel):
    max_steps: int | None = Field(None, ge=1)
    epochs: float = Field(1.0, gt=0)
    eval_every: int = Field(50, ge=1)
    save_every: int = Field(100, ge=1)
    keep_last: int = Field(2, ge=1)
    merged: bool = True  # LoRA merged into the saved backbone (a reward model loads without peft)
    seed: int = 0


@dataclass(frozen=True)
class Pair:
    """Two candidates of one prompt as token ids (scored ends), the better one first."""

    prompt_id: str
    category: str
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    margin: float = 0.0
    chosen_id: str = ""  # the candidates' ids
    rejected_id: str = ""


def candidate_ids(tokenizer, record: PreferenceRecord, index: int) -> list[int]:
    """Candidate ``index`` of ``record`` as the reward model reads it (see the module docstring)."""
    return reward_ids(tokenizer, record.prompt + record.candidates[index].messages, record.tools)


def preference_pairs(tokenizer, records: list[PreferenceRecord], cfg: RewardDataConfig) -> tuple[list[Pair], int]:
    """Every ordered pair of every record, and how many pairs were dropped for length."""
    pairs: list[Pair] = []
    dropped = 0
    for record in records:
        ordered = ranking_pairs(record.ranks)
        if not ordered:
            continue
        ids = [tuple(candidate_ids(tokenizer, record, i)) for i in range(len(record.candidates))]
        for better, worse in ordered:
            if max(len(ids[better]), len(ids[worse])) > cfg.max_length:
                dropped += 1
                continue
            margin = (record.ranks[worse] - record.ranks[better]) * cfg.margin_scale if cfg.margin == "rank_gap" else 0.0
            cands = record.candidates
            pairs.append(Pair(record.prompt_id, record.category, ids[better], ids[worse], margin, cands[better].id, cands[worse].id))
    return pairs, dropped


def pairwise_accuracy(pairs: list[Pair], chosen: list[float], rejected: list[float]) -> dict[str, float]:
    """The share of pairs whose better candidate scores strictly higher (a tie is a miss),
    overall (``accuracy``) and per category (``accuracy/<category>``), with the pair counts."""
    if not len(pairs) == len(chosen) == len(rejected):
        raise ValueError(f"{len(pairs)} pairs, {len(chosen)} chosen and {len(rejected)} rejected scores")
    totals: dict[str, list[int]] = {}
    for pair, c, r in zip(pairs, chosen, rejected):
        for key in ("", f"/{pair.category}"):
            hit = totals.setdefault(key, [0, 0])
            hit[0] += c > r
            hit[1] += 1
    out: dict[str, float] = {}
    for key, (hits, n) in sorted(totals.items()):
        out[f"accuracy{key}"] = hits / n
        out[f"pairs{key}"] = float(n)
    return out


def planned_steps(num_pairs: int, pairs_per_step: int, cfg: RewardTrainConfig) -> int:
    """Optimizer steps of the run: ``max_steps``, or ``epochs`` over the pairs."""
    return cfg.max_steps or max(1, int(steps_per_epoch(num_pairs, pairs_per_step) * cfg.epochs))


def score_sequences(group: LearnerGroup, sequences: list[list[int]]) -> list[float]:
    """The reward model's score of each sequence, split over the group's ranks."""
    return per_rank(group, "rewards", sequences)


class RewardModelTrainer(StepTrainer):
    desc = "reward model"

    def __init__(
        self,
        group: LearnerGroup,
        tokenizer,
        train: list[Pair],
        validation: list[Pair],
        cfg: RewardTrainConfig,
        output_dir: str | Path,
        logger: MetricsLogger | None = None,
    ):
        lc = group.cfg
        if lc.head != "reward":
            raise ValueError(f"a reward model trains a learner with head 'reward', got {lc.head!r}")
        if lc.micro_batch_size % 2:
            raise ValueError(f"learner.micro_batch_size must be even (rows are chosen/rejected pairs), got {lc.micro_batch_size}")
        self.train, self.validation = train, validation
        self.micro_pairs, self.accum, self.world = lc.micro_batch_size // 2, lc.grad_accum_steps, group.world_size
        self.pairs_per_step = self.micro_pairs * self.accum * self.world
        super().__init__(group, tokenizer, cfg, output_dir, logger, planned_steps(len(train), self.pairs_per_step, cfg))

    def train_step(self, step: int) -> dict[str, float]:
        indices = global_batch_indices(len(self.train), self.pairs_per_step, step, self.cfg.seed)
        plan = rank_micro_batches(indices, self.world, self.micro_pairs, self.accum)
        per_rank = [([pair_columns([self.train[i] for i in mb]) for mb in plan[r]], bradley_terry_loss, len(indices)) for r in range(self.world)]
        stats = self.group.each("train_step", per_rank)
        n = sum(s["pairs"] for s in stats)
        return {
            "train/loss": sum(s["loss_sum"] for s in stats) / n,
            "train/accuracy": sum(s["correct"] for s in stats) / n,
            "train/lr": stats[0]["lr"],
        }

    def validate(self) -> dict[str, float]:
        """Held-out pairwise accuracy (overall and per category) and mean Bradley–Terry loss
        (margins aside): every distinct held-out candidate scored once."""
        if not self.validation:
            return {}
        return {f"validation/{k}": v for k, v in evaluate_pairs(self.group, self.validation).items()}


def pair_columns(pairs: list[Pair]) -> dict[str, list]:
    """Learner rows for ``pairs``: chosen, rejected, chosen, ... (``bradley_terry_loss``'s layout)."""
    rows = [list(ids) for p in pairs for ids in (p.chosen, p.rejected)]
    columns: dict[str, list] = {"input_ids": rows}
    if any(p.margin for p in pairs):
        columns["margin"] = [p.margin for p in pairs for _ in range(2)]
    return columns


def evaluate_pairs(group: LearnerGroup, pairs: list[Pair]) -> dict[str, float]:
    """``pairwise_accuracy`` of the group's reward model on ``pairs`` and its mean BT loss."""
    import math

    distinct = list(dict.fromkeys(ids for p in pairs for ids in (p.chosen, p.rejected)))
    score = dict(zip(distinct, score_sequences(group, [list(ids) for ids in distinct])))
    chosen, rejected = [score[p.chosen] for p in pairs], [score[p.rejected] for p in pairs]
    loss = sum(math.log1p(math.exp(-(c - r))) if c - r > -30 else r - c for c, r in zip(chosen, rejected)) / len(pairs)
    return pairwise_accuracy(pairs, chosen, rejected) | {"loss": loss}
