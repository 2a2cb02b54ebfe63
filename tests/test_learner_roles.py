"""One learner for every role, on real DeepSpeed engines in Ray (gloo): a PPO-shaped step through
a caller-supplied loss, a frozen reference (plain and ZeRO-3 partitioned), a critic's values."""

from functools import partial

import pytest

from cluster.placement import RoleConfig
from trainers.group import LearnerGroup
from trainers.learner import LearnerConfig
from trainers.losses import ppo_policy_loss, value_loss

# (prompt, response) token ids: the response tokens are the actions.
EPISODES = [
    ([1, 5, 9, 12], [40, 41, 42]),
    ([1, 7, 7], [50, 51, 52, 53, 2]),
    ([1, 5, 9, 12, 30, 31], [60, 2]),
    ([1, 8], [70, 71, 72, 73]),
]
SEQS = [p + r for p, r in EPISODES]
MASKS = [[0] * len(p) + [1] * len(r) for p, r in EPISODES]


@pytest.fixture(scope="module")
def ray_cluster():
    from cluster.local import local_ray

    with local_ray():
        yield


def group(name, model, ranks=1, **cfg):
    return LearnerGroup(name, RoleConfig(num_ranks=ranks, cpus=0.25), LearnerConfig(model=model, **cfg))


def action_sums(logprobs, rows):
    # logprobs[i][t - 1] belongs to token t.
    return [sum(lp[t - 1] for t in range(1, len(MASKS[i])) if MASKS[i][t]) for i, lp in zip(rows, logprobs)]


@pytest.mark.slow
def test_ppo_step_reference_and_critic(ray_cluster, tiny_model_dir):
    import ray

    actor = group("actor", tiny_model_dir, ranks=2, zero_stage=2, lr=1e-3, micro_batch_size=2)
    reference = group("reference", tiny_model_dir, trainable=False, zero_stage=0, micro_batch_size=3)
    # Every weight partitioned (the tiny model's would otherwise all stay whole) and short chunks:
    # the LM head gathers once per chunk, so ranks with different loads must still keep in step.
    sharded_reference = group(
        "reference-z3", tiny_model_dir, ranks=2, trainable=False, zero_stage=3, micro_batch_size=2,
        zero3_persistence_threshold=0, logprob_chunk_tokens=4,
    )
    critic = group("critic", tiny_model_dir, head="value", lr=1e-2, micro_batch_size=4)
    try:
        # The frozen reference is the actor before any step, batched in micro-batches of 3.
        before = actor.first("logprobs", SEQS)
        ref = reference.first("logprobs", SEQS)
        assert [len(r) for r in ref] == [len(s) - 1 for s in SEQS]
        assert max(abs(a - b) for x, y in zip(before, ref) for a, b in zip(x, y)) < 1e-5
        # Partitioned over two ranks, each scoring its own rows (3 and 1: two micro-batches and one), the same numbers.
        halves = sharded_reference.each("logprobs", [(SEQS[:3],), (SEQS[3:],)])
        assert max(abs(a - b) for x, y in zip(halves[0] + halves[1], ref) for a, b in zip(x, y)) < 1e-5
        with pytest.raises(ray.exceptions.RayTaskError, match="frozen learner"):
            reference.first("train_step", {"input_ids": SEQS[:3]}, ppo_policy_loss, 1.0)

        # One PPO step; each rank holds one row of each sign.
        advantage = [1.0, -1.0, 1.0, -1.0]
        rows = [
            {
                "input_ids": SEQS[i],
                "action_mask": MASKS[i],
                "old_logprobs": [0.0] + ref[i],
                "advantages": [advantage[i] * m for m in MASKS[i]],
            }
            for i in range(4)
        ]
        per_rank = [[0, 1], [2, 3]]
        denominator = sum(map(sum, MASKS))
        batches = [{k: [rows[i][k] for i in idx] for k in rows[0]} for idx in per_rank]
        loss = partial(ppo_policy_loss, clip_eps=0.2)
        stats = actor.each("train_step", [(b, loss, denominator) for b in batches])
        assert sum(s["tokens"] for s in stats) == denominator
        # The first micro-batch is on-policy: every ratio is exactly 1, nothing clipped.
        assert sum(s["ratio_sum"] for s in stats) == pytest.approx(denominator) and sum(s["clipped"] for s in stats) == 0
        after = actor.all("logprobs", SEQS)
        assert after[0] == after[1], "ZeRO-2 ranks hold different weights after the step"
        # The step climbed the surrogate: sum over rows of advantage x the actions' log-prob.
        objective = [sum(a * s for a, s in zip(advantage, action_sums(lp, range(4)))) for lp in (before, after[0])]
        assert objective[1] > objective[0] + 0.1, objective
        # The frozen reference did not move.
        assert reference.first("logprobs", SEQS) == ref

        # The critic: one value per token; its value loss falls as it fits the returns.
        values = critic.first("values", SEQS)
        assert [len(v) for v in values] == [len(s) for s in SEQS]
        assert critic.first("rewards", SEQS) == pytest.approx([v[-1] for v in values], abs=1e-6)
        returns = [[0.0] + [advantage[i]] * (len(SEQS[i]) - 1) for i in range(4)]
        batch = {"input_ids": SEQS, "action_mask": MASKS, "returns": returns}
        fit = [critic.first("train_step", batch, partial(value_loss, clip_eps=None), denominator)["value_loss_sum"] for _ in range(6)]
        assert fit[-1] < 0.5 * fit[0], fit
    finally:
        for g in (actor, reference, sharded_reference, critic):
            g.shutdown()


@pytest.mark.slow
def test_lora_base_is_the_reference_at_no_extra_model(ray_cluster, tiny_model_dir):
    from trainers.learner import LoraConfig

    lora = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    actor = group("lora-actor", tiny_model_dir, zero_stage=2, lr=5e-2, micro_batch_size=4, lora=lora)
    plain = group("plain", tiny_model_dir, trainable=False, zero_stage=0, micro_batch_size=4)
    try:
        ref = plain.first("logprobs", SEQS)
        # The adapter starts at zero: with or without it, the starting model.
        assert max(abs(a - b) for x, y in zip(actor.first("logprobs", SEQS), ref) for a, b in zip(x, y)) < 1e-5
        rows = {"input_ids": SEQS, "action_mask": MASKS, "old_logprobs": [[0.0] + r for r in ref],
                "advantages": [[1.0 * m for m in mask] for mask in MASKS]}  # fmt: skip
        actor.first("train_step", rows, partial(ppo_policy_loss, clip_eps=0.2), sum(map(sum, MASKS)))
        moved = actor.first("logprobs", SEQS)
        assert max(abs(a - b) for x, y in zip(moved, ref) for a, b in zip(x, y)) > 1e-3
        # The base under the trained adapter is still the starting model.
        base = actor.first("logprobs", SEQS, 1.0, True)
        assert max(abs(a - b) for x, y in zip(base, ref) for a, b in zip(x, y)) < 1e-5
        with pytest.raises(Exception, match="has none"):
            plain.first("logprobs", SEQS, 1.0, True)
    finally:
        actor.shutdown()
        plain.shutdown()
