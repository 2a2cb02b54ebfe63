"""Evaluation job: run the tool loop for real on the tool world's held-out tasks and on BFCL, and report.

1. start (or attach to) Ray and spawn N rollout workers (vLLM engines);
2. tool world: run every task of the chosen splits, and of the user's eval files (``files``,
   see ``tooltune.eval_data``), through the multi-turn tool loop, sharded across the workers;
   compute every metric (overall, seen tools, unseen tools) per split and per file; with
   ``contrast.pairs_per_form``, the contrastive arithmetic pairs too (does the call decision
   follow the operands or the phrasing?);
3. BFCL: its single-turn categories through the same loop with ``max_turns=1``, scored by
   BFCL's own AST checker;
4. write ``metrics.json``, ``episodes.jsonl``, ``report.md`` and ``metrics.png``.

    python -m ray_jobs.evaluate --config configs/smol/evaluate.yaml
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from cluster.local import RayConfig, local_ray
from cluster.placement import RoleConfig, RoleGroup
from ray_jobs._cli import job_config, user_errors
from rollout.agent_loop import LoopConfig, Trajectory, run_episodes
from rollout.vllm_worker import RolloutConfig
from tooltune.bfcl import BFCL_CATEGORIES, BfclItem, BfclScore, score_bfcl
from tooltune.config import StrictModel
from tooltune.data import RowError
from tooltune.episode import Episode, FailureReason, Task
from tooltune.models import resolve_model
from tooltune.parser import decode_tool_calls
from tooltune.provenance import provenance
from tooltune.world import SPLITS, WorldConfig, world_registry
from tooltune.world_contrast import ContrastSettings


class WorkerSettings(RolloutConfig):
    """The rollout engines' settings; their model is ``EvalConfig.model``, so leave ``model`` out."""

    model: Literal[""] = ""


class BfclEvalConfig(StrictModel):
    categories: list[Literal[BFCL_CATEGORIES]] = list(BFCL_CATEGORIES)  # type: ignore[valid-type]
    limit_per_category: int = Field(0, ge=0)  # 0 skips BFCL


class EvalConfig(StrictModel):
    model: str = "tiny"  # a checkpoint directory, or "tiny" / "smollm2" (built or converted locally)
    label: str = ""  # the run's name in the report; the model's when empty
    ray: RayConfig = RayConfig()
    workers: RoleConfig = RoleConfig(num_ranks=1, cpus=1.0)
    rollout: WorkerSettings = WorkerSettings()
    world: WorldConfig | str = WorldConfig()  # generated from this config, or a directory of {split}.parquet
    splits: list[Literal[SPLITS]] = ["test"]  # type: ignore[valid-type]
    # The user's eval files (tooltune.eval_data: reference conversations, or prompts with their
    # expected calls); each is scored as its own task set, "file:<name>", beside the splits.
    files: list[str] = []
    files_on_error: Literal["skip", "fail"] = "fail"
    limit: int | None = Field(None, ge=1)  # the first N tasks of each split and file
    bfcl: BfclEvalConfig = BfclEvalConfig()
    contrast: ContrastSettings = ContrastSettings()
    loop: LoopConfig = LoopConfig(sampling={"temperature": 0.0})
    output_dir: str = "runs/evaluate"

    @model_validator(mode="after")
    def _one_episode_per_task(self) -> EvalConfig:
        if self.loop.samples_per_task != 1:
            raise ValueError("loop.samples_per_task must be 1: the metrics pair one episode with each task")
        if self.loop.max_total_tokens > self.rollout.max_model_len:
            raise ValueError(
                f"loop.max_total_tokens ({self.loop.max_total_tokens}) exceeds rollout.max_model_len "
                f"({self.rollout.max_model_len}): an episode would outgrow the engine's context"
            )
        return self


def run_evaluation(cfg: EvalConfig) -> dict[str, Any]:
    import ray
    from transformers import AutoTokenizer

    from rollout.vllm_worker import RolloutWorker
    from tooltune.bfcl import bfcl_summary, load_bfcl
    from tooltune.metrics import compute_metrics
    from tooltune.world_contrast import contrastive_decisions

    t0 = time.time()
    model_dir = resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    world, data_errors = world_tasks(cfg)
    pairs = cfg.contrast.pairs()
    contrast_tasks = cfg.contrast.tasks(pairs)
    bfcl_items = load_bfcl(cfg.bfcl.categories, cfg.bfcl.limit_per_category) if cfg.bfcl.limit_per_category else []
    timing: dict[str, float] = {}

    with local_ray(cfg.ray):
        group = RoleGroup("rollout", cfg.workers)
        engine = cfg.rollout.model_dump() | {"model": model_dir}
        workers = group.spawn(RolloutWorker, lambda rank: ({**engine, "seed": engine["seed"] + rank},))
        try:
            ray.get([w.version.remote() for w in workers])  # the engines are up
            timing["startup_s"] = time.time() - t0

            # Tool world: all splits (and the contrastive pairs) in one batch, each turn's prompts
            # spread over the workers.
            t = time.time()
            tasks = [task for split in world.values() for task in split] + contrast_tasks
            registry = world_registry(cfg.world)
            trajectories = dict(zip((task.id for task in tasks), run_episodes(tasks, workers, tokenizer, cfg.loop, registry)))
            timing["world_s"] = time.time() - t

            # BFCL is single-turn: the first turn's calls are the answer.
            t = time.time()
            bfcl_loop = cfg.loop.model_copy(update={"max_turns": 1})
            bfcl_runs = run_episodes([item.to_task() for item in bfcl_items], workers, tokenizer, bfcl_loop)
            timing["bfcl_s"] = time.time() - t
        finally:
            ray.get([w.shutdown.remote() for w in workers])
            group.remove()

    world_metrics = {
        split: compute_metrics(split_tasks, [trajectories[task.id].episode for task in split_tasks])
        for split, split_tasks in world.items()
    }
    contrast = contrastive_decisions(pairs, {t.id: trajectories[t.id].episode for t in contrast_tasks}) if pairs else None
    bfcl_scores = [score_bfcl_episode(item, run.episode) for item, run in zip(bfcl_items, bfcl_runs)]
    bfcl = bfcl_summary(bfcl_items, bfcl_scores) if bfcl_items else None

    everything = [*trajectories.values(), *bfcl_runs]
    generated = sum(run.episode.num_generated_tokens for run in everything)
    timing["total_s"] = time.time() - t0
    results = {
        "label": cfg.label or cfg.model,
        "model": cfg.model,
        "model_dir": model_dir,
        "policy_version": everything[0].policy_version if everything else None,
        "world": world_metrics,
        "bfcl": bfcl,
        "contrast": contrast,
        "generated_tokens": generated,
        "generated_tokens_per_s": generated / max(timing["world_s"] + timing["bfcl_s"], 1e-9),
        "timing": {k: round(v, 1) for k, v in timing.items()},
        "data_errors": [str(e) for e in data_errors],
        "config": cfg.model_dump(mode="json"),
        "provenance": provenance(cfg, run_dir=cfg.output_dir),
    }
    episodes_of = world | ({"contrast": contrast_tasks} if contrast_tasks else {})
    write_outputs(Path(cfg.output_dir), results, episodes_of, trajectories, bfcl_items, bfcl_runs, bfcl_scores)
    return results


# ---- inputs -----------------------------------------------------------------------------------


def world_tasks(cfg: EvalConfig) -> tuple[dict[str, list[Task]], list[RowError]]:
    """The tasks of each split, then of each eval file (``file:<name>``), the first ``cfg.limit``
    of each; and the eval files' rows skipped (``files_on_error="skip"``)."""
    from tooltune.eval_data import load_eval_tasks
    from tooltune.world import generate_world, load_tasks

    if isinstance(cfg.world, WorldConfig):
        generated = generate_world(cfg.world) if cfg.splits else {}
        splits = {split: generated[split] for split in cfg.splits}
    else:
        splits = {split: load_tasks(Path(cfg.world) / f"{split}.parquet") for split in cfg.splits}
    errors: list[RowError] = []
    for path in cfg.files:
        tasks, skipped = load_eval_tasks(path, on_error=cfg.files_on_error)
        splits[f"file:{Path(path).name}"] = tasks
        errors += skipped
    return {split: tasks[: cfg.limit] for split, tasks in splits.items()}, errors


def score_bfcl_episode(item: BfclItem, episode: Episode) -> BfclScore:
    """BFCL's verdict on the first turn: the calls the model emitted, judged by BFCL's checker as the
    leaderboard judges them. A call that decoded is a call even if the parser rejected it (unknown
    function, or arguments that break the schema we offered): the checker fails a wrong one, and
    passes a right one whose type BFCL's own answer shares (parallel_multiple_21 and _94 break
    their schemas); the rejection is reported as ``schema_violation``, beside accuracy. Malformed
    JSON in any call makes the turn no call at all: vLLM's hermes parser returns such a turn as text."""
    turn = episode.turns[0] if episode.turns else None
    if turn is None or turn.failure is None:
        return score_bfcl(item, turn.calls if turn is not None else [])  # the parser kept every call
    emitted, malformed = decode_tool_calls(turn.text)
    if malformed:
        score = score_bfcl(item, [])
        return score if score.correct else BfclScore(False, f"{FailureReason.MALFORMED_JSON.value}: {malformed}")
    score = score_bfcl(item, emitted)
    # Without malformed JSON, the parser's first failure is the first schema violation.
    schema_failures = (FailureReason.UNKNOWN_TOOL, FailureReason.INVALID_ARGUMENTS)
    violation = f"{turn.failure.value}: {turn.failure_detail}" if turn.failure in schema_failures else None
    return BfclScore(score.correct, score.error, violation)


# ---- outputs ----------------------------------------------------------------------------------


def write_outputs(
    out: Path,
    results: dict[str, Any],
    world: dict[str, list[Task]],
    trajectories: dict[str, Trajectory],
    bfcl_items: list[BfclItem],
    bfcl_runs: list[Trajectory],
    bfcl_scores: list[BfclScore],
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(out / "episodes.jsonl", "w", encoding="utf-8") as f:
        for split, tasks in world.items():
            for task in tasks:
                row = {"source": split, "category": task.category, "unseen_tools": task.unseen_tools}
                f.write(json.dumps(row | trajectories[task.id].episode.to_dict(), ensure_ascii=False) + "\n")
        for item, run, score in zip(bfcl_items, bfcl_runs, bfcl_scores):
            row = {
                "source": "bfcl", "category": item.category, "bfcl_correct": score.correct, "bfcl_error": score.error,
                "bfcl_schema_violation": score.schema_violation,
            }  # fmt: skip
            f.write(json.dumps(row | run.episode.to_dict(), ensure_ascii=False) + "\n")
    (out / "report.md").write_text(report_markdown(results), encoding="utf-8")
    plot_metrics(results, out / "metrics.png")


def report_markdown(results: dict[str, Any]) -> str:
    from tooltune.metrics import metrics_markdown

    label = results["label"]
    loop = results["config"]["loop"]
    lines = [
        f"# Evaluation: {label}",
        "",
        f"Model `{results['model']}`, policy version {results['policy_version']}; tool loop: at most "
        f"{loop['max_turns']} turns of {loop['max_new_tokens']} new tokens, temperature "
        f"{loop['sampling']['temperature']:g}, parse failures {loop['on_parse_failure']} the episode "
        "(BFCL: one turn).",
    ]
    for split, metrics in results["world"].items():
        rows = {f"{label}": metrics, f"{label}, seen tools": metrics["seen"], f"{label}, unseen tools": metrics["unseen"]}
        lines += ["", f"## Tool world: {split}", "", metrics_markdown(rows)]
    contrast = results.get("contrast")
    if contrast:
        lines += ["", f"## Contrastive arithmetic ({contrast['pairs']} pairs: one phrasing, small and large operands)", ""]
        lines += ["| half | right decision | and right answer |", "|---|---:|---:|"]
        lines.append(f"| trivial: no call | {100 * contrast['contrastive_trivial_direct']:.1f}% | {100 * contrast['contrastive_trivial_answered']:.1f}% |")
        lines.append(f"| large: the exact calculator call | {100 * contrast['contrastive_large_called']:.1f}% | {100 * contrast['contrastive_large_answered']:.1f}% |")
    bfcl = results["bfcl"]
    if bfcl:
        lines += ["", f"## BFCL (bfcl-eval {bfcl['bfcl_eval_version']}, AST checker)", ""]
        # What the model emitted is scored; outputs that broke their schema are counted apart.
        lines += ["| category | accuracy | correct / total | schema violations |", "|---|---:|---:|---:|"]
        for category, c in bfcl["categories"].items():
            lines.append(f"| {category} | {100 * c['accuracy']:.1f}% | {c['correct']} / {c['total']} | {c['schema_violations']} |")
        o = bfcl["overall"]
        lines.append(f"| **overall** | {100 * o['accuracy']:.1f}% | {o['correct']} / {o['total']} | {o['schema_violations']} |")
        lines.append(f"| macro (mean of categories) | {100 * bfcl['macro_accuracy']:.1f}% | | |")
    timing = results["timing"]
    lines += [
        "",
        f"Generated {results['generated_tokens']} tokens ({results['generated_tokens_per_s']:.0f}/s); "
        + ", ".join(f"{k} {v}" for k, v in timing.items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def plot_metrics(results: dict[str, Any], path: Path) -> None:
    """Bars of every rate metric (overall, seen, unseen tools) and of BFCL's category accuracies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tooltune.metrics import METRIC_KEYS

    rates = [k for k in METRIC_KEYS if k not in ("n_tasks", "calls_per_query", "tokens_per_query")]
    panels = [(f"tool world: {split}", m) for split, m in results["world"].items()]
    fig, axes = plt.subplots(1, len(panels) + bool(results["bfcl"]), figsize=(6 * (len(panels) + 1), 4.5), squeeze=False)
    for ax, (title, metrics) in zip(axes[0], panels):
        width = 0.27
        for offset, (name, subset) in enumerate((("all", metrics), ("seen", metrics["seen"]), ("unseen", metrics["unseen"]))):
            values = [subset[k] or 0.0 for k in rates]
            ax.bar([i + (offset - 1) * width for i in range(len(rates))], values, width, label=name)
        ax.set_xticks(range(len(rates)), [k.replace("_", " ") for k in rates], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{results['label']} — {title}")
        ax.legend(fontsize=8)
    if results["bfcl"]:
        ax = axes[0][-1]
        categories = results["bfcl"]["categories"]
        names = [*categories, "overall"]
        ax.bar(names, [c["accuracy"] for c in categories.values()] + [results["bfcl"]["overall"]["accuracy"]])
        ax.set_ylim(0, 1)
        ax.set_title(f"{results['label']} — BFCL accuracy")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    cfg = job_config(EvalConfig, __doc__.splitlines()[0], argv)
    with user_errors():
        results = run_evaluation(cfg)
    summary = {split: {k: v for k, v in m.items() if k not in ("seen", "unseen")} for split, m in results["world"].items()}
    shown = {"world": summary, "bfcl": results["bfcl"] and results["bfcl"]["overall"], "contrast": results["contrast"], "timing": results["timing"]}
    print(json.dumps(shown, indent=2))
    print(f"wrote {cfg.output_dir}/metrics.json, report.md, metrics.png, episodes.jsonl")


if __name__ == "__main__":
    main()
