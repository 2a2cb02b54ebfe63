"""Turning tokenized examples into the exact micro-batches each rank sees at each step.

Pure functions: the same (seed, step) always yields the same rows on the same rank, which is
what makes a resumed run equal an uninterrupted one, and N ranks with batch B equal one rank
with batch N*B (the global batch at a step is the same set of rows).
"""

from __future__ import annotations

import numpy as np

Example = dict[str, list[int]]


def truncate(example: Example, seq_len: int) -> Example:
    return {k: v[:seq_len] for k, v in example.items()}


def pack_examples(examples: list[Example], seq_len: int) -> list[Example]:
    """Concatenate consecutive examples into rows of at most ``seq_len`` tokens (order kept).

    Examples longer than ``seq_len`` are truncated. Each row carries ``position_ids`` that restart
    at 0 with every example: the learner gives them to the model without a padding mask, and
    transformers turns the restarts into a block-diagonal causal mask (sdpa, eager) or varlen
    flash attention, so an example attends only to itself, at the positions it has unpacked.
    The first token of every example after the first has ``loss_mask`` 0: its target would be
    predicted from the previous example's last token (unpacked, position 0 is never a target).
    """
    rows: list[Example] = []
    cur: Example = _empty_row()
    for ex in examples:
        ex = truncate(ex, seq_len)
        if cur["input_ids"] and len(cur["input_ids"]) + len(ex["input_ids"]) > seq_len:
            rows.append(cur)
            cur = _empty_row()
        n = len(ex["input_ids"])
        loss_mask = ([0] + ex["loss_mask"][1:]) if cur["input_ids"] and n else ex["loss_mask"]
        cur["input_ids"] = cur["input_ids"] + ex["input_ids"]
        cur["loss_mask"] = cur["loss_mask"] + loss_mask
        cur["position_ids"] = cur["position_ids"] + list(range(n))
    if cur["input_ids"]:
        rows.append(cur)
    return rows


def _empty_row() -> Example:
    return {"input_ids": [], "loss_mask": [], "position_ids": []}


def collate(rows: list[Example], pad_id: int) -> dict[str, list[list[int]]]:
    """Right-pad to the longest row: pads come after every real token, so causal attention and
    the loss never see them.

    Packed rows (with ``position_ids``) also get padded ``position_ids``: the pads count 0, 1, ...
    so they form a document of their own, which no real token attends to. Unpacked rows get no
    ``position_ids`` key, so their batches are exactly what they were before packing had one.
    """
    width = max(len(r["input_ids"]) for r in rows)
    packed = any("position_ids" in r for r in rows)
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "loss_mask": []}
    if packed:
        out["position_ids"] = []
    for r in rows:
        n = len(r["input_ids"])
        pad = width - n
        out["input_ids"].append(r["input_ids"] + [pad_id] * pad)
        out["attention_mask"].append([1] * n + [0] * pad)
        out["loss_mask"].append(r["loss_mask"] + [0] * pad)
        if packed:
            out["position_ids"].append(r.get("position_ids", list(range(n))) + list(range(pad)))
    return out


def steps_per_epoch(num_rows: int, global_batch: int) -> int:
    if num_rows < global_batch:
        raise ValueError(f"{num_rows} training rows cannot fill one global batch of {global_batch}")
    return num_rows // global_batch


def global_batch_indices(num_rows: int, global_batch: int, step: int, seed: int) -> list[int]:
    """Row indices of optimizer step ``step`` (0-based): a fresh seeded permutation per epoch."""
    per_epoch = steps_per_epoch(num_rows, global_batch)
    epoch, offset = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_rows)
    return perm[offset * global_batch : (offset + 1) * global_batch].tolist()


def rank_micro_batches(indices: list[int], world_size: int, micro_batch: int, accum: int) -> list[list[list[int]]]:
    """Split a global batch: rank r gets a contiguous slice, cut into ``accum`` micro-batches."""
    if len(indices) != world_size * micro_batch * accum:
        raise ValueError(f"global batch {len(indices)} != {world_size} ranks x {micro_batch} x {accum}")
    per_rank = micro_batch * accum
    return [
        [indices[r * per_rank + a * micro_batch : r * per_rank + (a + 1) * micro_batch] for a in range(accum)]
        for r in range(world_size)
    ]


def loss_tokens(rows: list[Example]) -> int:
    """Tokens that carry loss (targets are positions 1..n-1; packed rows already mask the first
    token of each later document, see ``pack_examples``)."""
    return sum(sum(r["loss_mask"][1:]) for r in rows)
