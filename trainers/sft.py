"""Supervised fine-tuning over a learner group: data to rows, steps, validation (the step loop,
checkpoints and resume are ``trainers.loop.StepTrainer``'s)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tooltune.chat import tokenize_conversation
from tooltune.config import StrictModel
from tooltune.data import DataError, load_conversations
from tooltune.tracking import MetricsLogger
from tooltune.world import WorldConfig, gold_messages
from trainers.group import LearnerGroup
from trainers.loop import StepTrainer
from trainers.losses import sft_nll
from trainers.packing import (
    Example,
    collate,
    global_batch_indices,
    loss_tokens,
    pack_examples,
    rank_micro_batches,
    steps_per_epoch,
    truncate,
)

log = logging.getLogger(__name__)


class SFTDataConfig(StrictModel):
    """Where conversations come from: the generated tool world, user files, or plain text."""

    world: WorldConfig | None = WorldConfig()
    train_files: list[str] = []
    validation_files: list[str] = []
    format: str = "auto"
    on_error: Literal["skip", "fail"] = "skip"
    text_files: list[str] = []
    limit: int | None = Field(None, ge=1)
    # "all" trains on every token of a conversation (pre-training a base that has never seen
    # the format: far more signal per step, and values repeat across turns, which teaches copying).
    conversation_loss: Literal["assistant", "all"] = "assistant"


class SFTTrainConfig(StrictModel):
    seq_len: int = Field(1024, ge=8)
    pack: bool = False
    max_steps: int | None = Field(None, ge=1)
    epochs: float = Field(1.0, gt=0)
    eval_every: int = Field(50, ge=1)
    save_every: int = Field(100, ge=1)
    keep_last: int = Field(2, ge=1)
    merged: bool = True
    seed: int = 0


Conversation = tuple[list[dict[str, Any]], list[dict[str, Any]]]


def load_sft_conversations(cfg: SFTDataConfig) -> tuple[list[Conversation], list[Conversation]]:
    """(train, validation) conversations as (messages, tools)."""
    from tooltune.world import generate_world, world_registry

    train: list[Conversation] = []
    val: list[Conversation] = []
    if cfg.world is not None:
        registry = world_registry(cfg.world)
        splits = generate_world(cfg.world)
        train += [(gold_messages(t, registry), t.tools) for t in splits["train"]]
        val += [(gold_messages(t, registry), t.tools) for t in splits["validation"]]
    for files, out in ((cfg.train_files, train), (cfg.validation_files, val)):
        for path in files:
            result = load_conversations(path, fmt=cfg.format, on_error=cfg.on_error)
            out += [(c["messages"], c.get("tools") or []) for c in result.conversations]
    if cfg.limit:
        train = train[: cfg.limit]
    return train, val


def load_text(paths: list[str]) -> list[str]:
    """Plain text for pre-training: ``.txt`` (one document per blank-line block) or JSONL ``text``.
    A file that cannot be read, or a bad line, is a ``DataError`` naming the file (and line)."""
    import json

    docs: list[str] = []
    for path in paths:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read: {' '.join(str(e).split())}") from None
        if p.suffix == ".txt":
            docs += [d.strip() for d in text.split("\n\n") if d.strip()]
            continue
        for i, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{i}: expected an object with a string 'text' field")
            docs.append(row["text"])
    return docs


def tokenize_all(
    tokenizer, convs: list[Conversation], texts: list[str], seq_len: int, conversation_loss: str = "assistant"
) -> list[Example]:
    """Assistant-only (or all-token) masks for conversations, every token for plain text (ended by EOS).

    Conversations longer than ``seq_len`` are cut to it, and said so in a warning (with how many
    lost every token they were to be trained on); if none keeps one, that is a ``DataError``
    rather than a run whose loss is 0 at every step."""
    full = [tokenize_conversation(tokenizer, m, t) for m, t in convs]
    rows = [truncate(r, seq_len) for r in full]
    if conversation_loss == "all":
        rows = [{"input_ids": r["input_ids"], "loss_mask": [1] * len(r["input_ids"])} for r in rows]
    cut = sum(len(r["input_ids"]) > seq_len for r in full)
    empty = sum(not any(r["loss_mask"][1:]) for r in rows)
    if rows and empty == len(rows):
        raise DataError(
            f"seq_len {seq_len}: none of the {len(rows)} conversations keeps a token to train on once cut to "
            f"seq_len (longest {max(len(r['input_ids']) for r in full)} tokens); raise train.seq_len"
        )
    if cut:
        log.warning("%d of %d conversations are longer than seq_len %d and were cut (%d of them lost every "
                    "token to train on)", cut, len(rows), seq_len, empty)  # fmt: skip
    for doc in texts:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(truncate({"input_ids": ids, "loss_mask": [1] * len(ids)}, seq_len))
    return rows


def training_rows(examples: list[Example], cfg: SFTTrainConfig) -> list[Example]:
    return pack_examples(examples, cfg.seq_len) if cfg.pack else examples


def planned_steps(num_rows: int, global_batch: int, cfg: SFTTrainConfig) -> int:
    """Optimizer steps of the run: ``max_steps``, or ``epochs`` over the rows."""
    return cfg.max_steps or max(1, int(steps_per_epoch(num_rows, global_batch) * cfg.epochs))


def tool_eval_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The overall numeric metrics of a tool-world evaluation, keyed for the metrics log."""
    return {f"tool_eval/{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class SFTTrainer(StepTrainer):
    desc = "sft"

    def __init__(
        self,
        group: LearnerGroup,
        tokenizer,
        train: list[Example],
        validation: list[Example],
        cfg: SFTTrainConfig,
        output_dir: str | Path,
        logger: MetricsLogger | None = None,
        tool_eval: Callable[[], dict[str, Any]] | None = None,
        tool_eval_every: int | None = None,
    ):
        """``tool_eval`` (every ``tool_eval_every`` steps and at the end) returns the tool-world
        metrics of the model as it is; they are logged as ``tool_eval/<metric>``."""
        self.tool_eval, self.tool_eval_every = tool_eval, tool_eval_every
        self.train, self.validation = train, validation
        lc = group.cfg
        self.micro, self.accum, self.world = lc.micro_batch_size, lc.grad_accum_steps, group.world_size
        self.global_batch = self.micro * self.accum * self.world
        super().__init__(group, tokenizer, cfg, output_dir, logger, planned_steps(len(train), self.global_batch, cfg))

    # ---- one step -----------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        indices = global_batch_indices(len(self.train), self.global_batch, step, self.cfg.seed)
        plan = rank_micro_batches(indices, self.world, self.micro, self.accum)
        tokens = loss_tokens([self.train[i] for i in indices])
        per_rank = [
            ([collate([self.train[i] for i in mb], self.tok.pad_token_id) for mb in plan[r]], sft_nll, tokens)
            for r in range(self.world)
        ]
        stats = self.group.each("train_step", per_rank)
        return {"train/loss": sum(s["nll_sum"] for s in stats) / max(1, tokens), "train/lr": stats[0]["lr"], "train/tokens": tokens}

    def validate(self) -> dict[str, float]:
        """Mean NLL over every validation token; rows dealt round-robin to the ranks."""
        if not self.validation:
            return {}
        per_rank = []
        for r in range(self.world):
            rows = self.validation[r :: self.world]
            per_rank.append(([collate(rows[i : i + self.micro], self.tok.pad_token_id) for i in range(0, len(rows), self.micro)], sft_nll))
        stats = self.group.each("eval_loss", per_rank)
        return {"validation/loss": sum(s.get("nll_sum", 0.0) for s in stats) / max(1, sum(s.get("tokens", 0) for s in stats))}

    def periodic(self, done: int) -> dict[str, float]:
        if self.tool_eval and self.tool_eval_every and (done % self.tool_eval_every == 0 or done == self.total_steps):
            return tool_eval_scalars(self.tool_eval())
        return {}
