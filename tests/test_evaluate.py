"""The evaluation job end to end on the tiny model: Ray, a vLLM worker actor, the tool loop, BFCL, reports."""

import json
from pathlib import Path

import pytest

from tooltune.episode import Episode
from tooltune.metrics import METRIC_KEYS


@pytest.mark.slow
def test_evaluate_job_writes_every_metric_and_bfcl(tmp_path):
    from ray_jobs.evaluate import EvalConfig, run_evaluation
    from tooltune.config import load_config

    # The user's own eval file too, with one bad row (skipped and reported, file and row).
    mine = tmp_path / "mine.jsonl"
    mine.write_text(Path("configs/examples/eval_tasks.jsonl").read_text() + '{"messages": []}\n')
    overrides = [f"output_dir={tmp_path}", f"files=[{mine}]", "files_on_error=skip", "contrast.pairs_per_form=1"]
    cfg = load_config("configs/tiny/evaluate.yaml", EvalConfig, overrides)
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
    own = written["world"]["file:mine.jsonl"]
    assert own["n_tasks"] == 5 and all(key in own for key in METRIC_KEYS)
    assert written["data_errors"] == [f"{mine}:6: no messages"]
    # The contrastive pairs: one per trivial phrasing, each half an episode of its own.
    from tooltune.world_queries import TRIVIAL_FORMS

    contrast = written["contrast"]
    assert contrast["pairs"] == len(TRIVIAL_FORMS)
    assert all(0 <= contrast[k] <= 1 for k in ("contrastive_trivial_direct", "contrastive_large_called"))
    rows = [json.loads(line) for line in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    halves = [row for row in rows if row["source"] == "contrast"]
    assert len(halves) == 2 * contrast["pairs"]
    direct = sum(not Episode.from_dict(row).attempted_call for row in halves if row["task_id"].endswith("trivial"))
    assert contrast["contrastive_trivial_direct"] == direct / contrast["pairs"]
    assert len(rows) == test["n_tasks"] + own["n_tasks"] + bfcl["overall"]["total"] + len(halves)
    assert {row["task_id"] for row in rows if row["source"] == "file:mine.jsonl"} == {"stock-1", "stock-2", "flight-1", "flight-2", "no-tool-1"}
    assert all(row["end_reason"] for row in rows)

    report = (tmp_path / "report.md").read_text()
    assert "Contrastive arithmetic" in report
    assert "call validity" in report and "unseen tools" in report and "irrelevance" in report and "schema violations" in report
    assert results["world"] == written["world"]


def test_evaluate_rejects_several_samples_per_task(tmp_path):
    from ray_jobs.evaluate import EvalConfig
    from tooltune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="samples_per_task"):
        load_config("configs/tiny/evaluate.yaml", EvalConfig, ["loop.samples_per_task=2"])


def test_a_loop_longer_than_the_engines_context_is_a_config_error():
    from ray_jobs.evaluate import EvalConfig
    from ray_jobs.sft import SFTConfig
    from tooltune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"loop.max_total_tokens \(4096\) exceeds rollout.max_model_len \(2048\)"):
        load_config("configs/tiny/evaluate.yaml", EvalConfig, ["loop.max_total_tokens=4096"])
    # The SFT job checks its final evaluation when the config is read, not after training.
    with pytest.raises(ConfigError, match=r"evaluation.loop.max_total_tokens \(4096\) exceeds evaluation.max_model_len \(2048\)"):
        load_config("configs/tiny/sft.yaml", SFTConfig, ["evaluation.loop.max_total_tokens=4096"])
    assert load_config("configs/tiny/sft.yaml", SFTConfig, ["evaluation.loop.max_total_tokens=4096", "evaluation.max_model_len=4096"])
