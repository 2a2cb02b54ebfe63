"""Driver of the autoscaling test (run in its own namespaces by tests/test_autoscaling.py).

A fake autoscaling cluster whose head has no GPU and whose GPU node type scales from 0; the tiny
SFT job asks for 2 learner ranks of 1 GPU each, one per node (STRICT_SPREAD): the autoscaler must
add two nodes, the job must finish, and the idle nodes must then be removed. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

import ray

from cluster.fake_autoscaler import FakeAutoscalingCluster
from ray_jobs.sft import run_sft
from tests.drivers.multinode_jobs import sft_config


def alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"]]


def main(out_dir: str) -> None:
    cluster = FakeAutoscalingCluster(
        head_resources={"CPU": 1},
        worker_node_types={"gpu_node": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}},
    )
    cluster.start()
    t0 = time.time()
    try:
        ray.init(address="auto")
        before = len(alive_nodes())
        # The multi-node test's SFT job, its two ranks asking a (fake) GPU each.
        cfg = sft_config(out_dir, "auto")
        cfg = cfg.model_copy(update={"learners": cfg.learners.model_copy(update={"gpus": 1.0, "ready_timeout_s": 300.0})})
        result = run_sft(cfg)
        peak = len(alive_nodes())
        gpu_nodes_used = sorted({n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU")})
        deadline = time.time() + 180
        while len(alive_nodes()) > before and time.time() < deadline:
            time.sleep(1)
        print(json.dumps({
            "nodes_before": before, "nodes_during": peak, "gpu_nodes": len(gpu_nodes_used),
            "nodes_after_idle": len(alive_nodes()), "steps": [h["step"] for h in result["history"]],
            "losses": [h["train/loss"] for h in result["history"]], "seconds": round(time.time() - t0, 1),
        }), flush=True)  # fmt: skip
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
