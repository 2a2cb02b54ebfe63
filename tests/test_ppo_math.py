"""PPO's math (trainers/ppo.py and the PPO part of trainers/losses.py) on numbers computed by hand."""

import inspect
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from trainers.losses import (
    aggregate,
    approx_kl,
    clipped_policy_loss,
    clipped_value_loss,
    kl_estimate,
    loss_units,
    ppo_policy_loss,
    value_loss,
)
from trainers.ppo import (
    PPOAlgorithmConfig,
    compute_advantages,
    explained_variance,
    gae,
    grpo_advantages,
    masked_whiten,
    reinforce_pp_advantages,
    rloo_advantages,
    token_rewards,
    token_values,
)

FUZZ = settings(max_examples=150, deadline=1000, database=None, suppress_health_check=[HealthCheck.too_slow])
F64 = torch.float64


def T(rows):
    return torch.tensor(rows, dtype=F64)


def approx(rows, rel=1e-9, abs=1e-12):
    return pytest.approx([x for row in rows for x in row], rel=rel, abs=abs)


def flat(x):
    return [v for row in x.tolist() for v in row]


# ---- KL estimators -----------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    # logp - ref = 1 and -1:  k1 = 1, -1;  k2 = 0.5, 0.5;
    # k3 with d = ref - logp = -1, 1:  e^-1 + 1 - 1 = 0.367879,  e - 1 - 1 = 0.718282.
    logp, ref = T([[-1.0, -2.0]]), T([[-2.0, -1.0]])
    assert flat(kl_estimate(logp, ref, "k1")) == pytest.approx([1.0, -1.0])
    assert flat(kl_estimate(logp, ref, "k2")) == pytest.approx([0.5, 0.5])
    assert flat(kl_estimate(logp, ref, "k3")) == pytest.approx([math.exp(-1), math.e - 2])
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_estimate(logp, ref, "k4")


def test_approx_kl_is_k3_of_behaviour_against_current():
    # Behaviour p = 0.25, current p = 0.5: d = ln 0.5 - ln 0.25 = ln 2, e^d - d - 1 = 1 - ln 2.
    # The masked second token (padding: old 0, logp -1000) would add 999.
    logp, old = T([[math.log(0.5), -1000.0]]), T([[math.log(0.25), 0.0]])
    assert approx_kl(logp, old, T([[1, 0]])).item() == pytest.approx(1 - math.log(2))


# ---- per-token rewards and GAE -----------------------------------------------------------------


def test_token_rewards_put_kl_on_actions_and_the_reward_on_the_last_action():
    # Row 0: prompt, prompt, turn 1 (2 tokens), a tool result, turn 2 (1 token); reward 1.
    #   k1 = old - ref on actions: 1, -1, 0  ->  -0.1 * KL: -0.1, 0.1, 0; +1 at the last action.
    # Row 1: one action then padding; reward -1; no KL (old == ref).
    mask = T([[0, 0, 1, 1, 0, 1], [0, 1, 0, 0, 0, 0]])
    old = T([[0, 0, -1, -2, -7, -0.5], [0, -1, 0, 0, 0, 0]])
    ref = T([[0, 0, -2, -1, -3, -0.5], [0, -1, 0, 0, 0, 0]])
    out = token_rewards(T([1.0, -1.0]), mask, old, ref, kl_coef=0.1, kind="k1")
    assert flat(out) == approx([[0, 0, -0.1, 0.1, 0, 1.0], [0, -1.0, 0, 0, 0, 0]])
    # k3 over padding (ref 0, logp -1000) would overflow: masked, it is never seen.
    padded = token_rewards(T([1.0, -1.0]), mask, old.masked_fill(mask == 0, -1000.0), ref, 0.1, "k3")
    assert torch.isfinite(padded).all() and padded[0, 4] == 0 and padded[1, 2:].eq(0).all()
    # Without a KL the log-probs are not needed.
    assert flat(token_rewards(T([2.0, 3.0]), mask)) == approx([[0, 0, 0, 0, 0, 2.0], [0, 3.0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"rows \[1\] have no action token"):
        token_rewards(T([1.0, 1.0]), T([[0, 1], [0, 0]]))


def test_token_values_shift_the_head_outputs_by_one():
    # Head output at t is the value of the state in which token t+1 is generated.
    assert token_values(T([[5, 6, 7, 8]])).tolist() == [[0, 5, 6, 7]]


def test_gae_skips_the_tool_result_between_two_turns():
    # Tokens: prompt 0-1, turn 1 at 2-3, a tool result at 4-5, turn 2 at 6. gamma 0.9, lam 0.8.
    # Rewards: -0.1 (a KL) at 2, 1 at the last action 6. Values (token-aligned): V2 0.5, V3 0.6,
    # V6 0.8; 9 elsewhere, which must not count. Action steps: 2 -> 3 -> 6 -> end.
    #   t6: delta = 1 + 0.9*0 - 0.8 = 0.2;                A6 = 0.2
    #   t3: delta = 0 + 0.9*0.8 - 0.6 = 0.12;             A3 = 0.12 + 0.72*0.2 = 0.264
    #   t2: delta = -0.1 + 0.9*0.6 - 0.5 = -0.06;         A2 = -0.06 + 0.72*0.264 = 0.13008
    # Returns A + V: 0.63008, 0.864, 1.0. Had the tool tokens been steps with reward 0, t3 would
    # bootstrap from V4 = 9.
    mask = T([[0, 0, 1, 1, 0, 0, 1]])
    rewards = T([[0, 0, -0.1, 0, 0, 0, 1.0]])
    values = T([[9, 9, 0.5, 0.6, 9, 9, 0.8]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert flat(adv) == approx([[0, 0, 0.13008, 0.264, 0, 0, 0.2]])
    assert flat(ret) == approx([[0, 0, 0.63008, 0.864, 0, 0, 1.0]])
    # Whatever sits under the mask's zeros changes nothing.
    noisy = values.clone()
    noisy[0, [0, 1, 4, 5]] = T([-3, float("nan"), 100, -100])
    junk = rewards.clone()
    junk[0, [4, 5]] = T([5.0, float("inf")])
    adv2, ret2 = gae(junk, noisy, mask, gamma=0.9, lam=0.8)
    assert torch.equal(adv2, adv) and torch.equal(ret2, ret)


def compact_gae(rewards, values, gamma, lam):
    """Textbook GAE over a list of steps (one episode, no gaps)."""
    out, next_v, next_a = [], 0.0, 0.0
    for r, v in zip(reversed(rewards), reversed(values)):
        next_a = r + gamma * next_v - v + gamma * lam * next_a
        next_v = v
        out.append(next_a)
    return out[::-1]


finite = st.floats(-10, 10, allow_nan=False)
token = st.tuples(st.booleans(), finite, finite)  # (action?, reward, value)


@FUZZ
@given(rows=st.integers(1, 3).flatmap(lambda n: st.lists(st.lists(token, min_size=6, max_size=6), min_size=n, max_size=n)),
       gamma=st.floats(0, 1), lam=st.floats(0, 1))
def test_gae_equals_plain_gae_over_the_action_tokens_alone(rows, gamma, lam):
    mask = T([[float(m) for m, _, _ in row] for row in rows])
    rewards = T([[r for _, r, _ in row] for row in rows])
    values = T([[v for _, _, v in row] for row in rows])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for i, row in enumerate(rows):
        steps = [(r, v) for m, r, v in row if m]
        expected = compact_gae([r for r, _ in steps], [v for _, v in steps], gamma, lam)
        actions = mask[i].bool()
        assert adv[i][actions].tolist() == pytest.approx(expected, rel=1e-9, abs=1e-9)
        assert adv[i][~actions].eq(0).all() and ret[i][~actions].eq(0).all()
    # gamma = lam = 1: the values cancel and the return is the sum of the rewards still to come.
    _, ret = gae(rewards, values, mask, 1.0, 1.0)
    future = (rewards * mask).flip(-1).cumsum(-1).flip(-1)
    assert flat(ret) == pytest.approx(flat(future * mask), rel=1e-9, abs=1e-9)


# ---- critic-free estimators --------------------------------------------------------------------

# Two groups of 4 interleaved: a = rows 0, 2, 4, 6 with rewards 1, 0, 1, 0; b = rows 1, 3, 5, 7
# with rewards 2, 0, 0, 0. Masks of different lengths (row 2 has a tool gap).
GROUPS = ["a", "b"] * 4
REWARDS = T([1, 2, 0, 0, 1, 0, 0, 0])
MASK = T([[0, 1, 1, 1], [0, 1, 0, 0], [1, 0, 1, 1], [0, 0, 1, 0], [0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1], [0, 1, 1, 0]])


def test_grpo_and_dr_grpo_on_two_interleaved_groups():
    # a: mean 0.5, deviations +-0.5, Bessel var (4 x 0.25) / 3 = 1/3, std 0.57735: +-0.866025.
    # b: mean 0.5, deviations 1.5, -0.5 x 3, var (2.25 + 3 x 0.25) / 3 = 1, std 1.
    s = math.sqrt(1 / 3) + 1e-6
    per_row = [0.5 / s, 1.5 / (1 + 1e-6), -0.5 / s, -0.5 / (1 + 1e-6), 0.5 / s, -0.5 / (1 + 1e-6), -0.5 / s, -0.5 / (1 + 1e-6)]
    adv = grpo_advantages(REWARDS, GROUPS, MASK)
    assert flat(adv) == approx([[a * m for m in row] for a, row in zip(per_row, MASK.tolist())])
    # Dr GRPO: only centred. Group ids as a tensor work the same.
    centred = [0.5, 1.5, -0.5, -0.5, 0.5, -0.5, -0.5, -0.5]
    adv = grpo_advantages(REWARDS, torch.tensor([0, 1] * 4), MASK, scale_std=False)
    assert flat(adv) == approx([[a * m for m in row] for a, row in zip(centred, MASK.tolist())])


def test_rloo_on_two_interleaved_groups():
    # a: r - mean(others): 1 - 1/3 = 2/3, 0 - 2/3 = -2/3.  b: 2 - 0 = 2, 0 - 2/3 = -2/3.
    per_row = [2 / 3, 2.0, -2 / 3, -2 / 3, 2 / 3, -2 / 3, -2 / 3, -2 / 3]
    adv = rloo_advantages(REWARDS, GROUPS, MASK)
    assert flat(adv) == approx([[a * m for m in row] for a, row in zip(per_row, MASK.tolist())])


def test_groups_of_one():
    # GRPO: r minus its own mean is 0 (no signal); RLOO has no other sample for a baseline.
    # Group y (1, 3): deviations -1, 1, Bessel var 2 / 1 = 2: -1/sqrt 2, 1/sqrt 2.
    mask = T([[0, 1], [0, 1], [0, 1]])
    y = 1 / (math.sqrt(2) + 1e-6)
    assert flat(grpo_advantages(T([5.0, 1.0, 3.0]), ["x", "y", "y"], mask)) == approx([[0, 0], [0, -y], [0, y]])
    with pytest.raises(ValueError, match=r"at least 2 samples per group; group sizes \[1, 2\]"):
        rloo_advantages(T([5.0, 1.0, 3.0]), ["x", "y", "y"], mask)


def test_reinforce_pp_whitens_returns_over_the_batch():
    # Row 0: actions 1, 2, (tool at 3), 4; token rewards -0.1, 0, 1: returns 0.9, 1, 1.
    # Row 1: actions 1, 2; token rewards -0.1, -1: returns -1.1, -1.
    # Mean of the five: 0.8 / 5 = 0.16; deviations 0.74, 0.84, 0.84, -1.26, -1.16;
    # variance (0.5476 + 2 x 0.7056 + 1.5876 + 1.3456) / 5 = 0.9784.
    mask = T([[0, 1, 1, 0, 1], [0, 1, 1, 0, 0]])
    rewards = T([[0, -0.1, 0, 7, 1], [0, -0.1, -1, 0, 0]])
    s = math.sqrt(0.9784 + 1e-8)
    assert flat(reinforce_pp_advantages(rewards, mask)) == approx([[0, 0.74 / s, 0.84 / s, 0, 0.84 / s], [0, -1.26 / s, -1.16 / s, 0, 0]])


# ---- dual clip, aggregation, value loss, the actor's loss --------------------------------------


def test_dual_clip_caps_negative_advantages():
    # eps 0.2, c 3.  token 1: r 5, A -1: max(5, 1.2) = 5 > 3 = -c A  ->  3 (the cap bites);
    # token 2: r 2, A -1: max(2, 1.2) = 2 < 3, kept;  token 3: r 5, A 1: max(-5, -1.2) = -1.2
    # (clipped; A > 0 is never capped). Sum 3 + 2 - 1.2 = 3.8; without the cap 5.8.
    logp = T([[math.log(5), math.log(2), math.log(5)]]).requires_grad_()
    old, adv, mask = T([[0, 0, 0]]), T([[-1, -1, 1]]), T([[1, 1, 1]])
    total, stats = clipped_policy_loss(logp, old, adv, mask, 0.2, dual_clip=3.0)
    assert total.item() == pytest.approx(3.8)
    assert stats == pytest.approx({"clipped": 1.0, "ratio_sum": 12.0, "tokens": 3.0, "dual_clipped": 1.0})
    total.backward()
    # d(-A r)/dlogp = -A r: 2 on token 2; the capped and the clipped token have none.
    assert flat(logp.grad) == pytest.approx([0.0, 2.0, 0.0])
    assert clipped_policy_loss(logp, old, adv, mask, 0.2)[0].item() == pytest.approx(5.8)
    with pytest.raises(ValueError, match="dual_clip must be above 1"):
        clipped_policy_loss(logp, old, adv, mask, 0.2, dual_clip=1.0)


def test_aggregation_modes_on_rows_of_different_lengths():
    # Row 0: losses 1, 2, 3 (3 tokens); row 1: 4 (1 token); row 2: no action token.
    #   token_mean:          sum 10, units 4 tokens     -> 2.5
    #   seq_mean_token_sum:  sum 6 + 4 = 10, 2 seqs     -> 5
    #   seq_mean_token_mean: sum 6/3 + 4/1 = 6, 2 seqs  -> 3
    inf, nan = float("inf"), float("nan")
    loss = T([[1, 2, 3, inf], [4, nan, 5, 6], [7, 8, 9, 10]])
    mask = T([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    expected = {"token_mean": (10.0, 4.0), "seq_mean_token_sum": (10.0, 2.0), "seq_mean_token_mean": (6.0, 2.0)}
    for mode, (total, units) in expected.items():
        out, n = aggregate(loss, mask, mode)
        assert (out.item(), n) == pytest.approx((total, units)), mode
        # Micro-batches (rows 0 | rows 1-2) add up to the whole: the learner divides their sums
        # by the step's units, which the driver takes from the whole step's mask.
        parts = [aggregate(loss[:1], mask[:1], mode), aggregate(loss[1:], mask[1:], mode)]
        assert sum(p[0].item() for p in parts) == pytest.approx(total) and sum(p[1] for p in parts) == units
        assert loss_units(mask, mode) == units
    with pytest.raises(ValueError, match="unknown loss aggregation 'seq_sum'"):
        aggregate(loss, mask, "seq_sum")


def test_value_loss_aggregated_per_sequence():
    # Per token (v, old, R) = (1, 0, 2) and (3, 2.5, 2), clip 0.2: max(1, 3.24) = 3.24 and
    # max(1, 0.49) = 1. One row: seq_mean_token_mean 0.5 x (3.24 + 1) / 2 = 1.06; token sum 2.12.
    values, old, returns, mask = T([[1.0, 3.0]]), T([[0.0, 2.5]]), T([[2.0, 2.0]]), T([[1, 1]])
    assert clipped_value_loss(values, old, returns, mask, 0.2, "seq_mean_token_mean")[0].item() == pytest.approx(1.06)
    assert clipped_value_loss(values, old, returns, mask, 0.2)[0].item() == pytest.approx(2.12)


class Outputs:
    """What a loss reads of a ``trainers.forward.Forward``: outputs for tokens 1.. (position t-1)."""

    def __init__(self, logp, entropy=None, values=None):
        self._logp, self._entropy, self._values = logp, entropy, values

    def logprobs(self, temperature=1.0, entropy=False):
        return self._logp, self._entropy if entropy else None

    def values(self):
        return self._values


def test_ppo_policy_loss_reads_token_columns_one_step_shifted():
    # Row 0: actions at tokens 2, 3; row 1: an action at token 1, padding after. On-policy
    # (ratio 1), so the clipped term is -A. Entropy 0.5, 0.7 | 0.3, coef 0.1. KL k2 with coef 0.5:
    # logp - ref = 1, 0 | -2  ->  0.5, 0 | 2.  Per token -A - 0.1 H + 0.5 KL:
    #   row 0: -1 - 0.05 + 0.25 = -0.8,  -1 - 0.07 + 0 = -1.07;   row 1: -2 - 0.03 + 1 = -1.03
    # seq_mean_token_mean: (-0.8 - 1.07) / 2 - 1.03 = -1.965.
    logp = T([[-5, -1, -2], [-2.5, -1000, -1000]])  # tokens 1, 2, 3 of each row
    batch = {
        "action_mask": T([[0, 0, 1, 1], [0, 1, 0, 0]]),
        "old_logprobs": T([[0, 0, -1, -2], [0, -2.5, 0, 0]]),
        "ref_logprobs": T([[0, 0, -2, -2], [0, -0.5, 0, 0]]),
        "advantages": T([[0, 0, 1, 1], [0, 2, 0, 0]]),
    }
    fwd = Outputs(logp, entropy=T([[9, 0.5, 0.7], [0.3, 9, 9]]))
    total, stats = ppo_policy_loss(fwd, batch, entropy_coef=0.1, kl_coef=0.5, kl_kind="k2", loss_agg="seq_mean_token_mean")
    assert total.item() == pytest.approx(-1.965)
    assert stats == pytest.approx({"clipped": 0.0, "ratio_sum": 3.0, "tokens": 3.0, "approx_kl_sum": 0.0,
                                   "entropy_sum": 1.5, "kl_sum": 2.5, "loss_sum": -1.965})


def test_value_loss_compares_the_output_at_t_minus_1_with_the_return_at_t():
    # Head outputs 0.5, 1, 7 (the last is the value after the final token: unused); action at
    # tokens 1, 2 with returns 1, 2: 0.5 x ((0.5 - 1)^2 + (1 - 2)^2) = 0.625.
    fwd = Outputs(None, values=T([[0.5, 1.0, 7.0]]))
    batch = {"action_mask": T([[0, 1, 1]]), "returns": T([[0, 1.0, 2.0]])}
    assert value_loss(fwd, batch, clip_eps=None)[0].item() == pytest.approx(0.625)


# ---- stats -------------------------------------------------------------------------------------


def test_masked_whiten_and_explained_variance():
    mask = T([[1, 1, 0]])
    assert flat(masked_whiten(T([[1.0, 3.0, 100.0]]), mask)) == approx([[-1, 1, 0]], rel=1e-6)
    # Returns 1, 2, 3 (var 2/3), values 1, 2, 2: residuals 0, 0, 1 (var 2/9): 1 - 1/3 = 2/3.
    mask = T([[1, 1, 1, 0]])
    assert explained_variance(T([[1, 2, 2, 50]]), T([[1, 2, 3, -50]]), mask) == pytest.approx(2 / 3)
    assert math.isnan(explained_variance(T([[1, 2, 2, 0]]), T([[4, 4, 4, 0]]), mask))


# ---- config and the estimator it selects -------------------------------------------------------


def test_config_validates_combinations():
    assert PPOAlgorithmConfig().needs_critic and not PPOAlgorithmConfig(estimator="grpo").needs_critic
    with pytest.raises(ValidationError, match="grpo uses one scalar reward per trajectory"):
        PPOAlgorithmConfig(estimator="grpo", kl_coef=0.1)
    with pytest.raises(ValidationError, match="k1 as a loss term"):
        PPOAlgorithmConfig(kl_coef=0.1, kl_in_reward=False)
    with pytest.raises(ValidationError, match="dual_clip"):
        PPOAlgorithmConfig(dual_clip=0.5)
    with pytest.raises(ValidationError, match="loss_agg"):
        PPOAlgorithmConfig(loss_agg="seq_mean")
    with pytest.raises(ValidationError, match="estimatr"):
        PPOAlgorithmConfig(estimatr="gae")
    # The KL is a loss term only when it is not in the reward; the kwargs fit the losses.
    cfg = PPOAlgorithmConfig(estimator="grpo", kl_coef=0.1, kl_in_reward=False, kl_kind="k3", dual_clip=3.0)
    assert cfg.policy_loss_kwargs()["kl_coef"] == 0.1
    assert PPOAlgorithmConfig(kl_coef=0.1).policy_loss_kwargs()["kl_coef"] == 0.0
    inspect.signature(ppo_policy_loss).bind(None, {}, **cfg.policy_loss_kwargs())
    inspect.signature(value_loss).bind(None, {}, **cfg.value_loss_kwargs())


def test_compute_advantages_routes_to_the_configured_estimator():
    # GAE, gamma = lam = 1, KL k1 in the reward with coef 0.2: KL 0.5, 0 -> token rewards -0.1, 1.
    # Values 0.5, 0.4: returns 0.9, 1; advantages 0.4, 0.6.
    mask, rewards = T([[0, 1, 1]]), T([1.0])
    old, ref, values = T([[0, -1, -1]]), T([[0, -1.5, -1]]), T([[0, 0.5, 0.4]])
    cfg = PPOAlgorithmConfig(gamma=1.0, lam=1.0, kl_coef=0.2, whiten_advantages=False)
    adv, ret = compute_advantages(cfg, rewards, mask, old_logp=old, ref_logp=ref, values=values)
    assert flat(adv) == approx([[0, 0.4, 0.6]]) and flat(ret) == approx([[0, 0.9, 1.0]])
    # The KL as a loss term leaves the reward alone: returns 1, 1.
    cfg = PPOAlgorithmConfig(gamma=1.0, lam=1.0, kl_coef=0.2, kl_kind="k3", kl_in_reward=False, whiten_advantages=False)
    assert flat(compute_advantages(cfg, rewards, mask, values=values)[1]) == approx([[0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="gae needs the critic's values"):
        compute_advantages(PPOAlgorithmConfig(), rewards, mask)
    with pytest.raises(ValueError, match="rloo needs group_ids"):
        compute_advantages(PPOAlgorithmConfig(estimator="rloo"), rewards, mask)
    adv, ret = compute_advantages(PPOAlgorithmConfig(estimator="rloo"), REWARDS, MASK, group_ids=GROUPS)
    assert ret is None and torch.equal(adv, rloo_advantages(REWARDS, GROUPS, MASK))


def test_without_old_logprobs_the_pass_is_its_own_denominator():
    # The same rows as above, on-policy: leaving old_logprobs out gives the same loss, gradient
    # and stats as passing the pass's own log-probs; the sampler's log-probs -1.5, -2 | -2 differ
    # from this pass's -1, -2 | -2.5 by 0.5, 0 | 0.5: behaviour_gap_sum 1.0.
    batch = {
        "action_mask": T([[0, 0, 1, 1], [0, 1, 0, 0]]),
        "ref_logprobs": T([[0, 0, -2, -2], [0, -0.5, 0, 0]]),
        "advantages": T([[0, 0, 1, 1], [0, 2, 0, 0]]),
        "behaviour_logprobs": T([[0, 0, -1.5, -2], [0, -2, 0, 0]]),
    }
    runs = []
    for old in (None, T([[0, 0, -1, -2], [0, -2.5, 0, 0]])):
        logp = T([[-5, -1, -2], [-2.5, -1000, -1000]]).requires_grad_()
        fwd = Outputs(logp, entropy=T([[9, 0.5, 0.7], [0.3, 9, 9]]))
        total, stats = ppo_policy_loss(fwd, batch | ({"old_logprobs": old} if old is not None else {}), kl_coef=0.5, kl_kind="k2")
        total.backward()
        runs.append((total.item(), logp.grad.clone(), stats))
    (fused, grad_fused, stats_fused), (given, grad_given, stats_given) = runs
    assert fused == pytest.approx(given) and torch.allclose(grad_fused, grad_given)
    assert stats_fused == pytest.approx(stats_given)
    assert stats_fused["ratio_sum"] == stats_fused["tokens"] == 3.0 and stats_fused["behaviour_gap_sum"] == pytest.approx(1.0)
    # The KL stat is kept without a KL term in the loss.
    assert ppo_policy_loss(Outputs(T([[-5, -1, -2], [-2.5, -1000, -1000]]), entropy=T([[0] * 3] * 2)), batch, kl_kind="k2")[1]["kl_sum"] == pytest.approx(2.5)
