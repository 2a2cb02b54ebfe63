"""Smoke job: the three real components of tooltune working together in one Ray.

1. a vLLM engine in a Ray actor generates from a tiny model;
2. two Ray actors in one gloo group, each holding a DeepSpeed ZeRO engine, take a step;
3. the learners' new weights stream to the vLLM actor over a gloo group (verified bucket by
   bucket, ``ray_jobs.weight_sync``), whose log-probs must then match theirs.

    python -m ray_jobs.smoke --config configs/tiny/smoke.yaml
"""

from __future__ import annotations

import json
import time

from pydantic import Field

from cluster.local import RayConfig, local_ray
from cluster.placement import RoleConfig, RoleGroup
from ray_jobs._cli import job_config
from tooltune.config import StrictModel
from tooltune.models import TinyModelConfig


class SmokeConfig(StrictModel):
    ray: RayConfig = RayConfig()
    model: TinyModelConfig = TinyModelConfig()
    zero_stage: int = 2
    lr: float = 1e-2
    learners: RoleConfig = RoleConfig(num_ranks=2, cpus=0.5)
    rollout: RoleConfig = RoleConfig(num_ranks=1, cpus=1.0)
    tolerance: float = Field(1e-3, gt=0)


PROBE = "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n"
TRAIN_TEXT = [
    "Hello! How can I help you today? The answer is 42.",
    "Convert 10 km to miles. What is the capital of France? It is Paris.",
]


def run_smoke(cfg: SmokeConfig) -> dict:
    import ray
    from transformers import AutoTokenizer

    from ray_jobs.weight_sync import connect_weight_sync, sync_weights
    from rollout.vllm_worker import RolloutWorker
    from tooltune.models import tiny_model
    from trainers.learner import Learner
    from trainers.losses import sft_nll

    t0 = time.time()
    model_dir = str(tiny_model(cfg=cfg.model))
    tok = AutoTokenizer.from_pretrained(model_dir)
    probe = tok(PROBE)["input_ids"]
    batch = tok(TRAIN_TEXT, padding="max_length", max_length=32, truncation=True)["input_ids"]

    with local_ray(cfg.ray):
        rollout_group, learner_group = RoleGroup("rollout", cfg.rollout), RoleGroup("learners", cfg.learners)
        # On an attached cluster, actors and placement groups outlive the driver unless removed.
        try:
            (worker,) = rollout_group.spawn(RolloutWorker, lambda r: ({"model": model_dir},))
            learner_cfg = {"model": model_dir, "zero_stage": cfg.zero_stage, "lr": cfg.lr, "micro_batch_size": 1}
            world = cfg.learners.num_ranks
            learners = learner_group.spawn(Learner, lambda r: (learner_cfg, r, world))
            addr, port = ray.get(learners[0].master_address.remote())
            ray.get([lrn.setup.remote(addr, port) for lrn in learners])
            connect_weight_sync(learners, [worker])

            generated = ray.get(worker.generate.remote([probe], {"n": 2, "max_tokens": 16, "temperature": 1.0, "seed": 0}))
            before = ray.get(worker.score.remote([probe]))[0]

            # Each rank steps on its own row: the gradient all-reduce makes their updates identical.
            rows = [{"input_ids": [batch[r % len(batch)]], "loss_mask": [[1] * len(batch[0])]} for r in range(world)]
            tokens = world * (len(batch[0]) - 1)
            stats = ray.get([lrn.train_step.remote(rows[r], sft_nll, tokens) for r, lrn in enumerate(learners)])
            losses = [s["nll_sum"] / s["tokens"] for s in stats]
            checksums = set(ray.get([lrn.with_model.remote(weights_checksum) for lrn in learners]))
            sync = sync_weights(learners, [worker], version=1)

            after = ray.get(worker.score.remote([probe]))[0]
            learner_lp = ray.get(learners[0].logprobs.remote([probe]))[0]
            ray.get(worker.shutdown.remote())
        finally:
            rollout_group.close()
            learner_group.close()

    diff_after = max(abs(a - b) for a, b in zip(after, learner_lp))
    diff_before = max(abs(a - b) for a, b in zip(before, learner_lp))
    return {
        "generated_tokens": sum(len(s.token_ids) for s in generated[0].samples),
        "learner_losses": losses,
        "ranks_agree": len(checksums) == 1,
        "max_logprob_diff_before_sync": diff_before,
        "max_logprob_diff_after_sync": diff_after,
        "synced": diff_after < cfg.tolerance < diff_before and len(checksums) == 1,
        "sync_s": sync["sync_s"],
        "seconds": round(time.time() - t0, 1),
    }


def weights_checksum(model) -> str:
    """One rank's weights, as an identity (ZeRO ranks must agree after a step)."""
    from tooltune.weights import tensor_checksum

    return tensor_checksum(model.state_dict())


def main(argv: list[str] | None = None) -> None:
    cfg = job_config(SmokeConfig, __doc__.splitlines()[0], argv)
    result = run_smoke(cfg)
    print(json.dumps(result, indent=2))
    raise SystemExit(0 if result["synced"] else 1)


if __name__ == "__main__":
    main()
