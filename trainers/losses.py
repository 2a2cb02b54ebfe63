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

from typing import Any

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


# ---- PPO: clipped policy objective, clipped value loss -----------------------------------------


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2
) -> tuple[torch.Tensor, Stats]:
    """PPO's clipped surrogate, negated and summed over the masked tokens.

    Per token: ``max(-A * r, -A * clip(r, 1 - eps, 1 + eps))`` with ``r = exp(logp - old_logp)``.
    Stats: ``clipped`` (tokens where the clipped term was the larger), ``ratio_sum``, ``tokens``.
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    stats = {
        "clipped": float(((clipped > unclipped).to(mask.dtype) * mask).sum()),
        "ratio_sum": float((ratio.detach() * mask).sum()),
        "tokens": float(mask.sum()),
    }
    return (per_token * mask).sum(), stats


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens, never negative:
    ``exp(ref - logp) - (ref - logp) - 1`` (Schulman's k3)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def ppo_policy_loss(
    fwd, batch: dict[str, torch.Tensor], clip_eps: float = 0.2, temperature: float = 1.0,
    entropy_coef: float = 0.0, kl_coef: float = 0.0,
) -> tuple[torch.Tensor, Stats]:
    """The actor's loss on trajectories: columns ``action_mask``, ``old_logprobs``, ``advantages``
    (and ``ref_logprobs`` when ``kl_coef`` > 0); log-probs taken at the sampling temperature."""
    logp, entropy = fwd.logprobs(temperature, entropy=entropy_coef > 0)
    mask = batch["action_mask"][:, 1:].to(logp.dtype)
    total, stats = clipped_policy_loss(logp, batch["old_logprobs"][:, 1:].float(), batch["advantages"][:, 1:].float(), mask, clip_eps)
    if entropy_coef > 0:
        ent = (entropy * mask).sum()
        total = total - entropy_coef * ent
        stats["entropy_sum"] = float(ent)
    if kl_coef > 0:
        # Padded columns hold reference log-prob 0: exp(0 - logp) can overflow there, and
        # inf * 0 is NaN, so they compare the policy with itself instead.
        ref = torch.where(mask.bool(), batch["ref_logprobs"][:, 1:].float(), logp.detach())
        kl = (kl_k3(logp, ref) * mask).sum()
        total = total + kl_coef * kl
        stats["kl_sum"] = float(kl)
    stats["loss_sum"] = float(total.detach())
    return total, stats


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_eps: float | None = 0.2
) -> tuple[torch.Tensor, Stats]:
    """``0.5 * max((v - R)^2, (old + clip(v - old, -eps, eps) - R)^2)`` summed over the mask
    (plain squared error when ``clip_eps`` is None)."""
    mask = mask.to(values.dtype)
    loss = (values - returns) ** 2
    if clip_eps is not None:
        clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    total = 0.5 * (loss * mask).sum()
    return total, {"value_loss_sum": float(total.detach()), "tokens": float(mask.sum())}


def value_loss(fwd, batch: dict[str, torch.Tensor], clip_eps: float | None = 0.2) -> tuple[torch.Tensor, Stats]:
    """The critic's loss: columns ``action_mask``, ``returns`` and ``old_values`` (when clipping).

    The value of the state in which token t was generated is the head's output at t-1: it is
    compared with ``returns[t]``. ``old_values`` is the head's output as ``Learner.values``
    returns it (entry t = output at token t, one per token), so it is read at t-1 as well."""
    values = fwd.values()[:, :-1]
    mask = batch["action_mask"][:, 1:]
    old = batch["old_values"][:, :-1].float() if clip_eps is not None else values.detach()
    return clipped_value_loss(values, old, batch["returns"][:, 1:].float(), mask, clip_eps)


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
