"""Autoscaling on one machine: Ray's fake multi-node autoscaler adds (fake) GPU nodes for a job's
pending placement, the job finishes, the idle nodes are removed.

The fake autoscaler runs ``ray stop --force`` when it starts and ends, which would end every Ray
process of this user: the driver runs in its own user, PID and network namespaces (its own
loopback, its own default ports). Without namespaces it runs only in CI (a machine with nothing
else on Ray), and the output says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.local import head_env
from tests.drivers.namespaces import permitted, unshare

ROOT = Path(__file__).resolve().parents[1]
NAMESPACES = unshare(net=True)


@pytest.mark.slow
def test_pending_placement_adds_nodes_job_finishes_idle_nodes_go(tmp_path):
    driver = [sys.executable, "-m", "tests.drivers.autoscale_sft", str(tmp_path / "run")]
    if permitted(NAMESPACES, "ip", "link", "set", "lo", "up"):  # the driver brings its loopback up
        cmd = [*NAMESPACES, "bash", "-c", 'ip link set lo up && exec "$@"', "driver", *driver]
        print("fake autoscaler: own user, PID and network namespaces")
    elif os.environ.get("CI") == "true":
        cmd = driver
        print("fake autoscaler: namespaces not permitted here; running on this CI machine's only Ray")
    else:
        pytest.skip("namespaces not permitted and not CI: the fake autoscaler would stop every Ray process here")
    env = head_env() | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert out.returncode == 0 and lines, out.stdout[-4000:] + out.stderr[-4000:]
    result = json.loads(lines[-1])
    assert result["nodes_before"] == 1  # the head only: no GPU anywhere
    assert result["gpu_nodes"] == 2 and result["nodes_during"] == 3  # two added for the two learner ranks
    assert result["steps"] == [1, 2, 3] and all(loss == loss and loss > 0 for loss in result["losses"]), json.dumps(result)
    assert result["nodes_after_idle"] == 1  # idle GPU nodes removed
