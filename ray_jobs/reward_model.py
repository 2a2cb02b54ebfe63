"""Reward model job: train a scalar-head model on judged rankings, and serve it to scorers.

    python -m ray_jobs.reward_model --config configs/tiny/reward_model.yaml [key=value ...]

Reads the preference files (``ray_jobs.preferences`` writes them), turns every ranking into its
(chosen, rejected) pairs, trains a learner group with the ``reward`` head on the Bradley–Terry
loss (full or LoRA; ZeRO as any learner), logs held-out pairwise accuracy per category, and
saves checkpoints with exact resume as SFT does. The saved model is a one-label sequence
classifier: ``AutoModelForSequenceClassification.from_pretrained(dir)`` loads it.

``start_scorers`` starts the reward model as frozen scorer actors for another job (PPO): its own
placement, or bundles shared with other roles (``cluster.placement.place_roles``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import Field, model_validator

from cluster.local import RayConfig, local_ray
from cluster.placement import RoleConfig, RoleGroup
from ray_jobs._cli import job_config, user_errors
from ray_jobs.sft import start_run
from tooltune.config import StrictModel
from trainers.learner import LearnerConfig
from trainers.reward_model import RewardDataConfig, RewardTrainConfig

# Keys that do not change what a run trains: a resumed run may differ from its checkpoint in these.
RUN_INDEPENDENT_KEYS = (
    "ray", "resume", "tensorboard", "output_dir", "learners.cpus", "learners.gpus", "learners.strategy",
    "learners.ready_timeout_s", "train.eval_every", "train.save_every", "train.keep_last", "data.validation_files",
)  # fmt: skip


class RewardModelConfig(StrictModel):
    model: str = Field("tiny", description="the backbone: a checkpoint path (an SFT run's model), 'smollm2' or 'tiny'")
    ray: RayConfig = RayConfig()
    learners: RoleConfig = RoleConfig(num_ranks=1)
    learner: LearnerConfig = LearnerConfig(head="reward")
    data: RewardDataConfig
    train: RewardTrainConfig = RewardTrainConfig()
    output_dir: str = "runs/reward_model"
    resume: bool = True
    tensorboard: bool = True

    @model_validator(mode="after")
    def _check(self) -> RewardModelConfig:
        if self.learner.head != "reward":
            raise ValueError(f"learner.head must be 'reward' for a reward model, got {self.learner.head!r}")
        if not self.learner.trainable:
            raise ValueError("learner.trainable must be true: this job trains the reward model")
        if not self.train.merged:
            raise ValueError("train.merged must be true: a reward model is saved whole (LoRA merged), to load without peft")
        if self.learner.micro_batch_size % 2:
            raise ValueError(f"learner.micro_batch_size must be even (rows are chosen/rejected pairs), got {self.learner.micro_batch_size}")
        return self


def load_pairs(tokenizer, files: list[str], cfg: RewardDataConfig) -> tuple[list, int, int]:
    """(pairs, records read, pairs dropped for length) of the preference files."""
    from tooltune.preferences import read_preferences
    from trainers.reward_model import preference_pairs

    records = [r for path in files for r in read_preferences(path)]
    pairs, dropped = preference_pairs(tokenizer, records, cfg)
    return pairs, len(records), dropped


def run_reward_model(cfg: RewardModelConfig, stop_after: int | None = None) -> dict:
    from transformers import AutoTokenizer

    from tooltune.chat import install_tool_template, needs_tool_template
    from tooltune.models import resolve_model
    from tooltune.tracking import MetricsLogger, plot_curves
    from trainers.group import LearnerGroup
    from trainers.reward_model import RewardModelTrainer, planned_steps

    t0 = time.time()
    out = start_run(cfg, RUN_INDEPENDENT_KEYS)

    model_path = resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if needs_tool_template(tokenizer):
        install_tool_template(tokenizer)
    train, n_train, dropped = load_pairs(tokenizer, cfg.data.train_files, cfg.data)
    validation, n_val, dropped_val = load_pairs(tokenizer, cfg.data.validation_files, cfg.data)
    if not train:
        raise ValueError(f"{cfg.data.train_files}: no ordered pair to train on ({n_train} rankings, {dropped} pairs too long)")
    pairs_per_step = cfg.learner.micro_batch_size // 2 * cfg.learner.grad_accum_steps * cfg.learners.num_ranks
    steps = planned_steps(len(train), pairs_per_step, cfg.train)
    # The learners' LR schedule spans the run unless the config fixes its length.
    learner = cfg.learner.model_copy(update={"model": model_path, "total_steps": cfg.learner.total_steps or steps})
    logger = MetricsLogger(out, tensorboard=cfg.tensorboard)
    with local_ray(cfg.ray):
        group = LearnerGroup("reward-model", cfg.learners, learner)
        try:
            trainer = RewardModelTrainer(group, tokenizer, train, validation, cfg.train, out, logger)
            history = trainer.fit(resume=cfg.resume, stop_after=stop_after)
        finally:
            group.shutdown()
    logger.close()
    curves = ["train/loss", "train/accuracy", "validation/loss", "validation/accuracy"]
    curves += sorted({k for h in history for k in h if k.startswith("validation/accuracy/")})
    plot_curves(out / "metrics.jsonl", out / "curves.png", curves, f"reward model {out.name}")
    final = trainer.ckpt.latest()
    last_validation = next((h for h in reversed(history) if "validation/accuracy" in h), {})
    result = {
        "base_model": model_path,
        "checkpoint": str(final / "model") if final else None,
        "steps": trainer.total_steps,
        "completed_steps": history[-1]["step"] if history else 0,
        "data": {
            "train_rankings": n_train, "train_pairs": len(train), "train_pairs_too_long": dropped,
            "validation_rankings": n_val, "validation_pairs": len(validation), "validation_pairs_too_long": dropped_val,
        },  # fmt: skip
        "validation": {k.removeprefix("validation/"): v for k, v in last_validation.items() if k.startswith("validation/")},
        "history": history,
        "wall_seconds": round(time.time() - t0, 1),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def start_scorers(model_dir: str, role: RoleConfig, learner: LearnerConfig | None = None, placement: RoleGroup | None = None, scorer_cfg=None):
    """The reward model at ``model_dir`` as frozen scorer actors (``role.num_ranks`` of them) and
    the driver's ``RewardScorer`` over them; returns ``(group, scorer)`` (``group.shutdown()`` when
    done). ``learner`` sets dtype, micro-batch and ZeRO stage (ZeRO-0 by default: each actor holds
    the whole model and scores its share alone); ``placement``: bundles shared with other roles."""
    from transformers import AutoTokenizer

    from rollout.scorer import RewardScorer
    from trainers.group import LearnerGroup

    base = learner or LearnerConfig(zero_stage=0)
    frozen = base.model_copy(update={"model": model_dir, "head": "reward", "trainable": False, "lora": None})
    group = LearnerGroup("reward-scorers", role, frozen, placement)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return group, RewardScorer(group.actors, tokenizer, scorer_cfg, independent=frozen.zero_stage < 3)


def main(argv: list[str] | None = None) -> None:
    cfg = job_config(RewardModelConfig, __doc__.splitlines()[0], argv)
    with user_errors():
        result = run_reward_model(cfg)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
