"""The step loop every trainer shares: steps, periodic validation, checkpoints and exact resume.

The driver owns the data plan (which rows each rank sees at each step, a pure function of the
step) and the tokenizer; the ranks own the model and optimizer. Resuming restores the ranks'
DeepSpeed state and RNG, and the step: the data position follows from it. A subclass says what
one step is (``train_step``), what validation measures (``validate``) and, optionally, what else
is logged now and then (``periodic``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tooltune.tracking import MetricsLogger
from trainers.checkpoint import CheckpointManager
from trainers.group import LearnerGroup


class StepTrainer:
    desc = "train"

    def __init__(self, group: LearnerGroup, tokenizer, cfg: Any, output_dir: str | Path, logger: MetricsLogger | None, total_steps: int):
        """``cfg`` has ``eval_every``, ``save_every``, ``keep_last``, ``merged`` and ``seed``."""
        self.group, self.tok, self.cfg, self.logger = group, tokenizer, cfg, logger
        self.ckpt = CheckpointManager(Path(output_dir) / "checkpoints", cfg.keep_last)
        self.total_steps = total_steps

    def train_step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        return {}

    def periodic(self, done: int) -> dict[str, float]:
        """Metrics logged after step ``done`` besides training and validation (none by default)."""
        return {}

    # ---- checkpoints --------------------------------------------------------------------
    def save(self, step: int) -> Path:
        staging = self.ckpt.staging(step)
        self.group.all("save_state", str(staging / "state"), {"step": step})
        self.group.all("save_pretrained", str(staging / "model"), self.cfg.merged)
        self.tok.save_pretrained(staging / "model")
        return self.ckpt.commit(step, {"step": step, "total_steps": self.total_steps, "seed": self.cfg.seed})

    def resume(self) -> int:
        """The next step to run: 0, or one past the latest complete checkpoint."""
        latest = self.ckpt.latest()
        if latest is None:
            return 0
        states = self.group.all("load_state", str(latest / "state"))
        return int(states[0]["step"])

    # ---- the loop -----------------------------------------------------------------------
    def fit(self, resume: bool = True, stop_after: int | None = None, on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
        """Train to ``total_steps`` (or stop after ``stop_after`` steps, saving, as a crash test)."""
        from tqdm import tqdm

        start = self.resume() if resume else 0
        if self.logger:
            self.logger.rewind(start)
        history: list[dict] = []
        last = min(self.total_steps, stop_after) if stop_after else self.total_steps
        bar = tqdm(range(start, last), desc=self.desc, initial=start, total=self.total_steps, disable=None)
        t0 = time.time()
        for step in bar:
            metrics = self.train_step(step)
            done = step + 1
            if done % self.cfg.eval_every == 0 or done == self.total_steps:
                metrics |= self.validate()
            metrics |= self.periodic(done)
            metrics["time/elapsed_s"] = time.time() - t0
            history.append({"step": done, **metrics})
            bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
            if self.logger:
                self.logger.log(done, metrics)
            if on_step:
                on_step(done, metrics)
            if done % self.cfg.save_every == 0 or done == last:
                self.save(done)
        return history
