"""Where a result came from: the command, the code (git commit, dirty or not), the config.

Written by the tools next to every run and every recorded result, never by hand, so a reader can
check that a number was produced by the code and settings it claims.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from tooltune.config import StrictModel, dump_config


def config_hash(cfg: StrictModel | dict[str, Any]) -> str:
    """sha256 of the resolved config as canonical JSON: equal configs, equal hashes."""
    data = dump_config(cfg) if isinstance(cfg, StrictModel) else cfg
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def git_state(root: str | Path | None = None) -> dict[str, Any]:
    """``{"git_commit": sha or None, "git_dirty": bool or None}`` of the repository at ``root``
    (the code's checkout by default); tracked files other than recorded results decide dirtiness."""
    cwd = Path(root) if root is not None else Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    # Recorded results are outputs, not code: a tree whose only changes are results is clean.
    outputs = (":!benchmarks/results", ":!benchmarks/RESULTS.md")
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", *outputs) if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: ``python -m package.module args`` when run as a module."""
    argv = list(sys.argv if argv is None else argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None and spec.name else ["python", *argv[:1]]
    return shlex.join(head + argv[1:])


def ray_job_id() -> str | None:
    """The Ray submission id of the job this process runs in (``ray job submit`` / ``tooltune
    submit``), from the job config Ray hands its driver; None outside a submitted job."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


def provenance(
    cfg: StrictModel | dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = (), run_dir: str | Path | None = None,
    machine: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``provenance`` object of a recorded result."""
    return {
        "command": command_line(),
        **git_state(),
        "config_hash": config_hash(cfg) if cfg is not None else None,
        "overrides": list(overrides),
        "run_dir": str(run_dir) if run_dir is not None else None,
        # Inside a submitted Ray job: its submission id (``tooltune status ID`` / ``ray job logs ID``).
        **({"ray_job_id": job_id} if (job_id := ray_job_id()) else {}),
        "machine": machine,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
