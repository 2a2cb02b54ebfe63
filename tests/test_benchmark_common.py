"""Benchmark results: one JSON per benchmark, and each run replaces only its own RESULTS.md section."""

import json

from benchmarks.common import machine_info, write_result


def test_write_result_writes_json_and_replaces_only_its_section(tmp_path):
    info = machine_info()
    assert info["machine"]["cores"] >= 1 and info["machine"]["torch"] and info["date"]

    first = {"tokens_per_s": 12.5, "model": "m"} | info
    path = write_result("rollout", first, root=tmp_path)
    assert path == tmp_path / "results" / "rollout.json"
    assert json.loads(path.read_text()) == first
    write_result("sft", {"steps": 3}, "| steps |\n|---|\n| 3 |", root=tmp_path)

    md = (tmp_path / "RESULTS.md").read_text()
    assert md.startswith("# Benchmark results")
    assert "## rollout" in md and "| tokens_per_s | 12.5 |" in md and info["machine"]["cpu"] in md
    assert "## sft" in md and "| 3 |" in md

    write_result("rollout", {"tokens_per_s": 99.0, "note": "machine busy"}, root=tmp_path)
    md2 = (tmp_path / "RESULTS.md").read_text()
    assert md2.count("## rollout") == 1 and "| tokens_per_s | 99 |" in md2 and "12.5" not in md2
    assert "Note: machine busy" in md2
    # The other section is untouched, and keeps its place after the replaced one.
    assert md2[md2.index("## sft") :] == md[md.index("## sft") :]
    assert md2.index("## rollout") < md2.index("## sft")


def test_other_cpu_share_is_a_fraction():
    import time

    from benchmarks.common import OtherCpuShare

    with OtherCpuShare() as others:
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            pass
    # This process's own busy loop is not counted as "others".
    assert others.value is None or 0.0 <= others.value <= 1.0
