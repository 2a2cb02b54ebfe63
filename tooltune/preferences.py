"""Preference data: judged prompts, the pairs a ranking implies, the judges' agreement, and files.

A ``PreferenceRecord`` is one prompt with k candidates (each a whole episode as messages: calls,
tool results, final answer) and a judge's ranking of them as ``ranks``, one per candidate: 0 is
best, a larger number is worse, equal numbers are a tie. Ties are kept: they give no pair to
learn from (``ranking_pairs``) and count as ties in Kendall's tau-b.

Judges that need no model live here: ``rule_ranks`` (the rule reward on the task's ground
truth) and ``load_human_labels`` (a user's file of rankings). Everything is pure and Ray-free;
the job that samples candidates and runs an AI judge builds on it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from pydantic import Field, NonNegativeInt, model_validator

from tooltune.config import StrictModel
from tooltune.data import RowError, usable_rows
from tooltune.episode import Episode, Task
from tooltune.formats import json_field
from tooltune.rewards import RewardConfig, rule_reward


class Candidate(StrictModel):
    """One sampled answer to a prompt: the whole episode after the prompt, as OpenAI messages."""

    id: str
    messages: list[dict[str, Any]]


class PreferenceRecord(StrictModel):
    """One judged prompt. ``prompt`` is the question's messages (system, user); ``reasons`` is
    empty or the judge's reason for each candidate, in candidate order."""

    prompt_id: str
    tools: list[dict[str, Any]]
    prompt: list[dict[str, Any]]
    candidates: list[Candidate]
    ranks: list[NonNegativeInt]
    judge: str
    reasons: list[str] = Field(default_factory=list)
    # The task's category (no_tool, single, parallel, multi_step): held-out accuracy is reported per category.
    category: str = ""

    @model_validator(mode="after")
    def _aligned(self) -> PreferenceRecord:
        if len(self.ranks) != len(self.candidates):
            raise ValueError(f"ranks: {len(self.ranks)} ranks for {len(self.candidates)} candidates")
        if self.reasons and len(self.reasons) != len(self.candidates):
            raise ValueError(f"reasons: {len(self.reasons)} reasons for {len(self.candidates)} candidates")
        ids = [c.id for c in self.candidates]
        if len(set(ids)) != len(ids):
            raise ValueError(f"candidates: ids must be distinct, got {ids}")
        return self


def ranking_pairs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """Every ``(better, worse)`` pair of candidate indices the ranking orders; tied pairs give none."""
    pairs = []
    for i in range(len(ranks)):
        for j in range(i + 1, len(ranks)):
            if ranks[i] < ranks[j]:
                pairs.append((i, j))
            elif ranks[j] < ranks[i]:
                pairs.append((j, i))
    return pairs


def dense_ranks(scores: Sequence[float]) -> list[int]:
    """Ranks for ``scores`` where higher is better: 0 for the best, equal scores tied, no gaps."""
    order = sorted(set(scores), reverse=True)
    return [order.index(s) for s in scores]


def rule_ranks(task: Task, episodes: Sequence[Episode], cfg: RewardConfig | None = None) -> tuple[list[int], list[str]]:
    """The rules judge: candidates ranked by ``rule_reward`` total (equal totals tied), and each
    one's breakdown as its reason, e.g. ``"12: correct_call +10, correct_answer_bonus +2"``."""
    breakdowns = [rule_reward(task, e, cfg) for e in episodes]
    # Totals are sums of a few table values; rounding keeps equal sums reached in another order tied.
    ranks = dense_ranks([round(b.total, 9) for b in breakdowns])
    reasons = [f"{b.total:g}: " + ", ".join(f"{k} {v:+g}" for k, v in b.parts.items()) for b in breakdowns]
    return ranks, reasons


def pairwise_agreement(ranks_a: Sequence[int], ranks_b: Sequence[int]) -> float:
    """The share of candidate pairs ordered the same way by both judges, among the pairs both
    order strictly; NaN when there is no such pair."""
    agree, both = _pair_counts(ranks_a, ranks_b)[:2]
    return agree / both if both else math.nan


def kendall_tau(ranks_a: Sequence[int], ranks_b: Sequence[int]) -> float:
    """Kendall's tau-b of two rankings of the same candidates (ties in either allowed):
    ``(concordant - discordant) / sqrt((n0 - ties_a) (n0 - ties_b))``; NaN when either judge
    ties every candidate (or there are fewer than two)."""
    concordant, both, ties_a, ties_b = _pair_counts(ranks_a, ranks_b)
    discordant = both - concordant
    n0 = len(ranks_a) * (len(ranks_a) - 1) // 2
    denominator = math.sqrt((n0 - ties_a) * (n0 - ties_b))
    return (concordant - discordant) / denominator if denominator else math.nan


def judge_agreement(a: dict[str, list[int]], b: dict[str, list[int]]) -> dict[str, float]:
    """Two judges' agreement over the prompts both ranked: pairwise agreement pooled over all
    pairs, and Kendall's tau-b averaged over the prompts where it is defined."""
    shared = sorted(a.keys() & b.keys())
    agree = both = 0
    taus = []
    for prompt_id in shared:
        agreed, ordered = _pair_counts(a[prompt_id], b[prompt_id])[:2]
        agree, both = agree + agreed, both + ordered
        tau = kendall_tau(a[prompt_id], b[prompt_id])
        if not math.isnan(tau):
            taus.append(tau)
    return {
        "prompts": len(shared),
        "pairs": both,
        "pairwise_agreement": agree / both if both else math.nan,
        "kendall_tau": sum(taus) / len(taus) if taus else math.nan,
    }


def _pair_counts(ranks_a: Sequence[int], ranks_b: Sequence[int]) -> tuple[int, int, int, int]:
    """(pairs both order the same way, pairs both order strictly, pairs tied by a, pairs tied by b)."""
    if len(ranks_a) != len(ranks_b):
        raise ValueError(f"the rankings cover {len(ranks_a)} and {len(ranks_b)} candidates")
    same = both = ties_a = ties_b = 0
    for i in range(len(ranks_a)):
        for j in range(i + 1, len(ranks_a)):
            da, db = ranks_a[i] - ranks_a[j], ranks_b[i] - ranks_b[j]
            ties_a += da == 0
            ties_b += db == 0
            if da and db:
                both += 1
                same += (da > 0) == (db > 0)
    return same, both, ties_a, ties_b


def write_preferences(path: str | Path, records: Sequence[PreferenceRecord]) -> Path:
    """``records`` as one Parquet file, a row per prompt. Messages and tools are JSON strings
    (``candidate_messages`` holds one per candidate): nested chat of varying shape as Arrow
    structs would merge keys across rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def dumps(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    columns = {
        "prompt_id": [r.prompt_id for r in records],
        "category": [r.category for r in records],
        "judge": [r.judge for r in records],
        "tools": [dumps(r.tools) for r in records],
        "prompt": [dumps(r.prompt) for r in records],
        "candidate_ids": [[c.id for c in r.candidates] for r in records],
        "candidate_messages": [[dumps(c.messages) for c in r.candidates] for r in records],
        "ranks": [list(r.ranks) for r in records],
        "reasons": [list(r.reasons) for r in records],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=_parquet_schema()), path)
    return path


def read_preferences(path: str | Path) -> list[PreferenceRecord]:
    """The records ``write_preferences`` wrote, validated again."""
    import pyarrow.parquet as pq

    records = []
    for row in pq.read_table(path).to_pylist():
        candidates = [
            {"id": i, "messages": json.loads(m)} for i, m in zip(row["candidate_ids"], row["candidate_messages"])
        ]
        records.append(
            PreferenceRecord(
                prompt_id=row["prompt_id"], category=row["category"], judge=row["judge"],
                tools=json.loads(row["tools"]), prompt=json.loads(row["prompt"]), candidates=candidates,
                ranks=row["ranks"], reasons=row["reasons"],
            )  # fmt: skip
        )
    return records


def _parquet_schema() -> Any:
    import pyarrow as pa

    strings = pa.list_(pa.string())
    return pa.schema(
        [("prompt_id", pa.string()), ("category", pa.string()), ("judge", pa.string()), ("tools", pa.string()),
         ("prompt", pa.string()), ("candidate_ids", strings), ("candidate_messages", strings),
         ("ranks", pa.list_(pa.int32())), ("reasons", strings)]
    )  # fmt: skip


def load_human_labels(
    path: str | Path, candidates_by_prompt: dict[str, list[str]], on_error: str = "skip"
) -> tuple[dict[str, list[int]], list[RowError]]:
    """Human rankings from ``path`` (JSONL, JSON or Parquet), as ranks aligned with
    ``candidates_by_prompt[prompt_id]``, and the rows that could not be used.

    A row is ``{"prompt_id": "p1", "ranking": [["c2"], ["c0", "c3"], "c1"]}``: the groups best
    first, each a list of tied candidate ids (a bare id is a group of one), so this says c2 is
    best, c0 and c3 tie behind it, c1 is worst. Every candidate of the prompt appears exactly
    once; ``ranking`` may be a JSON string (a Parquet column); other keys are ignored.
    A bad row is ``file:row: reason`` (rows from 1; a JSON line's row is its line number):
    ``on_error="skip"`` uses the rest and returns the errors, ``"fail"`` raises ``DataError``.
    """
    labels: dict[str, list[int]] = {}

    def parse(row: Any, file: str, number: int) -> str:
        prompt_id, ranks = _label_row(row, candidates_by_prompt)
        if prompt_id in labels:
            raise ValueError(f"prompt id {prompt_id!r} is ranked by an earlier row")
        labels[prompt_id] = ranks
        return prompt_id

    _, errors = usable_rows(path, parse, on_error)
    return labels, errors


def _label_row(row: Any, candidates_by_prompt: dict[str, list[str]]) -> tuple[str, list[int]]:
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    for key in ("prompt_id", "ranking"):
        if key not in row:
            raise ValueError(f"missing key {key!r}")
    prompt_id = row["prompt_id"]
    if not isinstance(prompt_id, str):
        raise ValueError(f"'prompt_id' must be a string, got {type(prompt_id).__name__}")
    if prompt_id not in candidates_by_prompt:
        raise ValueError(f"unknown prompt id {prompt_id!r}")
    ids = candidates_by_prompt[prompt_id]
    rank_of: dict[str, int] = {}
    for rank, group in enumerate(json_field(row["ranking"], "ranking", list)):
        group = [group] if isinstance(group, str) else group
        if not isinstance(group, list) or not group or not all(isinstance(c, str) for c in group):
            raise ValueError(f"ranking: group {rank + 1} must be a candidate id or a non-empty list of ids")
        for candidate in group:
            if candidate not in ids:
                raise ValueError(f"ranking: unknown candidate id {candidate!r} for prompt {prompt_id!r}")
            if candidate in rank_of:
                raise ValueError(f"ranking: candidate id {candidate!r} appears twice")
            rank_of[candidate] = rank
    missing = [c for c in ids if c not in rank_of]
    if missing:
        raise ValueError(f"ranking: candidates {missing} of prompt {prompt_id!r} are not ranked")
    return prompt_id, [rank_of[c] for c in ids]
