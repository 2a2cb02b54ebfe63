"""The evaluation job end to end on the tiny model: Ray, a vLLM worker actor, the tool loop, BFCL, reports."""

import json

import pytest

from tooltune.metrics import METRIC_KEYS


@pytest.mark.slow
def test_evaluate_job_writes_every_metric_and_bfcl(tmp_path):
    from ray_jobs.evaluate import EvalConfig, run_evaluation
    from tooltune.config import load_config

    cfg = load_config("configs/tiny/evaluate.yaml", EvalConfig, [f"output_dir={tmp_path}"])
    results = run_evaluation(cfg)

    for name in ("metrics.json", "episodes.jsonl", "report.md", "metrics.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    written = json.loads((tmp_path / "metrics.json").read_text())
    test = written["world"]["test"]
    assert test["n_tasks"] == cfg.world.n_test
    for subset in (test, test["seen"], test["unseen"]):
        assert all(key in subset for key in METRIC_KEYS)
    assert written["policy_version"] == 0

    bfcl = written["bfcl"]
    assert set(bfcl["categories"]) == set(cfg.bfcl.categories)
    assert bfcl["overall"]["total"] == cfg.bfcl.limit_per_category * len(cfg.bfcl.categories)
    rows = [json.loads(line) for line in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert len(rows) == test["n_tasks"] + bfcl["overall"]["total"]
    assert all(row["end_reason"] for row in rows)

    report = (tmp_path / "report.md").read_text()
    assert "call validity" in report and "unseen tools" in report and "irrelevance" in report
    assert results["world"] == written["world"]


def test_evaluate_rejects_several_samples_per_task(tmp_path):
    from ray_jobs.evaluate import EvalConfig
    from tooltune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="samples_per_task"):
        load_config("configs/tiny/evaluate.yaml", EvalConfig, ["loop.samples_per_task=2"])
