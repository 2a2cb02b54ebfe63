"""SFT benchmark: what the SFT job does to a model's tool calling, and what it costs.

Settings are chosen on the validation split; the test split is scored once per recorded tier:

    python -m benchmarks.sft --tier tiny --trial NAME [--set k=v ...]  # train, score validation only
    python -m benchmarks.sft --tier tiny --promote NAME   # the trial becomes the tier: test scored once
    python -m benchmarks.sft --tier tiny                  # the tier's config: train, validation, test once

A trial is the tier's config (``configs/<tier>/sft.yaml``) with ``--set`` overrides. Promoting one
needs the config file to hold its settings already (the command names any key that differs); it
reuses the trial's run, scores the test split and records that it was promoted. The test split
of a run is scored at most once: a second recording of the same run reads the first score back.
``--reuse`` takes a finished run of the same config instead of training again. The smol tier
also scores the base model on the test split (once). Every rate carries a bootstrap 95%
interval over tasks; a subset of fewer than 30 tasks is flagged ``small``.

Writes ``benchmarks/results/sft.json`` (one key per tier, trials under ``trials``, each with a
``provenance`` written here) and a section of ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info, write_result
from ray_jobs.evaluate import ContrastSettings, EvalConfig, run_evaluation
from ray_jobs.sft import SFTConfig, evaluation_config, run_sft, saved_config_changes
from tooltune.config import ConfigError, load_config
from tooltune.episode import Episode
from tooltune.metrics import metric_intervals, miss_breakdown, pair_episodes
from tooltune.provenance import provenance
from tooltune.world import generate_world

RESULTS = Path(__file__).parent / "results"
RUNS = Path("runs/bench-sft")
RATES = ("call_validity", "tool_selection_accuracy", "argument_accuracy", "over_call_rate", "under_call_rate", "final_answer_accuracy")
SMALL = 30  # a subset of fewer tasks than this is flagged: its interval is wide


def run_dir(tier: str, trial: str | None) -> Path:
    return RUNS / (f"{tier}-trial-{trial}" if trial else tier)


def bench_config(tier: str, out: Path, overrides: Sequence[str] = ()) -> SFTConfig:
    """The tier's config with ``overrides``, writing to ``out``; the benchmark scores the run itself."""
    return load_config(f"configs/{tier}/sft.yaml", SFTConfig, [*overrides, f"output_dir={out}", "evaluation.enabled=false"])


def run_changes(sft: SFTConfig, finished: bool = True) -> list[str] | None:
    """How ``sft`` differs from the run its output directory holds (keys that change a run);
    ``None`` when the directory holds no finished run (``finished=False``: no run with a checkpoint)."""
    out = Path(sft.output_dir)
    try:
        changes = saved_config_changes(out, sft)
        if finished:
            done = json.loads((out / "result.json").read_text())
            if done["completed_steps"] != done["steps"]:
                return None
        elif not (out / "checkpoints" / "latest").is_file():
            return None
    except (OSError, ValueError, ConfigError):
        return None
    return changes


def score(
    sft: SFTConfig, model: str, split: str, limit: int | None, eval_dir: Path, label: str, contrast: ContrastSettings | None = None
) -> dict[str, Any]:
    """``model`` on ``split`` of the run's world: the rates overall, on seen and on unseen tools,
    each with a bootstrap 95% interval over tasks, and where exact calls fail; with ``contrast``,
    the contrastive arithmetic pairs' decisions too. Scored at most once per directory: an
    earlier score of the same model and tasks is read back, not recomputed."""
    cfg = evaluation_config(sft.model_copy(update={"evaluation": sft.evaluation.model_copy(update={"limit": limit})}), model, eval_dir, label, split)
    if contrast is not None:
        cfg = cfg.model_copy(update={"contrast": contrast})
    previous = eval_dir / "metrics.json"
    same = previous.exists() and _same_evaluation(json.loads(previous.read_text())["config"], cfg)
    if previous.exists() and not same and split == "test":
        raise SystemExit(
            f"error: {eval_dir} already holds a test score of this run, under another evaluation config: "
            "the test split is scored once; remove that directory yourself if a second score is really meant"
        )
    if not same:
        shutil.rmtree(eval_dir, ignore_errors=True)
        run_evaluation(cfg)
    metrics = json.loads(previous.read_text())["world"][split]
    lines = (eval_dir / "episodes.jsonl").read_text(encoding="utf-8").splitlines()
    episodes = [Episode.from_dict(json.loads(line)) for line in lines if json.loads(line)["source"] == split]
    tasks = {t.id: t for t in generate_world(sft.data.world)[split]}
    pairs = pair_episodes([tasks[e.task_id] for e in episodes], episodes)
    result: dict[str, Any] = {"split": split, "n_tasks": metrics["n_tasks"], "scored_once_in": str(eval_dir)}
    for subset, chosen in (("all", pairs), ("seen", [p for p in pairs if not p[0].unseen_tools]), ("unseen", [p for p in pairs if p[0].unseen_tools])):
        shown = metrics if subset == "all" else metrics[subset]
        intervals = metric_intervals(chosen)
        result[subset] = {
            k: {"value": shown[k], "ci95": intervals[k]["ci"] if intervals else None, "n": intervals[k]["n"] if intervals else 0}
            | ({"small": True} if intervals and 0 < intervals[k]["n"] < SMALL else {})
            for k in RATES
        }
    result["misses"] = miss_breakdown(pairs)
    if contrast is not None:
        result["contrast"] = json.loads(previous.read_text())["contrast"]
    return result


def _same_evaluation(saved: dict[str, Any], cfg: EvalConfig) -> bool:
    """Whether a saved score's evaluation config is ``cfg``: a setting added to the evaluation
    since that score counts at its default (read back through the config class), never as a match
    whatever its value."""
    try:
        filled = EvalConfig.model_validate(saved)
    except ValueError:
        return False
    return filled.model_dump(mode="json") == cfg.model_dump(mode="json")


def training_summary(trained: dict[str, Any], out: Path) -> dict[str, Any]:
    # The whole run's log (one line per step, across resumes), not the last stretch's history.
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    prov = out / "provenance.json"
    first = trained["history"][0]["step"] if trained["history"] else None
    return {
        "steps": trained["steps"],
        "wall_seconds": trained["wall_seconds"],
        "resumed_at_step": first - 1 if first and first > 1 else None,
        "final_train_loss": history[-1]["train/loss"],
        "final_validation_loss": next((h["validation/loss"] for h in reversed(history) if "validation/loss" in h), None),
        # The tool loop on validation tasks during training (evaluation.during_training_every).
        "during_training": [
            {"step": h["step"], "call_validity": h["tool_eval/call_validity"], "exact_calls": h["tool_eval/argument_accuracy"]}
            for h in history
            if "tool_eval/argument_accuracy" in h
        ],
        "training_provenance": json.loads(prov.read_text()) if prov.exists() else None,
    }


def train(sft: SFTConfig, reuse: bool) -> dict[str, Any]:
    """A finished run of ``sft`` (``reuse``), or the run trained: resumed from its latest
    checkpoint when an interrupted run of the same config is there, else from scratch.
    ``wall_seconds`` of a resumed run counts its last stretch only (``resumed_at_step`` says where)."""
    out = Path(sft.output_dir)
    if reuse and run_changes(sft) == []:
        return json.loads((out / "result.json").read_text())
    if run_changes(sft, finished=False) == [] and run_changes(sft) is None:
        return run_sft(sft)
    shutil.rmtree(out, ignore_errors=True)
    return run_sft(sft)


def headline(test: dict[str, Any]) -> dict[str, Any]:
    """The tier's quoted numbers: exact calls on seen tools (unseen apart), validity, over-call."""
    return {
        "exact_call_accuracy": test["seen"]["argument_accuracy"]["value"],
        "exact_call_accuracy_ci95": test["seen"]["argument_accuracy"]["ci95"],
        "exact_call_accuracy_unseen_tools": test["unseen"]["argument_accuracy"]["value"],
        "exact_call_accuracy_unseen_tools_ci95": test["unseen"]["argument_accuracy"]["ci95"],
        "unseen_needed_tool_tasks": test["unseen"]["argument_accuracy"]["n"],
        "call_validity": test["all"]["call_validity"]["value"],
        "call_validity_ci95": test["all"]["call_validity"]["ci95"],
        "over_call_rate": test["all"]["over_call_rate"]["value"],
        "over_call_rate_ci95": test["all"]["over_call_rate"]["ci95"],
    }


def record_trial(tier: str, name: str, overrides: Sequence[str], reuse: bool) -> dict[str, Any]:
    out = run_dir(tier, name)
    sft = bench_config(tier, out, overrides)
    trained = train(sft, reuse)
    checkpoint = trained["checkpoint"]
    validation = score(sft, checkpoint, "validation", None, out / "eval_validation", f"{tier} trial {name}")
    return {
        "config": f"configs/{tier}/sft.yaml",
        "overrides": list(overrides),
        "selected_on": "validation",
        **training_summary(trained, out),
        "validation": validation,
        "provenance": provenance(sft, overrides, out, machine_info()["machine"]),
    }


def record_tier(tier: str, eval_limit: int | None, trial: dict[str, Any] | None, trial_name: str | None, reuse: bool) -> dict[str, Any]:
    """The tier's config trained (or the promoted trial's run), scored on validation, then on test once."""
    out = Path(trial["provenance"]["run_dir"]) if trial else run_dir(tier, None)
    sft = bench_config(tier, out)
    if trial:
        changes = run_changes(sft)
        if changes is None:
            raise SystemExit(f"error: trial {tier}/{trial_name}: no finished run in {out} to promote")
        if changes:
            raise SystemExit(
                f"error: trial {tier}/{trial_name} differs from configs/{tier}/sft.yaml in {'; '.join(changes)}: "
                "put its settings in the config file first"
            )
        trained = json.loads((out / "result.json").read_text())
    else:
        trained = train(sft, reuse)
    label = f"{tier} SFT"
    result: dict[str, Any] = {
        "config": f"configs/{tier}/sft.yaml",
        "overrides": [],
        "selected_on": "validation",
        "promoted_from": f"{tier}/{trial_name}" if trial else None,
        **training_summary(trained, out),
        "validation": score(sft, trained["checkpoint"], "validation", None, out / "eval_validation", label),
    }
    test = score(sft, trained["checkpoint"], "test", eval_limit, out / "eval_test", label)
    result |= headline(test) | {"test": test}
    if tier == "smol":
        base = score(sft, "smollm2", "test", eval_limit, RUNS / "smol-base" / "eval_test", "SmolLM2-135M-Instruct (base)")
        result["base"] = {"call_validity": base["all"]["call_validity"]["value"] or 0.0, "test": base}
    result["provenance"] = provenance(sft, [], out, machine_info()["machine"])
    return result


def _rate(cell: dict[str, Any]) -> str:
    if cell["value"] is None:
        return "–"
    ci = f" [{cell['ci95'][0]:.2f}, {cell['ci95'][1]:.2f}]" if cell.get("ci95") else ""
    small = f" (n={cell['n']}, small)" if cell.get("small") else ""
    return f"{cell['value']:.3f}{ci}{small}"


def summary(results: dict[str, Any]) -> str:
    lines = [
        "Test split, scored once per tier (rates with bootstrap 95% intervals over tasks); settings chosen on validation.",
        "",
        "| tier | steps | train wall s | base validity | validity (all) | exact calls (seen tools) | exact calls (unseen tools) | over-call | validation exact (seen) | promoted from | run (UTC) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tier in ("tiny", "smol"):
        r = results.get(tier)
        if not r:
            continue
        t, v = r["test"], r["validation"]
        base = f"{r['base']['call_validity']:.3f}" if r.get("base") else "–"
        lines.append(
            f"| {tier} | {r['steps']} | {r['wall_seconds']:.0f} | {base} | {_rate(t['all']['call_validity'])} "
            f"| {_rate(t['seen']['argument_accuracy'])} | {_rate(t['unseen']['argument_accuracy'])} | {_rate(t['all']['over_call_rate'])} "
            f"| {_rate(v['seen']['argument_accuracy'])} | {r.get('promoted_from') or '–'} | {r['provenance']['date'][:16].replace('T', ' ')} |"
        )
    trials = results.get("trials", {})
    if trials:
        lines += [
            "",
            "Trials, validation split only:",
            "",
            "| trial | overrides | steps | train wall s | validity (all) | exact calls | over-call | run (UTC) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in trials.items():
            v = r["validation"]["all"]
            lines.append(
                f"| {name} | {' '.join(r['overrides']) or '(the config file)'} | {r['steps']} | {r['wall_seconds']:.0f} | {_rate(v['call_validity'])} "
                f"| {_rate(v['argument_accuracy'])} | {_rate(v['over_call_rate'])} | {r['provenance']['date'][:16].replace('T', ' ')} |"
            )
    for tier in ("tiny", "smol"):
        r = results.get(tier)
        if r and r["test"].get("misses"):
            m = r["test"]["misses"]
            tools = ", ".join(f"{k} {v['first_wrong']}/{v['expected_calls']}" for k, v in m["by_tool"].items())
            cats = ", ".join(f"{k} {v['missed']}/{v['tasks']}" for k, v in m["by_category"].items())
            lines += ["", f"{tier}, exact-call misses on test: by category (missed/tasks) {cats}; by tool (calls wrong or missing in the first wrong step / calls expected) {tools}."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", choices=["tiny", "smol"], required=True)
    parser.add_argument("--eval-limit", type=int, default=None, help="score only the first N test tasks")
    parser.add_argument("--reuse", action="store_true", help="take a finished run of the same config instead of training again")
    parser.add_argument("--trial", help="record the run as trials[TIER/NAME], scored on validation only")
    # Repeated --set flags add up (with a plain nargs="*" only the last would count, silently).
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="config overrides (a trial only)")
    parser.add_argument("--promote", metavar="NAME", help="record trial TIER/NAME as the tier: its test split scored once")
    args = parser.parse_args(argv)
    if args.set and not args.trial:
        parser.error("--set changes the tier's config: name the run with --trial")
    if args.trial and args.promote:
        parser.error("--trial and --promote: record the trial first, then promote it")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    path = RESULTS / "sft.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.trial:
        key, run = f"{args.tier}/{args.trial}", record_trial(args.tier, args.trial, args.set, args.reuse)
    else:
        trial = results.get("trials", {}).get(f"{args.tier}/{args.promote}") if args.promote else None
        if args.promote and trial is None:
            sys.exit(f"error: no trial {args.tier}/{args.promote} in {path}: record it with --trial first")
        key, run = args.tier, record_tier(args.tier, args.eval_limit, trial, args.promote, args.reuse)
    # Read again after the run: another tier may have been recorded in the meantime. Entries
    # without provenance were recorded before this benchmark wrote one: they are dropped.
    results = json.loads(path.read_text()) if path.exists() else {}
    trials = {k: v for k, v in results.get("trials", {}).items() if "provenance" in v}
    results = {k: v for k, v in results.items() if isinstance(v, dict) and "provenance" in v and k in ("tiny", "smol")}
    if args.trial:
        trials[key] = run
    else:
        results[key] = run
    results["trials"] = trials
    results |= machine_info()
    write_result("sft", results, summary(results))
    print(json.dumps({k: v for k, v in run.items() if k not in ("validation", "test", "base")}, indent=2))


if __name__ == "__main__":
    main()
