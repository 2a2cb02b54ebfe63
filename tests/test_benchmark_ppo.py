"""The PPO benchmark's bookkeeping: means over seeds, the accuracy drop, acceptance on the worst seed."""

import pytest

from benchmarks.ppo import parse_args, summarise


def run(over, exact, trivial, large):
    return {"over_call_rate": over, "exact_call_accuracy": exact, "under_call_rate": 0.0, "answer_accuracy": 0.5,
            "contrastive_trivial_direct": trivial, "contrastive_trivial_answered": trivial,
            "contrastive_large_called": large, "contrastive_large_answered": large}  # fmt: skip


def test_summary_takes_means_and_reads_acceptance_on_the_worst_seed():
    sft = run(0.40, 0.90, 0.10, 0.80)
    out = summarise(sft, [run(0.0, 0.90, 1.0, 0.96), run(0.03, 0.88, 0.96, 1.0)])
    assert out["after"]["over_call_rate"] == pytest.approx(0.015)
    assert out["after"]["exact_call_accuracy"] == pytest.approx(0.89)
    # Drops of 0 and 2 points: the mean is 1, the worst seed's 2 fails the 1-point line.
    assert out["accuracy_drop_points"] == pytest.approx(1.0)
    assert out["worst_seed"] == {"over_call_rate": 0.03, "accuracy_drop_points": pytest.approx(2.0),
                                 "contrastive_trivial_direct": 0.96, "contrastive_large_called": 0.96}  # fmt: skip
    assert out["acceptance"] == {
        "sft_over_call_at_least_20pct": True, "after_over_call_at_most_2pct": False, "accuracy_drop_at_most_1_point": False,
        "contrastive_trivial_direct_at_least_95pct": True, "contrastive_large_called_at_least_95pct": True,
    }  # fmt: skip
    assert out["contrastive_large_called"] == pytest.approx(0.98)


def test_overrides_need_a_trial_name_and_a_trial_is_learning_only():
    with pytest.raises(SystemExit):
        parse_args(["--set", "actor.lr=1e-4"])
    args = parse_args(["--trial", "lr", "--set", "actor.lr=1e-4", "--seeds", "0"])
    assert args.part == "learning" and args.seeds == [0] and args.set == ["actor.lr=1e-4"]
