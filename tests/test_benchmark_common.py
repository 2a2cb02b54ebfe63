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


def test_other_share_by_hand():
    from benchmarks.common import other_share

    # 2 cores for 10 s: 20 CPU-seconds. The machine was busy 15 s, 5 of them ours: others 10/20.
    assert other_share(15.0, 5.0, 10.0, 2) == 0.5
    assert other_share(5.0, 5.0, 10.0, 2) == 0.0
    assert other_share(4.9, 5.0, 10.0, 2) == 0.0  # tick skew never reads as negative
    assert other_share(50.0, 0.0, 10.0, 2) == 1.0


def test_other_cpu_share_counts_another_process_not_this_one():
    import subprocess
    import sys
    import time

    from benchmarks.common import OtherCpuShare

    # Another process keeps one core busy for the whole window: at least ~1/cores of the machine
    # (more if the machine is busy besides), measured from /proc/stat.
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)
        with OtherCpuShare() as others:
            time.sleep(1.5)
    finally:
        child.wait()
    if others.value is not None:
        import os

        assert others.value >= 0.6 / (os.cpu_count() or 1)
