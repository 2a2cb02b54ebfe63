"""Submit tooltune jobs to a Ray cluster (local head or remote), and watch, follow or stop them.

A thin layer over Ray's ``JobSubmissionClient``: the project directory is the job's working
directory (uploaded without the virtual environment, runs, caches and git history), the config
is checked here before anything is sent, the entrypoint is ``python -m ray_jobs.JOB --config
FILE k=v ...`` exactly as one types it, and ``--retries`` resubmits a failed job, which resumes
from its checkpoint (a job's ``resume: true`` picks up the last checkpoint of a run with the same
config, and refuses one whose config differs, naming the keys).

Token authentication: for a remote cluster the token comes from ``--token-file``, or from Ray's
own ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` / ``~/.ray/auth_token``; it travels in a request
header and is never printed or written into a log or a run directory.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tooltune.config import ConfigError, StrictModel, load_config

ROOT = Path(__file__).resolve().parents[1]

# Each job module and its config class: the config is validated here, before submission.
JOBS: dict[str, str] = {
    "sft": "ray_jobs.sft:SFTConfig",
    "demo": "ray_jobs.sft:SFTConfig",
    "evaluate": "ray_jobs.evaluate:EvalConfig",
    "preferences": "ray_jobs.preferences:PreferencesConfig",
    "reward_model": "ray_jobs.reward_model:RewardModelConfig",
    "ppo": "ray_jobs.ppo:PPOConfig",
    "distill": "ray_jobs.distill:DistillConfig",
}

# Never uploaded with the working directory (Ray also honours .gitignore): environments, runs,
# caches, history. The cluster installs the stack itself (cluster/install.sh).
EXCLUDES = [".venv/", "venv/", "runs/", "outputs/", ".cache/", ".git/", "**/__pycache__/", "*.pyc", ".pytest_cache/",
            ".hypothesis/", "*.log", "build/", "dist/", "*.egg-info/"]  # fmt: skip

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(RuntimeError):
    """A submission that cannot go ahead, said in one line."""


def config_class(job: str) -> type[StrictModel]:
    if job not in JOBS:
        raise SubmitError(f"unknown job {job!r}; jobs: {', '.join(JOBS)}")
    module, name = JOBS[job].split(":")
    return getattr(import_module(module), name)


def is_loopback(address: str) -> bool:
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


@dataclass
class JobSpec:
    """What is submitted: the entrypoint, its runtime environment, and the checked config."""

    job: str
    args: list[str]  # config path (relative to the project) and overrides
    runtime_env: dict[str, Any]
    config: StrictModel
    output_dir: str

    def entrypoint(self, resume: bool = False) -> str:
        """``python -m ray_jobs.JOB --config FILE k=v ...``; ``resume`` appends ``resume=true``
        (what a retry runs: it picks up the failed attempt's last checkpoint)."""
        return shlex.join(["python", "-m", f"ray_jobs.{self.job}", *self.args, *(["resume=true"] if resume else [])])


def job_spec(job: str, config: str | Path, overrides: list[str], address: str, root: Path = ROOT) -> JobSpec:
    """Check the config as the job will read it, and build the submission.

    The config must sit inside the project (the uploaded working directory is all the cluster
    sees). On a local head a relative ``output_dir`` is made absolute in this checkout, so the
    run lands where the user looks (not in Ray's unpacked copy of the project); on a remote
    cluster a relative one would land in that copy, so it is refused: give storage the head can
    write (``output_dir=/shared/runs/...``).
    """
    path = Path(config).resolve()
    if not path.is_file():
        raise SubmitError(f"{config}: no such config file")
    try:
        rel = path.relative_to(root.resolve())
    except ValueError:
        raise SubmitError(
            f"{config}: the config must be inside the project directory {root} (the working directory "
            "is what the cluster receives); copy it under configs/"
        ) from None
    try:
        cfg = load_config(path, config_class(job), overrides)
    except ConfigError as e:
        raise SubmitError(str(e)) from None
    overrides = list(overrides)
    local = is_loopback(address)
    out = getattr(cfg, "output_dir", None)
    if out is not None and not Path(out).is_absolute():
        if not local:
            raise SubmitError(
                f"{config}: output_dir {out!r} is relative: on a remote cluster it would be written inside the "
                "job's unpacked working directory; pass output_dir=<storage every node can write>"
            )
        out = str((root / out).resolve())
        overrides.append(f"output_dir={out}")
    env_vars = {"TOKENIZERS_PARALLELISM": "false"}
    if local:
        # One machine: the job shares this checkout's caches (models built once, not per job).
        for key in ("TOOLTUNE_CACHE", "TORCH_EXTENSIONS_DIR", "VLLM_CACHE_ROOT", "HF_HOME", "HF_HUB_OFFLINE"):
            if key in os.environ:
                env_vars[key] = os.environ[key]
        env_vars.setdefault("TOOLTUNE_CACHE", str(root / ".cache" / "tooltune"))
    runtime_env = {"working_dir": str(root), "excludes": EXCLUDES, "env_vars": env_vars}
    return JobSpec(job, ["--config", str(rel), *overrides], runtime_env, cfg, out or "")


def auth_headers(token_file: str | None) -> dict[str, str]:
    """The bearer token header for a token-protected cluster; none when Ray's own lookup applies."""
    if token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise SubmitError(f"{token_file}: empty token file")
        return {"Authorization": f"Bearer {token}"}
    return {}


def client(address: str, token_file: str | None = None):
    from ray.job_submission import JobSubmissionClient

    if is_loopback(address):
        # A loopback head started by `tooltune head start` runs without tokens (bound to 127.0.0.1).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    return JobSubmissionClient(address, headers=auth_headers(token_file) or None)


def default_address() -> str:
    return os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"


def submit(spec: JobSpec, address: str, token_file: str | None = None, submission_id: str | None = None,
           entrypoint_num_cpus: float | None = None, entrypoint_num_gpus: float | None = None,
           resume: bool = False) -> str:  # fmt: skip
    """Submit ``spec``; returns the job's submission id."""
    return client(address, token_file).submit_job(
        entrypoint=spec.entrypoint(resume), runtime_env=spec.runtime_env, submission_id=submission_id,
        metadata={"tooltune_job": spec.job, "output_dir": spec.output_dir},
        entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus,
    )  # fmt: skip


def wait(address: str, job_id: str, token_file: str | None = None, follow: bool = True, out=None,
         poll_s: float = 1.0) -> str:  # fmt: skip
    """Wait for a job to end, printing its new log lines as they come when ``follow``; returns
    its final status (SUCCEEDED, FAILED or STOPPED)."""
    out = out or sys.stdout
    c = client(address, token_file)
    shown = 0
    while True:
        status = str(c.get_job_status(job_id).value)
        if follow:
            logs = c.get_job_logs(job_id)
            if len(logs) > shown:
                out.write(logs[shown:])
                out.flush()
                shown = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def submit_with_retries(spec: JobSpec, address: str, retries: int = 0, token_file: str | None = None,
                        follow: bool = True, out=None, **kwargs) -> tuple[list[str], str]:  # fmt: skip
    """Submit and wait; on FAILED, submit again (up to ``retries`` times) with ``resume=true``,
    so each retry picks up the run's last checkpoint; returns the submission ids and the last status."""
    out = out or sys.stdout
    ids: list[str] = []
    for attempt in range(retries + 1):
        job_id = submit(spec, address, token_file, resume=attempt > 0, **kwargs)
        ids.append(job_id)
        print(f"submitted {job_id} (attempt {attempt + 1} of {retries + 1}): {spec.entrypoint(attempt > 0)}",
              file=out, flush=True)  # fmt: skip
        status = wait(address, job_id, token_file, follow=follow, out=out)
        print(f"{job_id}: {status}", file=out, flush=True)
        if status != "FAILED":
            return ids, status
    return ids, status
