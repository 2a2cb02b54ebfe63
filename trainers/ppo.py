"""PPO's advantage side as pure functions: per-token rewards with the KL to the reference, GAE,
critic-free estimators (GRPO, RLOO, REINFORCE++), stats, and the algorithm's config.

Tensors are padded ``[rows, T]`` columns aligned with ``input_ids``, as trajectories record them:
entry t belongs to token t. ``action_mask[t]`` is 1 on tokens the policy generated; prompt,
tool-result and padding tokens are 0 and never carry a reward, an advantage or a return.
``old_logp``/``ref_logp`` are token-aligned too (the trajectory's log-probs; a learner's
``logprobs`` of a sequence prefixed with one 0.0). A value column ``values[t]`` is V(s_t), the value
of the state in which token t is generated: the critic head's output at t-1, which is what
``token_values`` makes of ``Learner.values``. The learner's losses (``trainers.losses``) read the
advantages and returns made here at ``[:, 1:]``, beside log-probs and values taken at t-1.

Every step is an action token: the tokens between two turns (a tool's result) are not steps of
their own. GAE and the returns go from one action token straight to the next, so the first token
of turn 2 bootstraps the last token of turn 1, undiscounted by the length of the tool's output.
A trajectory ends at its last action token (V = 0 after it).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from tooltune.config import StrictModel
from trainers.losses import KLKind, LossAgg, kl_estimate

Estimator = Literal["gae", "grpo", "rloo", "reinforce_pp"]


class PPOAlgorithmConfig(StrictModel):
    """How advantages are estimated and what the actor's and critic's losses are.

    Only ``gae`` needs a critic (``needs_critic``): the driver starts a critic group for it and
    none for the critic-free estimators. GRPO and RLOO compare whole trajectories' scalar
    rewards within a group (k samples of one prompt), so their KL to the reference is a loss term
    (``kl_in_reward`` false); GAE and REINFORCE++ take it in the reward or as a loss term.
    """

    estimator: Estimator = "gae"
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    kl_coef: float = Field(0.0, ge=0)
    kl_kind: KLKind = "k1"
    # True: -kl_coef * KL on every action token's reward; False: a term of the actor's loss.
    kl_in_reward: bool = True
    # GAE's advantages whitened over the batch's action tokens (REINFORCE++ always is).
    whiten_advantages: bool = True
    # False: Dr GRPO (rewards centred on the group mean, not divided by the group's std).
    grpo_scale_std: bool = True
    clip_eps: float = Field(0.2, gt=0, lt=1)
    dual_clip: float | None = Field(None, gt=1)
    # None: the critic's loss is plain squared error.
    value_clip: float | None = Field(0.2, gt=0)
    entropy_coef: float = Field(0.0, ge=0)
    loss_agg: LossAgg = "token_mean"

    @model_validator(mode="after")
    def _consistent(self) -> PPOAlgorithmConfig:
        if self.kl_coef > 0 and self.kl_in_reward and self.estimator in ("grpo", "rloo"):
            raise ValueError(
                f"{self.estimator} uses one scalar reward per trajectory: set kl_in_reward=false (the KL as a loss term)"
            )
        if self.kl_coef > 0 and not self.kl_in_reward and self.kl_kind == "k1":
            raise ValueError("kl_kind k1 as a loss term has zero expected gradient: use k2 or k3, or kl_in_reward=true")
        return self

    @property
    def needs_critic(self) -> bool:
        return self.estimator == "gae"

    def policy_loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``trainers.losses.ppo_policy_loss`` (sampling temperature aside)."""
        return {
            "clip_eps": self.clip_eps, "dual_clip": self.dual_clip, "entropy_coef": self.entropy_coef,
            "kl_coef": 0.0 if self.kl_in_reward else self.kl_coef, "kl_kind": self.kl_kind, "loss_agg": self.loss_agg,
        }

    def value_loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``trainers.losses.value_loss``."""
        return {"clip_eps": self.value_clip, "loss_agg": self.loss_agg}


# ---- masked statistics -------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    keep = mask.bool()
    return torch.where(keep, x, torch.zeros_like(x)).sum() / keep.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance (divided by the count, not count - 1) of the masked entries."""
    keep = mask.bool()
    centred = torch.where(keep, x - masked_mean(x, mask), torch.zeros_like(x))
    return (centred**2).sum() / keep.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries of the whole batch; 0 elsewhere."""
    out = (x - masked_mean(x, mask)) * torch.rsqrt(masked_var(x, mask) + eps)
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var[R - V] / Var[R]`` over the action tokens (``values`` token-aligned, as for
    ``gae``): 1 is a perfect critic, 0 one no better than a constant, below 0 worse. NaN when the
    returns are all equal (there is no variance to explain)."""
    var = masked_var(returns, mask)
    if var.item() == 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask) / var)


# ---- rewards and GAE ---------------------------------------------------------------------------


def token_values(head_values: torch.Tensor) -> torch.Tensor:
    """``Learner.values`` (entry t = the head's output at token t) as a token-aligned value column:
    entry t is the output at t-1, the value of the state in which token t is generated. Entry 0
    (the first prompt token, never an action) is 0."""
    return torch.nn.functional.pad(head_values[:, :-1], (1, 0))


def last_action_index(action_mask: torch.Tensor) -> torch.Tensor:
    """Each row's last action token; a row without one is an error (its reward would go nowhere)."""
    keep = action_mask.bool()
    empty = (~keep.any(-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have no action token: a trajectory's reward needs one")
    positions = torch.arange(keep.shape[-1], device=keep.device).expand_as(keep)
    return torch.where(keep, positions, -1).argmax(-1)


def token_rewards(
    rewards: torch.Tensor, action_mask: torch.Tensor, old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0, kind: KLKind = "k1",
) -> torch.Tensor:
    """Per-token rewards (OpenRLHF/verl's KL in the reward): ``-kl_coef * KL`` on every action
    token (``kl_estimate`` of the policy that sampled them against the reference), plus each
    trajectory's scalar reward (``rewards``, one per row) at its last action token. Tokens outside
    the mask (tool results between turns included) get 0."""
    keep = action_mask.bool()
    out = torch.zeros(keep.shape, dtype=rewards.dtype, device=rewards.device)
    if kl_coef > 0:
        if old_logp is None or ref_logp is None:
            raise ValueError("a KL penalty in the reward needs old_logp and ref_logp")
        # Outside the mask the log-probs are padding (ref 0.0): k3's exp may overflow there.
        out = torch.where(keep, -kl_coef * kl_estimate(old_logp.to(out), ref_logp.to(out), kind), out)
    rows = torch.arange(keep.shape[0], device=keep.device)
    out[rows, last_action_index(keep)] += rewards
    return out


def gae(
    rewards: torch.Tensor, values: torch.Tensor, action_mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the action tokens: ``(advantages, returns)``.

    With a_1 < ... < a_n the action tokens of a row: ``delta_i = r[a_i] + gamma V[a_(i+1)] -
    V[a_i]`` (V[a_(n+1)] = 0), ``A_i = delta_i + gamma lam A_(i+1)``, ``returns = A + V``. Tokens
    outside the mask are skipped, not steps with reward 0 (see the module's docstring); their
    rewards, values and outputs do not count (outputs are 0 there). ``values`` is token-aligned
    (``token_values``).
    """
    keep = action_mask.bool()
    advantages = torch.zeros_like(rewards)
    next_value = next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[-1])):
        here = keep[:, t]
        adv = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * next_adv
        advantages[:, t] = torch.where(here, adv, 0.0)
        next_value = torch.where(here, values[:, t], next_value)
        next_adv = torch.where(here, adv, next_adv)
    returns = torch.where(keep, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


# ---- critic-free estimators --------------------------------------------------------------------


def _groups(group_ids: Sequence[Hashable] | torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's group index (0..G-1, by first appearance) and each group's size."""
    ids = group_ids.tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)
    index = {g: i for i, g in enumerate(dict.fromkeys(ids))}
    inverse = torch.tensor([index[g] for g in ids], device=device)
    return inverse, torch.bincount(inverse, minlength=len(index))


def _group_sums(x: torch.Tensor, inverse: torch.Tensor, groups: int) -> torch.Tensor:
    return torch.zeros(groups, dtype=x.dtype, device=x.device).index_add_(0, inverse, x)


def grpo_advantages(
    rewards: torch.Tensor, group_ids: Sequence[Hashable] | torch.Tensor, action_mask: torch.Tensor,
    scale_std: bool = True, eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO: ``(r - mean_g) / (std_g + eps)`` within each group g (rows sharing a group id: the
    samples of one prompt; std with Bessel's correction, as GRPO's implementations), or
    ``r - mean_g`` with ``scale_std`` false (Dr GRPO), on every action token of the row.
    A group of one gets 0: with no other sample there is nothing to compare against (verl gives
    it the raw reward instead)."""
    inverse, sizes = _groups(group_ids, rewards.device)
    mean = _group_sums(rewards, inverse, len(sizes)) / sizes
    adv = rewards - mean[inverse]
    if scale_std:
        var = _group_sums(adv**2, inverse, len(sizes)) / (sizes - 1).clamp(min=1)
        adv = adv / (var.sqrt()[inverse] + eps)
    return adv[:, None] * action_mask.to(adv)


def rloo_advantages(
    rewards: torch.Tensor, group_ids: Sequence[Hashable] | torch.Tensor, action_mask: torch.Tensor
) -> torch.Tensor:
    """RLOO: ``r_i`` minus the mean reward of the other samples of its group, on every action
    token of the row. A group of one has no other sample to form a baseline: an error."""
    inverse, sizes = _groups(group_ids, rewards.device)
    if (sizes < 2).any():
        raise ValueError(f"RLOO needs at least 2 samples per group; group sizes {sizes.tolist()}")
    others = (_group_sums(rewards, inverse, len(sizes))[inverse] - rewards) / (sizes[inverse] - 1)
    return (rewards - others)[:, None] * action_mask.to(rewards)


def reinforce_pp_advantages(rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++: each action token's discounted return (``rewards`` per token, the KL to the
    reference usually in them: ``token_rewards``), whitened over all action tokens of the batch.
    The returns are GAE's with no critic and lam = 1, so tool results are skipped the same way."""
    _, returns = gae(rewards, torch.zeros_like(rewards), action_mask, gamma, 1.0)
    return masked_whiten(returns, action_mask)


def compute_advantages(
    cfg: PPOAlgorithmConfig, rewards: torch.Tensor, action_mask: torch.Tensor, *,
    old_logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
    values: torch.Tensor | None = None, group_ids: Sequence[Hashable] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The batch's advantages under ``cfg``, and the critic's returns (None without a critic).

    ``rewards``: one scalar per row; ``values``: token-aligned (``token_values``), for GAE;
    ``group_ids``: one per row, for GRPO and RLOO; ``old_logp``/``ref_logp`` when the KL is in the
    reward."""
    if cfg.estimator in ("grpo", "rloo"):
        if group_ids is None:
            raise ValueError(f"{cfg.estimator} needs group_ids (which rows sample the same prompt)")
        if cfg.estimator == "grpo":
            return grpo_advantages(rewards, group_ids, action_mask, cfg.grpo_scale_std), None
        return rloo_advantages(rewards, group_ids, action_mask), None
    kl_coef = cfg.kl_coef if cfg.kl_in_reward else 0.0
    per_token = token_rewards(rewards, action_mask, old_logp, ref_logp, kl_coef, cfg.kl_kind)
    if cfg.estimator == "reinforce_pp":
        return reinforce_pp_advantages(per_token, action_mask, cfg.gamma), None
    if values is None:
        raise ValueError("gae needs the critic's values")
    advantages, returns = gae(per_token, values, action_mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, action_mask)
    return advantages, returns
