"""Losses and batch padding as pure functions, on numbers computed by hand."""

import math

import pytest
import torch

from trainers.forward import pad_columns, split_rows, unpad
from trainers.losses import clipped_policy_loss, clipped_value_loss, kl_k3


def t(*xs):
    return torch.tensor([list(xs)], dtype=torch.float64)


def test_clipped_policy_loss_by_hand():
    # ratios 1.5, 0.5, 1.1; advantages 1, 1, -2; eps 0.2:
    #   token 1: max(-1.5, -1.2) = -1.2 (clipped), token 2: max(-0.5, -0.8) = -0.5,
    #   token 3: max(2.2, 2.2) = 2.2  ->  sum 0.5, one token clipped.
    logp, old, adv = t(math.log(1.5), math.log(0.5), math.log(1.1)), t(0, 0, 0), t(1, 1, -2)
    total, stats = clipped_policy_loss(logp, old, adv, t(1, 1, 1), clip_eps=0.2)
    assert total.item() == pytest.approx(0.5)
    assert stats == pytest.approx({"clipped": 1.0, "ratio_sum": 3.1, "tokens": 3.0})
    # A masked token counts for nothing: -1.2 - 0.5.
    total, stats = clipped_policy_loss(logp, old, adv, t(1, 1, 0), clip_eps=0.2)
    assert total.item() == pytest.approx(-1.7) and stats["tokens"] == 2.0


def test_policy_gradient_at_ratio_one_is_minus_the_advantage():
    logp = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    total, _ = clipped_policy_loss(logp, torch.zeros(1, 3, dtype=torch.float64), t(2, -1, 5), t(1, 1, 0))
    total.backward()
    assert logp.grad.tolist() == [[-2.0, 1.0, 0.0]]


def test_kl_k3_by_hand():
    # d = ref - logp = ln 2: e^d - d - 1 = 2 - 0.693147 - 1 = 0.306853; zero where equal.
    out = kl_k3(t(0.0, -1.0), t(math.log(2), -1.0))
    assert out.tolist()[0] == pytest.approx([2 - math.log(2) - 1, 0.0])


def test_clipped_value_loss_by_hand():
    # v = 1, old = 0, R = 2: max((1-2)^2, (0.2-2)^2) = 3.24; v = 3, old = 2.5, R = 2:
    # max((3-2)^2, (2.7-2)^2) = 1  ->  0.5 * 4.24 = 2.12. Unclipped: 0.5 * (1 + 1) = 1.
    values, old, returns, mask = t(1.0, 3.0), t(0.0, 2.5), t(2.0, 2.0), t(1, 1)
    assert clipped_value_loss(values, old, returns, mask, 0.2)[0].item() == pytest.approx(2.12)
    assert clipped_value_loss(values, old, returns, mask, None)[0].item() == pytest.approx(1.0)


def test_pad_columns_pads_per_token_columns_and_keeps_per_row_ones():
    cols = {"input_ids": [[5, 6, 7], [8]], "advantages": [[0.0, 1.5, 1.5], [2.0]], "reward": [1.0, -1.0], "topk": [[[1, 2]] * 3, [[3, 4]]]}
    out = pad_columns(cols)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["advantages"].tolist() == [[0.0, 1.5, 1.5], [2.0, 0.0, 0.0]]
    assert out["reward"].tolist() == [1.0, -1.0]
    assert out["topk"].shape == (2, 3, 2) and out["topk"][1].tolist() == [[3, 4], [0, 0], [0, 0]]
    assert unpad(out["advantages"], [3, 1]) == [[0.0, 1.5, 1.5], [2.0]]
    # Packed rows bring their positions and get no padding mask.
    assert "attention_mask" not in pad_columns({"input_ids": [[1, 2]], "position_ids": [[0, 0]]})


def test_bad_batches_name_the_column_and_row():
    with pytest.raises(ValueError, match=r"column 'advantages', row 1: 2 entries for 1 tokens"):
        pad_columns({"input_ids": [[5, 6], [7]], "advantages": [[0.0, 1.0], [1.0, 2.0]]})
    with pytest.raises(ValueError, match="different numbers of rows"):
        pad_columns({"input_ids": [[5, 6], [7]], "reward": [1.0]})
    assert [len(p["input_ids"]) for p in split_rows({"input_ids": [[1]] * 5}, 2)] == [2, 2, 1]
