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


def test_conversations_cut_to_seq_len_are_reported_and_none_left_to_train_on_is_an_error(tiny_model_dir, caplog):
    from transformers import AutoTokenizer

    from tooltune.chat import install_tool_template, needs_tool_template
    from tooltune.data import DataError
    from trainers.sft import tokenize_all

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    if needs_tool_template(tok):
        install_tool_template(tok)
    long_question = {"role": "user", "content": "hi " * 200}
    convs = [(GOOD["messages"], None), ([long_question, {"role": "assistant", "content": "Hello!"}], None)]
    with caplog.at_level(logging.WARNING):
        rows = tokenize_all(tok, convs, [], 64)
    assert len(rows) == 2 and all(len(r["input_ids"]) <= 64 for r in rows)
    assert "1 of 2 conversations are longer than seq_len 64 and were cut (1 of them lost every token" in caplog.text
    with pytest.raises(DataError, match="seq_len 8: none of the 2 conversations keeps a token to train on"):
        tokenize_all(tok, convs, [], 8)
