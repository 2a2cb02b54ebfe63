"""PPO benchmark: does PPO teach the tiny policy when a tool call is worth its cost, and how fast
is an iteration of our GRPO mode beside TRL's ``GRPOTrainer``.

    python -m benchmarks.ppo --trial NAME [--set k=v ...] [--seeds 0]  # PPO runs scored on validation only
    python -m benchmarks.ppo [--seeds 0 1 2]         # the config: every seed trained, test scored once
    python -m benchmarks.ppo --part throughput       # our GRPO vs TRL's, samples per second

1. The starting point: ``configs/tiny/sft-overcall.yaml`` (SFT whose few no-tool examples are
   chit-chat and general knowledge: it over-calls), trained here or taken from ``--sft-run DIR``
   (a finished run of that config, checked key by key).
2. PPO from it: ``configs/tiny/ppo-overcall.yaml`` once per seed (``train.seed`` and the sampling
   seed), each run resumed or reused when its directory holds the same config.
3. Scores: the SFT start and every seed's final policy on the held-out split of the SFT world,
   with the contrastive arithmetic pairs (validation's seed for a trial, test's for the record),
   by the evaluation job (greedy, vLLM). The test split is scored once per run directory.

A trial is the config with ``--set`` overrides; its runs and scores stay on validation. The
record (no ``--trial``) takes the config file as it is: put a chosen trial's settings there first.
A trial without overrides trains the record's runs themselves (scored on validation only), so
recording the config afterwards reuses them and adds the test scores.
The acceptance figures are read on every seed (``worst``), not only on their mean.

Writes ``benchmarks/results/ppo.json`` and a section of ``RESULTS.md``. The throughput part needs
TRL (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info, write_result
from benchmarks.sft import run_changes, score
from benchmarks.sft import train as train_sft
from ray_jobs.ppo import RUN_INDEPENDENT_KEYS, PPOConfig, run_ppo, train_prompts
from ray_jobs.sft import SFTConfig, saved_config_changes
from tooltune.config import ConfigError, load_config
from tooltune.provenance import provenance
from tooltune.world import generate_world
from tooltune.world_contrast import HELDOUT_SEEDS, ContrastSettings

RESULTS = Path(__file__).parent / "results"
RUNS = Path("runs/bench-ppo")
SFT_CONFIG = "configs/tiny/sft-overcall.yaml"
PPO_CONFIG = "configs/tiny/ppo-overcall.yaml"
# Pairs per trivial phrasing scored on each split (6 phrasings): 60 pairs on validation, 120 on test.
CONTRAST_PER_FORM = {"validation": 10, "test": 20}
HEADLINE = {
    "over_call_rate": "over_call_rate", "exact_call_accuracy": "argument_accuracy",
    "under_call_rate": "under_call_rate", "answer_accuracy": "final_answer_accuracy",
}  # fmt: skip
CONTRAST_KEYS = ("contrastive_trivial_direct", "contrastive_trivial_answered", "contrastive_large_called", "contrastive_large_answered")


def sft_config(out: Path) -> SFTConfig:
    return load_config(SFT_CONFIG, SFTConfig, [f"output_dir={out}", "evaluation.enabled=false"])


def sft_start(run: Path | None) -> tuple[SFTConfig, str]:
    """The SFT config and its final checkpoint: ``run`` when given (a finished run of the config),
    else the benchmark's own run, trained or reused."""
    out = run or RUNS / "sft-overcall"
    sft = sft_config(out)
    if run is not None:
        changes = run_changes(sft)
        if changes is None:
            raise SystemExit(f"error: --sft-run {run}: no finished run there")
        if changes:
            raise SystemExit(f"error: --sft-run {run} differs from {SFT_CONFIG} in {'; '.join(changes)}")
        return sft, json.loads((out / "result.json").read_text())["checkpoint"]
    return sft, train_sft(sft, reuse=True)["checkpoint"]


def ppo_config(checkpoint: str, out: Path, seed: int, overrides: Sequence[str] = ()) -> PPOConfig:
    seeded = [f"train.seed={seed}", f"loop.sampling.seed={seed}"]
    return load_config(PPO_CONFIG, PPOConfig, [*overrides, *seeded, f"model={checkpoint}", f"output_dir={out}", "resume=true"])


def check_heldout(sft: SFTConfig, ppo: PPOConfig) -> None:
    """The PPO world's held-out splits must be the SFT world's (the start and the result are
    scored on the same tasks), and no PPO training prompt or SFT training task may be a scored query."""
    a, b = generate_world(sft.data.world), generate_world(ppo.world)
    for split in ("validation", "test"):
        if [t.query for t in a[split]] != [t.query for t in b[split]]:
            raise SystemExit(f"error: {PPO_CONFIG}: world.{split} differs from {SFT_CONFIG}'s: keep the seed and split sizes")
    scored = {t.query for split in ("validation", "test") for t in a[split] + contrast_settings(sft, split).tasks()}
    for name, prompts in (("PPO training prompts", train_prompts(ppo, b)[0]), (f"{SFT_CONFIG} training tasks", a["train"])):
        shared = scored & {t.query for t in prompts}
        if shared:
            raise SystemExit(f"error: {len(shared)} {name} are scored queries, e.g. {sorted(shared)[:3]}")


def train_ppo(cfg: PPOConfig) -> dict[str, Any]:
    """A finished run of ``cfg`` reused, an interrupted one resumed, anything else trained afresh."""
    out = Path(cfg.output_dir)
    try:
        changes = saved_config_changes(out, cfg, RUN_INDEPENDENT_KEYS)
    except (OSError, ConfigError):
        changes = None
    if changes == []:
        try:
            done = json.loads((out / "result.json").read_text())
            if done["completed_steps"] == done["steps"]:
                return done
        except (OSError, ValueError, KeyError):
            pass
    elif out.exists():
        shutil.rmtree(out)
    return run_ppo(cfg)


def headline(scored: dict[str, Any]) -> dict[str, Any]:
    """The issue's four rates (held-out split, all tasks) with bootstrap intervals, and the
    contrastive pairs' decisions."""
    cells = {key: scored["all"][metric] for key, metric in HEADLINE.items()}
    out: dict[str, Any] = {key: c["value"] for key, c in cells.items()}
    out |= {f"{key}_ci95": c["ci95"] for key, c in cells.items()}
    out |= {key: scored["contrast"][key] for key in CONTRAST_KEYS} | {"contrast_pairs": scored["contrast"]["pairs"]}
    return out


def contrast_settings(sft: SFTConfig, split: str) -> ContrastSettings:
    """The contrastive pairs scored on ``split``, with the tools the SFT world offers."""
    return ContrastSettings(pairs_per_form=CONTRAST_PER_FORM[split], seed=HELDOUT_SEEDS[split], distractor_tools=sft.data.world.distractor_tools)


def scored_policy(sft: SFTConfig, model: str, split: str, eval_dir: Path, label: str) -> dict[str, Any]:
    return headline(score(sft, model, split, None, eval_dir, label, contrast_settings(sft, split)))


def learning(split: str, seeds: Sequence[int], overrides: Sequence[str], trial: str | None, sft_run: Path | None) -> dict[str, Any]:
    """The SFT start and PPO from it, every seed, scored on ``split``."""
    sft, start = sft_start(sft_run)
    sft_out = Path(sft.output_dir)
    result: dict[str, Any] = {
        "sft_config": SFT_CONFIG, "ppo_config": PPO_CONFIG, "overrides": list(overrides), "split": split,
        "selected_on": "validation", "sft_run": str(sft_out), "seeds": list(seeds),
        "sft": scored_policy(sft, start, split, sft_out / f"eval_{split}_contrast", "SFT start (over-calling)"),
    }  # fmt: skip
    runs = []
    # A trial of the config file as it is trains the record's own runs: recording it then reuses them.
    configs = {seed: ppo_config(start, RUNS / (f"trial-{trial}-seed{seed}" if overrides else f"ppo-seed{seed}"), seed, overrides) for seed in seeds}
    if configs:
        check_heldout(sft, next(iter(configs.values())))  # the seeds change neither world
    for seed, cfg in configs.items():
        out = Path(cfg.output_dir)
        trained = train_ppo(cfg)
        after = scored_policy(sft, trained["checkpoint"], split, out / f"eval_{split}", f"PPO seed {seed}")
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        runs.append({"seed": seed, "run_dir": str(out), "steps": trained["steps"], "wall_seconds": trained["wall_seconds"]} | after
                    | {"curve": [{k: h[k] for k in CURVE_KEYS if k in h} for h in history if any(k.startswith("eval/") for k in h)]})  # fmt: skip
    result["after_seeds"] = runs
    result |= summarise(result["sft"], runs)
    result["steps"] = runs[0]["steps"] if runs else 0
    result["wall_seconds"] = round(sum(r["wall_seconds"] for r in runs), 1)
    result["provenance"] = provenance(next(iter(configs.values()), sft), list(overrides), RUNS, machine_info()["machine"])
    return result


CURVE_KEYS = ("step", "reward/total", "eval/over_call_rate", "eval/argument_accuracy", "eval/contrastive_trivial_direct", "eval/contrastive_large_called")


def summarise(sft: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds, the drop in exact-call accuracy (points) and the acceptance read on the worst seed."""
    if not runs:
        return {}
    keys = [*HEADLINE, *CONTRAST_KEYS]
    after = {k: statistics.fmean(r[k] for r in runs) for k in keys if all(r[k] is not None for r in runs)}
    drops = [100 * (sft["exact_call_accuracy"] - r["exact_call_accuracy"]) for r in runs]
    worst = {
        "over_call_rate": max(r["over_call_rate"] for r in runs),
        "accuracy_drop_points": max(drops),
        "contrastive_trivial_direct": min(r["contrastive_trivial_direct"] for r in runs),
        "contrastive_large_called": min(r["contrastive_large_called"] for r in runs),
    }
    return {
        "after": after,
        "accuracy_drop_points": round(statistics.fmean(drops), 2),
        "contrastive_trivial_direct": after.get("contrastive_trivial_direct"),
        "contrastive_large_called": after.get("contrastive_large_called"),
        "worst_seed": worst,
        "acceptance": {
            "sft_over_call_at_least_20pct": sft["over_call_rate"] >= 0.20,
            "after_over_call_at_most_2pct": worst["over_call_rate"] <= 0.02,
            "accuracy_drop_at_most_1_point": worst["accuracy_drop_points"] <= 1.0,
            "contrastive_trivial_direct_at_least_95pct": worst["contrastive_trivial_direct"] >= 0.95,
            "contrastive_large_called_at_least_95pct": worst["contrastive_large_called"] >= 0.95,
        },
    }


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.ppo_throughput import measure

    return measure(steps=args.tp_steps, prompts=args.tp_prompts, k=args.tp_k, max_new_tokens=args.tp_new_tokens)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def summary(results: dict[str, Any]) -> str:
    lines = []
    rec = results.get("learning")
    rows = [("recorded (test)", rec)] if rec else []
    rows += [(f"trial {name} (validation)", r) for name, r in results.get("trials", {}).items()]
    if rows:
        lines += [
            "Tiny tier: PPO (GRPO, rule reward) from an over-calling SFT start. Rates on the held-out split of the SFT world; "
            "contrastive pairs: one phrasing with small operands (answer directly) and large ones (call the calculator).",
            "",
            "| run | seeds | steps | over-call SFT → after | exact calls SFT → after | drop (points) | trivial direct SFT → after | large called SFT → after |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in rows:
            s, a = r["sft"], r.get("after", {})
            lines.append(
                f"| {name} | {r['seeds']} | {r['steps']} | {_pct(s['over_call_rate'])} → {_pct(a.get('over_call_rate'))} "
                f"| {_pct(s['exact_call_accuracy'])} → {_pct(a.get('exact_call_accuracy'))} | {r.get('accuracy_drop_points')} "
                f"| {_pct(s['contrastive_trivial_direct'])} → {_pct(a.get('contrastive_trivial_direct'))} "
                f"| {_pct(s['contrastive_large_called'])} → {_pct(a.get('contrastive_large_called'))} |"
            )
        if rec:
            lines += ["", "Acceptance on the worst seed: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in rec["acceptance"].items()) + "."]
    tp = results.get("throughput")
    if tp:
        lines += ["", f"GRPO iteration throughput, SmolLM2-135M: ours {tp['ours_samples_per_s']:.2f} samples/s, TRL "
                  f"{tp['trl_samples_per_s']:.2f} samples/s ({tp.get('trl_mode')}): ratio {tp['trl_ratio']:.2f}."]  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["learning", "throughput", "all"], default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trial", help="record the runs as trials[NAME], scored on validation only")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="PPO config overrides (a trial only)")
    parser.add_argument("--sft-run", type=Path, help=f"a finished run of {SFT_CONFIG} to start from")
    parser.add_argument("--tp-steps", type=int, default=4)
    parser.add_argument("--tp-prompts", type=int, default=4)
    parser.add_argument("--tp-k", type=int, default=4)
    parser.add_argument("--tp-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    if args.set and not args.trial:
        parser.error("--set changes the config: name the runs with --trial")
    if args.trial and args.part != "learning":
        args.part = "learning"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.part in ("learning", "all"):
        split = "validation" if args.trial else "test"
        record(args.trial or "learning", learning(split, args.seeds, args.set, args.trial, args.sft_run), trial=bool(args.trial))
    if args.part in ("throughput", "all"):
        record("throughput", throughput(args) | {"provenance": provenance(None, [], None, machine_info()["machine"])})


def record(key: str, part: dict[str, Any], trial: bool = False) -> None:
    """Write one part (as soon as it is done: a later part's failure loses nothing). The file is
    read again first: only this part is replaced."""
    path = RESULTS / "ppo.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    trials = results.get("trials", {})
    if trial:
        trials[key] = part
    else:
        results[key] = part
    results["trials"] = trials
    flat = results.get("learning", {})
    results |= {k: flat.get(k) for k in ("sft", "after", "accuracy_drop_points", "contrastive_trivial_direct", "contrastive_large_called", "steps", "wall_seconds")}
    tp = results.get("throughput") or {}
    results |= {k: tp.get(k) for k in ("trl_samples_per_s", "ours_samples_per_s", "trl_ratio")}
    results |= machine_info()
    write_result("ppo", results, summary(results))
    print(json.dumps({k: v for k, v in results.items() if k not in ("learning", "trials", "throughput", "machine")}, indent=2, default=str))


if __name__ == "__main__":
    main()
