"""benchmarks/distill.py: the loss part on small sizes, and parts recorded side by side."""

import json

from benchmarks.distill import loss_summary, parse_args, record, run_loss


def test_loss_part_measures_three_variants_and_parts_are_kept_side_by_side(tmp_path):
    args = parse_args(["--part", "loss", "--quick"])
    r = run_loss(args)
    loss = r["loss"]
    assert set(loss["extra_peak_mib"]) == set(loss["step_s_median"]) == {"topk", "full_vocab", "floor"}
    assert r["topk_time_over_floor"] > 0 and r["topk_memory_ratio"] > 0
    # The bucketed KL never exceeds the full KL on the same logits.
    assert 0 < loss["values"]["topk_loss"] <= loss["values"]["full_kl"] + 1e-6
    assert "topk_memory_ratio" in loss_summary(r)
    record("loss", r, "loss table", {"part": "loss"}, root=tmp_path)
    record("pipeline", {"pipeline_speedup": 1.5, "pipeline": {}}, "pipeline table", {"part": "pipeline"}, root=tmp_path)
    saved = json.loads((tmp_path / "results" / "distill.json").read_text())
    assert saved["topk_memory_ratio"] == r["topk_memory_ratio"] and saved["pipeline_speedup"] == 1.5
    assert set(saved["parts"]) == {"loss", "pipeline"} and saved["parts"]["loss"]["provenance"]["command"]
    md = (tmp_path / "RESULTS.md").read_text()
    assert "### loss" in md and "### pipeline" in md
