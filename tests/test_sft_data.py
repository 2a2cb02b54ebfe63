"""SFT input: malformed rows are reported with file and row, skipped or fatal by the flag."""

import json
import logging

import pytest

from trainers.sft import SFTDataConfig, load_sft_conversations

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]}


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [json.dumps(GOOD), "{not json", json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), json.dumps(GOOD)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_skip_keeps_good_rows_and_reports_bad_ones(data_file, caplog):
    cfg = SFTDataConfig(world=None, train_files=[str(data_file)], on_error="skip")
    with caplog.at_level(logging.WARNING):
        train, val = load_sft_conversations(cfg)
    assert len(train) == 2 and val == []
    assert f"{data_file}:2:" in caplog.text and f"{data_file}:3:" in caplog.text


def test_fail_stops_the_job_with_one_line_naming_file_and_row(data_file, tmp_path, capsys):
    from ray_jobs.sft import main

    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"data:\n  world: null\n  train_files: [{data_file}]\n  on_error: fail\noutput_dir: {tmp_path / 'out'}\n")
    with pytest.raises(SystemExit) as e:
        main(["--config", str(cfg)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{data_file}:2:" in err


def test_lr_schedule_warmup_then_cosine_to_floor():
    # warm-up 2 steps: 1/2, 2/2; then 0.1 + 0.9 * (1 + cos(pi * (s - 2) / 4)) / 2
    from trainers.learner import LearnerConfig, lr_factor

    cfg = LearnerConfig(model="m", schedule="cosine", warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    assert [round(lr_factor(cfg, s), 4) for s in range(7)] == [0.5, 1.0, 1.0, 0.8682, 0.55, 0.2318, 0.1]


def test_evaluation_during_training_needs_a_world_and_whole_weights():
    import pydantic

    from ray_jobs.sft import SFTConfig

    SFTConfig.model_validate({"evaluation": {"during_training_every": 10}})
    with pytest.raises(pydantic.ValidationError, match="needs data.world"):
        SFTConfig.model_validate({"data": {"world": None}, "evaluation": {"during_training_every": 10}})
    with pytest.raises(pydantic.ValidationError, match="zero_stage 0-2"):
        SFTConfig.model_validate({"learner": {"zero_stage": 3}, "evaluation": {"during_training_every": 10}})
