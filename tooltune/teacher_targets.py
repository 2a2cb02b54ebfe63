"""A teacher's top-k targets on disk: sharded Parquet, written once and reused across student runs.

The training examples (token ids with a loss mask) are cut into shards of ``rows_per_shard``
consecutive examples. A shard holds, per example, its index and token ids and, at every position
that carries loss (token t, t >= 1, ``loss_mask[t] == 1``), the teacher's top-k ids and log-probs
for token t and the log of the mass outside them:

    row int64 | input_ids list<int32> | positions list<int32>
    | topk_ids list<list<int32>> | topk_logp list<list<float32>> | tail_logp list<float32>

The file's metadata records the teacher, k, the temperature and a fingerprint of the shard's
examples: a directory scored for other data or another teacher is refused, never mixed in.
A shard is written to a temporary name of its own, flushed to disk and renamed when complete, so
a job killed mid-shard leaves no file a reader would take for a shard; a restart skips complete
shards (after checking their metadata) and scores the rest. No Ray here: the scoring driver is ``ray_jobs/distill.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tooltune.data import DataError

Example = dict[str, list[int]]
META_KEY = b"tooltune.teacher_targets"
STALE_TMP_S = 3600.0
# Rows per Parquet row group: a reader decodes one group for a row, not the whole shard (a step's
# rows are drawn at random from the whole data set).
ROW_GROUP = 64
CACHED_GROUPS = 256


def shard_name(index: int, total: int) -> str:
    return f"shard-{index:05d}-of-{total:05d}.parquet"


def fingerprint(examples: Sequence[Example]) -> str:
    """A hash of the examples' token ids and loss masks, in order."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(np.asarray(ex["input_ids"], dtype=np.int64).tobytes())
        h.update(b"|")
        h.update(np.asarray(ex["loss_mask"], dtype=np.int8).tobytes())
        h.update(b";")
    return h.hexdigest()


def checkpoint_digest(model_dir: str | Path) -> str:
    """A hash of a checkpoint's config and weight files (the teacher's identity in the shards)."""
    root = Path(model_dir)
    h = hashlib.sha256()
    files = sorted(p for p in root.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    if not files:
        raise DataError(f"{root}: no config.json or weight files: not a checkpoint")
    for path in files:
        h.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def loss_positions(example: Example) -> list[int]:
    """Positions t >= 1 whose token carries loss: the teacher's target for t is read at t - 1."""
    return [t for t in range(1, len(example["input_ids"])) if example["loss_mask"][t]]


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("row", pa.int64()),
            ("input_ids", pa.list_(pa.int32())),
            ("positions", pa.list_(pa.int32())),
            ("topk_ids", pa.list_(pa.list_(pa.int32()))),
            ("topk_logp", pa.list_(pa.list_(pa.float32()))),
            ("tail_logp", pa.list_(pa.float32())),
        ]
    )


def write_shard(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Write one complete shard atomically (temporary file, then rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema().with_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    columns = {name: [r[name] for r in rows] for name in schema.names}
    table = pa.Table.from_pydict(columns, schema=schema)
    # A name of its own: two jobs scoring into one directory never write the same temporary file.
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())  # on disk before it gets the name readers trust
    os.replace(tmp, path)


def shard_meta(path: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    try:
        raw = pq.read_schema(path).metadata or {}
        return json.loads(raw[META_KEY])
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}: not a teacher-targets shard ({e})") from None


class TargetWriter:
    """Scores the shards a directory does not hold yet. ``score(examples)`` returns, per example,
    ``ids`` [L, k], ``logp`` [L, k], ``tail_logp`` [L] for its L positions (position p scores token p + 1)."""

    def __init__(self, out_dir: str | Path, examples: Sequence[Example], rows_per_shard: int, teacher: dict[str, Any]):
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.dir = Path(out_dir)
        self.examples, self.rows_per_shard, self.teacher = examples, rows_per_shard, teacher
        self.total = max(1, -(-len(examples) // rows_per_shard))

    def bounds(self, index: int) -> tuple[int, int]:
        return index * self.rows_per_shard, min(len(self.examples), (index + 1) * self.rows_per_shard)

    def meta(self, index: int) -> dict[str, Any]:
        start, end = self.bounds(index)
        return {"teacher": self.teacher, "shard": index, "shards": self.total, "rows": [start, end],
                "fingerprint": fingerprint(self.examples[start:end])}  # fmt: skip

    def done(self) -> list[int]:
        """Shards already complete here, checked against what this writer would write."""
        finished = []
        for index in range(self.total):
            path = self.dir / shard_name(index, self.total)
            if not path.exists():
                continue
            have, want = shard_meta(path), self.meta(index)
            if have != want:
                diff = sorted(k for k in want if have.get(k) != want.get(k))
                raise DataError(
                    f"{path}: scored with another teacher or other data (differs in {', '.join(diff)}); "
                    "use another directory for these targets"
                )
            finished.append(index)
        return finished

    def complete(self) -> bool:
        """Every shard is here (and checks out)."""
        return len(self.done()) == self.total

    def run(self, score: Callable[[list[Example]], list[dict[str, np.ndarray]]], stop_after: int | None = None) -> dict[str, list[int]]:
        """Score and write every shard not done yet, in order; ``stop_after`` shards at most this
        call. Temporary files older than ``STALE_TMP_S`` (a shard cut off mid-write; one in
        progress elsewhere is younger) are removed first; readers never look at them anyway."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob("*.tmp"):
            if time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink(missing_ok=True)
        skipped = self.done()
        written: list[int] = []
        for index in range(self.total):
            if index in skipped:
                continue
            if stop_after is not None and len(written) >= stop_after:
                break
            start, end = self.bounds(index)
            examples = self.examples[start:end]
            scores = score(list(examples))
            rows = [target_record(start + i, ex, sc) for i, (ex, sc) in enumerate(zip(examples, scores, strict=True))]
            write_shard(self.dir / shard_name(index, self.total), rows, self.meta(index))
            written.append(index)
        return {"skipped": skipped, "written": written}


def target_record(row: int, example: Example, scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """One example's stored record from the teacher's scores of all its positions (position p
    scores token p + 1): the top-k of each loss position t, read at t - 1."""
    pos = loss_positions(example)
    at = [p - 1 for p in pos]
    return {
        "row": row, "input_ids": list(example["input_ids"]), "positions": pos,
        "topk_ids": np.asarray(scores["ids"])[at].tolist(), "topk_logp": np.asarray(scores["logp"])[at].tolist(),
        "tail_logp": np.asarray(scores["tail_logp"])[at].tolist(),
    }  # fmt: skip


class TargetStore:
    """Reads the targets of a complete directory, row group by row group as examples are asked for."""

    def __init__(self, directory: str | Path, examples: Sequence[Example], rows_per_shard: int, teacher: dict[str, Any]):
        self.writer = TargetWriter(directory, examples, rows_per_shard, teacher)
        missing = sorted(set(range(self.writer.total)) - set(self.writer.done()))
        if missing:
            raise DataError(f"{directory}: {len(missing)} of {self.writer.total} shards not scored yet (first: {missing[0]})")
        self._cache: dict[tuple[int, int], list[dict[str, Any]]] = {}
        self._files: dict[int, Any] = {}

    def _group(self, row: int) -> list[dict[str, Any]]:
        """The decoded row group that holds example ``row`` (the last ``CACHED_GROUPS`` kept)."""
        import pyarrow.parquet as pq

        shard, offset = divmod(row, self.writer.rows_per_shard)
        key = (shard, offset // ROW_GROUP)
        if key not in self._cache:
            if len(self._cache) >= CACHED_GROUPS:
                self._cache.pop(next(iter(self._cache)))
            if shard not in self._files:
                self._files[shard] = pq.ParquetFile(self.writer.dir / shard_name(shard, self.writer.total))
            self._cache[key] = self._files[shard].read_row_group(key[1]).to_pylist()
        return self._cache[key]

    def columns(self, row: int) -> dict[str, np.ndarray]:
        """Per-token columns for example ``row``, aligned with its input_ids (zeros where no loss):
        ``t_ids`` [T, k], ``t_logp`` [T, k], ``t_tail`` [T]."""
        rec = self._group(row)[(row % self.writer.rows_per_shard) % ROW_GROUP]
        if rec["row"] != row:
            raise DataError(f"{self.writer.dir}: shard {row // self.writer.rows_per_shard} holds row {rec['row']} where row {row} belongs")
        return target_columns(rec, self.writer.teacher["k"])


def target_columns(rec: dict[str, Any], k: int) -> dict[str, np.ndarray]:
    """A stored record (``positions``, ``topk_*``, ``tail_logp``) as per-token arrays over its
    input_ids: ``t_ids`` int64 [T, k], ``t_logp`` float32 [T, k], ``t_tail`` float32 [T], zeros
    at positions without loss (every row [T, k], also one with no loss token: rows are padded together)."""
    n, pos = len(rec["input_ids"]), np.asarray(rec["positions"], dtype=np.int64)
    ids, logp, tail = np.zeros((n, k), np.int64), np.zeros((n, k), np.float32), np.zeros(n, np.float32)
    if len(pos):
        ids[pos] = np.asarray(rec["topk_ids"], dtype=np.int64)
        logp[pos] = np.asarray(rec["topk_logp"], dtype=np.float32)
        tail[pos] = np.asarray(rec["tail_logp"], dtype=np.float32)
    return {"t_ids": ids, "t_logp": logp, "t_tail": tail}
