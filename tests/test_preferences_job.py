"""The preferences job end to end on the tiny tier: policy samples and scripted contrasts through the
real tool loop, ranked by the rules, a real AI judge (the tiny model on a vLLM worker in a local
Ray) and human labels from a file."""

import json

import pytest

from ray_jobs.preferences import PreferencesConfig, main, run_preferences
from tooltune.config import ConfigError, load_config
from tooltune.contrasts import scripted_turns
from tooltune.data import DataError
from tooltune.preferences import ranking_pairs, read_preferences
from tooltune.world import generate_world

CONFIG = "configs/tiny/preferences.yaml"


def config(*overrides: str) -> PreferencesConfig:
    return load_config(CONFIG, PreferencesConfig, list(overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["judges=[rules, human]"], "'human' needs human.path"),
        (["loop.max_total_tokens=4096"], r"loop.max_total_tokens \(4096\) exceeds rollout.max_model_len \(2048\)"),
        (["loop.samples_per_task=2"], "samples_per_prompt sets the number of samples"),
        (["candidates_from=x.parquet"], "'rules' ranks fresh candidates only"),
        (["samples_per_prompt=0", "scripted=[]"], "no candidates"),
        (["judges=[ai]", "samples_per_prompt=23"], "at most 26 candidates: samples_per_prompt \\+ scripted gives 27"),
        (["judges=[rules, rules]"], "each entry at most once"),
        (["scripted=[gold, best]"], "scripted"),
    ],
)
def test_bad_configs_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(*overrides)


@pytest.mark.slow
def test_samples_and_contrasts_ranked_by_the_rules_and_a_real_ai_judge(tmp_path):
    # The tiny model is the policy and the judge: random weights, so every reply of the judge is
    # invalid; each is counted by its code and its prompt skipped, and the job goes on.
    cfg = config(
        f"output_dir={tmp_path}", "limit=4", "samples_per_prompt=2", "world.distractor_tools=0", "judges=[rules, ai]",
        "ai_judge.model=tiny", "ai_judge.max_new_tokens=16", "ai_judge.rollout.max_model_len=2048",
        "ai_judge.rollout.kv_cache_gib=0.25",
    )  # fmt: skip
    summary = run_preferences(cfg)

    tasks = generate_world(cfg.world)["train"][:4]
    records = read_preferences(tmp_path / "rules.parquet")
    assert [r.prompt_id for r in records] == [t.id for t in tasks]
    for task, record in zip(tasks, records):
        applicable = [v for v in cfg.scripted if scripted_turns(task, v) is not None]
        expected = [f"{task.id}/s0", f"{task.id}/s1"] + [f"{task.id}/{v}" for v in applicable]
        assert [c.id for c in record.candidates] == expected
        assert record.judge == "rules" and record.category == task.category and record.tools == task.tools
        assert record.prompt == [{"role": "user", "content": task.query}]
        # A candidate is the episode after the prompt; the gold one is ranked first, on 12 (or 5).
        gold = expected.index(f"{task.id}/gold")
        assert record.candidates[gold].messages[0]["role"] == "assistant"
        assert record.ranks[gold] == 0 and record.reasons[gold].startswith("12: " if task.needs_tool else "5: ")
    assert summary["judges"]["rules"]["pairs"] == sum(len(ranking_pairs(r.ranks)) for r in records) > 0
    assert summary["prompts"] == 4 and summary["candidates"] == sum(len(r.candidates) for r in records)
    assert sum(c["prompts"] for c in summary["categories"].values()) == 4

    ai = summary["judges"]["ai"]
    asked = 4 - ai["skipped_prompts"].get("fewer_than_two_candidates", 0)
    assert asked > 0 and ai["replies"] == 2 * asked
    assert sum(ai["invalid_replies"].values()) == ai["replies"]
    assert ai["skipped_prompts"]["no_valid_reply"] == asked and ai["prompts"] == 0
    assert read_preferences(tmp_path / "ai.parquet") == []
    assert summary["agreement"]["rules vs ai"]["prompts"] == 0
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["judges"] == summary["judges"] and written["provenance"]["config_hash"]
    assert summary["outputs"] == ["rules.parquet", "ai.parquet", "summary.json"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """Scripted candidates only (no engine, no Ray), ranked by the rules."""
    out = tmp_path_factory.mktemp("first")
    run_preferences(config(f"output_dir={out}", "limit=3", "samples_per_prompt=0"))
    return out / "rules.parquet"


def test_human_labels_rank_the_candidates_of_an_earlier_run(first_run, tmp_path):
    records = read_preferences(first_run)
    a, b, c = records
    labels = tmp_path / "labels.jsonl"
    # Best first, ties as a group: a's candidates in reverse order; b's all tied.
    rows = [
        json.dumps({"prompt_id": a.prompt_id, "ranking": [x.id for x in reversed(a.candidates)]}),
        '{"prompt_id": "broken",',
        json.dumps({"prompt_id": "nope", "ranking": ["nope/gold"]}),
        json.dumps({"prompt_id": b.prompt_id, "ranking": [[x.id for x in b.candidates]]}),
    ]
    labels.write_text("\n".join(rows) + "\n")
    overrides = [f"candidates_from={first_run}", "judges=[human]", f"human.path={labels}"]
    summary = run_preferences(config(f"output_dir={tmp_path / 'out'}", *overrides, "human.on_error=skip"))

    human = read_preferences(tmp_path / "out" / "human.parquet")
    assert [r.prompt_id for r in human] == [a.prompt_id, b.prompt_id]
    assert human[0].ranks == list(reversed(range(len(a.candidates)))) and set(human[1].ranks) == {0}
    assert [r.candidates for r in human] == [a.candidates, b.candidates]
    errors = summary["judges"]["human"]["errors"]
    assert errors == [f"{labels}:2: invalid JSON: Expecting property name enclosed in double quotes (column 24)",
                      f"{labels}:3: unknown prompt id 'nope'"]  # fmt: skip
    assert summary["judges"]["human"]["pairs"] == len(a.candidates) * (len(a.candidates) - 1) // 2
    # The earlier file's own ranking is compared with the new judge's, on the prompts both ranked.
    assert summary["agreement"]["human vs source:rules"]["prompts"] == 2

    with pytest.raises(DataError, match=f"^{labels}:2: invalid JSON"):
        run_preferences(config(f"output_dir={tmp_path / 'fail'}", *overrides, "human.on_error=fail"))


def test_a_bad_label_file_stops_the_command_with_one_line(first_run, tmp_path, capsys):
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"prompt_id": "nope", "ranking": ["x"]}\n')
    argv = ["--config", CONFIG, f"output_dir={tmp_path}", "judges=[human]", f"human.path={labels}"]
    argv.append("human.on_error=fail")
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, f"candidates_from={first_run}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {labels}:1: unknown prompt id 'nope'\n"
    missing = tmp_path / "missing.parquet"
    with pytest.raises(SystemExit):
        main([*argv, f"candidates_from={missing}"])
    assert capsys.readouterr().err == f"error: {missing}: candidates_from: no such file\n"
