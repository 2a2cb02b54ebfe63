"""Preferences job: candidate answers per prompt, ranked by judges (rules, an AI judge, human labels).

    python -m ray_jobs.preferences --config configs/tiny/preferences.yaml [key=value ...]

1. prompts: the first ``limit`` tasks of the tool world's ``split``;
2. candidates, each a whole episode of the real tool loop (calls, tool results, final answer):
   ``samples_per_prompt`` policy samples on rollout workers (ids ``{prompt_id}/s{i}``), then the
   scripted contrasts of ``tooltune.contrasts`` that apply (ids ``{prompt_id}/{variant}``), played
   through the same loop. A script is not sampled: its turns are bounded only by the whole
   context (``loop.max_total_tokens``), and it gets the turns it needs. A scripted episode that
   still ends without a final answer is dropped (it is no longer what its variant says), and so is
   any candidate whose messages equal an earlier one's of the same prompt (it can only tie, or
   force an AI judge to order two identical answers); both are counted in the summary;
   or, with ``candidates_from``, the prompts and candidates of an earlier run's Parquet file, so
   an AI judge or human labels rank the same candidates later (``world``, ``split``,
   ``samples_per_prompt`` and ``scripted`` are then unused). The rules need each candidate's
   episode, so they rank fresh candidates only; the earlier file's own ranking takes part in the
   agreement report instead, as judge ``source:<its judge>``;
3. judges: ``rules`` (``rule_ranks``, reasons = reward breakdowns), ``ai`` (a rollout worker on a
   judge checkpoint, greedy; each prompt shown in a seeded shuffled order and, with
   ``ask_reversed``, again in the reversed order; the first valid reply's ranking is used, both
   valid ones give the reversal agreement; a prompt with no valid reply is skipped and every
   invalid reply counted by ``InvalidReply`` code), ``human`` (``load_human_labels``);
4. writes ``{judge}.parquet`` per judge (``write_preferences``) and ``summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, NonNegativeInt, model_validator

from cluster.local import RayConfig, local_ray
from cluster.placement import RoleConfig, RoleGroup
from ray_jobs._cli import job_config, user_errors
from ray_jobs.evaluate import WorkerSettings
from rollout.agent_loop import LoopConfig, Trajectory, run_episodes
from rollout.scripted import run_scripted
from tooltune.config import StrictModel
from tooltune.contrasts import VARIANTS, scripted_turns
from tooltune.data import DataError
from tooltune.episode import EndReason, Episode, Task
from tooltune.judges import LABELS, display_order, judge_messages, parse_ranking, reversal_agreement
from tooltune.models import resolve_model
from tooltune.preferences import (
    Candidate, PreferenceRecord, judge_agreement, load_human_labels, ranking_pairs, read_preferences, rule_ranks,
    write_preferences,
)  # fmt: skip
from tooltune.provenance import provenance
from tooltune.rewards import RewardConfig
from tooltune.world import SPLITS, WorldConfig, generate_world, world_registry

JUDGES = ("rules", "ai", "human")


class AiJudgeConfig(StrictModel):
    model: str = "smollm2"  # a checkpoint directory, or "tiny" / "smollm2"
    ask_reversed: bool = True
    max_new_tokens: int = Field(128, ge=1)
    seed: int = 0  # of the shuffled display order
    workers: RoleConfig = RoleConfig(num_ranks=1, cpus=1.0)
    rollout: WorkerSettings = WorkerSettings()


class HumanConfig(StrictModel):
    path: str | None = None  # JSONL/JSON/Parquet, one ranking per prompt (see load_human_labels)
    on_error: Literal["skip", "fail"] = "fail"


class PreferencesConfig(StrictModel):
    policy: str = "tiny"  # a checkpoint directory, or "tiny" / "smollm2"
    ray: RayConfig = RayConfig()
    workers: RoleConfig = RoleConfig(num_ranks=1, cpus=1.0)
    rollout: WorkerSettings = WorkerSettings()
    world: WorldConfig = WorldConfig()
    split: Literal[SPLITS] = "train"  # type: ignore[valid-type]
    limit: int | None = Field(None, ge=1)  # the first N prompts
    samples_per_prompt: NonNegativeInt = 4  # 0: scripted candidates only, no engine started
    loop: LoopConfig = LoopConfig(sampling={"temperature": 1.0, "seed": 0})
    scripted: list[Literal[VARIANTS]] = list(VARIANTS)  # type: ignore[valid-type]
    judges: list[Literal[JUDGES]] = ["rules"]  # type: ignore[valid-type]
    rewards: RewardConfig = RewardConfig()
    ai_judge: AiJudgeConfig = AiJudgeConfig()
    human: HumanConfig = HumanConfig()
    candidates_from: str | None = None  # a {judge}.parquet written by an earlier run
    output_dir: str = "runs/preferences"

    @model_validator(mode="after")
    def _check(self) -> PreferencesConfig:
        for key in ("judges", "scripted"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ValueError(f"{key}: each entry at most once, got {values}")
        if not self.judges:
            raise ValueError(f"judges: name at least one of {', '.join(JUDGES)}")
        if "human" in self.judges and not self.human.path:
            raise ValueError("judges: 'human' needs human.path, a file of rankings")
        if self.loop.samples_per_task != 1:
            raise ValueError("loop.samples_per_task must be 1: samples_per_prompt sets the number of samples")
        if self.samples_per_prompt and self.loop.max_total_tokens > self.rollout.max_model_len:
            raise ValueError(
                f"loop.max_total_tokens ({self.loop.max_total_tokens}) exceeds rollout.max_model_len "
                f"({self.rollout.max_model_len}): an episode would outgrow the engine's context"
            )
        if "ai" in self.judges and self.ai_judge.max_new_tokens >= self.ai_judge.rollout.max_model_len:
            raise ValueError("ai_judge.max_new_tokens must be below ai_judge.rollout.max_model_len")
        if self.candidates_from is not None:
            if "rules" in self.judges:
                raise ValueError(
                    "judges: 'rules' ranks fresh candidates only (it needs their episodes), not candidates_from"
                )
            return self
        if not self.samples_per_prompt and not self.scripted:
            raise ValueError("no candidates: samples_per_prompt is 0 and scripted is empty")
        most = self.samples_per_prompt + len(self.scripted)
        if "ai" in self.judges and most > len(LABELS):
            raise ValueError(
                f"the AI judge ranks at most {len(LABELS)} candidates: samples_per_prompt + scripted gives {most}"
            )
        return self


@dataclass
class Prompt:
    """One prompt and its candidates; ``task`` and ``episodes`` only for fresh candidates."""

    prompt_id: str
    category: str
    tools: list[dict[str, Any]]
    messages: list[dict[str, Any]]  # system and user
    candidates: list[Candidate]
    task: Task | None = None
    episodes: list[Episode] = field(default_factory=list)

    def record(self, judge: str, ranks: list[int], reasons: Sequence[str] = ()) -> PreferenceRecord:
        return PreferenceRecord(
            prompt_id=self.prompt_id, category=self.category, tools=self.tools, prompt=self.messages,
            candidates=self.candidates, ranks=ranks, judge=judge, reasons=list(reasons),
        )  # fmt: skip


def run_preferences(cfg: PreferencesConfig) -> dict[str, Any]:
    """Candidates, each judge's ranking of them, ``{judge}.parquet`` per judge and ``summary.json``
    in ``output_dir``; returns the summary."""
    t0 = time.time()
    timing: dict[str, float] = {}
    counts: Counter[str] = Counter()
    records: dict[str, list[PreferenceRecord]] = {}
    report: dict[str, dict[str, Any]] = {}
    engines = (cfg.samples_per_prompt and not cfg.candidates_from) or "ai" in cfg.judges
    with local_ray(cfg.ray) if engines else contextlib.nullcontext():
        if cfg.candidates_from:
            prompts, source = reused_candidates(cfg.candidates_from, cfg.limit)
        else:
            prompts, source = fresh_candidates(cfg, timing, counts), None
        if "rules" in cfg.judges:
            ranked = [(p, *rule_ranks(p.task, p.episodes, cfg.rewards)) for p in prompts]
            records["rules"] = [p.record("rules", ranks, reasons) for p, ranks, reasons in ranked]
            report["rules"] = {}
        if "ai" in cfg.judges:
            t = time.time()
            records["ai"], report["ai"] = ai_judge(cfg.ai_judge, prompts)
            timing["ai_judge_s"] = time.time() - t
        if "human" in cfg.judges:
            ids = {p.prompt_id: [c.id for c in p.candidates] for p in prompts}
            labels, errors = load_human_labels(cfg.human.path, ids, cfg.human.on_error)
            for error in errors:
                print(f"skipped {error}", file=sys.stderr)
            records["human"] = [p.record("human", labels[p.prompt_id]) for p in prompts if p.prompt_id in labels]
            report["human"] = {"errors": [str(e) for e in errors]}

    out = Path(cfg.output_dir)
    for judge, judged in records.items():
        write_preferences(out / f"{judge}.parquet", judged)
    rankings = {judge: {r.prompt_id: r.ranks for r in judged} for judge, judged in records.items()}
    if source is not None:
        rankings[f"source:{source[0]}"] = source[1]
    timing["total_s"] = time.time() - t0
    categories: dict[str, Counter[str]] = {}
    for p in prompts:
        categories.setdefault(p.category, Counter()).update(prompts=1, candidates=len(p.candidates))
    summary = {
        "policy": cfg.policy,
        "candidates_from": cfg.candidates_from,
        "prompts": len(prompts),
        "candidates": sum(len(p.candidates) for p in prompts),
        **{key: counts[key] for key in ("duplicates_dropped", "scripted_incomplete")},
        "categories": {c: dict(n) for c, n in sorted(categories.items())},
        "judges": {judge: judge_summary(records[judge]) | extra for judge, extra in report.items()},
        "agreement": {
            f"{a} vs {b}": {k: _finite(v) for k, v in judge_agreement(rankings[a], rankings[b]).items()}
            for a, b in combinations(rankings, 2)
        },
        "outputs": [f"{judge}.parquet" for judge in records] + ["summary.json"],
        "timing": {k: round(v, 1) for k, v in timing.items()},
        "config": cfg.model_dump(mode="json"),
        "provenance": provenance(cfg, run_dir=cfg.output_dir),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


# ---- candidates -------------------------------------------------------------------------------


def fresh_candidates(cfg: PreferencesConfig, timing: dict[str, float], counts: Counter[str]) -> list[Prompt]:
    """Policy samples, then scripted contrasts, per task; duplicates and cut scripts dropped."""
    from transformers import AutoTokenizer

    tasks = generate_world(cfg.world)[cfg.split][: cfg.limit]
    registry = world_registry(cfg.world)
    model_dir = resolve_model(cfg.policy)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    episodes: dict[str, list[tuple[str, Episode]]] = {task.id: [] for task in tasks}
    if cfg.samples_per_prompt:
        sampled = sample_policy(cfg, tasks, model_dir, tokenizer, registry, timing)
        for i, run in enumerate(sampled):
            episodes[run.task.id].append((f"s{i % cfg.samples_per_prompt}", run.episode))
    t = time.time()
    scripts = [(task, v, turns) for task in tasks for v in cfg.scripted if (turns := scripted_turns(task, v, registry))]
    longest = max((len(turns) for *_, turns in scripts), default=1)
    unsampled = {"max_new_tokens": cfg.loop.max_total_tokens, "max_turns": max(cfg.loop.max_turns, longest)}
    loop = cfg.loop.model_copy(update=unsampled)
    played = run_scripted([(task, turns) for task, _, turns in scripts], tokenizer, loop, registry)
    for (task, variant, _), run in zip(scripts, played):
        if run.episode.end_reason != EndReason.FINAL_ANSWER:
            counts["scripted_incomplete"] += 1
            continue
        episodes[task.id].append((variant, run.episode))
    timing["scripted_s"] = time.time() - t

    prompts = []
    for task in tasks:
        prompt = [{"role": "system", "content": task.system}] if task.system else []
        prompt.append({"role": "user", "content": task.query})
        p = Prompt(task.id, task.category, task.tools, prompt, [], task)
        for suffix, episode in episodes[task.id]:
            messages = episode.messages[len(prompt) :]
            if any(c.messages == messages for c in p.candidates):
                counts["duplicates_dropped"] += 1
                continue
            p.candidates.append(Candidate(id=f"{task.id}/{suffix}", messages=messages))
            p.episodes.append(episode)
        prompts.append(p)
    return prompts


def sample_policy(
    cfg: PreferencesConfig, tasks: list[Task], model_dir: str, tokenizer: Any, registry: Any, timing: dict[str, float]
) -> list[Trajectory]:
    """``samples_per_prompt`` episodes per task (task-major) from the policy on rollout workers."""
    import ray

    from rollout.vllm_worker import RolloutWorker

    t = time.time()
    group = RoleGroup("rollout", cfg.workers)
    engine = cfg.rollout.model_dump() | {"model": model_dir}
    workers = group.spawn(RolloutWorker, lambda rank: ({**engine, "seed": engine["seed"] + rank},))
    try:
        ray.get([w.version.remote() for w in workers])  # the engines are up
        timing["policy_startup_s"] = time.time() - t
        t = time.time()
        loop = cfg.loop.model_copy(update={"samples_per_task": cfg.samples_per_prompt})
        sampled = run_episodes(tasks, workers, tokenizer, loop, registry)
        timing["sample_s"] = time.time() - t
    finally:
        ray.get([w.shutdown.remote() for w in workers])
        group.close()
    return sampled


def reused_candidates(path: str, limit: int | None) -> tuple[list[Prompt], tuple[str, dict[str, list[int]]]]:
    """The first ``limit`` prompts of a preferences file, and its judge's name and ranks."""
    if not Path(path).is_file():
        raise DataError(f"{path}: candidates_from: no such file")
    try:
        records = read_preferences(path)[:limit]
    except (ValueError, KeyError, OSError) as e:
        raise DataError(f"{path}: not a preferences file: {' '.join(str(e).split())[:300]}") from None
    prompts = [Prompt(r.prompt_id, r.category, r.tools, r.prompt, r.candidates) for r in records]
    judge = records[0].judge if records else "unknown"
    return prompts, (judge, {r.prompt_id: r.ranks for r in records})


# ---- the AI judge -----------------------------------------------------------------------------


def ai_judge(cfg: AiJudgeConfig, prompts: list[Prompt]) -> tuple[list[PreferenceRecord], dict[str, Any]]:
    """Each prompt ranked by a model on a rollout worker (greedy): its records and its report."""
    import ray
    from transformers import AutoTokenizer

    from rollout.vllm_worker import RolloutWorker
    from tooltune.chat import TURN_END, render_prompt

    model_dir = resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    skipped: Counter[str] = Counter()
    asked: list[tuple[Prompt, list[list[int]]]] = []
    inputs: list[list[int]] = []
    for p in prompts:
        if len(p.candidates) > len(LABELS):
            skipped["more_candidates_than_labels"] += 1
            continue
        if len(p.candidates) < 2:
            skipped["fewer_than_two_candidates"] += 1
            continue
        question = next((m["content"] for m in reversed(p.messages) if m["role"] == "user"), None)
        if not isinstance(question, str):
            skipped["no_question"] += 1
            continue
        first = display_order(len(p.candidates), cfg.seed, p.prompt_id)
        orders = [first, first[::-1]] if cfg.ask_reversed else [first]
        shown = [c.messages for c in p.candidates]
        texts = [render_prompt(tokenizer, judge_messages(p.tools, question, shown, order)) for order in orders]
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        if max(len(i) for i in ids) + cfg.max_new_tokens > cfg.rollout.max_model_len:
            skipped["prompt_too_long"] += 1
            continue
        asked.append((p, orders))
        inputs += ids

    replies: list[str] = []
    if inputs:
        sampling: dict[str, Any] = {"n": 1, "temperature": 0.0, "max_tokens": cfg.max_new_tokens}
        turn_end = tokenizer.convert_tokens_to_ids(TURN_END)
        if isinstance(turn_end, int) and turn_end != tokenizer.unk_token_id:
            sampling["stop_token_ids"] = [turn_end]
        group = RoleGroup("judge", cfg.workers)
        engine = cfg.rollout.model_dump() | {"model": model_dir}
        workers = group.spawn(RolloutWorker, lambda rank: ({**engine, "seed": engine["seed"] + rank},))
        try:
            n = len(workers)
            shards = ray.get([w.generate.remote(inputs[i::n], sampling) for i, w in enumerate(workers)])
        finally:
            ray.get([w.shutdown.remote() for w in workers])
            group.close()
        replies = [""] * len(inputs)
        for i, shard in enumerate(shards):
            replies[i::n] = [result.samples[0].text for result in shard]

    invalid: Counter[str] = Counter()
    records, agreements = [], []
    position = 0
    for p, orders in asked:
        judgements = [parse_ranking(replies[position + i], order) for i, order in enumerate(orders)]
        position += len(orders)
        invalid.update(j.invalid.value for j in judgements if j.invalid is not None)
        valid = [j for j in judgements if j.ranks is not None]
        if len(valid) == 2:
            agreements.append(reversal_agreement(valid[0].ranks, valid[1].ranks))
        if not valid:
            skipped["no_valid_reply"] += 1
            continue
        # The judge gives one reason for its whole ranking: each candidate's row carries it.
        reasons = [valid[0].reason] * len(p.candidates) if valid[0].reason else []
        records.append(p.record("ai", valid[0].ranks, reasons))
    report = {
        "model": cfg.model,
        "replies": len(replies),
        "invalid_replies": dict(sorted(invalid.items())),
        "skipped_prompts": dict(sorted(skipped.items())),
        "reversal_agreement": sum(agreements) / len(agreements) if agreements else None,
        "reversal_prompts": len(agreements),
    }
    return records, report


# ---- the summary ------------------------------------------------------------------------------


def judge_summary(records: list[PreferenceRecord]) -> dict[str, Any]:
    """Prompts ranked and the ordered pairs they give, in all and per category."""
    pairs: Counter[str] = Counter()
    for r in records:
        pairs[r.category] += len(ranking_pairs(r.ranks))
    return {"prompts": len(records), "pairs": sum(pairs.values()), "pairs_by_category": dict(sorted(pairs.items()))}


def _finite(value: Any) -> Any:
    # JSON has no NaN: an undefined agreement (no pair both judges order) is null.
    return None if isinstance(value, float) and math.isnan(value) else value


def main(argv: list[str] | None = None) -> None:
    cfg = job_config(PreferencesConfig, __doc__.splitlines()[0], argv)
    with user_errors():
        summary = run_preferences(cfg)
    brief = {k: summary[k] for k in ("prompts", "candidates", "duplicates_dropped", "scripted_incomplete")}
    print(json.dumps(brief | {k: summary[k] for k in ("judges", "agreement", "timing")}, indent=2))
    print(f"wrote {cfg.output_dir}/{', '.join(summary['outputs'])}")


if __name__ == "__main__":
    main()
