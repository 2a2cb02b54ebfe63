"""Distillation losses: the student's next-token distribution against a teacher's top-k.

The teacher sends, per token, its k most likely token ids with their log-probs and the log of
the mass outside them (the tail), never a vocabulary row (``trainers/teacher.py``). The student's
distribution is folded into the same k + 1 buckets (each top-k token, and one bucket for every
other token), and the divergences are taken between the two bucketed distributions:

- ``forward_kl`` KL(teacher || student), the usual logit distillation;
- ``reverse_kl`` KL(student || teacher), mode-seeking (the on-policy mode's loss);
- ``jsd`` the generalised Jensen-Shannon divergence of weight ``beta`` (GKD).

With k equal to the vocabulary size the tail is empty and each divergence is the full one. With a
smaller k the tail bucket keeps the total mass right, but the tail's shape is dropped: the student
is free to spread it as it likes. ``sampled_forward_kl`` is the alternative target: tokens drawn
from the teacher (importance-weighted when drawn from another proposal), an unbiased estimate of
the full forward KL whose gradient does not drop the tail.

Both distributions are taken at the same temperature T and the divergence is multiplied by T^2
(Hinton et al.): the gradient's scale then does not shrink as T grows. ``cross_entropy_mix`` mixes
in the next-token NLL of the data.

``head_loss`` applies a per-token loss over the LM head in row chunks, so no vocabulary-sized
tensor exists for the whole batch at once. With the head frozen (a LoRA student), each chunk's
gradient with respect to the hidden states is computed in the forward pass and the chunk's logits
freed at once: the backward pass is one multiplication, and the LM head runs twice per row in all
(logits, and their gradient back to the hidden states), as a plain matmul with its backward does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal

import torch

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


# ---- buckets ------------------------------------------------------------------------------------


def student_buckets(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's log-probs [n, k] of the teacher's top-k ``ids`` [n, k] and of the rest [n],
    under softmax(logits / temperature); logits [n, V], in fp32 (or wider) whatever their dtype.
    The rest is summed directly (not 1 - sum of the top-k), so a tiny tail keeps its precision
    and an empty one (k = V) is exactly -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _Buckets.apply(logits, ids.long(), temperature)


# Below this (relative to the row's largest exponential, 1) the rest's sum of exponentials has
# lost its precision in fp32: such rows take the rest's log-sum-exp from the logits instead.
_TINY_REST = 1e-30


class _Buckets(torch.autograd.Function):
    """Bucket log-probs with a written-out backward, in few passes over the [n, V] logits: the
    exponentials e = exp((z - max) / T) are taken once, in one buffer kept for backward (which is
    one multiplication of it); the rest's sum is over e with the top-k zeroed, so no 1 - sum.
    The top-k log-probs are taken in log space; a row whose rest underflows (a very peaked
    student, or a low temperature) gets its rest's log-mass and in-tail shares from a log-sum-exp.

    With q = softmax(s), s = z / T, and Q_b the bucket sums: d log Q_b / d s_j = q_j [j in b] / Q_b - q_j,
    so for upstream gradients G_b: dL/ds_j = q_j G_b(j) / Q_b(j) - q_j sum_b G_b, which is
    G_i - Q_i sum_b G_b at a top-k token i (q_i = Q_i) and G_tail (q_j / Q_tail) - q_j sum_b G_b elsewhere.
    """

    @staticmethod
    def forward(ctx, logits, ids, temperature):
        wide = torch.promote_types(logits.dtype, torch.float32)
        peak = logits.max(dim=-1, keepdim=True).values.to(wide)
        e = torch.sub(logits.to(wide), peak) if logits.dtype != wide else torch.sub(logits, peak)
        if temperature != 1.0:
            e.div_(temperature)
        top_scaled = e.gather(-1, ids)  # (z_i - max) / T, exact
        e.exp_()
        top = e.gather(-1, ids)
        rest = e.scatter_(-1, ids, 0.0).sum(-1)
        e.scatter_(-1, ids, top)
        log_total = (rest + top.sum(-1)).log()  # >= 0: the largest exponential is 1
        topk_logp = top_scaled - log_total[:, None]
        tail_logp = rest.log() - log_total
        small = (rest < _TINY_REST) if ids.shape[-1] < logits.shape[-1] else torch.zeros_like(rest, dtype=torch.bool)
        rows = small.nonzero().squeeze(-1)
        tail_share = None
        if rows.numel():
            scaled = (logits[rows].to(wide) - peak[rows]) / temperature
            scaled.scatter_(-1, ids[rows], float("-inf"))
            lse = torch.logsumexp(scaled, dim=-1)
            tail_logp[rows] = lse - log_total[rows]
            tail_share = scaled.sub_(lse[:, None]).exp_()  # q_j / Q_tail within the rest, exact
        ctx.temperature, ctx.dtype = temperature, logits.dtype
        ctx.save_for_backward(e, ids, log_total, topk_logp, rest, rows, tail_share)
        return topk_logp, tail_logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_topk, grad_tail):
        e, ids, log_total, topk_logp, rest, rows, tail_share = ctx.saved_tensors
        grad_topk = torch.zeros_like(topk_logp) if grad_topk is None else grad_topk
        grad_tail = torch.zeros_like(rest) if grad_tail is None else grad_tail
        g_sum = grad_topk.sum(-1) + grad_tail
        per_rest = torch.where(rest >= _TINY_REST, grad_tail / rest.clamp_min(_TINY_REST), torch.zeros_like(rest))
        # Off the top-k, q_j = e_j / total and q_j / Q_tail = e_j / rest (tail_share where rest is tiny).
        # In place: e is not needed again (autograd refuses a second backward through this graph).
        grad = e.mul_(per_rest[:, None] - (g_sum / log_total.exp())[:, None])
        if rows.numel():
            grad[rows] += grad_tail[rows, None] * tail_share
        grad.scatter_(-1, ids, grad_topk - topk_logp.exp() * g_sum[:, None])
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        return grad.to(ctx.dtype), None, None


# Log-probs are floored here before the divergences: an empty bucket (log 0 = -inf) then adds
# exactly 0 and passes no NaN back (0 * inf in a gradient), and its exp is still exactly 0.
_LOG_FLOOR = -1e4


def _buckets(topk: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    return torch.cat([topk, tail[..., None]], dim=-1).clamp_min(_LOG_FLOOR)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_b p_b (log p_b - log q_b) over the last dim; a bucket with p_b = 0 adds 0."""
    p = logp.exp()
    return (p * torch.where(p > 0, logp - logq, torch.zeros_like(p))).sum(-1)


def forward_kl(t_topk: torch.Tensor, t_tail: torch.Tensor, s_topk: torch.Tensor, s_tail: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) [n] over the k + 1 buckets; all arguments are log-probs."""
    return _kl(_buckets(t_topk, t_tail), _buckets(s_topk, s_tail))


def reverse_kl(t_topk: torch.Tensor, t_tail: torch.Tensor, s_topk: torch.Tensor, s_tail: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher) [n] over the k + 1 buckets; all arguments are log-probs."""
    return _kl(_buckets(s_topk, s_tail), _buckets(t_topk, t_tail))


def jsd(
    t_topk: torch.Tensor, t_tail: torch.Tensor, s_topk: torch.Tensor, s_tail: torch.Tensor, beta: float = 0.5
) -> torch.Tensor:
    """beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q, P the teacher, Q the
    student [n]; 0 < beta < 1 (beta = 0.5: the symmetric JSD)."""
    if not 0 < beta < 1:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
    logp, logq = _buckets(t_topk, t_tail), _buckets(s_topk, s_tail)
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log(1 - beta))
    return beta * _kl(logp, logm) + (1 - beta) * _kl(logq, logm)


def divergence(kind: Divergence, beta: float = 0.5) -> Callable[..., torch.Tensor]:
    if kind == "forward_kl":
        return forward_kl
    if kind == "reverse_kl":
        return reverse_kl
    if kind == "jsd":
        return lambda *args: jsd(*args, beta=beta)
    raise ValueError(f"unknown divergence {kind!r}: forward_kl, reverse_kl or jsd")


def sampled_forward_kl(sample_logp: torch.Tensor, student_logp: torch.Tensor, proposal_logp: torch.Tensor | None = None) -> torch.Tensor:
    """Forward KL [n] estimated from s tokens per position drawn from a proposal r:
    sum_i w_i (log p(x_i) - log q(x_i)) with self-normalised weights w_i ~ p(x_i) / r(x_i)
    (uniform when the tokens were drawn from the teacher itself: ``proposal_logp`` None).
    ``sample_logp`` the teacher's log-probs of the drawn tokens [n, s], ``student_logp`` the
    student's [n, s]. Its gradient, -sum_i w_i grad log q(x_i), is the full forward KL's in
    expectation (for r = p), tail included."""
    if proposal_logp is None:
        w = torch.full_like(sample_logp, 1.0 / sample_logp.shape[-1])
    else:
        w = torch.softmax(sample_logp - proposal_logp, dim=-1)
    return (w * (sample_logp - student_logp)).sum(-1)


# ---- per-token distillation loss ----------------------------------------------------------------


def distill_token_loss(
    logits: torch.Tensor,
    targets: Mapping[str, torch.Tensor],
    *,
    kind: Divergence = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    ce_weight: float = 0.0,
) -> torch.Tensor:
    """The per-token loss [n] of the student's ``logits`` [n, V] against the teacher's targets:
    ``ids`` [n, k], ``logp`` [n, k] and ``tail_logp`` [n] (at ``temperature``), or drawn tokens
    ``sample_ids`` / ``sample_logp`` [n, s] (``proposal_logp`` optional); ``labels`` [n] the data's
    next tokens when ``ce_weight`` > 0. Returns T^2 * divergence, mixed as
    (1 - ce_weight) * that + ce_weight * NLL(labels) (the NLL at temperature 1)."""
    if not 0 <= ce_weight <= 1:
        raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}")
    if "sample_ids" in targets:
        if kind != "forward_kl":
            raise ValueError(f"sampled targets estimate the forward KL only, not {kind!r}")
        z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
        student = z.gather(-1, targets["sample_ids"].long()) - torch.logsumexp(z, dim=-1, keepdim=True)
        div = sampled_forward_kl(targets["sample_logp"], student, targets.get("proposal_logp"))
    else:
        s_topk, s_tail = student_buckets(logits, targets["ids"], temperature)
        div = divergence(kind, beta)(targets["logp"], targets["tail_logp"], s_topk, s_tail)
    loss = div * temperature**2
    if ce_weight > 0:
        nll = -torch.log_softmax(_wide(logits), dim=-1).gather(-1, targets["labels"].long()[:, None]).squeeze(-1)
        loss = (1 - ce_weight) * loss + ce_weight * nll
    return loss


# ---- over the LM head, in chunks ----------------------------------------------------------------


TokenLoss = Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]


def head_loss(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    token_loss: TokenLoss,
    targets: Mapping[str, torch.Tensor],
    weights: torch.Tensor,
    *,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_t weights[t] * token_loss(lm_head(hidden[t]), targets[t]) over rows of ``hidden`` [N, H]
    (targets' tensors and ``weights`` [N] row-aligned), and the per-token losses [N] (detached).

    The head runs over ``chunk_tokens`` rows at a time. With gradients on and the head frozen,
    each chunk's gradient with respect to its rows is computed right away and kept ([N, H], as
    large as ``hidden``), and the backward pass scales it; with trainable head parameters (a
    LoRA-adapted or full head) each chunk is checkpointed instead (recomputed in backward).
    A row with weight 0 costs its share of the matmul but adds nothing.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if weights.shape != hidden.shape[:1]:
        raise ValueError(f"weights {tuple(weights.shape)} do not match hidden rows {hidden.shape[0]}")
    for key, value in targets.items():
        if value.shape[:1] != hidden.shape[:1]:
            raise ValueError(f"targets[{key!r}] has {value.shape[0]} rows, hidden has {hidden.shape[0]}")
    keys = sorted(targets)
    columns = [targets[k] for k in keys]
    if not torch.is_grad_enabled() or not hidden.requires_grad:
        with torch.no_grad():
            per = _chunked(hidden, lm_head, token_loss, keys, columns, chunk_tokens)
        return (per * weights).sum(), per
    if any(p.requires_grad for p in lm_head.parameters()):
        from torch.utils.checkpoint import checkpoint

        pers = []
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            chunk = {k: c[rows] for k, c in zip(keys, columns)}
            pers.append(checkpoint(lambda h, chunk=chunk: token_loss(lm_head(h), chunk), hidden[rows], use_reentrant=False))
        per = torch.cat(pers) if pers else hidden[:0].sum(-1)  # no rows: still a graph to run backward on
        return (per * weights).sum(), per.detach()
    total, per = _FrozenHeadLoss.apply(hidden, weights, lm_head, token_loss, keys, chunk_tokens, *columns)
    return total, per


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunked(hidden, lm_head, token_loss, keys, columns, chunk_tokens) -> torch.Tensor:
    out = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        out.append(_wide(token_loss(lm_head(hidden[rows]), {k: c[rows] for k, c in zip(keys, columns)})))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


class _FrozenHeadLoss(torch.autograd.Function):
    """The chunked loss over a frozen head, each chunk's gradient to its rows taken in forward."""

    @staticmethod
    def forward(ctx, hidden, weights, lm_head, token_loss, keys, chunk_tokens, *columns):
        grad = torch.empty_like(hidden)
        pers = []
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            with torch.enable_grad():
                h = hidden[rows].detach().requires_grad_(True)
                per = _wide(token_loss(lm_head(h), {k: c[rows] for k, c in zip(keys, columns)}))
                (grad[rows],) = torch.autograd.grad((per * weights[rows]).sum(), h)
            pers.append(per.detach())
        per = torch.cat(pers) if pers else hidden.new_zeros(0, dtype=torch.float32)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(per)
        ctx.n_inputs = 6 + len(columns)
        return (per * weights).sum(), per

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, _grad_per):
        (grad,) = ctx.saved_tensors
        return (grad * grad_total, *[None] * (ctx.n_inputs - 1))


# ---- the learner's loss -------------------------------------------------------------------------


def distill_loss(
    fwd,
    batch: dict[str, torch.Tensor],
    *,
    kind: Divergence = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    ce_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``Learner.train_step`` loss: the distillation loss summed over the tokens whose
    ``loss_mask`` is 1 (units: those tokens). Per-token batch columns, aligned with ``input_ids``
    (entry t: the teacher's distribution for token t, read at position t - 1): ``t_ids`` [rows, T, k],
    ``t_logp`` [rows, T, k], ``t_tail`` [rows, T]. Stats: the loss sum, the tokens, and how many of
    them the student's most likely token is the teacher's (``top1_agree``)."""
    from trainers.logprobs import output_embeddings

    mask = batch["loss_mask"][:, 1:].bool()
    rows = fwd.hidden()[:, :-1][mask]
    targets = {
        "ids": batch["t_ids"][:, 1:][mask],
        "logp": batch["t_logp"][:, 1:][mask],
        "tail_logp": batch["t_tail"][:, 1:][mask],
        "labels": batch["input_ids"][:, 1:][mask],
    }
    head = output_embeddings(fwd.model)
    agree: list[torch.Tensor] = []  # per chunk, in order (a checkpointed chunk appends again in backward)

    def token_loss(logits: torch.Tensor, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        agree.append((logits.detach().argmax(-1) == t["ids"][:, 0].long()).sum())
        return distill_token_loss(logits, t, kind=kind, temperature=temperature, beta=beta, ce_weight=ce_weight)

    weights = torch.ones(rows.shape[0], device=rows.device, dtype=torch.float32)
    total, _ = head_loss(rows, head, token_loss, targets, weights, chunk_tokens=fwd.chunk_tokens)
    chunks = -(-rows.shape[0] // fwd.chunk_tokens)
    top1 = float(sum(a.item() for a in agree[:chunks]))
    return total, {"distill_sum": total.item(), "tokens": float(rows.shape[0]), "top1_agree": top1}
