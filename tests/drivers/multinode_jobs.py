"""Job drivers of the multi-node test: run on a cluster (``RAY_ADDRESS``), print one JSON line with
the results and the address of the node each actor ran on (from Ray's actor table).

    python -m tests.drivers.multinode_jobs OUT_DIR MODEL_DIR

runs the SFT job (``OUT_DIR/sft``), then a short PPO run from ``MODEL_DIR`` (``OUT_DIR/ppo``).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

from ray_jobs.ppo import PPOConfig
from ray_jobs.sft import SFTConfig
from tooltune.config import load_config


def sft_config(out_dir: str, address: str | None = None) -> SFTConfig:
    """The tiny SFT job with 2 learner ranks, one per node (STRICT_SPREAD), ZeRO-2 on gloo."""
    return SFTConfig.model_validate({
        "model": "tiny",
        "ray": {"address": address},
        "learners": {"num_ranks": 2, "cpus": 1, "strategy": "STRICT_SPREAD", "ready_timeout_s": 120},
        "learner": {"zero_stage": 2, "lr": 3e-3, "micro_batch_size": 2},
        "data": {"world": {"n_train": 64, "n_validation": 8, "n_test": 8}},
        "train": {"seq_len": 768, "max_steps": 3, "eval_every": 100, "save_every": 100},
        "output_dir": out_dir,
        "tensorboard": False,
    })  # fmt: skip


def ppo_config(out_dir: str, model_dir: str, address: str | None = None) -> PPOConfig:
    """Two PPO steps, GRPO: one rollout worker taking a whole node (2 CPUs), so the actor and the
    reference land on the other."""
    return load_config("configs/tiny/ppo.yaml", PPOConfig, [
        f"model={model_dir}", f"output_dir={out_dir}", "ray.address=" + (address or "null"),
        "roles.rollout={num_ranks: 1, cpus: 2}", "roles.actor={num_ranks: 1, cpus: 1}",
        "roles.reference={num_ranks: 1, cpus: 1}", "algorithm.estimator=grpo", "algorithm.kl_in_reward=false", "algorithm.kl_kind=k3",
        "train.steps=2",
        "train.eval_every=100", "train.save_every=100", "actor.micro_batch_size=4", "tensorboard=false",
    ])  # fmt: skip


def actors() -> dict[str, tuple[str, str, str]]:
    """Actor id -> (class name, node address, node id) of every actor this cluster ran (alive or dead)."""
    import ray._private.state as state

    return {aid: (info["ActorClassName"].rsplit(".", 1)[-1], info["Address"]["IPAddress"], info["Address"]["NodeID"])
            for aid, info in state.state.actor_table(None).items()}  # fmt: skip


def nodes_of(table: dict[str, tuple[str, str, str]], field: int = 1) -> dict[str, list[str]]:
    """Class name -> the sorted node addresses (``field`` 1) or node ids (2) of its actors."""
    out: dict[str, list[str]] = defaultdict(list)
    for row in table.values():
        out[row[0]].append(row[field])
    return {cls: sorted(ips) for cls, ips in out.items()}


def run_jobs(out_dir: str, model_dir: str) -> dict:
    import ray

    from ray_jobs.ppo import run_ppo
    from ray_jobs.sft import run_sft

    sft = run_sft(sft_config(f"{out_dir}/sft", "auto"))
    before = actors()
    ppo = run_ppo(ppo_config(f"{out_dir}/ppo", model_dir, "auto"))
    new = {aid: v for aid, v in actors().items() if aid not in before}
    return {
        "sft": {"losses": [h["train/loss"] for h in sft["history"]], "nodes": nodes_of(before),
                "node_ids": nodes_of(before, 2)},
        "ppo": {"steps": [h["step"] for h in ppo["history"]], "rewards": [h["reward/total"] for h in ppo["history"]],
                "nodes": nodes_of(new), "node_ids": nodes_of(new, 2)},
        "driver_node": ray.util.get_node_ip_address(),
    }  # fmt: skip


def main(out_dir: str, model_dir: str) -> None:
    import ray

    ray.init(address="auto")
    print(json.dumps(run_jobs(out_dir, model_dir)), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
