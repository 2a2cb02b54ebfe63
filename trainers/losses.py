"""Losses, each a pure function of a ``Forward`` (the model's outputs, on demand) and the batch.

Signature of every loss: ``loss(fwd, batch, **kwargs) -> (total, stats)``. ``total`` is a sum
over the micro-batch's loss units (tokens, or pairs); the learner divides it by the step's
global count of those units, so N ranks with batch B follow the same curve as one rank with
N*B. ``stats`` are sums too (floats), added up over micro-batches and ranks by the caller.

Per-token batch columns are aligned with ``input_ids`` (entry t belongs to token t, as a
trajectory records them); a log-prob or value of token t comes from position t-1, so the
losses compare ``column[:, 1:]`` with ``fwd.logprobs()`` and ``fwd.values()[:, :-1]``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

Stats = dict[str, float]


# ---- supervised: next-token NLL on the loss mask ----------------------------------------------


def uses_flash_attention(model) -> bool:
    """Whether ``model`` (a transformers model, a PEFT wrapper, or a DeepSpeed engine around
    either) runs flash attention. An engine's own ``config`` is DeepSpeed's, so look inside it."""
    model = getattr(model, "module", model)
    return "flash" in (getattr(model.config, "_attn_implementation", None) or "")


def model_inputs(batch: dict[str, Any], flatten: bool = False) -> tuple[dict[str, Any], torch.Tensor]:
    """The model's keyword arguments for a collated micro-batch, and which targets carry loss.

    Targets are ``input_ids[:, 1:]``; the mask returned is their ``loss_mask``, shape [rows, seq-1].
    Unpacked batches pass the padding mask. Packed batches (with ``position_ids``) pass the
    position ids, no attention mask and no cache: transformers only builds its per-document
    causal mask from position-id restarts when ``attention_mask`` and ``past_key_values`` are
    None (``use_cache`` defaults to True and would create an empty cache), and right pads need no
    mask (no real token attends forward; collate gives them a document of their own).
    ``flatten`` lays the rows end to end in one row: flash attention finds documents from position
    ids only in a batch of one (varlen over the restarts) and otherwise lets them attend to each
    other. A row's last token then precedes the next row's first, and is kept out of the loss.
    """
    ids = torch.as_tensor(batch["input_ids"])
    targets = torch.as_tensor(batch["loss_mask"])[:, 1:]
    if "position_ids" not in batch:
        attn = torch.as_tensor(batch["attention_mask"]) if "attention_mask" in batch else None
        return {"input_ids": ids, "attention_mask": attn}, targets
    positions = torch.as_tensor(batch["position_ids"])
    if flatten:
        targets = torch.nn.functional.pad(targets, (0, 1)).reshape(1, -1)[:, :-1]
        ids, positions = ids.reshape(1, -1), positions.reshape(1, -1)
    return {"input_ids": ids, "position_ids": positions, "use_cache": False}, targets


def token_nll(model, batch: dict[str, Any], device: torch.device | str = "cpu", flatten: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL at the target columns some row needs, and the loss mask there ([rows, kept]).

    Logits are computed only at those columns (``logits_to_keep``): with a large vocabulary and
    loss on assistant turns only, the LM head is otherwise most of the cost. ``model`` is anything
    called like a transformers causal LM (a DeepSpeed engine, or the model itself in tests).
    """
    inputs, mask = model_inputs(batch, flatten)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    mask = mask.to(device)
    keep = mask.any(dim=0).nonzero().squeeze(-1)
    if keep.numel() == 0:
        return torch.zeros(mask.shape[0], 0, device=device), mask[:, keep]
    logits = model(**inputs, logits_to_keep=keep).logits.float()
    targets = inputs["input_ids"][:, keep + 1]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    return -logp, mask[:, keep].to(logp.dtype)


def sft_nll(fwd, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
    """Summed next-token NLL over the tokens whose ``loss_mask`` is 1; units: those tokens."""
    nll, mask = token_nll(fwd.model, batch, batch["input_ids"].device, flatten=uses_flash_attention(fwd.model))
    total = (nll * mask).sum()
    return total, {"nll_sum": total.item(), "tokens": float(mask.sum().item())}


# ---- PPO: clipped policy objective, KL estimators, clipped value loss, aggregation ---------------

LossAgg = Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"]
KLKind = Literal["k1", "k2", "k3"]


def loss_units(mask: torch.Tensor, mode: LossAgg = "token_mean") -> float:
    """What a loss aggregated in ``mode`` is averaged over, counted in ``mask`` ([rows, T], one row
    per sequence): the action tokens (``token_mean``), else the rows with at least one of them."""
    if mode == "token_mean":
        return float(mask.sum())
    if mode in ("seq_mean_token_sum", "seq_mean_token_mean"):
        return float((mask.sum(-1) > 0).sum())
    raise ValueError(f"unknown loss aggregation {mode!r}: one of {LossAgg.__args__}")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: LossAgg = "token_mean") -> tuple[torch.Tensor, float]:
    """One micro-batch's part of a loss aggregated as verl's ``loss_agg_mode`` does, in the form
    ``Learner.train_step`` wants: ``(sum to backprop, units)``. The step's objective is the sum over
    micro-batches and ranks divided by the step's units, the ``denominator`` the driver passes:
    ``loss_units`` of the whole step's action mask (units add up over rows, so that is also the sum
    of every micro-batch's units). Rows are sequences (unpacked batches).

    - ``token_mean``: every action token of the step weighs the same; sums the per-token losses.
    - ``seq_mean_token_sum``: each sequence's token sum, averaged over sequences; the micro-batch
      sum is the same as ``token_mean``'s, only the denominator (sequences) differs.
    - ``seq_mean_token_mean``: each sequence's token mean, averaged over sequences: every sequence
      weighs the same, so a token of a long answer weighs less than one of a short answer.

    A row without an action token counts in no mode; values under the mask's zeros never matter.
    """
    units = loss_units(mask, mode)
    keep = mask.bool()
    per_row = torch.where(keep, per_token, torch.zeros_like(per_token)).sum(-1)
    if mode == "seq_mean_token_mean":
        per_row = per_row / keep.sum(-1).clamp(min=1)
    return per_row.sum(), units


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2,
    dual_clip: float | None = None, loss_agg: LossAgg = "token_mean",
) -> tuple[torch.Tensor, Stats]:
    """PPO's clipped surrogate, negated and aggregated over the masked tokens (``aggregate``; by
    default their sum).

    Per token: ``max(-A * r, -A * clip(r, 1 - eps, 1 + eps))`` with ``r = exp(logp - old_logp)``.
    Dual clip (Ye et al. 2020), ``dual_clip`` = c > 1: where A < 0 the token's loss is capped at
    ``-c * A``, so a bad action whose ratio grew far above 1 (stale, off-policy samples) cannot
    dominate the step; a capped token has no gradient.
    Stats: ``clipped`` (tokens where the clipped term was the larger), ``ratio_sum``, ``tokens``,
    and with dual clip ``dual_clipped`` (tokens where the cap applied).
    """
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be above 1 (the cap is dual_clip x |A|), got {dual_clip}")
    keep = mask.bool()
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    stats = {
        "clipped": float(((clipped > unclipped) & keep).sum()),
        "ratio_sum": float(torch.where(keep, ratio.detach(), 0.0).sum()),
        "tokens": float(keep.sum()),
    }
    if dual_clip is not None:
        cap = -dual_clip * advantages
        capped = (advantages < 0) & (per_token > cap)
        per_token = torch.where(capped, cap, per_token)
        stats["dual_clipped"] = float((capped & keep).sum())
    return aggregate(per_token, mask, loss_agg)[0], stats


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens, never negative:
    ``exp(ref - logp) - (ref - logp) - 1`` (Schulman's k3)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLKind = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled from the policy
    (Schulman, "Approximating KL divergence"): ``k1 = logp - ref`` (unbiased, negative on some
    tokens, high variance), ``k2 = (logp - ref)^2 / 2`` (biased, low variance), ``k3`` (``kl_k3``:
    unbiased, never negative). As a loss term k1 pushes nothing on average (its expected gradient
    under the policy is zero): it belongs in the reward."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if kind == "k3":
        return kl_k3(logp, ref_logp)
    raise ValueError(f"unknown KL estimator {kind!r}: one of {KLKind.__args__}")


def approx_kl(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(behaviour || current policy) summed over the masked tokens: k3 with the behaviour policy
    (which sampled the tokens) in the policy's place. Divided by the tokens, it says how far the
    update has moved from the data; ``ppo_policy_loss`` reports it as ``approx_kl_sum``."""
    return torch.where(mask.bool(), kl_k3(old_logp, logp), 0.0).sum()


def ppo_policy_loss(
    fwd, batch: dict[str, torch.Tensor], clip_eps: float = 0.2, temperature: float = 1.0,
    entropy_coef: float = 0.0, kl_coef: float = 0.0, kl_kind: KLKind = "k3",
    dual_clip: float | None = None, loss_agg: LossAgg = "token_mean",
) -> tuple[torch.Tensor, Stats]:
    """The actor's loss on trajectories: columns ``action_mask``, ``old_logprobs``, ``advantages``
    (and ``ref_logprobs`` when ``kl_coef`` > 0: the KL to the reference as a loss term, estimated
    by ``kl_kind``); log-probs taken at the sampling temperature. Every term is aggregated by
    ``loss_agg`` (see ``aggregate`` for the denominator that goes with it); the stats stay sums
    over tokens: ``entropy_sum``, ``kl_sum`` (whenever ``ref_logprobs`` is given), ``approx_kl_sum``
    (see ``approx_kl``), ``loss_sum``.

    Without ``old_logprobs``, this pass is the first on the weights that sampled: its own detached
    log-probs are the ratio's denominator (the ratio is 1), so no pass of their own is needed. A
    ``behaviour_logprobs`` column (the sampler's) then gives ``behaviour_gap_sum``, the summed
    absolute gap between the sampler's log-probs and this pass's."""
    # The entropy comes from the same pass over the vocabulary as the log-probs (a stat even
    # without a bonus; unused, it adds nothing to the backward pass).
    logp, entropy = fwd.logprobs(temperature, entropy=True)
    mask = batch["action_mask"][:, 1:].to(logp.dtype)
    old = batch["old_logprobs"][:, 1:].float() if "old_logprobs" in batch else logp.detach()
    total, stats = clipped_policy_loss(logp, old, batch["advantages"][:, 1:].float(), mask, clip_eps, dual_clip, loss_agg)
    stats["approx_kl_sum"] = float(approx_kl(logp.detach(), old, mask))
    stats["entropy_sum"] = float(aggregate(entropy.detach(), mask)[0])
    if entropy_coef > 0:
        total = total - entropy_coef * aggregate(entropy, mask, loss_agg)[0]
    if "ref_logprobs" in batch:
        # Padded columns hold reference log-prob 0: exp(0 - logp) can overflow there, and
        # inf * 0 is NaN (in the backward pass too), so they compare the policy with itself.
        ref = torch.where(mask.bool(), batch["ref_logprobs"][:, 1:].float(), logp.detach())
        kl = kl_estimate(logp, ref, kl_kind)
        if kl_coef > 0:
            total = total + kl_coef * aggregate(kl, mask, loss_agg)[0]
        stats["kl_sum"] = float(aggregate(kl.detach(), mask)[0])
    if "behaviour_logprobs" in batch:
        stats["behaviour_gap_sum"] = float(aggregate((batch["behaviour_logprobs"][:, 1:].float() - logp.detach()).abs(), mask)[0])
    stats["loss_sum"] = float(total.detach())
    return total, stats


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_eps: float | None = 0.2,
    loss_agg: LossAgg = "token_mean",
) -> tuple[torch.Tensor, Stats]:
    """``0.5 * max((v - R)^2, (old + clip(v - old, -eps, eps) - R)^2)`` aggregated over the mask
    (by default summed; plain squared error when ``clip_eps`` is None)."""
    loss = (values - returns) ** 2
    if clip_eps is not None:
        clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    total = 0.5 * aggregate(loss, mask, loss_agg)[0]
    return total, {"value_loss_sum": float(total.detach()), "tokens": float(mask.sum())}


def value_loss(
    fwd, batch: dict[str, torch.Tensor], clip_eps: float | None = 0.2, loss_agg: LossAgg = "token_mean"
) -> tuple[torch.Tensor, Stats]:
    """The critic's loss: columns ``action_mask``, ``returns`` and ``old_values`` (when clipping).

    The value of the state in which token t was generated is the head's output at t-1: it is
    compared with ``returns[t]``. ``old_values`` is the head's output as ``Learner.values``
    returns it (entry t = output at token t, one per token), so it is read at t-1 as well."""
    values = fwd.values()[:, :-1]
    mask = batch["action_mask"][:, 1:]
    old = batch["old_values"][:, :-1].float() if clip_eps is not None else values.detach()
    return clipped_value_loss(values, old, batch["returns"][:, 1:].float(), mask, clip_eps, loss_agg)


# ---- reward model: Bradley–Terry over (chosen, rejected) pairs ---------------------------------


def bradley_terry_core(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> tuple[torch.Tensor, Stats]:
    """``sum(-log sigmoid(chosen - rejected - margin))`` over pairs: the negative log-likelihood
    that each chosen answer beats its rejected one, asking it to win by at least ``margin``.

    Stats: ``pairs``, ``correct`` (pairs where chosen scores above rejected, margin aside) and
    ``loss_sum``.
    """
    if chosen.shape != rejected.shape:
        raise ValueError(f"{tuple(chosen.shape)} chosen scores for {tuple(rejected.shape)} rejected ones")
    diff = chosen.float() - rejected.float()
    if margin is not None:
        diff = diff - margin.to(diff)
    total = -torch.nn.functional.logsigmoid(diff).sum()
    stats = {
        "pairs": float(chosen.numel()),
        "correct": float((chosen.detach() > rejected.detach()).sum()),
        "loss_sum": float(total.detach()),
    }
    return total, stats


def bradley_terry_loss(fwd, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
    """A reward model's loss; units: pairs. Rows come in consecutive (chosen, rejected) pairs: row
    2i is the better answer, row 2i+1 the worse one to the same prompt. The optional per-row column
    ``margin`` is read at the chosen rows. The score of a row is the reward head's value at its
    last real token."""
    scores = fwd.last_token_values()
    if scores.shape[0] % 2:
        raise ValueError(f"{scores.shape[0]} rows: a Bradley–Terry batch holds (chosen, rejected) pairs, an even number of rows")
    margin = batch["margin"][0::2] if "margin" in batch else None
    return bradley_terry_core(scores[0::2], scores[1::2], margin)
