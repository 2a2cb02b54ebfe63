"""The distillation job on real parts: a 2-stage sharded teacher (Ray actors), Parquet targets,
LoRA students on DeepSpeed learners; resumable scoring, streamed = stored targets, exact resume."""

from __future__ import annotations

import json
import os
import time

import pyarrow.parquet as pq
import pytest

from ray_jobs.distill import DistillConfig, make_teacher, run_distill, score_targets, teacher_identity
from tooltune.data import DataError

WORLD = {"n_train": 20, "n_validation": 4, "n_test": 4, "distractor_tools": 0, "unseen_test_fraction": 0.0}


def config(tmp_path, teacher: str, name: str, **over) -> DistillConfig:
    raw = {
        "teacher": {"model": teacher, "stages": 2, "cpus_per_stage": 0.25, "k": 8, "micro_batch_size": 3, "max_in_flight": 2},
        "targets": {"rows_per_shard": 6, "dir": str(tmp_path / "targets")},
        "student": {"keep_layers": [0]},
        "learners": {"num_ranks": 2, "cpus": 0.25},
        "learner": {"zero_stage": 2, "lr": 5e-3, "micro_batch_size": 2, "lora": {"r": 4, "alpha": 8}},
        # Every token carries loss: the tool schemas alone outgrow a short window on this tokenizer.
        "data": {"world": WORLD, "conversation_loss": "all"},
        "train": {"seq_len": 128, "max_steps": 4, "eval_every": 2, "save_every": 2},
        "output_dir": str(tmp_path / name),
        "tensorboard": False,
    }
    for key, value in over.items():
        raw[key] = raw.get(key, {}) | value if isinstance(value, dict) else value
    return DistillConfig.model_validate(raw)


def _examples(cfg):
    from transformers import AutoTokenizer

    from trainers.sft import load_sft_conversations, tokenize_all

    tok = AutoTokenizer.from_pretrained(cfg.teacher.model)
    train, _ = load_sft_conversations(cfg.data)
    return tok, tokenize_all(tok, train, [], cfg.train.seq_len, cfg.data.conversation_loss)


@pytest.mark.slow
def test_parquet_scoring_cut_off_and_restarted_writes_the_same_shards_and_skips_the_finished(tmp_path, tiny_model_dir):
    from cluster.local import local_ray

    cfg = config(tmp_path, tiny_model_dir, "unused")
    tok, examples = _examples(cfg)
    identity = teacher_identity(cfg)
    whole = cfg.model_copy(update={"targets": cfg.targets.model_copy(update={"dir": str(tmp_path / "whole")})})
    cut = cfg.model_copy(update={"targets": cfg.targets.model_copy(update={"dir": str(tmp_path / "cut")})})
    with local_ray():
        teacher = make_teacher(cfg)
        try:
            assert score_targets(whole, teacher, examples, "train", tok.pad_token_id, identity) == {"skipped": [], "written": [0, 1, 2, 3]}
            assert score_targets(cut, teacher, examples, "train", tok.pad_token_id, identity, stop_after=2) == {"skipped": [], "written": [0, 1]}
            # A shard cut off mid-write is a temporary file: never read, removed on restart once
            # stale (a young one may be another job's shard in progress, and stays).
            half = tmp_path / "cut" / "train" / "shard-00002-of-00004.parquet.0123.tmp"
            young = tmp_path / "cut" / "train" / "shard-00003-of-00004.parquet.4567.tmp"
            half.write_bytes(b"PAR1 half a shard")
            young.write_bytes(b"PAR1 another job's shard")
            os.utime(half, (time.time() - 2 * 3600, time.time() - 2 * 3600))
            assert score_targets(cut, teacher, examples, "train", tok.pad_token_id, identity) == {"skipped": [0, 1], "written": [2, 3]}
            assert not half.exists() and young.exists()
            young.unlink()
            # Targets of another teacher (another k) in the same directory are refused, naming the shard.
            other = teacher_identity(cfg) | {"k": 4}
            with pytest.raises(DataError, match=r"shard-00000-of-00004.parquet: scored with another teacher or other data \(differs in teacher\)"):
                score_targets(cut, teacher, examples, "train", tok.pad_token_id, other)
        finally:
            teacher.shutdown()
    names = sorted(p.name for p in (tmp_path / "whole" / "train").iterdir())
    assert names == [f"shard-0000{i}-of-00004.parquet" for i in range(4)]
    assert names == sorted(p.name for p in (tmp_path / "cut" / "train").iterdir())
    for name in names:
        a, b = pq.read_table(tmp_path / "whole" / "train" / name), pq.read_table(tmp_path / "cut" / "train" / name)
        assert a.equals(b) and a.schema.metadata == b.schema.metadata
    rows = [r for name in names for r in pq.read_table(tmp_path / "whole" / "train" / name).to_pylist()]
    assert [r["row"] for r in rows] == list(range(len(examples)))
    for r, ex in zip(rows, examples):
        assert r["input_ids"] == ex["input_ids"] and r["positions"] == [t for t in range(1, len(ex["loss_mask"])) if ex["loss_mask"][t]]
        assert all(len(ids) == 8 for ids in r["topk_ids"]) and len(r["tail_logp"]) == len(r["positions"])


def losses(result, key="train/loss"):
    return [h[key] for h in result["history"] if key in h]


@pytest.mark.slow
def test_logit_distillation_stored_and_streamed_targets_train_alike_and_resume_exactly(tmp_path, tiny_model_dir):
    stored = run_distill(config(tmp_path, tiny_model_dir, "stored"))
    assert stored["completed_steps"] == 4 and stored["student_params_ratio"] < 1
    assert stored["scoring"]["train"] == {"skipped": [], "written": [0, 1, 2, 3]}
    train = losses(stored)
    assert all(0 < x < 100 for x in train) and train[-1] < train[0]
    assert len(losses(stored, "validation/loss")) == 2
    # The student was the teacher's first layer only, and is saved as a loadable checkpoint.
    init = json.loads((tmp_path / "stored" / "student-init" / "config.json").read_text())
    assert init["num_hidden_layers"] == 1

    # Streamed (the teacher scores each step's rows, two steps ahead, while the student trains),
    # cut after step 2 and resumed: the same losses as the stored targets' uninterrupted run.
    streamed = config(tmp_path, tiny_model_dir, "streamed", targets={"source": "stream"})
    first = run_distill(streamed, stop_after=2)
    resumed = run_distill(streamed)
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    assert losses(first) + losses(resumed) == pytest.approx(train, rel=1e-6, abs=1e-7)
    # A later student of the same teacher and data reuses the stored targets: nothing is scored.
    again = run_distill(config(tmp_path, tiny_model_dir, "again", train={"max_steps": 1}))
    assert again["scoring"]["train"] == {"skipped": [0, 1, 2, 3], "written": []}


@pytest.mark.slow
def test_response_mode_runs_the_teacher_in_the_tool_loop_and_counts_what_the_filter_drops(tmp_path, tiny_model_dir):
    # An untrained teacher: every episode fails the filter, and the job says so instead of
    # training on nothing. The episodes are generated once and reused by the next run.
    cfg = config(tmp_path, tiny_model_dir, "response", mode="response",
                 response={"limit": 6, "workers": {"num_ranks": 1, "cpus": 0.5},
                           "rollout": {"max_model_len": 1024},
                           "loop": {"max_turns": 2, "max_new_tokens": 8, "max_total_tokens": 1024}})  # fmt: skip
    with pytest.raises(DataError, match=r"none of the teacher's 6 episodes passed the filter \(.*no_final_answer"):
        run_distill(cfg)
    saved = json.loads((tmp_path / "response" / "responses" / "counts.json").read_text())["counts"]
    assert saved["episodes"] == 6 and saved["kept"] == 0
    assert sum(v for k, v in saved.items() if k not in ("episodes", "kept")) == 6
    counts = tmp_path / "response" / "responses" / "counts.json"
    written = counts.stat().st_mtime_ns
    with pytest.raises(DataError, match="none of the teacher's 6 episodes"):
        run_distill(cfg.model_copy(update={"resume": False}))
    assert counts.stat().st_mtime_ns == written  # reused, not generated again


@pytest.mark.slow
def test_on_policy_mode_trains_on_the_students_own_tokens_and_keeps_its_workers_in_sync(tmp_path, tiny_model_dir):
    cfg = config(
        tmp_path, tiny_model_dir, "on-policy", mode="on_policy",
        learners={"num_ranks": 1, "cpus": 0.25},
        learner={"zero_stage": 0, "lr": 5e-3, "micro_batch_size": 2, "grad_accum_steps": 2, "lora": {"r": 8, "alpha": 16}},
        loss={"kind": "reverse_kl"},
        train={"seq_len": 1024, "max_steps": 2, "eval_every": 100, "save_every": 1},
        on_policy={"prompts_per_step": 2, "workers": {"num_ranks": 1, "cpus": 0.5}, "eval_limit": 2,
                   "rollout": {"max_model_len": 1024, "enable_lora": True, "max_lora_rank": 8},
                   "loop": {"max_turns": 2, "max_new_tokens": 12, "max_total_tokens": 1024, "samples_per_task": 2,
                            "sampling": {"temperature": 1.0, "seed": 0}}},
    )  # fmt: skip
    # Cut after step 1 and resumed: the fresh workers get the restored student (version 1).
    first = run_distill(cfg, stop_after=1)
    resumed = run_distill(cfg)
    history = first["history"] + resumed["history"]
    assert [h["step"] for h in history] == [1, 2]
    for h in history:
        # The loss is on the tokens the student generated, and only on them.
        assert h["train/tokens"] == h["batch/generated_tokens"] > 0
        assert 0 < h["train/loss"] < 100 and h["time/sync_s"] > 0
    assert any(k.startswith("eval/") for k in history[-1])  # the workers ran the validation tasks
