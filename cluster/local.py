"""Local single-node mode: start (or attach to) a Ray instance sized to this machine.

Attach when an address is given (config or ``RAY_ADDRESS``, as inside ``ray job submit``);
otherwise start Ray in-process with the dashboard and job server on 127.0.0.1 only, and stop
exactly what was started.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tooltune.config import StrictModel

log = logging.getLogger(__name__)


class RayConfig(StrictModel):
    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    dashboard: bool = False
    dashboard_port: int = 8265
    object_store_gib: float = 1.0
    temp_dir: str | None = None


def _local_env() -> None:
    # Token auth (on by default in Ray 2.60) only guards a loopback-bound head here.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def start(cfg: RayConfig | None = None) -> bool:
    """Connect to Ray; return True when this call started it (so ``stop`` should end it)."""
    import ray

    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return False
    _local_env()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    ray.init(
        # "local": a new instance, never a head someone started with `ray start` on this machine.
        address="local",
        num_cpus=cfg.num_cpus or os.cpu_count(),
        num_gpus=cfg.num_gpus,
        include_dashboard=cfg.dashboard,
        dashboard_host="127.0.0.1",
        dashboard_port=cfg.dashboard_port,
        object_store_memory=int(cfg.object_store_gib * 2**30),
        _temp_dir=cfg.temp_dir,
        logging_level=logging.WARNING,
    )
    return True


def stop(started: bool) -> None:
    import ray

    if started and ray.is_initialized():
        ray.shutdown()


@contextmanager
def local_ray(cfg: RayConfig | None = None) -> Iterator[None]:
    started = start(cfg)
    try:
        yield
    finally:
        stop(started)


def ray_bin() -> str:
    """The ``ray`` command of this interpreter's environment."""
    return os.path.join(os.path.dirname(sys.executable), "ray")


def head_env() -> dict[str, str]:
    """The environment a local head runs in: this interpreter's ``bin`` first on ``PATH``, so a
    job's entrypoint ``python -m ray_jobs.JOB`` finds the stack whether or not the virtual
    environment was activated (otherwise it is the system's python: ``No module named 'ray'``)."""
    _local_env()
    env = dict(os.environ)
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join([bindir, *(p for p in env.get("PATH", "").split(os.pathsep) if p != bindir)])
    env.pop("RAY_ADDRESS", None)
    return env


def head_command(num_cpus: int | None = None, port: int = 6379, dashboard_port: int = 8265,
                 temp_dir: str | None = None, block: bool = False) -> list[str]:  # fmt: skip
    cmd = [
        ray_bin(), "start", "--head", "--node-ip-address=127.0.0.1",
        f"--port={port}", f"--num-cpus={num_cpus or os.cpu_count()}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
    ]  # fmt: skip
    if temp_dir:
        cmd.append(f"--temp-dir={temp_dir}")
    if block:
        cmd.append("--block")
    return cmd


def head_up(num_cpus: int | None = None, port: int = 6379, dashboard_port: int = 8265) -> str:
    """Start a persistent local head (``ray start --head``, loopback only) that ``ray job submit``
    and ``tooltune submit`` can reach; returns its job-server address."""
    subprocess.run(head_command(num_cpus, port, dashboard_port), check=True, env=head_env())
    return f"http://127.0.0.1:{dashboard_port}"


def head_down() -> None:
    """``ray stop``: stops every Ray process of this user on this machine."""
    subprocess.run([ray_bin(), "stop"], check=True)
