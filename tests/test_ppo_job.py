"""The PPO job: its pure parts by hand, then a short run on real parts (local Ray, two vLLM rollout
workers, a frozen reward-model scorer, two ZeRO-2 actor ranks, a critic, a frozen reference), and
the same run submitted to a local head, killed and retried."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ray_jobs.ppo import PPOConfig, step_tasks
from tooltune.config import load_config
from trainers.ppo_trainer import check_staleness, minibatch_plan, shares, token_aligned

CONFIG = "configs/tiny/ppo.yaml"
TOL = 1e-3
PROBE = "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\nThe answer is 7."


# ---- pure parts -----------------------------------------------------------------------------
def test_shares_are_contiguous_and_differ_by_at_most_one():
    assert shares(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert shares([1, 2], 4) == [[1], [2], [], []]


def test_minibatch_plan_is_a_partition_fixed_by_seed_step_and_epoch():
    plan = minibatch_plan(8, 2, seed=0, step=3, epoch=1)
    assert sorted(i for mb in plan for i in mb) == list(range(8)) and [len(mb) for mb in plan] == [4, 4]
    assert plan == minibatch_plan(8, 2, seed=0, step=3, epoch=1)
    assert plan != minibatch_plan(8, 2, seed=0, step=3, epoch=0)


def test_learner_logprobs_become_token_aligned_columns():
    # A learner gives len-1 log-probs per sequence (token t's at t-1): token 0 gets 0.0.
    assert token_aligned([[-0.5, -1.0], [-2.0]]) == [[0.0, -0.5, -1.0], [0.0, -2.0]]


def test_staleness_refuses_old_unknown_and_future_versions():
    check_staleness([3, 3, 3], learner_version=3, max_staleness=0)
    check_staleness([2, 3], learner_version=3, max_staleness=1)
    with pytest.raises(ValueError, match=r"2 trajectories outside policy versions 3\.\.3 .*row 0: 2, row 2: None"):
        check_staleness([2, 3, None], learner_version=3, max_staleness=0)
    with pytest.raises(ValueError, match="row 0: 4"):
        check_staleness([4], learner_version=3, max_staleness=0)


def test_step_prompts_are_a_pure_function_of_step_and_seed():
    from tooltune.world import WorldConfig, generate_world

    tasks = generate_world(WorldConfig(n_train=10, n_validation=0, n_test=0))["train"]
    ids = [[t.id for t in step_tasks(tasks, 4, step, seed=0)] for step in range(3)]
    assert ids == [[t.id for t in step_tasks(tasks, 4, step, seed=0)] for step in range(3)]
    assert len(set(ids[0] + ids[1])) == 8  # one pass over the tasks before any repeats
    assert ids[0] != [t.id for t in step_tasks(tasks, 4, 0, seed=1)]


def test_training_prompts_leave_out_every_held_out_query():
    from ray_jobs.ppo import train_prompts
    from tooltune.world import WorldConfig, generate_world
    from tooltune.world_contrast import HELDOUT_TRIVIAL_QUERIES

    world = WorldConfig(seed=0, n_train=400, n_validation=60, n_test=60, no_tool_fraction=0.5, distractor_tools=0)
    cfg = load_config(CONFIG, PPOConfig, ["contrast_prompts={pairs_per_form: 40, seed: 2}", f"world={world.model_dump_json()}"])
    splits = generate_world(cfg.world)
    kept, dropped = train_prompts(cfg, splits)
    held = {t.query for split in ("validation", "test") for t in splits[split]} | HELDOUT_TRIVIAL_QUERIES
    assert dropped > 0 and len(kept) + dropped == len(splits["train"]) + 2 * 40 * 6
    assert not {t.query for t in kept} & held


def test_config_checks_rows_sampling_and_reward_model():
    from pydantic import ValidationError

    cfg = load_config(CONFIG, PPOConfig)
    data = cfg.model_dump()
    with pytest.raises(ValidationError, match=r"= 8 rows per step, but .*roles\.actor\.num_ranks .* = 16"):
        PPOConfig.model_validate(data | {"train": data["train"] | {"mini_batches": 4}})
    with pytest.raises(ValidationError, match="top_p 1"):
        PPOConfig.model_validate(data | {"loop": data["loop"] | {"sampling": {"temperature": 1.0, "top_p": 0.9}}})
    with pytest.raises(ValidationError, match="reward.model and reward.scorer.rm_weight go together"):
        PPOConfig.model_validate(data | {"reward": {"scorer": {"rm_weight": 1.0}}})
    with pytest.raises(ValidationError, match="max_staleness"):
        PPOConfig.model_validate(data | {"train": data["train"] | {"max_staleness": 2}})
    with pytest.raises(ValidationError, match="actor.trainable"):
        PPOConfig.model_validate(data | {"actor": data["actor"] | {"trainable": False}})
    with pytest.raises(ValidationError, match=r"reference.dtype \(bfloat16\) must be actor.dtype \(float32\)"):
        PPOConfig.model_validate(data | {"reference": data["reference"] | {"dtype": "bfloat16"}})
    with pytest.raises(ValidationError, match="roles.colocate puts rollout with a learner role"):
        PPOConfig.model_validate(data | {"roles": data["roles"] | {"colocate": [["actor", "rollout"]]}})
    with pytest.raises(ValidationError, match="reference_source actor_base disables the actor's LoRA adapter"):
        PPOConfig.model_validate(data | {"reference_source": "actor_base"})
    with pytest.raises(ValidationError, match=r"roles.actor: max_ranks and max_restarts are for roles.rollout only"):
        PPOConfig.model_validate(data | {"roles": data["roles"] | {"actor": data["roles"]["actor"] | {"max_restarts": 2}}})
    elastic = data["roles"]["rollout"] | {"max_ranks": 4, "max_restarts": -1}
    assert PPOConfig.model_validate(data | {"roles": data["roles"] | {"rollout": elastic}}).roles.rollout.extra_ranks == 2
    with pytest.raises(ValidationError, match="contrast_prompts.seed 1 draws the held-out pairs"):
        PPOConfig.model_validate(data | {"contrast_prompts": {"pairs_per_form": 1, "seed": 1}})


# ---- the job on real parts ------------------------------------------------------------------
def _hf_logprobs(model_dir: str, ids: list[int]) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0, :-1]
    return torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None]).squeeze(-1).tolist()


def _max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def _overrides(tiny_model_dir: str, output_dir, *more: str) -> list[str]:
    return [f"model={tiny_model_dir}", f"reward.model={tiny_model_dir}", "reward.scorer.rm_weight=1.0",
            f"output_dir={output_dir}", "tensorboard=false", "actor.lr=0.01", "ray.object_store_gib=0.5",
            # Contrastive pairs among the prompts, and scored with the validation tasks.
            "contrast_prompts={pairs_per_form: 1, seed: 7, distractor_tools: 0}", "eval_contrast.pairs_per_form=1", *more]  # fmt: skip


def _config(tiny_model_dir: str, output_dir, *overrides: str) -> PPOConfig:
    return load_config(CONFIG, PPOConfig, _overrides(tiny_model_dir, output_dir, *overrides))


class SyncChecks:
    """``run_ppo``'s ``on_step``: after every step, the workers serve the actor's new weights and
    the reference is still the starting checkpoint; keeps each step's actor log-probs and metrics."""

    def __init__(self, probe: list[int], start: list[float]):
        self.probe, self.start, self.seen = probe, start, []

    def __call__(self, done: int, metrics: dict, roles) -> None:
        import ray

        # Every worker serves the version of this step, with the same weights (one sync digest).
        versions = ray.get([w.version.remote() for w in roles.workers])
        assert [v for v, _ in versions] == [done] * len(roles.workers) and versions[0][1] is not None
        assert len({digest for _, digest in versions}) == 1
        # ... and they are the learners' weights: each engine's log-probs are the actor's.
        actor = roles.actor.all("logprobs", [self.probe])
        assert actor[0] == actor[1], "ZeRO-2 ranks hold different weights"
        for worker in roles.workers:
            assert _max_diff(ray.get(worker.score.remote([self.probe]))[0], actor[0][0]) < TOL
        # The reference (a frozen group, or the LoRA actor's base) is still the starting policy.
        reference = roles.reference.first("logprobs", [self.probe]) if roles.reference else roles.actor.first("logprobs", [self.probe], 1.0, True)
        assert _max_diff(reference[0], self.start) < 1e-4
        self.seen.append({"step": done, "actor": actor[0][0], "metrics": metrics})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    """Three PPO steps with 2 rollout workers, a reward-model scorer (the tiny model with an
    untrained head), 2 ZeRO-2 actor ranks, a critic and a reference; checked after every step."""
    from transformers import AutoTokenizer

    from ray_jobs.ppo import run_ppo

    cfg = _config(tiny_model_dir, tmp_path_factory.mktemp("ppo") / "run")
    assert cfg.algorithm.needs_critic and cfg.roles.rollout.num_ranks == 2 and cfg.roles.actor.num_ranks == 2
    probe = AutoTokenizer.from_pretrained(tiny_model_dir)(PROBE, add_special_tokens=False)["input_ids"]
    checks = SyncChecks(probe, _hf_logprobs(tiny_model_dir, probe))
    result = run_ppo(cfg, on_step=checks)
    return cfg, result, checks


@pytest.mark.slow
def test_ppo_steps_advance_the_policy_and_keep_workers_in_sync(uninterrupted):
    cfg, result, checks = uninterrupted
    seen = checks.seen
    assert [s["step"] for s in seen] == [1, 2, 3] and result["completed_steps"] == 3
    assert [s["metrics"]["policy/version"] for s in seen] == [1, 2, 3]
    # The policy moved at every step (and the workers followed it: SyncChecks).
    moved = [_max_diff(a["actor"], b) for a, b in zip(seen, [checks.start] + [s["actor"] for s in seen[:-1]])]
    assert min(moved) > 10 * TOL, moved
    for s in seen:
        m = s["metrics"]
        for key in ("reward/total", "reward/rm", "reward/rule", "train/loss", "critic/value_loss", "policy/kl_ref",
                    "policy/entropy", "policy/clip_fraction", "policy/approx_kl", "batch/calls_per_query",
                    "time/rollout_s", "time/score_s", "time/reference_s", "time/train_s", "time/sync_s"):  # fmt: skip
            assert math.isfinite(m[key]), (s["step"], key, m[key])
        assert m["reward/total"] == pytest.approx(m["reward/rm"] + m["reward/rule"])
        assert 0 <= m["policy/clip_fraction"] <= 1 and m["policy/entropy"] > 0
        # fp32 engines: vLLM's log-probs of the sampled tokens are the learners' (the ratio uses the latter).
        assert m["policy/vllm_logprob_gap"] < TOL
    # The first step starts at the reference: the KL between them is 0 before the update.
    assert seen[0]["metrics"]["policy/kl_ref"] == pytest.approx(0.0, abs=1e-4)
    assert seen[-1]["metrics"]["eval/n_tasks"] == 4  # validation at the last step
    assert 0 <= seen[-1]["metrics"]["eval/contrastive_large_called"] <= 1

    run = Path(cfg.output_dir)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    final = run / "checkpoints" / "step-000003"
    assert (final / "model" / "config.json").exists() and (final / "critic").is_dir() and (final / "critic_state").is_dir()
    assert (run / "curves.png").stat().st_size > 0


@pytest.mark.slow
def test_a_killed_and_resubmitted_job_gives_the_uninterrupted_metrics(uninterrupted, tmp_path, tiny_model_dir):
    """The same run submitted to a real local head, its driver SIGKILLed once step 2 is logged:
    ``--retries`` submits it again with ``resume=true``, and from the step-2 checkpoint (fresh
    workers must first get step 2's weights, or step 3's samples are refused as stale) step 3
    equals the uninterrupted run's."""
    from tests.drivers.local_head import kill_and_retry, local_head

    _, full, _ = uninterrupted
    cut = tmp_path / "cut"
    with local_head() as head:
        kill_and_retry("ppo", CONFIG, [*_overrides(tiny_model_dir, cut), "train.save_every=1"], cut, head, tmp_path)
    rows = {r["step"]: r for r in map(json.loads, (cut / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r}
    assert sorted(rows) == [1, 2, 3]
    again, before = rows[3], full["history"][2]
    for key in ("reward/total", "reward/rule", "batch/generated_tokens", "batch/sequence_tokens", "policy/version"):
        assert again[key] == before[key], key
    for key in ("reward/rm", "train/loss", "critic/value_loss", "policy/kl_ref", "policy/entropy", "policy/approx_kl"):
        assert again[key] == pytest.approx(before[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_off_policy_lora_run_overlaps_rollout_with_training(tmp_path, tiny_model_dir):
    """max_staleness 1: each step after the first trains on the previous version's rollout (made
    while the step before trained); a LoRA actor whose base is the reference (no reference group);
    GRPO without a critic or a reward model; the workers still serve the learners' weights after
    every sync."""
    from transformers import AutoTokenizer

    from ray_jobs.ppo import run_ppo

    cfg = _config(
        tiny_model_dir, tmp_path / "run", "reward.model=null", "reward.scorer.rm_weight=0.0", "train.max_staleness=1",
        "algorithm.estimator=grpo", "algorithm.kl_in_reward=false", "algorithm.kl_kind=k3", "algorithm.kl_coef=0.05",
        "actor.lora={r: 8, alpha: 16, target_modules: [q_proj, v_proj]}", "rollout.enable_lora=true", "rollout.max_lora_rank=8",
        "reference_source=actor_base", "actor.lr=0.05",
    )  # fmt: skip
    probe = AutoTokenizer.from_pretrained(tiny_model_dir)(PROBE, add_special_tokens=False)["input_ids"]
    checks = SyncChecks(probe, _hf_logprobs(tiny_model_dir, probe))
    result = run_ppo(cfg, on_step=checks)
    metrics = [s["metrics"] for s in checks.seen]
    assert result["completed_steps"] == 3 and [m["policy/version"] for m in metrics] == [1, 2, 3]
    assert [m["policy/staleness"] for m in metrics] == [0.0, 1.0, 1.0]
    assert metrics[0]["policy/kl_ref"] == pytest.approx(0.0, abs=1e-4)
    assert all(math.isfinite(m["train/loss"]) and m["time/rollout_wait_s"] >= 0 for m in metrics)
    moved = [_max_diff(a["actor"], b) for a, b in zip(checks.seen, [checks.start] + [s["actor"] for s in checks.seen[:-1]])]
    assert min(moved) > 10 * TOL, moved


# The one-update-per-step case (ratio exactly 1) runs as tests/test_rollout_pool.py's PPO run.
