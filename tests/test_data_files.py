"""A malformed text or task file is one line naming the file and row, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tooltune.data import DataError
from tooltune.world import WorldConfig, generate_world, load_tasks
from trainers.sft import load_text


@pytest.mark.parametrize(
    "lines, reason",
    [
        (['{"text": "ok"}', "{broken"], r":2: invalid JSON"),
        (['{"text": "ok"}', "", '{"body": "no text"}'], r":3: expected an object with a string 'text' field"),
        (['["a list"]'], r":1: expected an object"),
    ],
)
def test_bad_text_file(tmp_path, lines, reason):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{path}{reason}"):
        load_text([str(path)])
    with pytest.raises(DataError, match=r"missing.txt: cannot read"):
        load_text([str(tmp_path / "missing.txt")])
    good = tmp_path / "good.txt"
    good.write_text("one\n\ntwo\n")
    assert load_text([str(good)]) == ["one", "two"]


def test_bad_task_file(tmp_path):
    rows = [t.to_row() for t in generate_world(WorldConfig(n_train=0, n_validation=0, n_test=3))["test"]]
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"id": "x"}) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:2: not a task row: missing field 'expected_calls'"):
        load_tasks(path)
    path.write_text(json.dumps(rows[0]) + "\nnot json\n")
    with pytest.raises(DataError, match=rf"^{path}:2: not a task row: invalid JSON"):
        load_tasks(path)
    with pytest.raises(DataError, match=r"tasks.csv: expected a .parquet or .jsonl file"):
        load_tasks(tmp_path / "tasks.csv")


def test_the_jobs_print_one_line_and_exit_2(tmp_path):
    """Through the command line: the evaluation job on a broken task directory."""
    (tmp_path / "test.jsonl").write_text("{}\n")
    (tmp_path / "test.parquet").write_bytes(b"not parquet")
    root = Path(__file__).parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "ray_jobs.evaluate", "--config", "configs/tiny/evaluate.yaml", f"world={tmp_path}"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'test.parquet'}: cannot read Parquet")
    assert "Traceback" not in out.stderr
