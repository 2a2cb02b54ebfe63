"""SFT job: teach the calling pattern (schemas in, <tool_call> JSON out, result in, answer out).

    python -m ray_jobs.sft --config configs/tiny/sft.yaml [key=value ...]

Reads like the stage: resolve the model, tokenize the conversations (assistant turns carry the
loss), start the learner group, train with periodic validation and checkpoints (Hugging Face
weights with the tool-aware chat template, plus trainer state), then, when
``evaluation.enabled``, run the evaluation job on the final checkpoint (held-out tool world).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import Field, model_validator

from cluster.local import RayConfig, local_ray
from cluster.placement import RoleConfig
from ray_jobs._cli import job_config, user_errors
from ray_jobs.evaluate import BfclEvalConfig, EvalConfig, WorkerSettings, run_evaluation
from rollout.agent_loop import LoopConfig
from tooltune.config import ConfigError, StrictModel, config_changes, dump_config, read_yaml, save_config
from tooltune.models import TinyModelConfig
from tooltune.provenance import provenance
from trainers.learner import LearnerConfig
from trainers.sft import SFTDataConfig, SFTTrainConfig


class SFTEvalSettings(StrictModel):
    """Tool-world evaluation of the final checkpoint, on the test split of the training world."""

    enabled: bool = False
    limit: int | None = Field(None, ge=1)
    # During training: every N steps (and at the end), the tool loop on the first
    # ``during_training_limit`` validation tasks, run by learner rank 0 on the weights it holds
    # (transformers generate; ZeRO 0-2). Logged as tool_eval/<metric>.
    during_training_every: int | None = Field(None, ge=1)
    during_training_limit: int = Field(50, ge=1)
    workers: RoleConfig = RoleConfig(num_ranks=1, cpus=1.0)
    max_model_len: int = Field(2048, ge=16)  # the evaluation engines' context
    loop: LoopConfig = LoopConfig(max_turns=4, max_new_tokens=160, max_total_tokens=2048, sampling={"temperature": 0.0})


class SFTConfig(StrictModel):
    model: str = Field("tiny", description="a checkpoint path, 'smollm2', or 'tiny' (built on the training corpus)")
    tiny: TinyModelConfig = TinyModelConfig()
    ray: RayConfig = RayConfig()
    learners: RoleConfig = RoleConfig(num_ranks=1)
    learner: LearnerConfig = LearnerConfig()
    data: SFTDataConfig = SFTDataConfig()
    train: SFTTrainConfig = SFTTrainConfig()
    evaluation: SFTEvalSettings = SFTEvalSettings()
    output_dir: str = "runs/sft"
    resume: bool = True
    tensorboard: bool = True

    @model_validator(mode="after")
    def _check_evaluation(self) -> SFTConfig:
        # Checked when the config is read, not when the evaluation starts after hours of training.
        if self.evaluation.loop.max_total_tokens > self.evaluation.max_model_len:
            raise ValueError(
                f"evaluation.loop.max_total_tokens ({self.evaluation.loop.max_total_tokens}) exceeds "
                f"evaluation.max_model_len ({self.evaluation.max_model_len}): an episode would outgrow the engine's context"
            )
        if self.evaluation.during_training_every:
            if self.data.world is None:
                raise ValueError("evaluation.during_training_every needs data.world: its validation split is evaluated")
            if self.learner.zero_stage == 3:
                raise ValueError("evaluation.during_training_every needs learner.zero_stage 0-2 (ZeRO-3 shards the weights)")
        return self


def evaluation_config(cfg: SFTConfig, model: str, output_dir: str | Path, label: str = "", split: str = "test") -> EvalConfig:
    """The evaluation job's config for ``model`` on a held-out split (``test``, or ``validation``
    to choose settings on) of ``cfg``'s world, generated with the same config, so no evaluated
    query was a training query. ``cfg`` may be any job config with SFT's ``ray``, ``evaluation``,
    ``learner`` and ``data`` (the distillation job's too)."""
    if cfg.data.world is None:
        raise ValueError("SFT evaluation needs data.world: the test split comes from the training world")
    return EvalConfig(
        model=model,
        label=label,
        ray=cfg.ray,
        workers=cfg.evaluation.workers,
        rollout=WorkerSettings(dtype=cfg.learner.dtype, max_model_len=cfg.evaluation.max_model_len),
        world=cfg.data.world,
        splits=[split],
        limit=cfg.evaluation.limit,
        bfcl=BfclEvalConfig(limit_per_category=0),
        loop=cfg.evaluation.loop,
        output_dir=str(output_dir),
    )


def periodic_tool_eval(cfg: SFTConfig, group, tokenizer) -> tuple:
    """(callable, every) for ``SFTTrainer``: the validation split's tool loop on learner rank 0."""
    every = cfg.evaluation.during_training_every
    if not every:
        return None, None
    from tooltune.world import generate_world

    tasks = generate_world(cfg.data.world)["validation"][: cfg.evaluation.during_training_limit]
    loop, world = cfg.evaluation.loop.model_dump(), cfg.data.world.model_dump()
    return (lambda: group.first("with_model", evaluate_model, tasks, tokenizer, loop, world)), every


def evaluate_model(model, tasks: list, tokenizer, loop: dict, world: dict | None) -> dict:
    """Tool-world metrics of a live model (runs on a learner rank, through ``Learner.with_model``):
    the tool loop over ``generate``, no checkpoint and no engine start."""
    from rollout.agent_loop import LoopConfig, run_episodes
    from rollout.hf_worker import HFRolloutWorker
    from tooltune.metrics import compute_metrics
    from tooltune.world import WorldConfig, world_registry

    registry = world_registry(WorldConfig.model_validate(world) if world else None)
    worker = HFRolloutWorker.around(model, tokenizer)
    runs = run_episodes(tasks, worker, tokenizer, LoopConfig.model_validate(loop), registry)
    return compute_metrics(tasks, [run.episode for run in runs])


def base_model(cfg: SFTConfig, train_convs: list | None = None, texts: list[str] | None = None) -> str:
    """The checkpoint SFT starts from: a path, SmolLM2 (converted once), or the tiny model whose
    tokenizer is fit to the training corpus (``train_convs``/``texts``, loaded when not given)."""
    from tooltune.models import chat_corpus, resolve_model
    from trainers.sft import load_sft_conversations, load_text

    def corpus() -> list[str]:
        convs = train_convs if train_convs is not None else load_sft_conversations(cfg.data)[0]
        text = texts if texts is not None else load_text(cfg.data.text_files)
        return chat_corpus(convs[:2000]) + text[:2000]

    return resolve_model(cfg.model, corpus, cfg.tiny)


# Keys that do not change what a run trains: a resumed run may differ from its checkpoint in these.
RUN_INDEPENDENT_KEYS = (
    "evaluation", "ray", "resume", "tensorboard", "output_dir", "learners.cpus", "learners.gpus",
    "learners.strategy", "learners.ready_timeout_s", "train.eval_every", "train.save_every", "train.keep_last",
)  # fmt: skip


def saved_config_changes(out: Path, cfg: StrictModel, independent: tuple[str, ...] = RUN_INDEPENDENT_KEYS) -> list[str]:
    """How ``cfg`` differs from the config saved in ``out`` in the keys that change a run.
    The saved file is compared as written, not validated again: a check added to the code since
    (on a key that does not change the run) must not make an older run unreadable."""
    return config_changes(read_yaml(out / "config.yaml"), dump_config(cfg), independent, added_ok=True)


def prepare_run_dir(cfg: StrictModel, independent: tuple[str, ...] = RUN_INDEPENDENT_KEYS) -> int | None:
    """Check ``output_dir`` before a run writes to it; returns the step a resume starts from.

    ``cfg`` has ``output_dir`` and ``resume``. With ``resume``, a checkpoint there must come from
    a run of the same config (every key but those under ``independent``), and must not be the end
    of that run: either is a ``ConfigError`` naming the directory (and the keys), never a run that
    trains nothing and reports an old checkpoint as new. Without ``resume``, earlier checkpoints and metrics there are removed.
    """
    import shutil

    from trainers.checkpoint import CheckpointManager

    out = Path(cfg.output_dir)
    ckpts = CheckpointManager(out / "checkpoints")
    latest = ckpts.latest()
    if not cfg.resume:
        for old in (out / "checkpoints", out / "tensorboard", out / "eval"):
            shutil.rmtree(old, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        return None
    if latest is None:
        return None
    try:
        changes = saved_config_changes(out, cfg, independent)
    except ConfigError as e:
        raise ConfigError(f"{out}: resume=true, but the config of its checkpoint {latest.name} cannot be read: {e}") from None
    if changes:
        raise ConfigError(
            f"{out}: resume=true, but its checkpoint {latest.name} was trained with another config: "
            f"{'; '.join(changes[:6])}; set resume=false to start over there, or another output_dir"
        )
    state = CheckpointManager.trainer_state(latest)
    if state["step"] >= state["total_steps"]:
        raise ConfigError(
            f"{out}: this run already finished (step {state['step']} of {state['total_steps']}, {latest / 'model'}); "
            "set resume=false to train it again, or another output_dir"
        )
    return int(state["step"])


def start_run(cfg: StrictModel, independent: tuple[str, ...] = RUN_INDEPENDENT_KEYS) -> Path:
    """A job's ``output_dir``, checked (``prepare_run_dir``), with the run's config and the
    provenance of this start written into it."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prepare_run_dir(cfg, independent)
    save_config(cfg, out / "config.yaml")
    (out / "provenance.json").write_text(json.dumps(provenance(cfg, run_dir=out), indent=1))
    return out


def run_sft(cfg: SFTConfig, stop_after: int | None = None) -> dict:
    from transformers import AutoTokenizer

    from tooltune.chat import install_tool_template, needs_tool_template
    from tooltune.tracking import MetricsLogger
    from trainers.group import LearnerGroup
    from trainers.sft import SFTTrainer, load_sft_conversations, load_text, planned_steps, tokenize_all, training_rows

    t0 = time.time()
    out = start_run(cfg)

    train_convs, val_convs = load_sft_conversations(cfg.data)
    texts = load_text(cfg.data.text_files)
    model_path = base_model(cfg, train_convs, texts)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if needs_tool_template(tokenizer):
        install_tool_template(tokenizer)
    loss_on = cfg.data.conversation_loss
    train = training_rows(tokenize_all(tokenizer, train_convs, texts, cfg.train.seq_len, loss_on), cfg.train)
    validation = tokenize_all(tokenizer, val_convs, [], cfg.train.seq_len, loss_on)
    global_batch = cfg.learner.micro_batch_size * cfg.learner.grad_accum_steps * cfg.learners.num_ranks
    steps = planned_steps(len(train), global_batch, cfg.train)
    # The learners' LR schedule spans the run unless the config fixes its length.
    learner = cfg.learner.model_copy(update={"model": model_path, "total_steps": cfg.learner.total_steps or steps})

    logger = MetricsLogger(out, tensorboard=cfg.tensorboard)
    with local_ray(cfg.ray):
        group = LearnerGroup("sft-learners", cfg.learners, learner)
        # On an attached cluster the learners outlive a driver that fails unless shut down.
        try:
            trainer = SFTTrainer(
                group, tokenizer, train, validation, cfg.train, out, logger, *periodic_tool_eval(cfg, group, tokenizer)
            )
            history = trainer.fit(resume=cfg.resume, stop_after=stop_after)
        finally:
            group.shutdown()
        train_seconds = time.time() - t0
        final = trainer.ckpt.latest()
        evaluation = None
        if cfg.evaluation.enabled and final is not None and stop_after is None:
            eval_cfg = evaluation_config(cfg, str(final / "model"), out / "eval", label=f"SFT {out.name}")
            evaluation = run_evaluation(eval_cfg)["world"]["test"]
    logger.close()
    result = {
        "base_model": model_path,
        "checkpoint": str(final / "model") if final else None,
        "steps": trainer.total_steps,
        "completed_steps": history[-1]["step"] if history else 0,
        "history": history,
        "wall_seconds": round(train_seconds, 1),  # set-up and training, not the evaluation
        "evaluation": evaluation,
        "evaluation_seconds": round(time.time() - t0 - train_seconds, 1) if evaluation else None,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> None:
    cfg = job_config(SFTConfig, __doc__.splitlines()[0], argv)
    with user_errors():
        result = run_sft(cfg)
    last = result["history"][-1] if result["history"] else {}
    print(json.dumps({k: v for k, v in result.items() if k != "history"} | {"last": last}, indent=2))


if __name__ == "__main__":
    main()
