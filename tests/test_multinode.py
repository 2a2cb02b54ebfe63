"""Multi-node for real on one machine: a head and two worker nodes, each a real ``ray start`` in
its own network namespace with its own address on a bridge; the tiny SFT job's 2 learner ranks run
on different nodes (gloo over TCP) with the losses of the single-node run, and a short PPO run has
its rollout worker on another node than its learners (weights synced across nodes).

Where namespaces are not permitted, the same jobs run on ``ray.cluster_utils.Cluster`` (three
raylets on one address), and the output says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.drivers.multinode_jobs import run_jobs, sft_config
from tests.drivers.namespaces import permitted, unshare
from tests.drivers.private_cluster import private_cluster

ROOT = Path(__file__).resolve().parents[1]
NAMESPACES = unshare(net=True)


def on_namespaced_nodes(out: Path, model_dir: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [*NAMESPACES, sys.executable, "-m", "tests.drivers.netns_cluster", str(out / "cluster"),
           "tests.drivers.multinode_jobs", str(out), model_dir]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0 and lines, run.stdout[-4000:] + run.stderr[-6000:]
    return json.loads(lines[-1])


def on_cluster_utils(out: Path, model_dir: str) -> dict:
    with private_cluster(sys.modules[__name__], {"num_cpus": 0}, ({"num_cpus": 2}, {"num_cpus": 2})):
        return run_jobs(str(out), model_dir)


@pytest.mark.slow
def test_sft_and_ppo_across_three_nodes(tmp_path, tiny_model_dir):
    if permitted(NAMESPACES, "sh", "-c", "command -v nsenter && ip link add br0 type bridge && unshare --net true"):
        print("three nodes: each in its own network namespace (10.77.0.1-3 on a bridge)")
        result = on_namespaced_nodes(tmp_path, tiny_model_dir)
        head = "10.77.0.1"
    else:
        print("three nodes: ray.cluster_utils.Cluster (network namespaces not permitted here)")
        result = on_cluster_utils(tmp_path, tiny_model_dir)
        head = None
    sft, ppo = result["sft"], result["ppo"]
    # Two ranks on two nodes (STRICT_SPREAD), neither the head (it holds no CPU); the rollout
    # worker on another node than the PPO learners.
    assert len(set(sft["node_ids"]["Learner"])) == 2
    assert set(ppo["node_ids"]["RolloutWorker"]).isdisjoint(ppo["node_ids"]["Learner"])
    if head:
        assert head not in sft["nodes"]["Learner"] and result["driver_node"] == head
        assert len(set(sft["nodes"]["Learner"])) == 2 and set(ppo["nodes"]["RolloutWorker"]).isdisjoint(ppo["nodes"]["Learner"])
    assert ppo["steps"] == [1, 2] and all(r == r for r in ppo["rewards"])

    # The same job on one node: the same losses.
    from ray_jobs.sft import run_sft

    cfg = sft_config(str(tmp_path / "single"))
    single = run_sft(cfg.model_copy(update={"learners": cfg.learners.model_copy(update={"strategy": "PACK"})}))
    assert sft["losses"] == pytest.approx([h["train/loss"] for h in single["history"]], rel=1e-6)
