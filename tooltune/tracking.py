"""The one metrics logger: JSON lines (always) and TensorBoard (when asked for and installed)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, out_dir: str | Path, tensorboard: bool = True):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # the tensorboard package is missing: JSON lines only
                logging.getLogger(__name__).warning("no TensorBoard logs (%s); metrics.jsonl only", e)
            else:
                self._tb = SummaryWriter(str(self.dir / "tensorboard"))

    def rewind(self, step: int) -> None:
        """Drop the lines of steps after ``step`` (a run resumed from ``step`` logs them again),
        so ``metrics.jsonl`` holds one line per step."""
        path = self.dir / "metrics.jsonl"
        self._jsonl.close()
        kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line)["step"] <= step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
        self._jsonl = open(path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def plot_curves(metrics_path: str | Path, out_png: str | Path, keys: list[str], title: str = "") -> list[str]:
    """One panel per key of ``keys`` that ``metrics.jsonl`` holds, its value against the step
    (steps where it was not logged are skipped); returns the keys drawn. Nothing is written when
    none is there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
    drawn = [k for k in keys if series[k]]
    if not drawn:
        return []
    cols = min(3, len(drawn))
    fig, axes = plt.subplots(-(-len(drawn) // cols), cols, figsize=(4.5 * cols, 3.2 * -(-len(drawn) // cols)), squeeze=False)
    for ax, key in zip(axes.flat, drawn):
        steps, values = zip(*series[key])
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(drawn) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return drawn
