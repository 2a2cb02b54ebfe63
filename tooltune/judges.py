"""The AI judge (RLAIF): the prompt that asks a model to rank candidate answers, and its reply read back.

Candidates are shown under letters in a per-prompt shuffled order (``display_order``); asking a
second time with that order reversed measures position bias (``reversal_agreement``). The judge
replies with one JSON object, ``{"ranking": ["B", "A", "C"], "reason": "..."}``, best first,
every label exactly once: no ties, so a judgement always yields k(k-1)/2 ordered pairs.

Reading a reply never raises: whatever a model writes becomes either ranks per candidate (0 best,
in candidate order, not display order) or an ``InvalidReply`` that the caller counts and skips.
"""

from __future__ import annotations

import enum
import json
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tooltune.chat import normalize_messages

LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

JUDGE_SYSTEM = (
    "You are a careful judge of answers written by an assistant that can call tools. "
    "You compare candidate answers to the same question and rank them."
)

REPLY_FORMAT = '{"ranking": ["<best label>", ..., "<worst label>"], "reason": "<one sentence>"}'


class InvalidReply(str, enum.Enum):
    """Why a judge's reply gave no ranking; ``None`` means it did."""

    NO_JSON = "no_json"
    MALFORMED_JSON = "malformed_json"
    TRUNCATED_JSON = "truncated_json"
    NO_RANKING = "no_ranking"
    WRONG_TYPE = "wrong_type"
    UNKNOWN_CANDIDATE = "unknown_candidate"
    REPEATED_CANDIDATE = "repeated_candidate"
    MISSING_CANDIDATE = "missing_candidate"


@dataclass(frozen=True)
class Judgement:
    """One reply read back: ``ranks[i]`` is candidate i's place (0 best), or ``invalid`` says why not."""

    ranks: list[int] | None
    invalid: InvalidReply | None = None
    reason: str = ""


# ---- the prompt ---------------------------------------------------------------------------------


def display_order(n: int, seed: int, prompt_id: str | int) -> list[int]:
    """Which candidate is shown at each position (``order[p]`` is under label ``LABELS[p]``).

    A shuffle seeded by ``(seed, prompt_id)`` alone, so a rerun or another process shows the same
    prompt the same way (``random.Random`` hashes a string seed with SHA-512, not Python's salted
    ``hash``). The second asking uses ``order[::-1]``: every pair then swaps sides.
    """
    order = list(range(n))
    random.Random(f"{seed}:{prompt_id}").shuffle(order)
    return order


def candidate_text(candidate: str | list[dict[str, Any]]) -> str:
    """A candidate as the judge reads it: text as is, or an episode's messages as a transcript
    (assistant text, each call as ``name {arguments}``, each tool result)."""
    if isinstance(candidate, str):
        return candidate
    lines = []
    for message in normalize_messages(candidate):
        role = message["role"]
        if role == "tool":
            lines.append(f"Tool result: {message['content']}")
            continue
        if message["content"]:
            lines.append(f"{role.capitalize()}: {message['content']}")
        for call in message.get("tool_calls", []):
            fn = call["function"]
            lines.append(f"Tool call: {fn['name']} {json.dumps(fn['arguments'], ensure_ascii=False)}")
    return "\n".join(lines)


def judge_messages(
    tools: list[dict[str, Any]], question: str, candidates: Sequence[str | list[dict[str, Any]]], order: Sequence[int]
) -> list[dict[str, str]]:
    """Chat messages asking a model to rank ``candidates`` shown in ``order``, replying in ``REPLY_FORMAT``.

    The tools are described in the text, not passed to the chat template: the judge reads them,
    it is not offered them to call.
    """
    if sorted(order) != list(range(len(candidates))):
        raise ValueError(f"order {list(order)} is not a permutation of the {len(candidates)} candidates")
    if not 2 <= len(candidates) <= len(LABELS):
        raise ValueError(f"the judge ranks 2 to {len(LABELS)} candidates, got {len(candidates)}")
    labels = LABELS[: len(candidates)]
    if tools:
        tool_lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        parts = [f"Tools the assistant could call, one JSON schema per line:\n{tool_lines}"]
    else:
        parts = ["The assistant had no tools."]
    parts.append(f"Question:\n{question}")
    for label, index in zip(labels, order):
        parts.append(f"[Candidate {label}]\n{candidate_text(candidates[index])}\n[End of candidate {label}]")
    parts.append(
        f"Rank all {len(labels)} candidates from best to worst. A correct final answer matters most; "
        "among correct answers, prefer the one that calls tools only when the question needs them, "
        "with valid arguments and no wasted calls. Ties are not allowed. Reply with only a JSON "
        f"object of this form, listing each of the labels {', '.join(labels)} exactly once, best first:\n"
        + REPLY_FORMAT
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


# ---- the reply ----------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _json_objects(text: str) -> Iterator[tuple[Any, InvalidReply | None]]:
    """Each top-level JSON object in ``text`` (prose, fences and all), or why the one at a ``{`` failed.

    After an object decodes, the search resumes past its end: an object nested inside it is part
    of what the model wrote there, not an answer of its own.
    """
    start = text.find("{")
    while start != -1:
        try:
            value, end = _DECODER.raw_decode(text, start)
        except RecursionError:
            yield None, InvalidReply.MALFORMED_JSON
        except ValueError as e:
            yield None, _failure(e, text)
        else:
            yield value, None
            start = text.find("{", end)
            continue
        start = text.find("{", start + 1)


def _failure(error: ValueError, text: str) -> InvalidReply:
    # A reply cut at the token limit fails where the text ends, or inside a string never closed.
    pos = getattr(error, "pos", None)
    ran_out = pos is not None and pos >= len(text.rstrip())
    if ran_out or str(error).startswith("Unterminated string"):
        return InvalidReply.TRUNCATED_JSON
    return InvalidReply.MALFORMED_JSON


def _label(value: Any) -> str | None:
    # Lenient on spelling a model may vary ("b", "Candidate B"), strict on everything else.
    if not isinstance(value, str):
        return None
    label = value.strip().upper()
    return label.removeprefix("CANDIDATE").strip()


def parse_ranking(reply: str, order: Sequence[int]) -> Judgement:
    """Ranks per candidate from a judge's ``reply`` to a prompt shown in ``order``; never raises on any text.

    The reply's last JSON object with a ``ranking`` key is read (a model that drafts and then
    corrects itself ends with its answer). Its labels map back through ``order``: the candidate
    shown under ``LABELS[p]`` is ``order[p]``, and its rank is its place in the ranking.
    """
    text = reply if isinstance(reply, str) else ""
    found, failures = None, []
    for value, failure in _json_objects(text):
        if failure is not None:
            failures.append(failure)
        elif "ranking" in value:
            found = value
        else:
            failures.append(InvalidReply.NO_RANKING)
    if found is None:
        for reason in (InvalidReply.TRUNCATED_JSON, InvalidReply.NO_RANKING, InvalidReply.MALFORMED_JSON):
            if reason in failures:
                return Judgement(None, reason)
        return Judgement(None, InvalidReply.NO_JSON)
    reason = found.get("reason")
    return _ranks(found["ranking"], order, reason if isinstance(reason, str) else "")


def _ranks(ranking: Any, order: Sequence[int], reason: str) -> Judgement:
    if not isinstance(ranking, list):
        return Judgement(None, InvalidReply.WRONG_TYPE, reason)
    labels = [_label(v) for v in ranking]
    if None in labels:
        return Judgement(None, InvalidReply.WRONG_TYPE, reason)
    shown = list(LABELS[: len(order)])
    if any(label not in shown for label in labels):
        return Judgement(None, InvalidReply.UNKNOWN_CANDIDATE, reason)
    if len(set(labels)) < len(labels):
        return Judgement(None, InvalidReply.REPEATED_CANDIDATE, reason)
    if len(labels) < len(order):
        return Judgement(None, InvalidReply.MISSING_CANDIDATE, reason)
    ranks = [0] * len(order)
    for place, label in enumerate(labels):
        ranks[order[shown.index(label)]] = place
    return Judgement(ranks, None, reason)


def tally_judgements(replies: Sequence[str], orders: Sequence[Sequence[int]]) -> tuple[list[Judgement], Counter[str]]:
    """Each reply read back (aligned with ``replies``), and how many were invalid, by reason."""
    if len(replies) != len(orders):
        raise ValueError(f"{len(replies)} replies for {len(orders)} display orders")
    judgements = [parse_ranking(reply, order) for reply, order in zip(replies, orders)]
    return judgements, Counter(j.invalid.value for j in judgements if j.invalid is not None)


def reversal_agreement(first: Sequence[int], second: Sequence[int]) -> float:
    """Share of candidate pairs that two judgements of one prompt order the same way.

    Given the judgement in the shown order and the one in the reversed order, 1.0 means the
    positions made no difference; a judge that always prefers the first position scores 0.0.
    A pair tied in one and not in the other counts as disagreeing.
    """
    if len(first) != len(second):
        raise ValueError(f"judgements of {len(first)} and {len(second)} candidates")
    pairs = [(i, j) for i in range(len(first)) for j in range(i + 1, len(first))]
    if not pairs:
        raise ValueError("fewer than two candidates: no pairs to compare")

    def sign(x: int) -> int:
        return (x > 0) - (x < 0)

    same = sum(sign(first[i] - first[j]) == sign(second[i] - second[j]) for i, j in pairs)
    return same / len(pairs)
