"""Logit distillation over a learner group: SFT's data plan and step loop, the teacher's top-k as
the target (``trainers.distill.distill_loss``).

Targets come from a provider with ``columns(row)`` (per-token ``t_ids``, ``t_logp``, ``t_tail``
for training example ``row``): a ``tooltune.teacher_targets.TargetStore`` (Parquet scored once),
or ``StreamedTargets`` (the sharded teacher scoring the next steps' rows while the student trains).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from tooltune.teacher_targets import Example, target_columns, target_record
from tooltune.tracking import MetricsLogger
from trainers.distill import distill_loss
from trainers.group import LearnerGroup
from trainers.loop import StepTrainer
from trainers.packing import global_batch_indices, loss_tokens, rank_micro_batches
from trainers.sft import SFTTrainConfig, SFTTrainer


class Targets(Protocol):
    def columns(self, row: int) -> dict[str, Any]: ...


class StreamedTargets:
    """Targets scored online: the sharded teacher works on the rows of steps ``step + 1 ..
    step + ahead`` (object refs in flight, through the object store) while the student trains on
    ``step``; a step's rows are collected when it starts. Held: the steps in flight, not the data set."""

    def __init__(self, teacher, examples: Sequence[Example], rows_of: Callable[[int], list[int]], total_steps: int,
                 ahead: int, micro_batch_size: int, pad_id: int):  # fmt: skip
        self.teacher, self.examples, self.rows_of, self.total = teacher, examples, rows_of, total_steps
        self.ahead, self.micro, self.pad_id = ahead, micro_batch_size, pad_id
        self.pending: dict[int, tuple[list[int], list[list[list[int]]], list[Any]]] = {}
        self.ready: dict[int, dict[str, Any]] = {}

    def _submit(self, step: int) -> None:
        from trainers.teacher import padded_micro_batches

        rows = list(dict.fromkeys(self.rows_of(step)))
        groups, batches = padded_micro_batches([list(self.examples[r]["input_ids"]) for r in rows], self.micro, self.pad_id)
        self.pending[step] = (rows, groups, [self.teacher.submit(b) for b in batches])

    def begin(self, step: int) -> None:
        """Collect ``step``'s targets (scoring them now if they were not sent ahead) and send the
        next ``ahead`` steps' rows to the teacher."""
        import ray

        from trainers.teacher import unpad_scores

        for s in range(step, min(self.total, step + self.ahead + 1)):
            if s not in self.pending:
                self._submit(s)
        rows, groups, refs = self.pending.pop(step)
        scores = unpad_scores(groups, ray.get(refs))
        self.ready = {r: target_columns(target_record(r, self.examples[r], sc), sc["ids"].shape[-1]) for r, sc in zip(rows, scores)}

    def columns(self, row: int) -> dict[str, Any]:
        return self.ready[row]


class DistillTrainer(SFTTrainer):
    desc = "distill"

    def __init__(
        self,
        group: LearnerGroup,
        tokenizer,
        train: list[Example],
        validation: list[Example],
        targets: Targets,
        validation_targets: Targets | None,
        cfg: SFTTrainConfig,
        loss: dict[str, Any],
        output_dir: str | Path,
        logger: MetricsLogger | None = None,
        tool_eval: Callable[[], dict[str, Any]] | None = None,
        tool_eval_every: int | None = None,
    ):
        """``loss``: ``distill_loss``'s keyword arguments (kind, temperature, beta, ce_weight)."""
        self.targets, self.validation_targets = targets, validation_targets
        self.loss = functools.partial(distill_loss, **loss)
        super().__init__(group, tokenizer, train, validation, cfg, output_dir, logger, tool_eval, tool_eval_every)

    def rows_of(self, step: int) -> list[int]:
        return global_batch_indices(len(self.train), self.global_batch, step, self.cfg.seed)

    @staticmethod
    def batch(rows: list[int], examples: Sequence[Example], targets: Targets) -> dict[str, list]:
        """Unpadded per-token columns of ``rows`` (the learner pads them; targets as tensors)."""
        out: dict[str, list] = {"input_ids": [], "loss_mask": [], "t_ids": [], "t_logp": [], "t_tail": []}
        for r in rows:
            out["input_ids"].append(list(examples[r]["input_ids"]))
            out["loss_mask"].append(list(examples[r]["loss_mask"]))
            for key, col in targets.columns(r).items():
                out[key].append(torch.as_tensor(col))
        return out

    def train_step(self, step: int) -> dict[str, float]:
        if isinstance(self.targets, StreamedTargets):
            self.targets.begin(step)
        indices = self.rows_of(step)
        plan = rank_micro_batches(indices, self.world, self.micro, self.accum)
        tokens = loss_tokens([self.train[i] for i in indices])
        per_rank = [([self.batch(mb, self.train, self.targets) for mb in plan[r]], self.loss, tokens) for r in range(self.world)]
        stats = self.group.each("train_step", per_rank)
        return {
            "train/loss": sum(s["distill_sum"] for s in stats) / max(1, tokens),
            "train/top1_agree": sum(s["top1_agree"] for s in stats) / max(1, tokens),
            "train/lr": stats[0]["lr"],
            "train/tokens": tokens,
        }

    def validate(self) -> dict[str, float]:
        """The distillation loss and top-1 agreement over every validation token."""
        if not self.validation or self.validation_targets is None:
            return {}
        per_rank = []
        for r in range(self.world):
            rows = list(range(len(self.validation)))[r :: self.world]
            mbs = [rows[i : i + self.micro] for i in range(0, len(rows), self.micro)]
            per_rank.append(([self.batch(mb, self.validation, self.validation_targets) for mb in mbs], self.loss))
        stats = self.group.each("eval_loss", per_rank)
        tokens = max(1.0, sum(s.get("tokens", 0.0) for s in stats))
        return {
            "validation/loss": sum(s.get("distill_sum", 0.0) for s in stats) / tokens,
            "validation/top1_agree": sum(s.get("top1_agree", 0.0) for s in stats) / tokens,
        }


class OnPolicyDistillTrainer(StepTrainer):
    """On-policy distillation: each step the student samples episodes in the tool loop (its own
    rollout workers, which get the student's weights after every update), the teacher scores the
    student's own tokens, and the loss is the per-token divergence to the teacher's top-k on the
    tokens the student generated (reverse KL by default: the student is pushed off what the
    teacher finds unlikely, where it actually goes). Prompt and tool-result tokens carry no loss.

    ``sample(step)`` returns the step's sequences, their action masks (1 on generated tokens) and
    metrics; ``score(sequences)`` the teacher's scores of every position of each;
    ``sync(version)`` sends the learners' weights to the workers; ``evaluate()`` (optional) the
    workers' tool-world metrics, run every ``eval_every`` steps.
    """

    desc = "distill-on-policy"

    def __init__(
        self,
        group: LearnerGroup,
        tokenizer,
        cfg: SFTTrainConfig,
        total_steps: int,
        sample: Callable[[int], tuple[list[list[int]], list[list[int]], dict[str, float]]],
        score: Callable[[list[list[int]]], list[dict[str, Any]]],
        sync: Callable[[int], Any],
        loss: dict[str, Any],
        output_dir: str | Path,
        logger: MetricsLogger | None = None,
        evaluate: Callable[[], dict[str, float]] | None = None,
    ):
        super().__init__(group, tokenizer, cfg, output_dir, logger, total_steps)
        self.sample, self.score, self.sync, self.evaluate = sample, score, sync, evaluate
        self.loss = functools.partial(distill_loss, **loss)
        lc = group.cfg
        self.micro, self.accum, self.world = lc.micro_batch_size, lc.grad_accum_steps, group.world_size

    def train_step(self, step: int) -> dict[str, float]:
        import time

        t = time.perf_counter()
        ids, masks, metrics = self.sample(step)
        t_rollout = time.perf_counter() - t
        t = time.perf_counter()
        examples = [{"input_ids": i, "loss_mask": m} for i, m in zip(ids, masks, strict=True)]
        scores = self.score(ids)
        targets = _MemoryColumns([target_columns(target_record(r, ex, sc), sc["ids"].shape[-1]) for r, (ex, sc) in enumerate(zip(examples, scores))])
        t_score = time.perf_counter() - t
        t = time.perf_counter()
        tokens = loss_tokens(examples)
        plan = rank_micro_batches(list(range(len(examples))), self.world, self.micro, self.accum)
        per_rank = [([DistillTrainer.batch(mb, examples, targets) for mb in plan[r]], self.loss, tokens) for r in range(self.world)]
        stats = self.group.each("train_step", per_rank)
        t_train = time.perf_counter() - t
        t = time.perf_counter()
        self.sync(step + 1)
        t_sync = time.perf_counter() - t
        return metrics | {
            "train/loss": sum(s["distill_sum"] for s in stats) / max(1, tokens),
            "train/top1_agree": sum(s["top1_agree"] for s in stats) / max(1, tokens),
            "train/lr": stats[0]["lr"],
            "train/tokens": tokens,
            "time/rollout_s": t_rollout, "time/teacher_s": t_score, "time/train_s": t_train, "time/sync_s": t_sync,
        }  # fmt: skip

    def validate(self) -> dict[str, float]:
        return self.evaluate() if self.evaluate else {}

    def resume(self) -> int:
        """The next step, the workers serving the restored student as version ``step``."""
        step = super().resume()
        if step:
            self.sync(step)
        return step


class _MemoryColumns:
    def __init__(self, columns: list[dict[str, Any]]):
        self._columns = columns

    def columns(self, row: int) -> dict[str, Any]:
        return self._columns[row]
