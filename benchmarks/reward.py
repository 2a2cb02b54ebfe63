"""Reward benchmark: does the reward model rank as the rules do, on prompts it never saw? And
how far does an AI judge agree with the rules?

    python -m benchmarks.reward [--skip-ai] [--train-prompts 400] ...

Tiny tier (the recorded tiny SFT model as policy and as the reward model's backbone, its own tool
world): preferences with the rule judge on the world's train split (the reward model trains
there), validation split (logged during training) and test split (scored once at the end, on
scorer actors); the reward model from ``configs/tiny/reward_model.yaml``. Reported:

- ``heldout_pairwise_accuracy``: the share of the test split's ordered pairs (policy samples and
  scripted contrasts, ``tooltune.contrasts``) whose better candidate the reward model scores
  higher, per category and over the policy's own samples alone, with a bootstrap 95% interval
  over prompts;
- ``prefers_direct_answer``: test trivial-math prompts (no tool needed, a calculator offered):
  the share where the direct right answer outscores a calculator call with the same answer;
- ``prefers_needed_call``: test prompts that need a tool: the share where the right call
  (gold episode) outscores a direct guess;
- ``scorer_episodes_per_s``: episodes scored per second by the scorer actors.

Smol tier: the recorded smol SFT model samples candidates on validation prompts and also judges
them (the AI judge, each prompt asked twice in reversed orders); ``ai_judge_agreement_with_rules``
(pairwise agreement and Kendall's tau with the rule judge) and ``ai_judge_invalid_replies``.

Writes ``benchmarks/results/reward.json`` and a section of ``RESULTS.md``; runs under
``runs/bench-reward``.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info, write_result
from cluster.placement import RoleConfig
from ray_jobs.preferences import PreferencesConfig, run_preferences
from ray_jobs.reward_model import RewardModelConfig, run_reward_model, start_scorers
from ray_jobs.sft import SFTConfig
from tooltune.config import load_config
from tooltune.metrics import bootstrap_interval
from tooltune.provenance import provenance

RUNS = Path("runs/bench-reward")
TINY_POLICY = "runs/bench-sft/tiny-trial-single-digits-10k"  # the recorded tiny tier (benchmarks/results/sft.json)
SMOL_POLICY = "runs/bench-sft/smol-trial-lora-150"  # the recorded smol tier
LOOP = {"max_turns": 4, "max_new_tokens": 160, "max_total_tokens": 2048, "sampling": {"temperature": 1.0, "seed": 0}}


def preferences(tier: str, policy: str, world, split: str, limit: int, samples: int, out: Path, reuse: bool = False, **update: Any) -> dict:
    """``configs/<tier>/preferences.yaml`` on ``split`` of ``world`` with ``policy``; its summary.
    ``reuse``: a run of the same config already in ``out`` is read back instead of run again."""
    cfg = load_config(f"configs/{tier}/preferences.yaml", PreferencesConfig)
    update = {k: (cfg.model_dump()[k] | v if isinstance(v, dict) else v) for k, v in update.items()}
    cfg = PreferencesConfig.model_validate(
        cfg.model_dump()
        | {"policy": policy, "world": world.model_dump(), "split": split, "limit": limit, "samples_per_prompt": samples}
        | {"loop": LOOP, "rollout": cfg.rollout.model_dump() | {"max_model_len": 2048}, "output_dir": str(out)}
        | update
    )
    done = out / "summary.json"
    if reuse and done.exists() and json.loads(done.read_text())["config"] == cfg.model_dump(mode="json"):
        print(f"reusing {done}")
        return json.loads(done.read_text())
    return run_preferences(cfg)


def probe_trajectories(tokenizer, world, limit: int) -> dict[str, list[tuple[Any, Any]]]:
    """For the test split's first ``limit`` tasks, the two probes' (better, worse) trajectories:
    scripted episodes played through the real tool loop, kept when both end in a final answer."""
    from rollout.agent_loop import LoopConfig
    from rollout.scripted import run_scripted
    from tooltune.contrasts import scripted_turns
    from tooltune.episode import EndReason
    from tooltune.world import generate_world, world_registry

    registry = world_registry(world)
    probes = {"prefers_direct_answer": ("gold", "unneeded_call"), "prefers_needed_call": ("gold", "direct_guess")}
    out: dict[str, list[tuple[Any, Any]]] = {name: [] for name in probes}
    loop = LoopConfig(max_turns=8, max_new_tokens=2048, max_total_tokens=2048)
    for task in generate_world(world)["test"][:limit]:
        for name, variants in probes.items():
            scripts = [scripted_turns(task, v, registry) for v in variants]
            if None in scripts:
                continue
            better, worse = run_scripted([(task, turns) for turns in scripts], tokenizer, loop, registry)
            if better.episode.end_reason == worse.episode.end_reason == EndReason.FINAL_ANSWER:
                out[name].append((better, worse))
    return out


def share_with_interval(per_prompt: dict[str, list[bool]]) -> dict[str, Any]:
    """The share of hits over all items, a bootstrap 95% interval over prompts, and the counts."""
    hits = [float(sum(v)) for v in per_prompt.values()]
    totals = [float(len(v)) for v in per_prompt.values()]
    if not sum(totals):
        return {"value": None, "ci95": None, "pairs": 0, "prompts": 0}
    interval = bootstrap_interval(hits, totals)
    return {
        "value": sum(hits) / sum(totals),
        "ci95": [round(interval[0], 4), round(interval[1], 4)] if interval else None,
        "pairs": int(sum(totals)),
        "prompts": len(per_prompt),
    }


def heldout_scores(checkpoint: str, world, test_file: Path, probe_limit: int, scorers: int, data_cfg) -> dict[str, Any]:
    """The test split scored once on ``scorers`` scorer actors: pairwise accuracy (all, per
    category, policy samples alone), the two probes (trajectories scored as PPO scores them,
    ``RewardScorer.score``), and the scorers' throughput against scoring in the driver."""
    import torch
    from transformers import AutoTokenizer

    from cluster.local import local_ray
    from tooltune.chat import reward_ids
    from tooltune.preferences import read_preferences
    from trainers.heads import ScalarHeadModel
    from trainers.reward_model import preference_pairs

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    pairs, dropped = preference_pairs(tokenizer, read_preferences(test_file), data_cfg)
    probes = probe_trajectories(tokenizer, world, probe_limit)
    runs = [run for rows in probes.values() for pair in rows for run in pair]
    sequences = list(dict.fromkeys([ids for p in pairs for ids in (p.chosen, p.rejected)]))
    sequences += [tuple(reward_ids(tokenizer, r.episode.messages, r.task.tools)) for r in runs]
    with local_ray():
        group, scorer = start_scorers(checkpoint, RoleConfig(num_ranks=scorers, cpus=2 / scorers))
        try:
            scorer.rm_scores([list(s) for s in sequences[:8]])  # warm-up
            t = time.time()
            scores = scorer.rm_scores([list(s) for s in sequences])
            seconds = time.time() - t
            probe_scores = scorer.score(runs)
        finally:
            group.shutdown()
    score = dict(zip(sequences, scores))

    # The obvious alternative: the same model scoring the same sequences in the driver, 8 at a time.
    model = ScalarHeadModel.from_pretrained(checkpoint).eval()
    t = time.time()
    with torch.inference_mode():
        for i in range(0, len(sequences), 8):
            batch = [list(s) for s in sequences[i : i + 8]]
            width = max(map(len, batch))
            ids = torch.tensor([s + [0] * (width - len(s)) for s in batch])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch])
            model(input_ids=ids, attention_mask=mask)
    in_process_seconds = time.time() - t

    def accuracy(selected) -> dict[str, Any]:
        per_prompt: dict[str, list[bool]] = {}
        for p in selected:
            per_prompt.setdefault(p.prompt_id, []).append(score[p.chosen] > score[p.rejected])
        return share_with_interval(per_prompt)

    # Policy samples are ids "<prompt>/s<i>" (ray_jobs.preferences); scripted contrasts "<prompt>/<variant>".
    sampled = [p for p in pairs if all(re.search(r"/s\d+$", i) for i in (p.chosen_id, p.rejected_id))]
    result: dict[str, Any] = {
        "heldout_pairwise_accuracy": accuracy(pairs),
        "heldout_pairwise_accuracy_by_category": {c: accuracy([p for p in pairs if p.category == c]) for c in sorted({p.category for p in pairs})},
        "heldout_pairwise_accuracy_policy_samples": accuracy(sampled),
        "heldout_pairs_too_long": dropped,
    }
    by_run = dict(zip(map(id, runs), probe_scores))
    for name, rows in probes.items():
        result[name] = share_with_interval({b.task.id: [by_run[id(b)].rm > by_run[id(w)].rm] for b, w in rows})
    result["scorer_episodes_per_s"] = len(sequences) / seconds
    result["scorer"] = {
        "actors": scorers, "episodes": len(sequences), "seconds": round(seconds, 2),
        "in_process_seconds": round(in_process_seconds, 2), "speedup_vs_in_process": round(in_process_seconds / seconds, 2),
    }  # fmt: skip
    return result


def reused_reward_model(run: str, cfg: RewardModelConfig) -> dict[str, Any]:
    """The result of a finished reward-model run whose run-changing settings equal ``cfg``'s
    (a trial chosen on validation, promoted by putting its settings in the tier config)."""
    from ray_jobs.reward_model import RUN_INDEPENDENT_KEYS
    from ray_jobs.sft import saved_config_changes

    changes = saved_config_changes(Path(run), cfg, RUN_INDEPENDENT_KEYS)
    if changes:
        raise SystemExit(f"error: {run} was trained with other settings than configs/tiny/reward_model.yaml: {'; '.join(changes)}")
    result = json.loads((Path(run) / "result.json").read_text())
    if result["completed_steps"] != result["steps"]:
        raise SystemExit(f"error: {run} stopped at step {result['completed_steps']} of {result['steps']}")
    print(f"reusing the reward model of {run}")
    return result | {"reused_run": run}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-prompts", type=int, default=400)
    parser.add_argument("--validation-prompts", type=int, default=100)
    parser.add_argument("--test-prompts", type=int, default=200)
    parser.add_argument("--samples", type=int, default=2, help="policy samples per prompt (besides the scripted contrasts)")
    parser.add_argument("--scorers", type=int, default=2, help="scorer actors")
    parser.add_argument("--ai-prompts", type=int, default=30)
    parser.add_argument("--skip-ai", action="store_true", help="leave the smol tier's AI judge out")
    parser.add_argument("--no-write", action="store_true", help="print, do not record")
    parser.add_argument("--reuse", action="store_true", help="read back preference runs of the same config instead of sampling again")
    parser.add_argument("--rm-run", help="a finished reward-model run (a trial) of the tier config's settings to score instead of training again")
    args = parser.parse_args(argv)

    t0 = time.time()
    tiny_world = load_config("configs/tiny/sft.yaml", SFTConfig).data.world
    prefs: dict[str, Any] = {}
    sizes = {"train": args.train_prompts, "validation": args.validation_prompts, "test": args.test_prompts}
    for split, n in sizes.items():
        prefs[split] = preferences("tiny", TINY_POLICY, tiny_world, split, n, args.samples, RUNS / f"tiny-preferences-{split}", args.reuse)
    rm_cfg = load_config(
        "configs/tiny/reward_model.yaml",
        RewardModelConfig,
        [f"model={TINY_POLICY}", f"data.train_files=[{RUNS}/tiny-preferences-train/rules.parquet]",
         f"data.validation_files=[{RUNS}/tiny-preferences-validation/rules.parquet]",
         f"output_dir={RUNS}/tiny-reward-model", "resume=false"],  # fmt: skip
    )
    trained = reused_reward_model(args.rm_run, rm_cfg) if args.rm_run else run_reward_model(rm_cfg)
    heldout = heldout_scores(trained["checkpoint"], tiny_world, RUNS / "tiny-preferences-test" / "rules.parquet", args.test_prompts, args.scorers, rm_cfg.data)

    result: dict[str, Any] = {
        "heldout_pairwise_accuracy": heldout["heldout_pairwise_accuracy"]["value"],
        "prefers_direct_answer": heldout["prefers_direct_answer"]["value"],
        "prefers_needed_call": heldout["prefers_needed_call"]["value"],
        "scorer_episodes_per_s": round(heldout["scorer_episodes_per_s"], 1),
        "tiny": {
            "policy": TINY_POLICY,
            "preferences": {s: {k: p[k] for k in ("prompts", "candidates", "duplicates_dropped", "scripted_incomplete", "judges")} for s, p in prefs.items()},
            "reward_model": {k: trained.get(k) for k in ("checkpoint", "steps", "data", "validation", "wall_seconds", "reused_run")},
            "test": heldout,
            # Settings were fixed before any run (configs/tiny/reward_model.yaml); the validation
            # split is only logged during training; the test split is scored once, here.
            "settings": "configs/tiny/reward_model.yaml, fixed in advance; validation logged, test scored once",
        },
    }
    if not args.skip_ai:
        smol_world = load_config("configs/smol/sft.yaml", SFTConfig).data.world
        judged = preferences(
            "smol", SMOL_POLICY, smol_world, "validation", args.ai_prompts, args.samples, RUNS / "smol-ai-judge",
            judges=["rules", "ai"], ai_judge={"model": SMOL_POLICY},
        )  # fmt: skip
        agreement = judged["agreement"].get("rules vs ai", {})
        result["ai_judge_agreement_with_rules"] = agreement.get("pairwise_agreement")
        result["ai_judge_kendall_tau_with_rules"] = agreement.get("kendall_tau")
        ai = judged["judges"]["ai"]
        result["ai_judge_invalid_replies"] = sum((ai.get("invalid_replies") or {}).values())
        result["smol"] = {"policy": SMOL_POLICY, "judge": SMOL_POLICY, "summary": {k: judged[k] for k in ("prompts", "candidates", "judges", "agreement", "timing")}}
    result |= {"wall_seconds": round(time.time() - t0, 1), "provenance": provenance(None, run_dir=RUNS)} | machine_info()
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))
    if not args.no_write:
        print(f"wrote {write_result('reward', result, summary(result))}")


def summary(result: dict[str, Any]) -> str:
    test = result["tiny"]["test"]

    def row(name: str, entry: dict[str, Any]) -> str:
        value = "n/a" if entry["value"] is None else f"{entry['value']:.3f}"
        ci = f"[{entry['ci95'][0]:.3f}, {entry['ci95'][1]:.3f}]" if entry.get("ci95") else ""
        return f"| {name} | {value} | {ci} | {entry['pairs']} pairs / {entry['prompts']} prompts |"

    lines = [
        "Reward model (tiny tier): trained on the rule judge's rankings of train prompts; scored once on "
        "test prompts it never saw (bootstrap 95% interval over prompts). Target: >= 0.90 on the first three rows.",
        "",
        "| metric | value | 95% interval | n |",
        "|---|---:|---|---|",
        row("heldout_pairwise_accuracy", test["heldout_pairwise_accuracy"]),
        row("prefers_direct_answer", test["prefers_direct_answer"]),
        row("prefers_needed_call", test["prefers_needed_call"]),
        row("held-out accuracy, policy samples only", test["heldout_pairwise_accuracy_policy_samples"]),
        *(row(f"held-out accuracy, {c}", e) for c, e in test["heldout_pairwise_accuracy_by_category"].items()),
        "",
        f"Scorer actors ({test['scorer']['actors']}): {result['scorer_episodes_per_s']} episodes/s, "
        f"{test['scorer']['speedup_vs_in_process']}x the same model scoring in the driver.",
    ]
    if "ai_judge_agreement_with_rules" in result:
        lines += [
            "",
            f"AI judge (smol SFT checkpoint) vs rules on {result['smol']['summary']['prompts']} validation prompts: "
            f"pairwise agreement {_num(result['ai_judge_agreement_with_rules'])}, Kendall's tau "
            f"{_num(result['ai_judge_kendall_tau_with_rules'])}, invalid replies {result['ai_judge_invalid_replies']}.",
        ]
    return "\n".join(lines)


def _num(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    main()
