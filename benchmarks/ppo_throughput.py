"""GRPO iteration throughput: our PPO job in GRPO mode against TRL's ``GRPOTrainer``, on this machine.

    python -m benchmarks.ppo_throughput --steps 3 --prompts 4 --k 4 --max-new-tokens 48 [--side both]

Prints a JSON dict, the one ``measure(...)`` returns (``benchmarks.ppo`` records it; this module writes
nothing under ``benchmarks/results``). The runs go to ``runs/bench-ppo/throughput-{ours,trl}``.

Both sides run in this one process, one after the other, and do the same work:
- the same model, SmolLM2-135M-Instruct (``tooltune.models.resolve_model("smollm2")``), in the same
  dtype (bf16 by default), trained as the same LoRA (configs/smol/ppo.yaml's: r 16, alpha 32, every
  linear layer) with the same learning rate, clip (0.2), KL coefficient to the reference (the k3
  estimator as a loss term on both), one epoch and one optimizer step per iteration;
- the same prompts, step for step: the smol world's training tasks in the order our job's step plan
  draws them (``ray_jobs.ppo.step_tasks``), rendered with the tool template. TRL is given the rendered
  text as a plain prompt, so both feed the model the same tokens;
- k samples per prompt at temperature 1 (top-p 1, top-k off), at most ``max_new_tokens`` each, ending
  at ``<|im_end|>``; a single turn (ours: ``loop.max_turns=1``);
- the same reward: the turn parsed by tooltune's parser and scored by ``tooltune.rewards.rule_reward``
  (``completion_reward`` is what our tool loop makes of one turn; TRL calls it as its reward function).

A sample is one completion. samples/s = prompts x k x timed steps / their wall time; the timed steps
are those after ``warmup``, each ending where the trainer ends a step (ours: the job's ``on_step`` hook;
TRL: ``TrainerCallback.on_step_end``). Start-up (engines, learners, model loading) is not timed.

Both take the reference as the policy with its adapter switched off (ours: the smol config's
``reference_source: actor_base``), and with one optimizer step per iteration both take the ratio's
denominator from the training pass itself (ours: ``trainers.ppo_trainer``'s ``fused_old``). Where
the two still differ, by design: a completion with calls is followed in our sequences by the tool
results the loop appends (masked out of the loss, but in the learners' passes).

Each side runs its best configuration that runs here. TRL: vLLM colocated in the trainer's process
(``use_vllm=True, vllm_mode="colocate"``) if that runs, else ``model.generate``; the result says which,
and why vLLM was not used (the error's first line). TRL's colocated engine takes its dtype from the
checkpoint's config (it has no dtype setting), so it is given a copy of the model saved in ``dtype``.
Ours: the smol config with every role booking all cores (they take turns: sample, then learn), so
that each runs with every core's threads, and the vLLM engine bound to every core. Ours goes first:
TRL's colocated engine sets this process's distributed environment, which Ray workers would inherit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tooltune.episode import EndReason, Episode, Task, Turn
from tooltune.parser import parse_assistant_text
from tooltune.rewards import RewardConfig, rule_reward

if TYPE_CHECKING:
    from ray_jobs.ppo import PPOConfig

SMOL_CONFIG = "configs/smol/ppo.yaml"
RUNS = Path("runs/bench-ppo")
MODEL = "smollm2"
Side = Literal["trl", "ours", "both"]
TrlGeneration = Literal["auto", "vllm", "generate"]


def completion_reward(task: Task, text: str, finished: bool, cfg: RewardConfig | None = None) -> float:
    """The rule reward of one assistant turn ``text`` (without its ``<|im_end|>``) as our tool loop
    scores it with ``max_turns=1``: ``finished`` is False when the turn was cut by the token budget
    (then it is no final answer); a turn with calls ends at the turn limit, their results unread."""
    parsed = parse_assistant_text(text, task.tools)
    turn = Turn(text, calls=list(parsed.calls), failure=parsed.failure, failure_detail=parsed.detail)
    episode = Episode(task.id, turns=[turn])
    if not finished:
        episode.end_reason = EndReason.LENGTH
    elif parsed.is_final_answer:
        episode.end_reason, episode.final_answer = EndReason.FINAL_ANSWER, parsed.content
    elif parsed.failure is not None:
        episode.end_reason = EndReason.PARSE_FAILURE
    else:
        episode.end_reason = EndReason.TURN_LIMIT
    return rule_reward(task, episode, cfg).total


def throughput(step_ends: list[float], warmup: int, samples_per_step: int) -> dict[str, Any]:
    """Samples per second over the steps after the first ``warmup``, from each step's end time
    (``step_ends[i]`` ends step i; the first timed step starts where step ``warmup - 1`` ends)."""
    if warmup < 1 or len(step_ends) <= warmup:
        raise ValueError(f"{len(step_ends)} step ends: need more than warmup ({warmup} >= 1) to time a step")
    seconds = step_ends[-1] - step_ends[warmup - 1]
    steps = len(step_ends) - warmup
    return {
        "timed_steps": steps,
        "seconds": round(seconds, 3),
        "samples_per_s": round(samples_per_step * steps / seconds, 4),
        "step_seconds": [round(b - a, 3) for a, b in zip(step_ends[warmup - 1 : -1], step_ends[warmup:])],
    }


# ---- the shared setup -------------------------------------------------------------------------
def bench_config(
    out: Path, prompts: int, k: int, max_new_tokens: int, total_steps: int, dtype: str, micro_batch: int,
    lr: float | None, kl_coef: float | None, cores: int,
) -> tuple[PPOConfig, list[str]]:  # fmt: skip
    """configs/smol/ppo.yaml for this measurement: the base SmolLM2 (the smol config starts from an SFT
    run), one turn, one optimizer step per iteration, no evaluation or checkpoint inside the timed steps."""
    from ray_jobs.ppo import PPOConfig
    from tooltune.config import load_config

    rows = prompts * k
    if rows % micro_batch:
        raise ValueError(f"prompts x k = {rows} rows per step: not a multiple of micro_batch ({micro_batch})")
    overrides = [
        f"model={MODEL}", f"output_dir={out}", "resume=false", "tensorboard=false",
        # Every role books every core: rollout and learners take turns, they never run at once.
        f"ray.num_cpus={3 * cores}", *(f"roles.{role}.cpus={cores}" for role in ("rollout", "actor", "reference")),
        "rollout.cpu_threads_bind=all", f"rollout.dtype={dtype}", f"actor.dtype={dtype}", f"reference.dtype={dtype}",
        "loop.max_turns=1", f"loop.max_new_tokens={max_new_tokens}", f"loop.samples_per_task={k}",
        f"train.prompts_per_step={prompts}", f"train.steps={total_steps + 1}", "train.mini_batches=1",
        "train.ppo_epochs=1",
        f"actor.micro_batch_size={micro_batch}", f"actor.grad_accum_steps={rows // micro_batch}",
        f"train.eval_every={10**6}", f"train.save_every={10**6}", "train.merged=false", "train.keep_last=1",
    ]  # fmt: skip
    overrides += [f"actor.lr={lr}"] if lr is not None else []
    overrides += [f"algorithm.kl_coef={kl_coef}"] if kl_coef is not None else []
    return load_config(SMOL_CONFIG, PPOConfig, overrides), overrides


def step_prompts(cfg: PPOConfig, tokenizer: Any, steps: int) -> tuple[list[list[Task]], list[list[str]]]:
    """The tasks our job samples at each of ``steps`` steps, and their prompts rendered as its tool
    loop renders them (system message, then the query, with the offered tools)."""
    from ray_jobs.ppo import fitting_tasks, step_tasks
    from tooltune.chat import render_prompt
    from tooltune.world import generate_world

    train = fitting_tasks(generate_world(cfg.world)["train"], tokenizer, cfg.loop)
    plan = [step_tasks(train, cfg.train.prompts_per_step, step, cfg.train.seed) for step in range(steps)]

    def text(task: Task) -> str:
        messages = [{"role": "system", "content": task.system}] if task.system else []
        return render_prompt(tokenizer, [*messages, {"role": "user", "content": task.query}], task.tools)

    return plan, [[text(t) for t in tasks] for tasks in plan]


# ---- ours ------------------------------------------------------------------------------------
def measure_ours(cfg: PPOConfig, warmup: int, steps: int) -> dict[str, Any]:
    from ray_jobs.ppo import run_ppo

    ends: list[float] = []
    rows: list[dict[str, float]] = []

    def on_step(done: int, metrics: dict[str, float], roles: Any) -> None:
        ends.append(time.perf_counter())
        rows.append(metrics)

    t0 = time.perf_counter()
    run_ppo(cfg, stop_after=warmup + steps, on_step=on_step)
    out = throughput(ends, warmup, cfg.train.prompts_per_step * cfg.loop.samples_per_task)
    timed = rows[warmup:]

    def mean(key: str) -> float | None:
        values = [r[key] for r in timed if key in r]
        return round(sum(values) / len(values), 3) if values else None

    tokens = sum(r["batch/generated_tokens"] for r in timed)
    samples = out["timed_steps"] * cfg.train.prompts_per_step * cfg.loop.samples_per_task
    return out | {
        "generated_tokens_per_sample": round(tokens / samples, 1),
        "generated_tokens_per_s": round(tokens / out["seconds"], 1),
        "phase_seconds": {p: mean(f"time/{p}_s") for p in ("rollout", "score", "reference", "train", "sync")},
        "reward_mean": mean("reward/total"),
        "first_step_end_s": round(ends[0] - t0, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "run_dir": cfg.output_dir,
    }


# ---- TRL -------------------------------------------------------------------------------------
# What TRL's colocate mode writes into this process's environment for vLLM's launcher.
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def _env(keep: tuple[str, ...] = (), **values: str) -> Iterator[None]:
    """Set ``values``; on exit, restore those and the ``keep`` variables to what they were."""
    old = {k: os.environ.get(k) for k in (*values, *keep)}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def checkpoint_in(model_dir: str, dtype: str) -> str:
    """``model_dir`` saved in ``dtype`` (itself when it is already), cached beside the converted
    models: what vLLM loads for TRL."""
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tooltune.models import cache_dir

    if str(getattr(AutoConfig.from_pretrained(model_dir), "dtype", "")).removeprefix("torch.") == dtype:
        return model_dir
    copy = cache_dir() / "models" / f"{Path(model_dir).name}-{dtype}"
    if not (copy / "config.json").exists():
        copy.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{copy.name}.", dir=copy.parent))
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
        os.replace(tmp, copy)
    return str(copy)


def measure_trl(
    cfg: PPOConfig, plan: list[list[Task]], texts: list[list[str]], warmup: int, steps: int, use_vllm: bool, out: Path
) -> dict[str, Any]:
    """One TRL run of ``warmup + steps`` iterations on ``plan``'s prompts, in order."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tooltune.chat import TURN_END

    k, prompts, actor = cfg.loop.samples_per_task, cfg.train.prompts_per_step, cfg.actor
    model = checkpoint_in(_model_dir(), actor.dtype)
    tokenizer = AutoTokenizer.from_pretrained(model)
    turn_end = tokenizer.convert_tokens_to_ids(TURN_END)
    tasks = [t for step in plan for t in step]
    data = Dataset.from_dict({"prompt": [p for step in texts for p in step], "task_index": list(range(len(tasks)))})

    def tool_world_reward(completion_ids: list, task_index: list, **_: Any) -> list[float]:
        # Decoded as our loop decodes a turn: special tokens kept, the closing <|im_end|> not part of it.
        rewards = []
        for ids, i in zip(completion_ids, task_index):
            finished = bool(ids) and ids[-1] == turn_end
            body = list(ids[:-1] if finished else ids)
            text = tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            rewards.append(completion_reward(tasks[i], text, finished, cfg.reward.scorer.rules))
        return rewards

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.logs: list[dict[str, float]] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    lora = actor.lora
    args = GRPOConfig(
        output_dir=str(out / ("vllm" if use_vllm else "generate")),
        use_cpu=not torch.cuda.is_available(),
        bf16=actor.dtype == "bfloat16",
        model_init_kwargs={"dtype": actor.dtype},
        per_device_train_batch_size=actor.micro_batch_size,
        gradient_accumulation_steps=actor.grad_accum_steps,
        num_generations=k,
        max_completion_length=cfg.loop.max_new_tokens,
        temperature=cfg.loop.sampling.temperature, top_p=1.0, top_k=0,
        learning_rate=actor.lr, lr_scheduler_type="constant", adam_beta1=actor.betas[0], adam_beta2=actor.betas[1],
        weight_decay=actor.weight_decay, max_grad_norm=actor.grad_clip,
        beta=cfg.algorithm.kl_coef, epsilon=cfg.algorithm.clip_eps, num_iterations=cfg.train.ppo_epochs,
        scale_rewards="group" if cfg.algorithm.grpo_scale_std else "none", loss_type="dapo",
        max_steps=warmup + steps, shuffle_dataset=False, remove_unused_columns=False, seed=cfg.train.seed,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        use_vllm=use_vllm, vllm_mode="colocate", vllm_max_model_length=cfg.rollout.max_model_len,
    )  # fmt: skip
    peft = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    clock = StepClock()
    t0 = time.perf_counter()
    trainer = GRPOTrainer(
        model=model, reward_funcs=tool_world_reward, args=args, train_dataset=data,
        processing_class=tokenizer, peft_config=peft, callbacks=[clock],
    )  # fmt: skip
    # The plain-text prompt must tokenize to what our loop feeds the model.
    first = texts[0][0]
    if tokenizer(text=first)["input_ids"] != tokenizer(first, add_special_tokens=False)["input_ids"]:
        raise RuntimeError("TRL's tokenization of the rendered prompt differs from the tool loop's")
    try:
        trainer.train()
    finally:
        # A traceback keeps this frame: without the trainer in it, a failed vLLM engine can be freed.
        del trainer
    result = throughput(clock.ends, warmup, prompts * k)
    logs = [log for log in clock.logs if "completions/mean_length" in log][warmup:]

    def mean(key: str) -> float | None:
        values = [log[key] for log in logs if key in log]
        return sum(values) / len(values) if values else None

    length, reward = mean("completions/mean_length"), mean("reward")
    return result | {
        "generated_tokens_per_sample": round(length, 1) if length is not None else None,
        "generated_tokens_per_s": round(length * result["samples_per_s"], 1) if length is not None else None,
        "reward_mean": round(reward, 3) if reward is not None else None,
        "first_step_end_s": round(clock.ends[0] - t0, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "model": model,
    }


def _model_dir() -> str:
    from tooltune.models import resolve_model

    return resolve_model(MODEL)


def failure_line(error: BaseException) -> str:
    """``Type: first line of the message (at file:line, in TRL at file:line)``: where it was raised,
    and the last TRL frame it passed (the call TRL made), paths from site-packages on."""
    message = str(error).strip().splitlines()
    frames = traceback.extract_tb(error.__traceback__)

    def short(frame: traceback.FrameSummary) -> str:
        return f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}"

    where = [f"at {short(frames[-1])}"] if frames else []
    trl = [f for f in frames if "/trl/" in f.filename]
    where += [f"in TRL at {short(trl[-1])} ({trl[-1].name})"] if trl and trl[-1] is not frames[-1] else []
    return f"{type(error).__name__}: {message[0] if message else ''}" + (f" ({', '.join(where)})" if where else "")


def forget_colocated_engine() -> None:
    """Undo what a failed colocated start left in this process, so that the fallback trains as a
    plain single process (left as it was, accelerate sees a process group and wraps the model in DDP):
    vLLM's process groups (torch's default one with them) and accelerate's state."""
    from accelerate.state import AcceleratorState

    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    except ImportError:  # no vLLM here: it set nothing up
        pass
    else:
        cleanup_dist_env_and_memory()
    AcceleratorState._reset_state(reset_partial_state=True)


def run_trl(cfg: PPOConfig, warmup: int, steps: int, generation: TrlGeneration, out: Path) -> dict[str, Any]:
    """TRL with colocated vLLM when it runs here (``generation="auto"`` falls back to ``generate``)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_model_dir())
    plan, texts = step_prompts(cfg, tokenizer, warmup + steps)
    cores = os.cpu_count() or 1
    engine_env = {
        # In-process, as TRL's colocate mode needs; KV cache and core binding as our rollout worker's.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(cfg.rollout.kv_cache_gib))),
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
    }
    vllm_error = None
    if generation in ("auto", "vllm"):
        try:
            with _env(LAUNCHER_ENV, **engine_env):
                measured = measure_trl(cfg, plan, texts, warmup, steps, True, out)
            return {"mode": "vllm_colocate", "vllm_error": None} | measured
        except Exception as e:  # noqa: BLE001 -- any failure of TRL's vLLM path is the finding
            if generation == "vllm":
                raise
            vllm_error = failure_line(e)
        forget_colocated_engine()
    return {"mode": "generate", "vllm_error": vllm_error} | measure_trl(cfg, plan, texts, warmup, steps, False, out)


# ---- both ------------------------------------------------------------------------------------
def measure(
    steps: int = 3, prompts: int = 4, k: int = 4, max_new_tokens: int = 64, side: Side = "both", warmup: int = 1,
    dtype: str = "bfloat16", micro_batch: int = 4, lr: float | None = None, kl_coef: float | None = None,
    trl_generation: TrlGeneration = "auto",
) -> dict[str, Any]:  # fmt: skip
    """Time ``steps`` GRPO iterations (after ``warmup`` untimed ones) of each side on the same work;
    ``lr``/``kl_coef`` None keep configs/smol/ppo.yaml's (2e-5, 0.02), which TRL then uses too."""
    cores = os.cpu_count() or 1
    total = warmup + steps
    cfg, overrides = bench_config(
        RUNS / "throughput-ours", prompts, k, max_new_tokens, total, dtype, micro_batch, lr, kl_coef, cores
    )
    result: dict[str, Any] = {
        "setup": {
            "model": "SmolLM2-135M-Instruct", "dtype": dtype, "prompts_per_step": prompts, "k": k,
            "max_new_tokens": max_new_tokens, "warmup_steps": warmup, "timed_steps": steps,
            "lr": cfg.actor.lr, "kl_coef": cfg.algorithm.kl_coef, "kl_kind": cfg.algorithm.kl_kind,
            "clip_eps": cfg.algorithm.clip_eps, "lora": cfg.actor.lora.model_dump() if cfg.actor.lora else None,
            "micro_batch_size": micro_batch, "grad_accum_steps": cfg.actor.grad_accum_steps,
            "optimizer_steps_per_iteration": 1, "single_turn": True, "order": [],
        },
        "ours_config": {"base": SMOL_CONFIG, "overrides": overrides},
    }  # fmt: skip
    if side in ("ours", "both"):
        result["setup"]["order"].append("ours")
        result["ours_load_avg_1m_at_start"] = round(os.getloadavg()[0], 2)
        result["ours"] = measure_ours(cfg, warmup, steps)
        result["ours_samples_per_s"] = result["ours"]["samples_per_s"]
    if side in ("trl", "both"):
        import trl

        out = RUNS / "throughput-trl"
        shutil.rmtree(out, ignore_errors=True)
        result["setup"]["order"].append("trl")
        result["trl_load_avg_1m_at_start"] = round(os.getloadavg()[0], 2)
        result["trl"] = {"version": trl.__version__} | run_trl(cfg, warmup, steps, trl_generation, out)
        result["trl_samples_per_s"] = result["trl"]["samples_per_s"]
        result["trl_mode"], result["trl_vllm_error"] = result["trl"]["mode"], result["trl"]["vllm_error"]
    if "ours" in result and "trl" in result:
        result["trl_ratio"] = round(result["ours_samples_per_s"] / result["trl_samples_per_s"], 3)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed iterations per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations before them")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per iteration")
    parser.add_argument("--k", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--side", choices=("trl", "ours", "both"), default="both")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--trl-generation", choices=("auto", "vllm", "generate"), default="auto")
    a = parser.parse_args(argv)
    result = measure(
        a.steps, a.prompts, a.k, a.max_new_tokens, a.side, a.warmup, a.dtype, a.micro_batch,
        trl_generation=a.trl_generation,
    )  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
