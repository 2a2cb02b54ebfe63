"""Per-token log-probs and entropy of given tokens, computed in row chunks over the LM head.

The full-vocabulary fp32 tensor of a batch is the largest thing a learner builds: SmolLM2's
49,152-token vocabulary over 8 x 2,048 tokens is 3.2 GB per copy, and a naive log-softmax with
its backward holds several copies. Here rows pass through the LM head ``chunk_tokens`` at a time.
With gradients on, each chunk is checkpointed: only its input rows stay alive until backward,
which computes the chunk's logits again (one more LM-head matmul per chunk, a small price for the
memory); the softmax's backward is written out, so a chunk in backward holds its logits and two
fp32 buffers rather than the half-dozen autograd would keep.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def token_logprobs(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden [B, T, H] (final hidden states, after the final norm: the LM head's input),
    targets [B, T] token ids (the token whose log-prob is wanted at each position).
    Returns log p(targets | ...) under softmax(lm_head(hidden) / temperature), fp32 [B, T],
    and the entropy of that distribution fp32 [B, T] (None unless with_entropy).

    ``lm_head`` is called, never its ``.weight`` read, so a PEFT-wrapped head or one whose weight
    ZeRO-3 partitions (gathered by the module's own hooks, again on recomputation) works as is.
    Differentiable with respect to ``hidden`` and the head's parameters.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.shape[:2] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree on [B, T]")
    rows = hidden.reshape(-1, hidden.shape[-1])
    ids = targets.reshape(-1)
    if rows.shape[0] == 0:
        empty = rows.new_zeros(targets.shape, dtype=torch.float32)
        return empty, (empty.clone() if with_entropy else None)
    # Recomputing in backward is only worth it when there is a backward; under no_grad or
    # inference_mode the chunk's tensors are freed as soon as the chunk is done anyway.
    recompute = torch.is_grad_enabled()
    logps, entropies = [], []
    for start in range(0, rows.shape[0], chunk_tokens):
        end = start + chunk_tokens
        args = (rows[start:end], ids[start:end], lm_head, temperature, with_entropy)
        logp, entropy = checkpoint(_chunk, *args, use_reentrant=False) if recompute else _chunk(*args)
        logps.append(logp)
        entropies.append(entropy)
    logp = torch.cat(logps).reshape(targets.shape)
    return logp, (torch.cat(entropies).reshape(targets.shape) if with_entropy else None)


def _chunk(
    hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [rows] (and entropy [rows]) of one chunk of rows [rows, H]."""
    return _VocabStats.apply(lm_head(hidden), targets, temperature, with_entropy)


class _VocabStats(torch.autograd.Function):
    """Target log-prob and entropy of softmax(logits / temperature), over rows of logits [rows, V].

    Its backward is written out so that it holds the logits and two fp32 [rows, V] buffers; left
    to autograd, log-softmax, softmax and their products keep about six. The softmax is fp32 (or
    wider) whatever the logits' dtype: a bf16 softmax over ~50k entries loses the small
    log-probs PPO's ratios are made of; the LM head's matmul itself stays in its own dtype.
    """

    @staticmethod
    def forward(ctx, logits, targets, temperature, with_entropy):
        z = _scaled(logits, temperature, copy=False)
        lse = torch.logsumexp(z, dim=-1)
        logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse
        entropy = None
        if with_entropy:
            # H = -sum p log p = lse - sum p z, since log p = z - lse and sum p = 1.
            entropy = lse - torch.softmax(z, dim=-1).mul_(z).sum(-1)
        ctx.temperature = temperature
        # An output the loss does not use gets None, not a [rows] tensor of zeros to multiply by.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, targets, lse, entropy)
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None
        # d logp_t / dz_j = [j = t] - p_j  and  dH / dz_j = -p_j (log p_j + H), so
        # dL/dz_j = -p_j (g_logp + g_H (log p_j + H)) + g_logp [j = t].
        logp_all = _scaled(logits, ctx.temperature, copy=True).sub_(lse[:, None])
        p = logp_all.exp()
        if grad_entropy is None:
            del logp_all
            grad = p.mul_(grad_logp[:, None])
        else:
            grad = logp_all.add_(entropy[:, None]).mul_(grad_entropy[:, None])
            if grad_logp is not None:
                grad.add_(grad_logp[:, None])
            grad.mul_(p)
            del p
        grad.neg_()
        if grad_logp is not None:
            grad.scatter_add_(-1, targets[:, None], grad_logp[:, None])
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        return grad.to(logits.dtype), None, None, None


def _scaled(logits: torch.Tensor, temperature: float, *, copy: bool) -> torch.Tensor:
    """logits / temperature in fp32 (float64 stays float64), a fresh tensor when ``copy``."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=copy)
    if temperature != 1.0:
        # In place whenever z is already a tensor of its own: one [rows, V] buffer fewer.
        z = z / temperature if z is logits else z.div_(temperature)
    return z


def naive_token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: full [B, T, V] fp32 log_softmax (for tests and as documentation).

    Returns the log-probs of ``targets`` and the entropy, both fp32 [B, T]. Builds the whole
    batch's vocabulary tensor (several copies of it with backward): use ``token_logprobs``.
    """
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def causal_lm(model) -> torch.nn.Module:
    """The transformers causal LM inside ``model``: through a DeepSpeed engine (or DDP) and a PEFT
    wrapper. PEFT replaces the adapted layers in place, so the LM found runs with the adapter."""
    inner = getattr(model, "module", None)
    if isinstance(inner, torch.nn.Module):
        model = inner
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def output_embeddings(model) -> torch.nn.Module:
    """The LM head module of ``model`` (a causal LM, PEFT wrapper or DeepSpeed engine around
    either), LoRA-wrapped when the adapter targets it. Call it; do not read its ``.weight``."""
    head = causal_lm(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(causal_lm(model)).__name__} has no output embeddings (LM head)")
    return head


def final_hidden_states(model, **inputs) -> torch.Tensor:
    """Run a transformers causal LM (or a PEFT wrapper, or a DeepSpeed engine around either) and
    return its final hidden states [B, T, H] without computing the LM head over the sequence.

    The whole model is called (so wrappers' forward logic, hooks and ZeRO-3 gathering run as in
    training) with ``logits_to_keep`` an empty index: the head runs over no position. The states
    are taken from the decoder's output by a forward hook: in transformers 5 that output is after
    the final norm (``LlamaModel`` applies ``norm`` before returning; ``hidden_states[-1]`` is tied
    to it). ``output_hidden_states=True`` would give the same tensor but also keep every layer's
    states alive, a real cost in inference, where nothing else holds them. ``use_cache`` defaults
    to False: no KV cache is wanted, and an empty one disables packed-sequence masks.
    """
    decoder = causal_lm(model).get_decoder()
    captured: list[torch.Tensor] = []
    handle = decoder.register_forward_hook(lambda _module, _args, output: captured.append(output[0]))
    device = next((v.device for v in inputs.values() if isinstance(v, torch.Tensor)), None)
    inputs.setdefault("use_cache", False)
    try:
        model(**inputs, logits_to_keep=torch.empty(0, dtype=torch.long, device=device))
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the decoder ran {len(captured)} times in one forward, expected once")
    return captured[0]
