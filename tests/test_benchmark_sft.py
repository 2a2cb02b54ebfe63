"""The SFT benchmark's bookkeeping: which run may be reused or promoted, and provenance."""

from __future__ import annotations

import json

import pytest

from benchmarks.sft import bench_config, record_tier, run_changes
from tooltune.config import save_config
from tooltune.provenance import config_hash, provenance


def finished(out, cfg, steps=10):
    save_config(cfg, out / "config.yaml")
    (out / "result.json").write_text(json.dumps({"completed_steps": steps, "steps": steps, "history": [], "checkpoint": "x"}))


def test_run_changes_and_promote_refusing_a_trial_that_is_not_the_config(tmp_path):
    out = tmp_path / "trial"
    trial = bench_config("tiny", out, ["learner.lr=0.01"])
    assert run_changes(trial) is None  # nothing there yet
    finished(out, trial)
    assert run_changes(trial) == []
    # Evaluation settings do not change a run.
    assert run_changes(trial.model_copy(update={"evaluation": trial.evaluation.model_copy(update={"limit": 5})})) == []
    assert run_changes(bench_config("tiny", out)) == ["learner.lr (0.01 -> 0.003)"]
    with pytest.raises(SystemExit, match=r"trial tiny/fast differs from configs/tiny/sft.yaml in learner.lr \(0.01 -> 0.003\)"):
        record_tier("tiny", None, {"provenance": {"run_dir": str(out)}}, "fast", reuse=False)
    # An unfinished run is not promoted either.
    (out / "result.json").write_text(json.dumps({"completed_steps": 4, "steps": 10}))
    with pytest.raises(SystemExit, match="no finished run"):
        record_tier("tiny", None, {"provenance": {"run_dir": str(out)}}, "fast", reuse=False)


def test_provenance_names_command_commit_and_config(tmp_path):
    cfg = bench_config("tiny", tmp_path)
    p = provenance(cfg, ["a=1"], tmp_path, {"cpu": "x"})
    assert set(p) == {"command", "git_commit", "git_dirty", "config_hash", "overrides", "run_dir", "machine", "date"}
    assert p["config_hash"] == config_hash(bench_config("tiny", tmp_path)) != config_hash(bench_config("tiny", tmp_path, ["train.seed=1"]))
    assert p["overrides"] == ["a=1"] and p["run_dir"] == str(tmp_path)
    assert p["git_commit"] is None or len(p["git_commit"]) == 40
    assert isinstance(p["git_dirty"], bool) or p["git_dirty"] is None


def test_the_test_split_is_not_scored_twice(tmp_path):
    from benchmarks.sft import score

    sft = bench_config("tiny", tmp_path / "run")
    eval_dir = tmp_path / "run" / "eval_test"
    eval_dir.mkdir(parents=True)
    (eval_dir / "metrics.json").write_text(json.dumps({"config": {"limit": 7}}))
    with pytest.raises(SystemExit, match="already holds a test score of this run"):
        score(sft, "model", "test", None, eval_dir, "x")


def test_repeated_set_flags_all_count():
    from benchmarks.sft import parse_args

    args = parse_args(["--tier", "smol", "--trial", "t", "--set", "a=1", "b=2", "--set", "c=3"])
    assert args.set == ["a=1", "b=2", "c=3"]


def test_a_saved_score_matches_only_its_own_evaluation_config():
    from benchmarks.sft import _same_evaluation
    from ray_jobs.evaluate import EvalConfig
    from tooltune.world_contrast import ContrastSettings

    cfg = EvalConfig(model="m", splits=["test"])
    saved = cfg.model_dump(mode="json")
    del saved["contrast"]  # scored before the evaluation had contrastive pairs
    assert _same_evaluation(saved, cfg)
    # A setting added since counts at its default: asking for pairs is another score.
    assert not _same_evaluation(saved, cfg.model_copy(update={"contrast": ContrastSettings(pairs_per_form=2)}))
    assert not _same_evaluation(saved | {"gone": 1}, cfg)  # a key the evaluation no longer has
