"""The reward model's Bradley–Terry loss: the pure core on numbers computed by hand, and the loss
on a real scalar-head model through ``Forward``."""

import math

import pytest
import torch

from trainers.forward import Forward, pad_columns
from trainers.heads import ScalarHeadModel
from trainers.losses import bradley_terry_core, bradley_terry_loss


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_core_by_hand():
    # -log sigmoid(d) = log(1 + e^-d): d = 2 -> 0.126928; 2 - margin 1 -> 0.313262; 0 - 1 -> 1.313262.
    total, stats = bradley_terry_core(t(2.0), t(0.0))
    assert total.item() == pytest.approx(0.126928, abs=1e-6)
    assert bradley_terry_core(t(2.0), t(0.0), margin=t(1.0))[0].item() == pytest.approx(0.313262, abs=1e-6)
    assert bradley_terry_core(t(0.0), t(1.0))[0].item() == pytest.approx(1.313262, abs=1e-6)
    assert stats == pytest.approx({"pairs": 1.0, "correct": 1.0, "loss_sum": 0.126928}, abs=1e-6)
    # Summed over pairs; a correct pair inside the margin still counts as correct.
    total, stats = bradley_terry_core(t(2.0, 0.0, 0.5), t(0.0, 1.0, 0.0), margin=t(0.0, 0.0, 1.0))
    expected = math.log1p(math.exp(-2)) + math.log1p(math.exp(1)) + math.log1p(math.exp(0.5))
    assert total.item() == pytest.approx(expected)
    assert stats == pytest.approx({"pairs": 3.0, "correct": 2.0, "loss_sum": expected})


def test_gradient_raises_chosen_and_lowers_rejected():
    # d/dc of -log sigmoid(c - r) = -(1 - sigmoid(c - r)) = -sigmoid(r - c); at c = r: -0.5, and +0.5 for r.
    chosen, rejected = t(0.0, 3.0).requires_grad_(), t(0.0, 1.0).requires_grad_()
    bradley_terry_core(chosen, rejected)[0].backward()
    s = 1 / (1 + math.exp(2))
    assert chosen.grad.tolist() == pytest.approx([-0.5, -s])
    assert rejected.grad.tolist() == pytest.approx([0.5, s])


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="chosen scores"):
        bradley_terry_core(t(1.0, 2.0), t(1.0))


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir):
    torch.manual_seed(0)
    return ScalarHeadModel.from_pretrained(tiny_model_dir).double()


def test_loss_pairs_consecutive_rows_at_their_last_real_token(reward_model):
    # Rows of different lengths: padding must not move the score off each row's last token.
    columns = {"input_ids": [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]], "margin": [0.5, 0.0, 0.0, 0.0]}
    batch = pad_columns(columns)
    total, stats = bradley_terry_loss(Forward(reward_model, batch, head="reward"), batch)
    with torch.no_grad():
        scores = [reward_model(input_ids=torch.tensor([ids]))[0, -1].item() for ids in columns["input_ids"]]
    expected = math.log1p(math.exp(-(scores[0] - scores[1] - 0.5))) + math.log1p(math.exp(-(scores[2] - scores[3])))
    assert total.item() == pytest.approx(expected, rel=1e-6)  # Forward reads values in fp32
    assert stats["pairs"] == 2.0 and stats["correct"] == float((scores[0] > scores[1]) + (scores[2] > scores[3]))
    # One step of gradient descent on the loss widens every pair's gap.
    total.backward()
    with torch.no_grad():
        for p in reward_model.parameters():
            p -= 1e-2 * p.grad
            p.grad = None
        after = [reward_model(input_ids=torch.tensor([ids]))[0, -1].item() for ids in columns["input_ids"]]
    assert after[0] - after[1] > scores[0] - scores[1] and after[2] - after[3] > scores[2] - scores[3]


def test_odd_number_of_rows_is_a_clear_error(reward_model):
    batch = pad_columns({"input_ids": [[5, 6], [7, 8], [9]]})
    with pytest.raises(ValueError, match="3 rows: a Bradley–Terry batch holds \\(chosen, rejected\\) pairs"):
        bradley_terry_loss(Forward(reward_model, batch, head="reward"), batch)
