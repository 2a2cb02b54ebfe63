"""What a loss sees: one padded micro-batch and the model's outputs on it, computed on demand.

A batch travels as columns: ``{"input_ids": [[...], ...], "advantages": [[...], ...],
"reward": [...], ...}``. A column whose rows are lists is per token (aligned with ``input_ids``,
nested lists allowed, e.g. a teacher's top-k per token); a column of scalars is per row. The
learner pads per-token columns on the right (with 0) and builds the attention mask; packed rows
(with ``position_ids``) keep their own positions and get no mask (see ``losses.model_inputs``).
"""

from __future__ import annotations

from typing import Any

import torch

Columns = dict[str, list[Any]]


def num_rows(columns: Columns) -> int:
    sizes = {k: len(v) for k, v in columns.items()}
    if "input_ids" not in columns:
        raise ValueError(f"a batch needs an 'input_ids' column; got {sorted(columns)}")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch columns have different numbers of rows: {sizes}")
    return sizes["input_ids"]


def split_rows(columns: Columns, size: int) -> list[Columns]:
    """Consecutive chunks of ``size`` rows (the last may be shorter)."""
    n = num_rows(columns)
    return [{k: v[i : i + size] for k, v in columns.items()} for i in range(0, n, size)]


def pad_columns(columns: Columns, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded tensors: per-token columns [rows, T, ...] (0 past a row's end), per-row ones
    [rows], and ``attention_mask`` (1 on real tokens) unless the rows are packed or bring one."""
    n = num_rows(columns)
    lengths = [len(r) for r in columns["input_ids"]]
    out: dict[str, torch.Tensor] = {}
    for key, rows in columns.items():
        if n and isinstance(rows[0], (list, tuple, torch.Tensor)):
            tensors = [torch.as_tensor(r) for r in rows]
            bad = [i for i, (t, m) in enumerate(zip(tensors, lengths)) if t.shape[0] != m]
            if bad:
                raise ValueError(f"column {key!r}, row {bad[0]}: {tensors[bad[0]].shape[0]} entries for {lengths[bad[0]]} tokens")
            out[key] = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=0)
        else:
            out[key] = torch.as_tensor(rows)
    if "attention_mask" not in out and "position_ids" not in out:
        width = max(lengths, default=0)
        out["attention_mask"] = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {k: v.to(device) for k, v in out.items()}


def max_over_ranks(value: int, device: torch.device | str = "cpu") -> int:
    """The largest ``value`` of any rank of the default process group (a collective)."""
    import torch.distributed as dist

    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def pad_to_common_shape(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pad a padded batch to the largest rows x width of any rank (a collective). Added rows
    hold one attended token (id 0; a row attending to nothing would give NaN) and zeros
    elsewhere, so every mask and loss column is 0 there."""
    rows, width = batch["input_ids"].shape
    device = batch["input_ids"].device
    most_rows, most_width = max_over_ranks(rows, device), max_over_ranks(width, device)
    out = {}
    for key, t in batch.items():
        if t.dim() >= 2 and t.shape[1] == width:
            t = torch.nn.functional.pad(t, [0, 0] * (t.dim() - 2) + [0, most_width - width])
        out[key] = torch.cat([t, t.new_zeros((most_rows - rows, *t.shape[1:]))]) if most_rows > rows else t
    if "attention_mask" in out and most_rows > rows:
        out["attention_mask"][rows:, 0] = 1
    return out


def unpad(values: torch.Tensor, lengths: list[int]) -> list[list[float]]:
    """Per-row lists of the first ``lengths[i]`` entries of row i."""
    return [row[:n].tolist() for row, n in zip(values.float().cpu(), lengths)]


class Forward:
    """One micro-batch through the model, each output computed once and only when a loss asks.

    ``model`` is what the learner runs (a DeepSpeed engine or a module; causal LM, PEFT-wrapped
    or not, or a ``ScalarHeadModel``); ``batch`` the padded tensors of ``pad_columns``.
    """

    def __init__(self, model: Any, batch: dict[str, torch.Tensor], head: str, chunk_tokens: int = 1024):
        self.model, self.batch, self.head, self.chunk_tokens = model, batch, head, chunk_tokens
        self._hidden: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    def inputs(self) -> dict[str, Any]:
        keys = ("input_ids", "attention_mask", "position_ids")
        return {k: self.batch[k] for k in keys if k in self.batch} | {"use_cache": False}

    def hidden(self) -> torch.Tensor:
        """Final hidden states [rows, T, H] (the LM head's input)."""
        from trainers.logprobs import final_hidden_states

        if self.head != "lm":
            raise ValueError(f"hidden states are read from a causal LM head; this learner's head is {self.head!r}")
        if self._hidden is None:
            self._hidden = final_hidden_states(self.model, **self.inputs())
        return self._hidden

    def logprobs(self, temperature: float = 1.0, entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log p(x_t | x_<t) of the given tokens at ``temperature``, for t >= 1: [rows, T-1] fp32,
        and the entropy of each of those distributions (None unless asked). Computed in chunks of
        ``chunk_tokens`` positions: the full-vocabulary fp32 tensor is never built for the batch."""
        from trainers.logprobs import output_embeddings, token_logprobs

        hidden = self.hidden()[:, :-1]
        targets = self.batch["input_ids"][:, 1:]
        return token_logprobs(
            hidden, output_embeddings(self.model), targets,
            temperature=temperature, chunk_tokens=self.chunk_tokens, with_entropy=entropy,
        )

    def values(self) -> torch.Tensor:
        """One scalar per token [rows, T] from a value or reward head."""
        if self.head == "lm":
            raise ValueError("values need a learner with head 'value' or 'reward'; this one is a causal LM")
        if self._values is None:
            self._values = self.model(**self.inputs()).float()
        return self._values

    def last_token_values(self) -> torch.Tensor:
        """The head's value at each row's last real token [rows]: a reward model's score."""
        mask = self.batch.get("attention_mask")
        values = self.values()
        if mask is None:
            return values[:, -1]
        last = mask.sum(dim=1).clamp(min=1) - 1
        return values.gather(1, last[:, None]).squeeze(1)
