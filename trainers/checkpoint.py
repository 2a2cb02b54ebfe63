"""Checkpoint directories: written in a staging folder, then renamed into place.

A crash during a save leaves the previous checkpoint intact and the staging folder is
discarded on the next save. Layout of ``root/step-000120/``: ``model/`` (Hugging Face weights,
tokenizer with the tool template), ``state/`` (DeepSpeed shards, per-rank RNG), ``trainer.json``.
Across nodes, ``root`` must be storage every rank can write (NFS, a mounted bucket).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

LATEST = "latest"
TRAINER_STATE = "trainer.json"


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError("keep_last must be at least 1")
        self.root, self.keep_last = Path(root), keep_last

    @staticmethod
    def name(step: int) -> str:
        return f"step-{step:06d}"

    def staging(self, step: int) -> Path:
        path = self.root / f".tmp-{self.name(step)}"
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def commit(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """Seal the staging folder as step ``step``, point ``latest`` at it, prune old ones."""
        staging = self.root / f".tmp-{self.name(step)}"
        (staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        final = self.root / self.name(step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        tmp = self.root / f".{LATEST}.tmp"
        tmp.write_text(final.name)
        os.replace(tmp, self.root / LATEST)
        self._prune()
        return final

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / TRAINER_STATE).exists() else None

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.root.glob("step-*") if (p / TRAINER_STATE).exists())

    def _prune(self) -> None:
        for old in self.checkpoints()[: -self.keep_last]:
            shutil.rmtree(old)

    @staticmethod
    def trainer_state(path: Path) -> dict[str, Any]:
        return json.loads((path / TRAINER_STATE).read_text())
