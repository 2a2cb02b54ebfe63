"""Distillation losses (trainers/distill.py) against numbers computed by hand and full-vocab references."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.distill import (
    distill_token_loss,
    forward_kl,
    head_loss,
    jsd,
    reverse_kl,
    sampled_forward_kl,
    student_buckets,
)

L = math.log


def t(*xs):
    return torch.tensor([list(xs)], dtype=torch.float64)


# The student's distribution over 4 tokens is 0.1, 0.2, 0.3, 0.4; the teacher's top-2 are tokens
# 3 and 2 with 0.5 and 0.3, its tail 0.2. The student's buckets: 0.4, 0.3 and a tail of 0.3.
STUDENT = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64))
IDS = torch.tensor([[3, 2]])
T_TOPK, T_TAIL = torch.log(t(0.5, 0.3)), torch.log(torch.tensor([0.2], dtype=torch.float64))


def test_student_buckets_by_hand():
    topk, tail = student_buckets(STUDENT, IDS)
    torch.testing.assert_close(topk, torch.log(t(0.4, 0.3)))
    torch.testing.assert_close(tail, torch.tensor([L(0.3)], dtype=torch.float64))
    # Temperature 2: probabilities proportional to sqrt(p): 0.1^.5 ... 0.4^.5.
    roots = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64).sqrt()
    topk, tail = student_buckets(STUDENT, IDS, temperature=2.0)
    torch.testing.assert_close(topk.exp(), (roots[[3, 2]] / roots.sum())[None])
    torch.testing.assert_close(tail.exp(), ((roots[0] + roots[1]) / roots.sum())[None])
    with pytest.raises(ValueError, match="temperature"):
        student_buckets(STUDENT, IDS, temperature=0)


def test_divergences_by_hand():
    s_topk, s_tail = student_buckets(STUDENT, IDS)
    fkl = 0.5 * L(0.5 / 0.4) + 0.3 * L(0.3 / 0.3) + 0.2 * L(0.2 / 0.3)
    rkl = 0.4 * L(0.4 / 0.5) + 0.3 * L(0.3 / 0.3) + 0.3 * L(0.3 / 0.2)
    m = [0.45, 0.3, 0.25]
    js = 0.5 * (0.5 * L(0.5 / m[0]) + 0.3 * L(0.3 / m[1]) + 0.2 * L(0.2 / m[2])) + 0.5 * (
        0.4 * L(0.4 / m[0]) + 0.3 * L(0.3 / m[1]) + 0.3 * L(0.3 / m[2])
    )
    assert forward_kl(T_TOPK, T_TAIL, s_topk, s_tail).item() == pytest.approx(fkl, abs=1e-12)
    assert fkl == pytest.approx(0.030479, abs=1e-6)
    assert reverse_kl(T_TOPK, T_TAIL, s_topk, s_tail).item() == pytest.approx(rkl, abs=1e-12)
    assert jsd(T_TOPK, T_TAIL, s_topk, s_tail, beta=0.5).item() == pytest.approx(js, abs=1e-12)
    # beta = 0.2: M = 0.2 P + 0.8 Q.
    m = [0.2 * p + 0.8 * q for p, q in zip((0.5, 0.3, 0.2), (0.4, 0.3, 0.3))]
    js2 = 0.2 * sum(p * L(p / mm) for p, mm in zip((0.5, 0.3, 0.2), m)) + 0.8 * sum(q * L(q / mm) for q, mm in zip((0.4, 0.3, 0.3), m))
    assert jsd(T_TOPK, T_TAIL, s_topk, s_tail, beta=0.2).item() == pytest.approx(js2, abs=1e-12)
    with pytest.raises(ValueError, match="beta"):
        jsd(T_TOPK, T_TAIL, s_topk, s_tail, beta=1.0)


def full(logits, temperature=1.0):
    return torch.log_softmax(logits.double() / temperature, dim=-1)


def teacher_topk(logits, k, temperature=1.0):
    logp = full(logits, temperature)
    top, ids = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return {"ids": ids, "logp": top, "tail_logp": rest}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_with_k_equal_to_the_vocabulary_each_divergence_is_the_full_one(temperature):
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(5, 11, generator=g, dtype=torch.float64) * 3, torch.randn(5, 11, generator=g, dtype=torch.float64)
    targets = teacher_topk(teacher, 11, temperature)
    assert torch.isneginf(targets["tail_logp"]).all()
    p, q = full(teacher, temperature), full(student, temperature)
    kl_pq = (p.exp() * (p - q)).sum(-1)
    kl_qp = (q.exp() * (q - p)).sum(-1)
    m = torch.logaddexp(p + L(0.5), q + L(0.5))
    js = 0.5 * (p.exp() * (p - m)).sum(-1) + 0.5 * (q.exp() * (q - m)).sum(-1)
    t2 = temperature**2
    for kind, want in (("forward_kl", kl_pq), ("reverse_kl", kl_qp), ("jsd", js)):
        got = distill_token_loss(student, targets, kind=kind, temperature=temperature)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want * t2, rtol=0, atol=1e-10)


def test_top_k_with_the_tail_bucket_is_below_the_full_kl_and_equal_when_the_tails_agree():
    g = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(4, 50, generator=g, dtype=torch.float64) * 2, torch.randn(4, 50, generator=g, dtype=torch.float64)
    p, q = full(teacher), full(student)
    kl = (p.exp() * (p - q)).sum(-1)
    topk = distill_token_loss(student, teacher_topk(teacher, 5))
    # Merging buckets can only lose divergence (the log-sum inequality).
    assert (topk <= kl + 1e-12).all() and (topk > 0).all()
    # A student equal to the teacher in the top-5 and proportional to it in the tail: both zero.
    assert distill_token_loss(teacher, teacher_topk(teacher, 5)).abs().max() < 1e-12


def test_cross_entropy_mix_and_temperature_factor():
    g = torch.Generator().manual_seed(2)
    teacher, student = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    labels = torch.tensor([1, 4, 6])
    nll = -full(student).gather(-1, labels[:, None]).squeeze(-1)
    targets = teacher_topk(teacher, 3, temperature=2.0) | {"labels": labels}
    div = distill_token_loss(student, targets, temperature=2.0)
    s_topk, s_tail = student_buckets(student, targets["ids"], 2.0)
    torch.testing.assert_close(div, 4 * forward_kl(targets["logp"], targets["tail_logp"], s_topk, s_tail))
    torch.testing.assert_close(distill_token_loss(student, targets, temperature=2.0, ce_weight=1.0), nll)
    torch.testing.assert_close(distill_token_loss(student, targets, temperature=2.0, ce_weight=0.25), 0.75 * div + 0.25 * nll)
    with pytest.raises(ValueError, match="ce_weight"):
        distill_token_loss(student, targets, ce_weight=1.5)


def test_sampled_targets_by_hand_and_unbiased():
    # Two draws, teacher log-probs ln .5 and ln .25, student ln .25 and ln .5: uniform weights.
    sp, sq = torch.log(t(0.5, 0.25)), torch.log(t(0.25, 0.5))
    want = 0.5 * L(0.5 / 0.25) + 0.5 * L(0.25 / 0.5)
    assert sampled_forward_kl(sp, sq).item() == pytest.approx(want, abs=1e-12)
    # Drawn from r = (0.25, 0.5): weights p / r = 2, 0.5, normalised 0.8, 0.2.
    assert sampled_forward_kl(sp, sq, torch.log(t(0.25, 0.5))).item() == pytest.approx(0.8 * L(2) + 0.2 * L(0.5), abs=1e-12)
    # Many draws from the teacher: the estimate and its gradient approach the full KL's.
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(1, 6, generator=g, dtype=torch.float64)
    student = torch.randn(1, 6, generator=g, dtype=torch.float64, requires_grad=True)
    p = full(teacher)
    draws = torch.multinomial(p.exp(), 200_000, replacement=True, generator=g)
    targets = {"sample_ids": draws, "sample_logp": p.gather(-1, draws)}
    est = distill_token_loss(student, targets)
    (grad_est,) = torch.autograd.grad(est.sum(), student)
    exact = (p.exp() * (p - full(student))).sum()
    (grad_exact,) = torch.autograd.grad(exact, student)
    assert est.item() == pytest.approx(exact.item(), abs=0.01)
    torch.testing.assert_close(grad_est, grad_exact, rtol=0, atol=0.01)
    with pytest.raises(ValueError, match="forward KL only"):
        distill_token_loss(student, targets, kind="reverse_kl")


def _naive(hidden, head, targets, weights, kind="forward_kl"):
    return (distill_token_loss(head(hidden), targets, kind=kind) * weights).sum()


@pytest.mark.parametrize("trainable_head", [False, True])
@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_head_loss_in_chunks_matches_the_whole_batch_at_once(trainable_head, kind):
    g = torch.Generator().manual_seed(4)
    n, h, v = 10, 6, 13
    head = torch.nn.Linear(h, v, bias=False).double()
    head.weight.requires_grad_(trainable_head)
    teacher = torch.randn(n, v, generator=g, dtype=torch.float64)
    targets = teacher_topk(teacher, 4)
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    weights[3] = 0.0
    base = torch.randn(n, h, generator=g, dtype=torch.float64)

    def loss(x, chunk):
        return distill_token_loss(x, chunk, kind=kind)

    h1 = base.clone().requires_grad_(True)
    total, per = head_loss(h1 * 1.0, head, loss, targets, weights, chunk_tokens=3)
    (total * 2).backward()
    grads = (h1.grad.clone(), head.weight.grad.clone() if trainable_head else None)
    head.zero_grad()
    h2 = base.clone().requires_grad_(True)
    want = _naive(h2 * 1.0, head, targets, weights, kind)
    (want * 2).backward()
    torch.testing.assert_close(total, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(per, loss(head(base), targets), rtol=0, atol=1e-12)
    assert not per.requires_grad
    torch.testing.assert_close(grads[0], h2.grad, rtol=0, atol=1e-12)
    if trainable_head:
        torch.testing.assert_close(grads[1], head.weight.grad, rtol=0, atol=1e-12)
    with torch.no_grad():
        total_ng, _ = head_loss(base, head, loss, targets, weights, chunk_tokens=4)
    torch.testing.assert_close(total_ng, want.detach(), rtol=0, atol=1e-12)


def test_head_loss_rejects_misaligned_rows():
    head = torch.nn.Linear(4, 5, bias=False)
    with pytest.raises(ValueError, match="weights"):
        head_loss(torch.zeros(3, 4), head, lambda z, t: z.sum(-1), {}, torch.ones(2))
    with pytest.raises(ValueError, match="targets\\['ids'\\]"):
        head_loss(torch.zeros(3, 4), head, lambda z, t: z.sum(-1), {"ids": torch.zeros(2, 1)}, torch.ones(3))


def test_bucket_gradients_match_autograd_through_the_full_softmax():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(9, generator=g)[:3] for _ in range(6)])
    ids[0] = torch.tensor([8, 0, 4])
    gt, gr = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    for temperature in (1.0, 0.7):
        topk, tail = student_buckets(logits, ids, temperature)
        (a,) = torch.autograd.grad((topk * gt).sum() + (tail * gr).sum(), logits)
        logp = full(logits, temperature)
        want_topk = logp.gather(-1, ids)
        want_tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
        (b,) = torch.autograd.grad((want_topk * gt).sum() + (want_tail * gr).sum(), logits)
        torch.testing.assert_close(topk, want_topk)
        torch.testing.assert_close(tail, want_tail)
        torch.testing.assert_close(a, b)
    # The backward reuses its saved buffer in place: a second pass through the same graph is refused.
    topk, tail = student_buckets(logits, ids)
    torch.autograd.grad(topk.sum() + tail.sum(), logits, retain_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(topk.sum() + tail.sum(), logits)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_gradients_stay_finite_with_an_empty_tail(kind):
    g = torch.Generator().manual_seed(6)
    teacher = torch.randn(4, 9, generator=g, dtype=torch.float64)
    student = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    loss = distill_token_loss(student, teacher_topk(teacher, 9), kind=kind).sum()
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # Against autograd through the full log-softmax of the same divergence.
    p, q = full(teacher), full(student)
    if kind == "forward_kl":
        want = (p.exp() * (p - q)).sum()
    elif kind == "reverse_kl":
        want = (q.exp() * (q - p)).sum()
    else:
        m = torch.logaddexp(p + L(0.5), q + L(0.5))
        want = (0.5 * (p.exp() * (p - m)).sum(-1) + 0.5 * (q.exp() * (q - m)).sum(-1)).sum()
    (want_grad,) = torch.autograd.grad(want, student)
    torch.testing.assert_close(grad, want_grad)


@pytest.mark.parametrize("gap", [100.0, 120.0, 200.0])
def test_a_very_peaked_fp32_student_keeps_its_tail(gap):
    # The student's tail sits `gap` nats under its top token: exp(-gap) underflows fp32's sums.
    teacher = torch.tensor([[5.0, 4.0, 3.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    targets = teacher_topk(teacher, 2)
    base = torch.tensor([[gap, 1.0, 0.0, 0.0, 0.0, 0.0]])
    results = {}
    for dtype in (torch.float32, torch.float64):
        x = base.to(dtype).requires_grad_(True)
        cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in targets.items()}
        for kind in ("forward_kl", "jsd"):
            loss = distill_token_loss(x, cast, kind=kind).sum()
            (grad,) = torch.autograd.grad(loss, x)
            results[(dtype, kind)] = (loss.double(), grad.double())
    for kind in ("forward_kl", "jsd"):
        (l32, g32), (l64, g64) = results[(torch.float32, kind)], results[(torch.float64, kind)]
        assert torch.isfinite(l32) and torch.isfinite(g32).all()
        torch.testing.assert_close(l32, l64, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(g32, g64, rtol=1e-4, atol=1e-6)


def test_a_student_equal_to_its_teacher_has_zero_loss_at_every_aligned_position(tiny_model_dir):
    """Scores of position p are the targets of token p + 1: self-distillation through the whole
    path (teacher stage -> stored record -> per-token columns -> learner loss) is exactly 0, and
    the same targets shifted by one position are not."""
    from transformers import AutoModelForCausalLM

    from tooltune.teacher_targets import target_columns, target_record
    from trainers.distill import distill_loss
    from trainers.forward import Forward, pad_columns
    from trainers.teacher import TeacherStage

    torch.manual_seed(0)
    stage = TeacherStage(tiny_model_dir, 0, 1, k=6)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    seqs = [[5, 9, 14, 3, 22, 7, 30, 11], [8, 2, 17, 4, 19]]
    masks = [[0, 0, 1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 1]]
    columns = {"input_ids": seqs, "loss_mask": masks, "t_ids": [], "t_logp": [], "t_tail": []}
    for ids, mask in zip(seqs, masks):
        scores = {k: v[0].numpy() for k, v in stage.forward(torch.tensor([ids])).items()}
        for key, col in target_columns(target_record(0, {"input_ids": ids, "loss_mask": mask}, scores), 6).items():
            columns[key].append(torch.as_tensor(col))
    batch = pad_columns(columns)
    with torch.no_grad():
        loss, stats = distill_loss(Forward(model, batch, "lm"), batch)
    tokens = sum(sum(m[1:]) for m in masks)
    assert stats["tokens"] == tokens and stats["top1_agree"] == tokens
    assert abs(loss.item()) < 1e-4
    shifted = dict(batch)
    for key in ("t_ids", "t_logp", "t_tail"):
        shifted[key] = torch.roll(batch[key], 1, dims=1)
    with torch.no_grad():
        off, off_stats = distill_loss(Forward(model, shifted, "lm"), shifted)
    assert off.item() > 0.1 and off_stats["top1_agree"] < tokens
