"""A real local head (``ray start --head`` on loopback, free ports) for the submission tests, the
``tooltune`` command as a subprocess, and a job killed mid-run and retried."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from cluster.local import head_command, head_env
from cluster.submit import job_spec
from tests.drivers.namespaces import permitted, unshare
from trainers.learner import free_port

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def local_head() -> Iterator[str]:
    """A loopback head on free ports, in its own PID namespace where permitted (ending it ends
    every process it started, and nothing else), else in its own process group. Its temp dir is
    short (Ray's socket paths under it have a length limit) and removed at the end."""
    temp = Path(tempfile.mkdtemp(prefix="tt-ray-", dir="/tmp"))
    dashboard = free_port()
    cmd = head_command(num_cpus=2, port=free_port(), dashboard_port=dashboard, temp_dir=str(temp), block=True)
    cmd += [f"--{name}={free_port()}" for name in (
        "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port",
    )]  # fmt: skip
    isolated = permitted(unshare(), "true")
    if isolated:
        cmd = [*unshare(), *cmd]
    print(f"head: {'own PID namespace' if isolated else 'own process group (unshare not permitted)'}")
    log = open(temp / "head.log", "w")
    proc = subprocess.Popen(cmd, env=head_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 120
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"head did not come up: {(temp / 'head.log').read_text()[-2000:]}") from None
                time.sleep(1)
        yield address
    finally:
        # SIGKILL: in its own PID namespace the head's init goes and every process there with it;
        # otherwise its process group does (a graceful `ray start --block` exit takes ~30 s).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def tooltune(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    # ``python -m`` from the project: this checkout's code (the console script imports the
    # checkout the environment was installed from).
    out = subprocess.run([sys.executable, "-m", "ray_jobs.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"tooltune {' '.join(args)} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def driver_pids(marker: str, job: str = "sft") -> list[int]:
    """Python processes running ``ray_jobs.JOB`` whose command line holds ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and f"ray_jobs.{job}".encode() in argv and marker.encode() in argv and b"python" in argv[0]:
            pids.append(int(proc.name))
    return pids


def kill_and_retry(job: str, config: str, overrides: list[str], run: Path, head: str, tmp_path: Path, after: int = 2) -> list[str]:
    """Submit with ``--retries 1``, SIGKILL the driver once the run logged step ``after``, and
    wait for the retry to succeed. Returns both attempts' job ids."""
    from cluster.submit import client, submit_with_retries

    spec = job_spec(job, ROOT / config, overrides, head)
    cut = run
    result: dict = {}
    log = open(tmp_path / "retries.log", "w")
    runner = threading.Thread(target=lambda: result.update(zip(("ids", "status"), submit_with_retries(
        spec, head, retries=1, follow=False, out=log))))  # fmt: skip
    runner.start()
    deadline = time.time() + 600
    while not ((cut / "metrics.jsonl").exists() and len(losses(cut)) >= after):
        assert time.time() < deadline and runner.is_alive(), f"the first attempt never reached step {after}"
        time.sleep(0.2)
    # The driver's pid as this machine sees it (the head may run in its own PID namespace).
    drivers = [pid for pid in driver_pids(f"output_dir={cut}", job) if pid != os.getpid()]
    assert len(drivers) == 1, drivers
    os.kill(drivers[0], signal.SIGKILL)
    c = client(head)
    runner.join(600)
    log.close()
    assert result["status"] == "SUCCEEDED" and len(result["ids"]) == 2, (tmp_path / "retries.log").read_text()
    assert c.get_job_status(result["ids"][0]).value == "FAILED"
    assert "resume=true" in c.get_job_info(result["ids"][1]).entrypoint
    return result["ids"]
