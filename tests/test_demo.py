"""The local demo end to end on the tiny model: base evaluation, SFT, evaluation, before/after."""

import json

import pytest
import yaml


def test_transcript_shows_text_and_calls_one_message_a_line():
    from ray_jobs.demo import transcript

    call = {"id": "c0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    episode = {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": '{"temperature_c": 3}'},
            {"role": "assistant", "content": "It is\n3 C."},
        ]
    }
    assert transcript(episode).splitlines() == [
        "       user: Weather in Oslo?",
        '  assistant: get_weather({"city": "Oslo"})',
        '       tool: {"temperature_c": 3}',
        "  assistant: It is 3 C.",
    ]


@pytest.mark.slow
def test_demo_evaluates_the_base_and_the_trained_model_on_the_same_tasks(tmp_path, capsys):
    from ray_jobs.demo import main
    from tooltune.metrics import metrics_markdown

    out = tmp_path / "demo"
    config = {
        "model": "tiny",
        "tiny": {"single_digits": True},
        "learners": {"num_ranks": 1, "cpus": 1},
        "learner": {"zero_stage": 0, "lr": 3e-3, "micro_batch_size": 4},
        "data": {"world": {"seed": 2, "n_train": 16, "n_validation": 2, "n_test": 8, "distractor_tools": 0}},
        "train": {"seq_len": 512, "max_steps": 2, "eval_every": 100, "save_every": 100},
        "evaluation": {"limit": 5, "loop": {"max_turns": 2, "max_new_tokens": 16, "sampling": {"temperature": 0.0}}},
        "output_dir": str(out),
        "tensorboard": False,
    }
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))
    main(["--config", str(tmp_path / "demo.yaml")])
    printed = capsys.readouterr().out

    before, after = (json.loads((out / d / "metrics.json").read_text()) for d in ("eval_base", "eval"))
    # The base row is the model SFT started from (the tiny model fit to this corpus and config).
    assert before["model_dir"] == json.loads((out / "result.json").read_text())["base_model"]
    ids = [[json.loads(row)["task_id"] for row in (out / d / "episodes.jsonl").read_text().splitlines()] for d in ("eval_base", "eval")]
    assert ids[0] == ids[1] and len(ids[0]) == 5
    assert "held-out tool-world tasks: 5; SFT: 2 steps" in printed
    assert metrics_markdown({"before SFT": before["world"]["test"], "after SFT": after["world"]["test"]}) in printed
    assert "task, before SFT:\n       user: " in printed and "after SFT:\n       user: " in printed

    # Run again in the same directory: with resume on it says plainly that the run finished (one
    # line, exit 2, before any evaluation); with resume=false, as `make demo` runs, the directory's
    # checkpoints and metrics are cleared for a new run (the check the demo makes first).
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(tmp_path / "demo.yaml")])
    assert stop.value.code == 2
    assert "this run already finished (step 2 of 2" in capsys.readouterr().err
    from ray_jobs.sft import SFTConfig, prepare_run_dir
    from tooltune.config import load_config

    again = load_config(tmp_path / "demo.yaml", SFTConfig, ["resume=false"])
    assert prepare_run_dir(again) is None
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
