"""SFT benchmark: what the SFT job does to a model's tool calling, and what it costs.

    python -m benchmarks.sft --tier tiny     # tiny Llama from scratch on the tool world
    python -m benchmarks.sft --tier smol     # LoRA on SmolLM2-135M-Instruct
    python -m benchmarks.sft --tier tiny --trial NAME --set train.max_steps=8000   # a variant

Each tier trains with its config (``configs/<tier>/sft.yaml``) from scratch, and the SFT job
then evaluates the final checkpoint on the held-out test split of the *same* tool world (so no
test query was seen in training). The smol tier also evaluates the base model first, the same way.
Writes ``benchmarks/results/sft.json`` (one key per tier; a trial, the tier's config with
``--set`` overrides, under ``trials``) and a section of ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info, write_result
from ray_jobs.evaluate import run_evaluation
from ray_jobs.sft import SFTConfig, evaluation_config, run_sft
from tooltune.config import ConfigError, load_config
from tooltune.episode import Episode
from tooltune.metrics import miss_breakdown, pair_episodes
from tooltune.world import generate_world

RESULTS = Path(__file__).parent / "results"


def needed_tool_subset(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("call_validity", "tool_selection_accuracy", "argument_accuracy", "over_call_rate", "under_call_rate", "final_answer_accuracy")
    return {k: metrics[k] for k in keys} | {
        "seen": {k: metrics["seen"][k] for k in keys},
        "unseen": {k: metrics["unseen"][k] for k in keys},
    }


def finished_run(sft: SFTConfig) -> dict[str, Any] | None:
    """A completed SFT run of exactly this config, if the output directory holds one."""
    out = Path(sft.output_dir)
    try:
        done = json.loads((out / "result.json").read_text())
        same = load_config(out / "config.yaml", SFTConfig) == sft
    except (OSError, ValueError, ConfigError):
        return None
    return done if same and done["completed_steps"] == done["steps"] else None


def misses(sft: SFTConfig, eval_dir: Path) -> dict[str, Any]:
    """Where the evaluated checkpoint's exact calls fail (``metrics.miss_breakdown``), from the
    episodes the evaluation wrote and the test split of the run's world."""
    lines = (eval_dir / "episodes.jsonl").read_text(encoding="utf-8").splitlines()
    episodes = [Episode.from_dict(json.loads(line)) for line in lines]
    tasks = {t.id: t for t in generate_world(sft.data.world)["test"]}
    return miss_breakdown(pair_episodes([tasks[e.task_id] for e in episodes], episodes))


def run_tier(tier: str, eval_limit: int | None, reuse: bool, overrides: Sequence[str] = ()) -> dict[str, Any]:
    sft = load_config(f"configs/{tier}/sft.yaml", SFTConfig, overrides)
    sft.evaluation.enabled, sft.evaluation.limit = True, eval_limit
    out = Path(sft.output_dir)
    previous = finished_run(sft) if reuse else None
    if previous is None:
        shutil.rmtree(out, ignore_errors=True)
    result: dict[str, Any] = {"config": f"configs/{tier}/sft.yaml", "overrides": list(overrides)}
    if tier == "smol":
        base = run_evaluation(evaluation_config(sft, "smollm2", out / "eval_base", "SmolLM2-135M-Instruct (base)"))["world"]["test"]
        result["base_call_validity"] = base["call_validity"] or 0.0
        result["base"] = needed_tool_subset(base)
    trained = previous or run_sft(sft)
    after = trained["evaluation"]
    seen = after["seen"]
    result |= {
        # Held-out needed-tool queries with tools seen in training; unseen tools are reported apart.
        "exact_call_accuracy": seen["argument_accuracy"],
        "exact_call_accuracy_unseen_tools": after["unseen"]["argument_accuracy"],
        "call_validity": after["call_validity"],
        "over_call_rate": after["over_call_rate"],
        "wall_seconds": trained["wall_seconds"],
        "steps": trained["steps"],
        "final_train_loss": trained["history"][-1]["train/loss"],
        "final_validation_loss": next((h["validation/loss"] for h in reversed(trained["history"]) if "validation/loss" in h), None),
        "eval_tasks": after["n_tasks"],
        # The tool loop on validation tasks during training (evaluation.during_training_every).
        "during_training": [
            {"step": h["step"], "call_validity": h["tool_eval/call_validity"], "exact_calls": h["tool_eval/argument_accuracy"]}
            for h in trained["history"]
            if "tool_eval/argument_accuracy" in h
        ],
        "after": needed_tool_subset(after),
        "misses": misses(sft, out / "eval"),
    }
    return result


def summary(results: dict[str, Any]) -> str:
    lines = [
        "| tier | steps | train wall s | base validity | validity (all) | validity (seen tools) | exact calls (seen tools) | exact (unseen tools) | over-call | run (UTC) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = [(tier, results.get(tier)) for tier in ("tiny", "smol")]
    runs += [(f"trial {name}: {' '.join(r['overrides'])}", r) for name, r in results.get("trials", {}).items()]
    for tier, r in runs:
        if not r:
            continue
        fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(
            f"| {tier} | {r['steps']} | {r['wall_seconds']:.0f} | {fmt(r.get('base_call_validity'))} | {fmt(r['call_validity'])} "
            f"| {fmt(r['after']['seen']['call_validity'])} "
            f"| {fmt(r['exact_call_accuracy'])} | {fmt(r['exact_call_accuracy_unseen_tools'])} | {fmt(r['over_call_rate'])} "
            f"| {r.get('date', '')[:16].replace('T', ' ')} |"
        )
    for tier, r in runs:
        if r and r.get("misses"):
            tools = ", ".join(f"{k} {v['first_wrong']}/{v['expected_calls']}" for k, v in r["misses"]["by_tool"].items())
            cats = ", ".join(f"{k} {v['missed']}/{v['tasks']}" for k, v in r["misses"]["by_category"].items())
            lines += ["", f"{tier}, exact-call misses: by category (missed/tasks) {cats}; by tool (calls wrong or missing in the first wrong step / calls expected) {tools}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", choices=["tiny", "smol"], required=True)
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N test tasks")
    parser.add_argument("--reuse", action="store_true", help="evaluate a finished run of the same config instead of training again")
    parser.add_argument("--trial", help="record the run as trials[TIER/NAME], not as the tier's result")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (a trial only)")
    args = parser.parse_args()
    if args.set and not args.trial:
        parser.error("--set changes the tier's config: name the run with --trial")
    tier = run_tier(args.tier, args.eval_limit, args.reuse, args.set)
    # Read after the run: the other tier may have finished in the meantime.
    path = RESULTS / "sft.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.pop("note", None)  # a note belongs to the run it was written for
    info = machine_info()
    # Each tier keeps the date and load of its own run; the top level is the latest run's.
    run = tier | {"date": info["date"], "load_avg_1_5_15": info["machine"].get("load_avg_1_5_15")}
    if args.trial:
        results.setdefault("trials", {})[f"{args.tier}/{args.trial}"] = run
    else:
        results[args.tier] = run
    results |= info
    write_result("sft", results, summary(results))
    print(json.dumps(run, indent=2))


if __name__ == "__main__":
    main()
