"""Distillation job: the teacher's tool-calling behaviour, token by token, into a smaller LoRA student.

    python -m ray_jobs.distill --config configs/tiny/distill.yaml [key=value ...]

Reads like the stage: tokenize the training conversations (the teacher's tokenizer; assistant
turns carry the loss) -> build the student (a checkpoint of the same tokenizer, or the teacher
with layers removed) -> the sharded teacher scores every loss token's top-k (pipeline stages as
Ray actors), into sharded Parquet once (resumable shard by shard, reused by later student runs
with the same teacher and data) or streamed to the student a bounded number of steps ahead ->
the student learns on ZeRO data-parallel learners (``trainers.distill_trainer``), checkpointed
and resumable like SFT -> optionally, the evaluation job on the final checkpoint.

Modes: ``logit`` (the teacher's distribution per token, as above) and ``response`` (the teacher
answers the training tasks in the real tool loop through vLLM rollout workers; episodes with
format errors, schema violations, hallucinated tools, wrong calls or wrong answers are dropped and
counted; the student does SFT on the rest). Feature-based and on-policy modes are to come.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from cluster.local import RayConfig, local_ray
from cluster.placement import RoleConfig
from ray_jobs._cli import job_config, user_errors
from ray_jobs.evaluate import WorkerSettings
from ray_jobs.sft import SFTEvalSettings, start_run
from rollout.agent_loop import LoopConfig
from tooltune.config import StrictModel
from tooltune.weights import WeightSyncConfig
from trainers.distill import Divergence
from trainers.learner import LearnerConfig, LoraConfig
from trainers.sft import SFTDataConfig, SFTTrainConfig


class TeacherSettings(StrictModel):
    model: str = Field(..., description="the teacher checkpoint (a tuned SFT or PPO model)")
    stages: int = Field(2, ge=1)  # pipeline stages, each a Ray actor with a slice of the layers
    cpus_per_stage: float = Field(1.0, ge=0)
    gpus_per_stage: float = Field(0.0, ge=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    k: int = Field(20, ge=1)  # top-k token ids and log-probs per token, plus the tail's mass
    temperature: float = Field(1.0, gt=0)  # the teacher's and the student's (T^2 scales the loss)
    micro_batch_size: int = Field(8, ge=1)
    max_in_flight: int = Field(4, ge=1)  # micro-batches in the pipeline at once
    chunk_tokens: int = Field(1024, ge=1)


class TargetSettings(StrictModel):
    # parquet: scored once into ``dir`` (resumable, reused); stream: scored while the student trains.
    source: Literal["parquet", "stream"] = "parquet"
    dir: str | None = None  # default: <output_dir>/targets
    rows_per_shard: int = Field(512, ge=1)
    ahead_steps: int = Field(2, ge=0)  # stream: steps the teacher scores ahead of the student


class StudentSettings(StrictModel):
    model: str | None = None  # a checkpoint with the teacher's tokenizer
    keep_layers: list[int] | None = None  # or: the teacher with only these decoder layers

    @model_validator(mode="after")
    def _one_source(self) -> StudentSettings:
        if (self.model is None) == (self.keep_layers is None):
            raise ValueError("student: give exactly one of model (a checkpoint) or keep_layers (the teacher's layers to keep)")
        return self


class DistillLossSettings(StrictModel):
    kind: Divergence = "forward_kl"
    beta: float = Field(0.5, gt=0, lt=1)  # jsd's weight
    ce_weight: float = Field(0.0, ge=0, le=1)  # mix of the data's next-token NLL


class ResponseSettings(StrictModel):
    """Response mode: the teacher answers the training tasks in the real tool loop (vLLM rollout
    workers); episodes that fail the filter (``tooltune.response_filter``) are dropped."""

    workers: RoleConfig = RoleConfig(num_ranks=1, cpus=1.0)
    rollout: WorkerSettings = WorkerSettings()
    loop: LoopConfig = LoopConfig(max_turns=4, max_new_tokens=160, max_total_tokens=2048, sampling={"temperature": 0.0})
    limit: int | None = Field(None, ge=1)  # the first N training tasks; None: all
    check_calls: bool = True  # drop episodes whose calls are not exactly the expected ones


class OnPolicySettings(StrictModel):
    """On-policy mode: the student samples episodes (its rollout workers, weights synced after
    every update, as in PPO), the teacher scores the student's tokens (``loss.kind``: reverse_kl
    is the usual choice). Rows per step: ``prompts_per_step`` x ``loop.samples_per_task``."""

    workers: RoleConfig = RoleConfig(num_ranks=1, cpus=1.0)
    rollout: WorkerSettings = WorkerSettings()
    loop: LoopConfig = LoopConfig(max_turns=4, max_new_tokens=160, max_total_tokens=2048, samples_per_task=2)
    prompts_per_step: int = Field(8, ge=1)
    eval_limit: int = Field(50, ge=1)  # validation tasks the workers run (greedy) every train.eval_every steps
    weight_sync: WeightSyncConfig = WeightSyncConfig()


class DistillConfig(StrictModel):
    # logit: the teacher's top-k per token of the data (sharded teacher); response: SFT on the
    # teacher's filtered episodes (rollout workers); on_policy: the teacher's top-k on the
    # student's own episodes. The feature-based mode is to come.
    mode: Literal["logit", "response", "on_policy"] = "logit"
    teacher: TeacherSettings
    response: ResponseSettings = ResponseSettings()
    on_policy: OnPolicySettings = OnPolicySettings()
    targets: TargetSettings = TargetSettings()
    student: StudentSettings
    ray: RayConfig = RayConfig()
    learners: RoleConfig = RoleConfig(num_ranks=1)
    learner: LearnerConfig = LearnerConfig(lora=LoraConfig())
    data: SFTDataConfig = SFTDataConfig()
    train: SFTTrainConfig = SFTTrainConfig()
    loss: DistillLossSettings = DistillLossSettings()
    evaluation: SFTEvalSettings = SFTEvalSettings()
    output_dir: str = "runs/distill"
    resume: bool = True
    tensorboard: bool = True

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.mode != "response" and self.learner.zero_stage == 3 and self.learners.num_ranks > 1:
            raise ValueError(
                "learner.zero_stage 3 with several ranks is not supported by the logit and on-policy modes yet: each rank "
                "runs the LM head over its own number of loss tokens, and ZeRO-3's gathers need the same calls on every rank; use ZeRO-2"
            )
        if self.mode != "response" and self.train.pack:
            raise ValueError("train.pack: packed rows would be scored by the teacher as one sequence; distil unpacked rows")
        if self.mode == "on_policy":
            op, lc = self.on_policy, self.learner
            rows = op.prompts_per_step * op.loop.samples_per_task
            per_step = self.learners.num_ranks * lc.micro_batch_size * lc.grad_accum_steps
            if rows != per_step:
                raise ValueError(
                    f"on_policy.prompts_per_step x on_policy.loop.samples_per_task = {rows} rows per step, but learners.num_ranks "
                    f"x learner.micro_batch_size x learner.grad_accum_steps = {per_step}: they must be equal"
                )
            if self.train.max_steps is None:
                raise ValueError("on_policy mode needs train.max_steps (there is no fixed data set to count epochs over)")
            if lc.lora is not None and not (op.rollout.enable_lora and op.rollout.max_lora_rank >= lc.lora.r):
                raise ValueError(f"learner.lora (r={lc.lora.r}) syncs an adapter: set on_policy.rollout.enable_lora and max_lora_rank >= r")
            if op.loop.max_total_tokens > op.rollout.max_model_len:
                raise ValueError(f"on_policy.loop.max_total_tokens exceeds on_policy.rollout.max_model_len ({op.rollout.max_model_len})")
        return self

    def targets_dir(self) -> Path:
        return Path(self.targets.dir) if self.targets.dir else Path(self.output_dir) / "targets"


# Keys that do not change what a run trains (where the targets come from is one: the same numbers).
RUN_INDEPENDENT_KEYS = (
    "evaluation", "ray", "resume", "tensorboard", "output_dir", "learners.cpus", "learners.gpus",
    "learners.strategy", "learners.ready_timeout_s", "train.eval_every", "train.save_every", "train.keep_last",
    "targets", "teacher.stages", "teacher.cpus_per_stage", "teacher.gpus_per_stage", "teacher.micro_batch_size",
    "teacher.max_in_flight", "teacher.chunk_tokens",
)  # fmt: skip


def teacher_identity(cfg: DistillConfig) -> dict[str, Any]:
    """What the targets depend on, recorded in every shard (a shard of another teacher is refused)."""
    from tooltune.teacher_targets import checkpoint_digest

    t = cfg.teacher
    return {"digest": checkpoint_digest(t.model), "k": t.k, "temperature": t.temperature, "dtype": t.dtype}


def student_model(cfg: DistillConfig, out: Path) -> str:
    """The student checkpoint: the configured one, or the teacher cut to ``keep_layers`` (built
    once into ``out/student-init``)."""
    from tooltune.models import truncated_model

    if cfg.student.model:
        return cfg.student.model
    path = out / "student-init"
    stamp = path / "tooltune_student.json"
    want = {"teacher": str(Path(cfg.teacher.model).resolve()), "keep_layers": cfg.student.keep_layers}
    if not (stamp.exists() and json.loads(stamp.read_text()) == want):
        truncated_model(cfg.teacher.model, cfg.student.keep_layers, path)
        stamp.write_text(json.dumps(want))
    return str(path)


def params_ratio(student: str, teacher: str) -> tuple[int, int]:
    """Both models' parameter counts (built on the meta device: no weights read), after checking
    that the student's vocabulary holds every token id the teacher can send."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tooltune.models import parameter_count

    configs = [AutoConfig.from_pretrained(p) for p in (student, teacher)]
    if configs[0].vocab_size < configs[1].vocab_size:
        raise ValueError(
            f"the student ({student}) has a vocabulary of {configs[0].vocab_size}, the teacher ({teacher}) {configs[1].vocab_size}: "
            "the student must share the teacher's tokenizer"
        )
    with torch.device("meta"):
        return tuple(parameter_count(AutoModelForCausalLM.from_config(c)) for c in configs)  # type: ignore[return-value]


def make_teacher(cfg: DistillConfig):
    from trainers.teacher import ShardedTeacher

    t = cfg.teacher
    return ShardedTeacher(
        t.model, stages=t.stages, k=t.k, temperature=t.temperature, cpus_per_stage=t.cpus_per_stage,
        max_in_flight=t.max_in_flight, chunk_tokens=t.chunk_tokens, dtype=t.dtype, gpus_per_stage=t.gpus_per_stage,
        name="distill-teacher",
    )  # fmt: skip


def score_targets(
    cfg: DistillConfig, teacher, examples: list, split: str, pad_id: int, identity: dict[str, Any], stop_after: int | None = None
) -> dict[str, list[int]]:
    """Score ``examples`` into ``<targets dir>/<split>``: the shards not there yet, in order."""
    from tooltune.teacher_targets import TargetWriter

    writer = TargetWriter(cfg.targets_dir() / split, examples, cfg.targets.rows_per_shard, identity)
    score = lambda exs: teacher.score_sequences([list(e["input_ids"]) for e in exs], cfg.teacher.micro_batch_size, pad_id)  # noqa: E731
    return writer.run(score, stop_after=stop_after)


def run_distill(cfg: DistillConfig, stop_after: int | None = None) -> dict:
    from transformers import AutoTokenizer

    from tooltune.data import DataError
    from tooltune.teacher_targets import TargetStore, TargetWriter
    from tooltune.tracking import MetricsLogger
    from trainers.distill_trainer import DistillTrainer, StreamedTargets
    from trainers.group import LearnerGroup
    from trainers.sft import load_sft_conversations, load_text, planned_steps, tokenize_all, training_rows

    t0 = time.time()
    out = start_run(cfg, RUN_INDEPENDENT_KEYS)

    tokenizer = AutoTokenizer.from_pretrained(cfg.teacher.model)
    train_convs, val_convs = load_sft_conversations(cfg.data)
    loss_on = cfg.data.conversation_loss
    validation = tokenize_all(tokenizer, val_convs, [], cfg.train.seq_len, loss_on)
    student = student_model(cfg, out)
    student_params, teacher_params = params_ratio(student, cfg.teacher.model)
    global_batch = cfg.learner.micro_batch_size * cfg.learner.grad_accum_steps * cfg.learners.num_ranks

    def learner_for(rows: int) -> LearnerConfig:
        """The student's learners, their LR schedule spanning the run (of ``rows`` training rows)."""
        steps = planned_steps(rows, global_batch, cfg.train)
        return cfg.learner.model_copy(update={"model": student, "total_steps": cfg.learner.total_steps or steps})

    loss = cfg.loss.model_dump() | {"temperature": cfg.teacher.temperature}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    logger = MetricsLogger(out, tensorboard=cfg.tensorboard)
    scoring: dict[str, Any] = {}
    if cfg.mode == "response":
        from trainers.sft import SFTTrainer

        with local_ray(cfg.ray):
            t_gen = time.time()
            kept, scoring = teacher_responses(cfg, tokenizer, out)
            scoring["seconds"] = round(time.time() - t_gen, 1)
            if not kept:
                dropped = ", ".join(f"{k} {v}" for k, v in scoring.items() if k not in ("episodes", "kept", "seconds", "reused") and v)
                raise DataError(f"response mode: none of the teacher's {scoring['episodes']} episodes passed the filter ({dropped})")
            train = training_rows(tokenize_all(tokenizer, kept, [], cfg.train.seq_len, loss_on), cfg.train)
            group = LearnerGroup("distill-learners", cfg.learners, learner_for(len(train)))
            try:
                trainer = SFTTrainer(group, tokenizer, train, validation, cfg.train, out, logger)
                history = trainer.fit(resume=cfg.resume, stop_after=stop_after)
            finally:
                group.shutdown()
            return _finish(cfg, out, logger, trainer, history, student, student_params, teacher_params, scoring, t0, stop_after)
    if cfg.mode == "on_policy":
        with local_ray(cfg.ray):
            # train.max_steps is required here: the schedule spans it whatever the row count.
            trainer, history = run_on_policy(cfg, tokenizer, student, learner_for(0), loss, pad, out, logger, stop_after)
            return _finish(cfg, out, logger, trainer, history, student, student_params, teacher_params, scoring, t0, stop_after)
    # Logit mode: the teacher's targets on the data's own conversations.
    train = training_rows(tokenize_all(tokenizer, train_convs, load_text(cfg.data.text_files), cfg.train.seq_len, loss_on), cfg.train)
    if not any(any(ex["loss_mask"][1:]) for ex in train):
        raise DataError(f"no training token carries loss within train.seq_len={cfg.train.seq_len}: raise it (or use data.conversation_loss=all)")
    learner = learner_for(len(train))
    with local_ray(cfg.ray):
        identity, rps = teacher_identity(cfg), cfg.targets.rows_per_shard
        splits = (("train", train), ("validation", validation))
        stored = cfg.targets.source == "parquet" and all(
            TargetWriter(cfg.targets_dir() / split, rows, rps, identity).complete() for split, rows in splits
        )
        # Targets already complete (a later student of the same teacher and data): no teacher to start.
        teacher = None if stored else make_teacher(cfg)
        try:
            t_score = time.time()
            if cfg.targets.source == "parquet":
                scoring = {split: score_targets(cfg, teacher, rows, split, pad, identity) for split, rows in splits}
                if teacher is not None:
                    teacher.shutdown()  # its CPUs (or GPUs) go to the learners
                teacher = None
                targets = TargetStore(cfg.targets_dir() / "train", train, rps, identity)
                val_targets = TargetStore(cfg.targets_dir() / "validation", validation, rps, identity) if validation else None
            else:
                val_targets = _memory_targets(teacher, validation, cfg.teacher.micro_batch_size, pad) if validation else None
                targets = None  # needs the trainer's data plan: set below
            scoring["seconds"] = round(time.time() - t_score, 1)
            group = LearnerGroup("distill-learners", cfg.learners, learner)
            try:
                trainer = DistillTrainer(group, tokenizer, train, validation, targets, val_targets, cfg.train, loss, out, logger)
                if targets is None:
                    trainer.targets = StreamedTargets(teacher, train, trainer.rows_of, trainer.total_steps,
                                                      cfg.targets.ahead_steps, cfg.teacher.micro_batch_size, pad)  # fmt: skip
                history = trainer.fit(resume=cfg.resume, stop_after=stop_after)
            finally:
                group.shutdown()
        finally:
            if teacher is not None:
                teacher.shutdown()
        return _finish(cfg, out, logger, trainer, history, student, student_params, teacher_params, scoring, t0, stop_after)


def _finish(cfg, out, logger, trainer, history, student, student_params, teacher_params, scoring, t0, stop_after) -> dict:
    """Evaluate the final checkpoint (when asked, inside the job's Ray) and write ``result.json``."""
    train_seconds = time.time() - t0
    final = trainer.ckpt.latest()
    evaluation = None
    if cfg.evaluation.enabled and final is not None and stop_after is None:
        from ray_jobs.evaluate import run_evaluation
        from ray_jobs.sft import evaluation_config

        # The SFT job's: the held-out split of the same world, the same evaluation settings.
        eval_cfg = evaluation_config(cfg, str(final / "model"), out / "eval", label=f"distill {out.name}")
        evaluation = run_evaluation(eval_cfg)["world"]["test"]
    logger.close()
    result = {
        "mode": cfg.mode,
        "student_init": student,
        "student_params": student_params,
        "teacher_params": teacher_params,
        "student_params_ratio": round(student_params / teacher_params, 4),
        "scoring": scoring,
        "checkpoint": str(final / "model") if final else None,
        "steps": trainer.total_steps,
        "completed_steps": history[-1]["step"] if history else 0,
        "history": history,
        "train_tokens": sum(h.get("train/tokens", 0) for h in history),
        "wall_seconds": round(train_seconds, 1),
        "evaluation": evaluation,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def teacher_responses(cfg: DistillConfig, tokenizer, out: Path) -> tuple[list, dict[str, Any]]:
    """The teacher's kept episodes on the training tasks as (messages, tools), and the filter's
    counts; generated once into ``out/responses`` (reused while the teacher and settings match)."""
    import ray

    from rollout.agent_loop import run_episodes
    from rollout.vllm_worker import RolloutWorker
    from cluster.placement import RoleGroup
    from tooltune.response_filter import filter_episodes
    from tooltune.teacher_targets import checkpoint_digest
    from tooltune.world import generate_world, world_registry

    if cfg.data.world is None:
        raise ValueError("response mode needs data.world: the teacher answers its training tasks")
    where = out / "responses"
    stamp = {"teacher": checkpoint_digest(cfg.teacher.model), "response": cfg.response.model_dump(mode="json"),
             "world": cfg.data.world.model_dump(mode="json")}  # fmt: skip
    done = where / "counts.json"
    if done.exists() and json.loads(done.read_text()).get("stamp") == stamp:
        saved = json.loads(done.read_text())
        rows = [json.loads(line) for line in (where / "conversations.jsonl").read_text().splitlines()]
        return [(r["messages"], r["tools"]) for r in rows], saved["counts"] | {"reused": True}
    tasks = generate_world(cfg.data.world)["train"][: cfg.response.limit]
    group = RoleGroup("distill-responses", cfg.response.workers)
    engine = cfg.response.rollout.model_dump() | {"model": cfg.teacher.model}
    workers = group.spawn(RolloutWorker, lambda rank: ({**engine, "seed": engine["seed"] + rank},))
    try:
        runs = run_episodes(tasks, workers, tokenizer, cfg.response.loop, world_registry(cfg.data.world))
    finally:
        ray.get([w.shutdown.remote() for w in workers])
        group.remove()
    episodes = [run.episode for run in runs]
    samples = cfg.response.loop.samples_per_task
    kept, counts = filter_episodes([t for t in tasks for _ in range(samples)], episodes, cfg.response.check_calls)
    where.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"messages": m, "tools": t}) + "\n" for m, t in kept)
    (where / "conversations.jsonl").write_text(lines)
    done.write_text(json.dumps({"stamp": stamp, "counts": counts}, indent=1))
    return kept, counts


def run_on_policy(cfg: DistillConfig, tokenizer, student: str, learner: LearnerConfig, loss: dict, pad: int, out: Path, logger, stop_after):
    """The on-policy loop: student rollout workers, the sharded teacher, student learners, weight sync."""
    import ray

    from cluster.placement import RoleGroup
    from ray_jobs.ppo import fitting_tasks, step_tasks
    from ray_jobs.weight_sync import connect_weight_sync, sync_weights
    from rollout.agent_loop import run_episodes
    from rollout.vllm_worker import RolloutWorker
    from tooltune.metrics import compute_metrics
    from tooltune.world import generate_world, world_registry
    from trainers.distill_trainer import OnPolicyDistillTrainer
    from trainers.group import LearnerGroup
    from trainers.sft import tool_eval_scalars

    op = cfg.on_policy
    if cfg.data.world is None:
        raise ValueError("on_policy mode needs data.world: the student answers its training tasks")
    splits = generate_world(cfg.data.world)
    tasks = fitting_tasks(splits["train"], tokenizer, op.loop)
    if len(tasks) < op.prompts_per_step:
        raise ValueError(f"{len(tasks)} training tasks fit on_policy.loop.max_total_tokens, fewer than prompts_per_step ({op.prompts_per_step})")
    validation = splits["validation"][: op.eval_limit]
    registry = world_registry(cfg.data.world)
    teacher = make_teacher(cfg)
    group = workers = rollout = None
    try:
        rollout = RoleGroup("distill-student-rollout", op.workers)
        engine = op.rollout.model_dump() | {"model": student}
        workers = rollout.spawn(RolloutWorker, lambda r: ({**engine, "seed": engine["seed"] + r},))
        group = LearnerGroup("distill-learners", cfg.learners, learner)
        connect_weight_sync(group, workers, op.weight_sync)

        def sample(step: int):
            loop = op.loop
            if loop.sampling.seed is not None:
                loop = loop.model_copy(update={"sampling": loop.sampling.model_copy(update={"seed": loop.sampling.seed + step})})
            runs = run_episodes(step_tasks(tasks, op.prompts_per_step, step, cfg.train.seed), workers, tokenizer, loop, registry)
            generated = sum(sum(r.action_mask) for r in runs)
            return [r.token_ids for r in runs], [r.action_mask for r in runs], {"batch/generated_tokens": float(generated)}

        def evaluate() -> dict[str, float]:
            greedy = op.loop.model_copy(update={"samples_per_task": 1, "sampling": op.loop.sampling.model_copy(update={"temperature": 0.0})})
            runs = run_episodes(validation, workers, tokenizer, greedy, registry)
            return {k.replace("tool_eval/", "eval/"): v for k, v in tool_eval_scalars(compute_metrics(validation, [r.episode for r in runs])).items()}

        trainer = OnPolicyDistillTrainer(
            group, tokenizer, cfg.train, cfg.train.max_steps, sample,
            score=lambda seqs: teacher.score_sequences(seqs, cfg.teacher.micro_batch_size, pad),
            sync=lambda version: sync_weights(group, workers, version, op.weight_sync),
            loss=loss, output_dir=out, logger=logger, evaluate=evaluate if validation else None,
        )  # fmt: skip
        history = trainer.fit(resume=cfg.resume, stop_after=stop_after)
    finally:
        if workers:
            ray.get([w.shutdown.remote() for w in workers])
        if group is not None:
            group.shutdown()
        if rollout is not None:
            rollout.close()
        teacher.shutdown()
    return trainer, history


class _MemoryTargets:
    def __init__(self, columns: dict[int, dict[str, Any]]):
        self._columns = columns

    def columns(self, row: int) -> dict[str, Any]:
        return self._columns[row]


def _memory_targets(teacher, examples: list, micro_batch_size: int, pad_id: int) -> _MemoryTargets:
    from tooltune.teacher_targets import target_columns, target_record

    scores = teacher.score_sequences([list(e["input_ids"]) for e in examples], micro_batch_size, pad_id)
    return _MemoryTargets({i: target_columns(target_record(i, e, s), s["ids"].shape[-1]) for i, (e, s) in enumerate(zip(examples, scores))})


def main(argv: list[str] | None = None) -> None:
    cfg = job_config(DistillConfig, __doc__.splitlines()[0], argv)
    with user_errors():
        result = run_distill(cfg)
    last = result["history"][-1] if result["history"] else {}
    print(json.dumps({k: v for k, v in result.items() if k != "history"} | {"last": last}, indent=2))


if __name__ == "__main__":
    main()
