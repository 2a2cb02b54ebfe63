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
from ray_jobs.sft import SFTConfig, run_sft


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
        cfg = SFTConfig.model_validate({
            "model": "tiny",
            "ray": {"address": "auto"},
            "learners": {"num_ranks": 2, "cpus": 1, "gpus": 1, "strategy": "STRICT_SPREAD", "ready_timeout_s": 300},
            "learner": {"zero_stage": 2, "lr": 3e-3, "micro_batch_size": 2},
            "data": {"world": {"n_train": 64, "n_validation": 8, "n_test": 8}},
            "train": {"seq_len": 768, "max_steps": 3, "eval_every": 100, "save_every": 100},
            "output_dir": out_dir,
            "tensorboard": False,
        })  # fmt: skip
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
