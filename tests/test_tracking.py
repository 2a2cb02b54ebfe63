"""The metrics log's learning-curve plot."""

import json

from tooltune.tracking import MetricsLogger, plot_curves


def test_curves_draw_the_logged_keys_only(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 6):
        logger.log(step, {"reward/total": step * 0.5} | ({"eval/over_call_rate": 0.1} if step % 2 == 0 else {}))
    logger.close()
    drawn = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png", ["reward/total", "eval/over_call_rate", "never/logged"])
    assert drawn == ["reward/total", "eval/over_call_rate"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Nothing logged for any key: no file.
    assert plot_curves(tmp_path / "metrics.jsonl", tmp_path / "none.png", ["never/logged"]) == [] and not (tmp_path / "none.png").exists()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
