"""PPO job: the policy learns when a tool call is worth its cost.

    python -m ray_jobs.ppo --config configs/tiny/ppo.yaml [key=value ...]

One step, as the algorithm reads: take the step's prompts -> roll out the multi-turn tool loop on
the vLLM workers (k samples per prompt) -> score (rule reward, and the reward model's when
configured) -> reference log-probs and the critic's values -> advantages -> actor and critic
updates (PPO epochs x mini-batches) -> weight sync to the workers as version step + 1 -> log ->
evaluate every N steps on the validation split -> checkpoint. The first two and the sync live
here (``sample_step``, ``trainer``); the learners' side is ``trainers.ppo_trainer``.

Roles, each a Ray actor group placed from config (``roles``; ``roles.colocate`` shares bundles):
``rollout`` (vLLM engines), ``actor`` and ``critic`` (DeepSpeed ZeRO learners), ``reference``
(the starting policy, frozen), ``scorers`` (a frozen reward model, when ``reward.model`` is set).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, model_validator

from cluster.local import RayConfig, local_ray
from cluster.placement import PlacementConfig, RoleConfig, RoleGroup, bundle, place_roles
from ray_jobs._cli import job_config, user_errors
from ray_jobs.evaluate import WorkerSettings
from rollout.agent_loop import LoopConfig, Trajectory, run_episodes
from rollout.pool import RolloutPool
from rollout.scorer import RewardScorer, ScorerConfig, score_summary
from tooltune.config import StrictModel
from tooltune.episode import Task
from tooltune.models import TinyModelConfig, resolve_model
from tooltune.weights import WeightSyncConfig
from tooltune.world import WorldConfig
from tooltune.world_contrast import HELDOUT_SEEDS, HELDOUT_TRIVIAL_QUERIES, ContrastSettings
from trainers.learner import LearnerConfig
from trainers.ppo import PPOAlgorithmConfig
from trainers.ppo_trainer import PPOTrainConfig, Samples

# Keys that do not change what a run trains: a resumed run may differ from its checkpoint in these.
# With loop.sampling.seed set, each request is seeded (episode, turn): the number of rollout workers
# does not change the episodes, nor does that of scorers change their scores.
RUN_INDEPENDENT_KEYS = (
    "ray", "resume", "tensorboard", "output_dir", "train.eval_every", "train.eval_limit", "train.save_every",
    "train.keep_last", "eval_contrast", "weight_sync", "roles.rollout", "roles.scorers", "roles.colocate",
) + tuple(f"roles.{role}.{key}" for role in ("actor", "critic", "reference") for key in ("cpus", "gpus", "strategy"))


class PPORoles(StrictModel):
    rollout: RoleConfig = RoleConfig(num_ranks=1, cpus=1.0)
    actor: RoleConfig = RoleConfig(num_ranks=1)
    critic: RoleConfig = RoleConfig(num_ranks=1)
    reference: RoleConfig = RoleConfig(num_ranks=1)
    scorers: RoleConfig = RoleConfig(num_ranks=1)
    # Roles sharing bundles (``cluster.placement.PlacementConfig.colocate``), e.g. [[actor, reference]];
    # not rollout with a learner role yet (the step does not put the engines to sleep).
    colocate: list[list[str]] = []


class RewardSettings(StrictModel):
    # A reward model (a checkpoint, or ``ray_jobs.reward_model``'s run directory: its latest
    # checkpoint); None: the rule reward alone.
    model: str | None = None
    # The scorers' dtype, micro-batch and ZeRO stage (frozen, whatever else is set here).
    learner: LearnerConfig = LearnerConfig(zero_stage=0)
    scorer: ScorerConfig = ScorerConfig(rm_weight=0.0)

    @model_validator(mode="after")
    def _model_iff_weighted(self) -> RewardSettings:
        if (self.model is None) != (self.scorer.rm_weight == 0):
            raise ValueError("reward.model and reward.scorer.rm_weight go together: set both, or neither (rules only)")
        return self


class ValidationContrast(ContrastSettings):
    # A class default, not an instance's: a config that sets only pairs_per_form keeps this seed.
    seed: int = HELDOUT_SEEDS["validation"]


class PPOConfig(StrictModel):
    model: str = Field("tiny", description="the starting policy: a checkpoint or run directory, 'smollm2', or 'tiny'")
    tiny: TinyModelConfig = TinyModelConfig()
    ray: RayConfig = RayConfig()
    roles: PPORoles = PPORoles()
    actor: LearnerConfig = LearnerConfig()
    # Used when the estimator needs a critic (``algorithm.estimator: gae``): a value head on the policy's backbone.
    critic: LearnerConfig = LearnerConfig(head="value")
    reference: LearnerConfig = LearnerConfig(trainable=False, zero_stage=0)
    # "role": the reference is its own frozen learner group (``roles.reference``, ``reference``);
    # "actor_base": the actor's base weights with its LoRA adapter disabled, the starting policy
    # at no second model's cost (the adapter starts at zero). Needs ``actor.lora``.
    reference_source: Literal["role", "actor_base"] = "role"
    rollout: WorkerSettings = WorkerSettings()
    reward: RewardSettings = RewardSettings()
    algorithm: PPOAlgorithmConfig = PPOAlgorithmConfig()
    world: WorldConfig = WorldConfig()
    # Contrastive arithmetic pairs added to the training prompts: one phrasing with small operands
    # (answer directly) and with large ones (call the calculator), so the decision is learnt from
    # the operands, not from the phrasing. Its seed must not be one the evaluation holds out.
    contrast_prompts: ContrastSettings = ContrastSettings()
    # Pairs scored with the validation tasks every ``train.eval_every`` steps (the validation seed's).
    eval_contrast: ValidationContrast = ValidationContrast()
    # samples_per_task is k, the samples per prompt. The learners' log-probs apply the temperature
    # alone: top-p and top-k would make the behaviour policy another distribution.
    loop: LoopConfig = LoopConfig(samples_per_task=2)
    train: PPOTrainConfig = PPOTrainConfig()
    weight_sync: WeightSyncConfig = WeightSyncConfig()
    output_dir: str = "runs/ppo"
    resume: bool = True
    tensorboard: bool = True

    @model_validator(mode="after")
    def _check(self) -> PPOConfig:
        s = self.loop.sampling
        if s.temperature <= 0 or s.top_p != 1 or s.top_k != 0:
            raise ValueError(
                f"loop.sampling must be temperature > 0, top_p 1, top_k 0 (got {s.temperature}, {s.top_p}, {s.top_k}): "
                "the learners' log-probs apply the temperature alone, so the ratio would compare two distributions"
            )
        if self.algorithm.estimator in ("grpo", "rloo") and self.loop.samples_per_task < 2:
            raise ValueError(f"{self.algorithm.estimator} compares samples of one prompt: loop.samples_per_task must be >= 2")
        if self.loop.max_total_tokens > self.rollout.max_model_len:
            raise ValueError(
                f"loop.max_total_tokens ({self.loop.max_total_tokens}) exceeds rollout.max_model_len ({self.rollout.max_model_len})"
            )
        if self.actor.lora is not None and not (self.rollout.enable_lora and self.rollout.max_lora_rank >= self.actor.lora.r):
            raise ValueError(
                f"actor.lora (r={self.actor.lora.r}) syncs an adapter: set rollout.enable_lora and rollout.max_lora_rank >= r"
            )
        if self.reference.trainable or self.actor.head != "lm" or self.critic.head != "value":
            raise ValueError("reference.trainable must be false, actor.head 'lm' and critic.head 'value'")
        if not self.actor.trainable or (self.algorithm.needs_critic and not self.critic.trainable):
            raise ValueError("actor.trainable (and critic.trainable, with a critic) must be true: PPO updates them")
        if self.reference_source == "actor_base" and self.actor.lora is None:
            raise ValueError("reference_source actor_base disables the actor's LoRA adapter: set actor.lora (or use reference_source role)")
        if self.reference.dtype != self.actor.dtype:
            raise ValueError(
                f"reference.dtype ({self.reference.dtype}) must be actor.dtype ({self.actor.dtype}): otherwise the KL "
                "to the reference is not 0 at the start, and the KL penalty punishes the precision gap"
            )
        learner_roles = {"actor", "critic", "reference", "scorers"}
        if any("rollout" in group and learner_roles & set(group) for group in self.roles.colocate):
            raise ValueError(
                "roles.colocate puts rollout with a learner role, but the PPO step does not yet put the engines to "
                "sleep while the learners run: on a GPU both would hold their memory at once; give rollout its own bundles"
            )
        if self.contrast_prompts.pairs_per_form and self.contrast_prompts.seed in HELDOUT_SEEDS.values():
            raise ValueError(
                f"contrast_prompts.seed {self.contrast_prompts.seed} draws the held-out pairs "
                f"({', '.join(f'{k}: {v}' for k, v in HELDOUT_SEEDS.items())}): train on another seed"
            )
        if self.eval_contrast.pairs_per_form and self.eval_contrast.seed == HELDOUT_SEEDS["test"]:
            raise ValueError(f"eval_contrast.seed {self.eval_contrast.seed} draws the test pairs: validation during training uses another seed")
        fixed = {n: r for n, r in self.roles if isinstance(r, RoleConfig) and n != "rollout"}
        elastic = [f"roles.{n}" for n, r in fixed.items() if r.max_ranks not in (None, r.num_ranks) or r.max_restarts]
        if elastic:
            raise ValueError(
                f"{', '.join(elastic)}: max_ranks and max_restarts are for roles.rollout only (learners and scorers "
                "are fixed process groups: a lost rank fails the job, which resumes from its checkpoint)"
            )
        rows = self.train.prompts_per_step * self.loop.samples_per_task
        trained = {"actor": self.actor} | ({"critic": self.critic} if self.algorithm.needs_critic else {})
        for name, lc in trained.items():
            ranks = getattr(self.roles, name).num_ranks
            per_update = self.train.mini_batches * ranks * lc.micro_batch_size * lc.grad_accum_steps
            if per_update != rows:
                raise ValueError(
                    f"train.prompts_per_step x loop.samples_per_task = {rows} rows per step, but train.mini_batches x "
                    f"roles.{name}.num_ranks x {name}.micro_batch_size x {name}.grad_accum_steps = {per_update}: they must be equal"
                )
        return self


def step_tasks(tasks: list[Task], count: int, step: int, seed: int) -> list[Task]:
    """The prompts of step ``step``: a fresh seeded permutation of ``tasks`` per pass over them, a
    pure function of the step (a resumed run samples the same prompts)."""
    from trainers.packing import global_batch_indices

    return [tasks[i] for i in global_batch_indices(len(tasks), count, step, seed)]


def train_prompts(cfg: PPOConfig, splits: dict[str, list[Task]]) -> tuple[list[Task], int]:
    """The training prompts: the world's training split and ``contrast_prompts``' pairs, less any
    whose query is held out (a validation or test query of the world, or a held-out contrastive
    trivial query: the small-operand space is small enough for draws to coincide). Returns the
    prompts and how many were dropped."""
    held = {t.query for split in ("validation", "test") for t in splits[split]} | HELDOUT_TRIVIAL_QUERIES
    candidates = splits["train"] + cfg.contrast_prompts.tasks()
    kept = [t for t in candidates if t.query not in held]
    return kept, len(candidates) - len(kept)


def fitting_tasks(tasks: list[Task], tokenizer, loop: LoopConfig) -> list[Task]:
    """The tasks whose prompt leaves room for one whole turn within ``loop.max_total_tokens``: a
    longer one would end before the policy samples anything, a row with no action to learn from.
    The prompt is rendered as the tool loop renders it (system message, then the query)."""
    from tooltune.chat import render_prompt

    def length(task: Task) -> int:
        messages = [{"role": "system", "content": task.system}] if task.system else []
        messages.append({"role": "user", "content": task.query})
        return len(tokenizer(render_prompt(tokenizer, messages, task.tools), add_special_tokens=False)["input_ids"])

    return [t for t in tasks if length(t) + loop.max_new_tokens <= loop.max_total_tokens]


def batch_call_metrics(trajectories: list[Trajectory], k: int) -> dict[str, float]:
    """Calls per query and over-/under-call rates on the batch (``tooltune.metrics``), averaged over
    the k samples of each prompt (trajectories task-major, as ``run_episodes`` returns them)."""
    from tooltune.metrics import compute_metrics

    tasks = [t.task for t in trajectories[::k]]
    keys = ("calls_per_query", "over_call_rate", "under_call_rate", "argument_accuracy", "final_answer_accuracy")
    found: dict[str, list[float]] = {key: [] for key in keys}
    for j in range(k):
        metrics = compute_metrics(tasks, [t.episode for t in trajectories[j::k]])
        for key in keys:
            if metrics[key] is not None:
                found[key].append(metrics[key])
    return {f"batch/{key}": sum(v) / len(v) for key, v in found.items() if v}


@dataclass
class Roles:
    """Everything the job started, for the step and for shutdown."""

    groups: dict[str, RoleGroup]
    pool: RolloutPool | None = None
    actor: Any = None
    reference: Any = None
    critic: Any = None
    scorer: RewardScorer | None = None
    learner_groups: list[Any] = field(default_factory=list)

    @property
    def workers(self) -> list[Any]:
        """The rollout workers serving now."""
        return self.pool.live() if self.pool else []

    def shutdown(self) -> None:
        try:
            if self.pool is not None:
                self.pool.shutdown()
        finally:
            for group in self.learner_groups:
                group.shutdown()
            for group in self.groups.values():
                group.close()


def placement(cfg: PPOConfig) -> PlacementConfig:
    """The roles this run starts (the reference, critic and scorers only when used) and their placement."""
    names = ["rollout", "actor"] + (["reference"] if cfg.reference_source == "role" else [])
    names += ["critic"] if cfg.algorithm.needs_critic else []
    names += ["scorers"] if cfg.reward.model else []
    return PlacementConfig(roles={n: getattr(cfg.roles, n) for n in names}, colocate=cfg.roles.colocate)


def start_roles(cfg: PPOConfig, model_dir: str, tokenizer) -> Roles:
    """Place every role, start the engines and learners, and join the weight-sync group."""
    from ray_jobs.reward_model import start_scorers
    from trainers.group import LearnerGroup

    roles = Roles(place_roles(placement(cfg)))
    try:
        optimizer_steps = cfg.train.steps * cfg.train.ppo_epochs * cfg.train.mini_batches

        def learners(name: str, lc: LearnerConfig) -> Any:
            # A role's own model (a critic started from a reward model, another reference) or the policy's.
            start = resolve_model(lc.model) if lc.model else model_dir
            update = {"model": start} | ({"total_steps": lc.total_steps or optimizer_steps} if lc.trainable else {})
            group = LearnerGroup(f"ppo-{name}", getattr(cfg.roles, name), lc.model_copy(update=update), roles.groups[name])
            roles.learner_groups.append(group)
            return group

        roles.actor = learners("actor", cfg.actor)
        if cfg.reference_source == "role":
            roles.reference = learners("reference", cfg.reference)
        if cfg.algorithm.needs_critic:
            roles.critic = learners("critic", cfg.critic)
        if cfg.reward.model:
            scorers, roles.scorer = start_scorers(
                resolve_model(cfg.reward.model), cfg.roles.scorers, cfg.reward.learner, roles.groups["scorers"], cfg.reward.scorer
            )
            roles.learner_groups.append(scorers)
        else:
            roles.scorer = RewardScorer([], tokenizer, cfg.reward.scorer)
        roles.pool = rollout_pool(cfg, model_dir, roles.groups["rollout"], roles.actor)
    except BaseException:
        roles.shutdown()
        raise
    return roles


def rollout_pool(cfg: PPOConfig, model_dir: str, group: RoleGroup, actor: Any) -> RolloutPool:
    """The rollout workers: the role's ranks, then any elastic ones (``roles.rollout.max_ranks``),
    each brought to the learners' weights before it serves (``rollout.pool``)."""
    import ray

    from ray_jobs.weight_sync import connect_weight_sync, sync_weights
    from rollout.vllm_worker import RolloutWorker

    engine = cfg.rollout.model_dump() | {"model": model_dir}
    remote = ray.remote(RolloutWorker)
    catch_up_cfg = cfg.weight_sync.model_copy(update={"transport": "object_store"})

    def spawn(slot: int, options: dict[str, Any]) -> Any:
        return remote.options(**(group.amounts() | options)).remote({**engine, "seed": engine["seed"] + slot})

    role = cfg.roles.rollout
    return RolloutPool(
        spawn,
        [group.actor_options(r) for r in range(role.num_ranks)],
        [bundle([role])] * role.extra_ranks,
        # One worker alone is caught up through the object store: no group to form for it.
        catch_up=lambda workers, version: sync_weights(actor, workers, version, catch_up_cfg),
        regroup=lambda workers: connect_weight_sync(actor, workers, cfg.weight_sync),
        sync=lambda workers, version: sync_weights(actor, workers, version, cfg.weight_sync),
        ready_timeout_s=role.ready_timeout_s,
    )


def sample_step(cfg: PPOConfig, roles: Roles, tasks: list[Task], tokenizer, registry, step: int) -> Samples:
    """Roll out the step's prompts (k samples each) and score them."""
    t = time.perf_counter()
    loop = cfg.loop
    if loop.sampling.seed is not None:
        # Fresh randomness each step, still a pure function of the step.
        loop = loop.model_copy(update={"sampling": loop.sampling.model_copy(update={"seed": loop.sampling.seed + step})})
    prompts = step_tasks(tasks, cfg.train.prompts_per_step, step, cfg.train.seed)
    roles.pool.refresh()
    trajectories = run_episodes(prompts, roles.pool, tokenizer, loop, registry)
    rollout_s = time.perf_counter() - t

    t = time.perf_counter()
    scores = roles.scorer.score(trajectories)
    score_s = time.perf_counter() - t

    n = len(scores)
    parts = sorted({p for s in scores for p in s.rule_parts})
    generated = sum(sum(tr.action_mask) for tr in trajectories)
    metrics = score_summary(scores) | {f"reward/rule/{p}": sum(s.rule_parts.get(p, 0.0) for s in scores) / n for p in parts}
    metrics |= roles.pool.metrics() | {"pool/scorers_lost": float(roles.scorer.lost)} | batch_call_metrics(trajectories, loop.samples_per_task) | {
        "time/rollout_s": rollout_s,
        "time/score_s": score_s,
        "perf/rollout_tokens_per_s": generated / max(rollout_s, 1e-9),
        "batch/generated_tokens": float(generated),
        "batch/sequence_tokens": float(sum(len(tr.token_ids) for tr in trajectories)),
    }
    return Samples(
        token_ids=[tr.token_ids for tr in trajectories],
        action_mask=[tr.action_mask for tr in trajectories],
        logprobs=[tr.logprobs for tr in trajectories],
        rewards=[s.total for s in scores],
        group_ids=[i // loop.samples_per_task for i in range(n)],
        # The oldest policy that sampled any of a row's tokens: that is how stale the row is.
        versions=[min((v for v in tr.versions if v is not None), default=tr.policy_version) for tr in trajectories],
        metrics=metrics,
    )


def evaluate_workers(cfg: PPOConfig, roles: Roles, tasks: list[Task], tokenizer, registry) -> dict[str, float]:
    """Tool-world metrics of the policy the workers serve, greedy, on the validation tasks (and
    the decisions on ``cfg.eval_contrast``'s pairs)."""
    from tooltune.metrics import compute_metrics
    from tooltune.world_contrast import contrastive_decisions
    from trainers.sft import tool_eval_scalars

    pairs = cfg.eval_contrast.pairs()
    contrast = cfg.eval_contrast.tasks(pairs)
    greedy = cfg.loop.sampling.model_copy(update={"temperature": 0.0})
    loop = cfg.loop.model_copy(update={"samples_per_task": 1, "sampling": greedy})
    runs = run_episodes(tasks + contrast, roles.pool, tokenizer, loop, registry)
    metrics = tool_eval_scalars(compute_metrics(tasks, [r.episode for r in runs[: len(tasks)]]))
    metrics = {k.replace("tool_eval/", "eval/"): v for k, v in metrics.items()}
    if pairs:
        decisions = contrastive_decisions(pairs, {r.task.id: r.episode for r in runs[len(tasks) :]})
        metrics |= {f"eval/{k}": float(v) for k, v in decisions.items() if k != "pairs"}
    return metrics


def run_ppo(cfg: PPOConfig, stop_after: int | None = None, on_step=None) -> dict:
    """Train; ``on_step(done, metrics, roles)`` after every step (tests check the roles there)."""
    from transformers import AutoTokenizer

    from ray_jobs.sft import start_run
    from tooltune.chat import install_tool_template, needs_tool_template
    from tooltune.tracking import MetricsLogger, plot_curves
    from tooltune.world import generate_world, world_registry
    from trainers.ppo_trainer import PPOTrainer

    t0 = time.time()
    out = start_run(cfg, RUN_INDEPENDENT_KEYS)

    model_dir = resolve_model(cfg.model, tiny=cfg.tiny)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if needs_tool_template(tokenizer):
        install_tool_template(tokenizer)
    splits = generate_world(cfg.world)
    candidates, held_out = train_prompts(cfg, splits)
    train_tasks = fitting_tasks(candidates, tokenizer, cfg.loop)
    if not train_tasks:
        raise ValueError(
            f"none of the {len(candidates)} training prompts leaves loop.max_new_tokens ({cfg.loop.max_new_tokens}) "
            f"within loop.max_total_tokens ({cfg.loop.max_total_tokens})"
        )
    if len(train_tasks) < cfg.train.prompts_per_step:
        raise ValueError(
            f"{len(train_tasks)} training prompts fit loop.max_total_tokens, fewer than train.prompts_per_step "
            f"({cfg.train.prompts_per_step})"
        )
    validation = splits["validation"][: cfg.train.eval_limit]
    registry = world_registry(cfg.world)

    logger = MetricsLogger(out, tensorboard=cfg.tensorboard)
    with local_ray(cfg.ray):
        roles = start_roles(cfg, model_dir, tokenizer)
        try:
            trainer = PPOTrainer(
                roles.actor, roles.reference, roles.critic, tokenizer, cfg.train, cfg.algorithm,
                cfg.loop.sampling.temperature,
                sample=lambda step: sample_step(cfg, roles, train_tasks, tokenizer, registry, step),
                sync=roles.pool.sync,
                output_dir=out, logger=logger,
                evaluate=(lambda: evaluate_workers(cfg, roles, validation, tokenizer, registry)) if validation else None,
            )  # fmt: skip
            hook = (lambda done, metrics: on_step(done, metrics, roles)) if on_step else None
            history = trainer.fit(resume=cfg.resume, stop_after=stop_after, on_step=hook)
        finally:
            if roles.pool is not None and roles.pool.events:
                with (out / "pool_events.jsonl").open("a") as f:
                    f.writelines(json.dumps(e.record()) + "\n" for e in roles.pool.events)
            roles.shutdown()
    logger.close()
    plot_curves(out / "metrics.jsonl", out / "curves.png", CURVES, f"PPO {out.name}")
    final = trainer.ckpt.latest()
    result = {
        "base_model": model_dir,
        "train_prompts": len(train_tasks),
        "train_prompts_too_long": len(candidates) - len(train_tasks),
        "train_prompts_held_out": held_out,
        "checkpoint": str(final / "model") if final else None,
        "steps": trainer.total_steps,
        "completed_steps": history[-1]["step"] if history else 0,
        "history": history,
        "wall_seconds": round(time.time() - t0, 1),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


# The learning curves drawn in the run directory at the end (curves.png).
CURVES = [
    "reward/total", "reward/rule", "reward/rm", "batch/over_call_rate", "batch/under_call_rate", "batch/calls_per_query",
    "policy/kl_ref", "policy/entropy", "policy/clip_fraction", "policy/approx_kl", "critic/value_loss",
    "critic/explained_variance", "eval/over_call_rate", "eval/under_call_rate", "eval/argument_accuracy",
    "eval/contrastive_trivial_direct", "eval/contrastive_large_called",
]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    cfg = job_config(PPOConfig, __doc__.splitlines()[0], argv)
    with user_errors():
        result = run_ppo(cfg)
    last = result["history"][-1] if result["history"] else {}
    print(json.dumps({k: v for k, v in result.items() if k != "history"} | {"last": last}, indent=2))


if __name__ == "__main__":
    main()
