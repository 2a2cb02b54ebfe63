"""The local demo: a pretrained model that cannot call tools learns to, on this machine.

1. evaluate the base model on held-out tool-world tasks (the real tool loop, vLLM in Ray);
2. SFT: LoRA on the tool world's conversations (DeepSpeed learner in Ray);
3. evaluate the trained checkpoint on the same tasks;
4. print both rows and one task's transcript before and after.

    python -m ray_jobs.demo --config configs/smol/sft.yaml [key=value ...]   (what `make demo` runs)

The config is an SFT config (``ray_jobs/sft.py``); the demo turns its final evaluation on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray_jobs._cli import job_config, user_errors
from ray_jobs.evaluate import run_evaluation, world_tasks
from ray_jobs.sft import SFTConfig, base_model, evaluation_config, prepare_run_dir, run_sft
from tooltune.episode import Episode, Task
from tooltune.metrics import answer_is_correct, calls_match_exactly, metrics_markdown


def before_and_after(cfg: SFTConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The base model's test metrics, then the SFT run's result, whose ``evaluation`` holds the
    trained model's metrics on the same held-out tasks."""
    cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"enabled": True})})
    prepare_run_dir(cfg)  # a run that cannot train says so before the base model is evaluated
    base_out = Path(cfg.output_dir) / "eval_base"
    base = run_evaluation(evaluation_config(cfg, base_model(cfg), base_out, f"{cfg.model} (base)"))["world"]["test"]
    trained = run_sft(cfg)
    if trained["evaluation"] is None:
        raise RuntimeError(f"SFT in {cfg.output_dir} saved no final checkpoint to evaluate (an older run's is newer?)")
    return base, trained


def transcript(episode: dict[str, Any]) -> str:
    """The conversation of one episode, a line per message, as the model saw and wrote it."""
    lines = []
    for m in episode["messages"]:
        parts = [(m.get("content") or "").strip().replace("\n", " ")[:300]]
        parts += [f"{c['function']['name']}({c['function']['arguments']})" for c in m.get("tool_calls") or []]
        lines.append(f"  {m['role']:>9}: " + " ".join(p for p in parts if p))
    return "\n".join(lines)


def read_episodes(eval_dir: Path) -> dict[str, dict[str, Any]]:
    lines = (eval_dir / "episodes.jsonl").read_text(encoding="utf-8").splitlines()
    return {e["task_id"]: e for e in map(json.loads, lines)}


def solved(task: Task, episode: dict[str, Any]) -> bool:
    """The episode (a line of ``episodes.jsonl``) made the expected calls and ended with the
    expected answer."""
    ep = Episode.from_dict(episode)
    return calls_match_exactly(task, ep) and answer_is_correct(task, ep)


def shown_task(base_dir: Path, after_dir: Path, tasks: dict[str, Task]) -> tuple[dict, dict] | None:
    """A task that needs a tool, with both its episodes (before, after): the first one the trained
    model solved, else the first one."""
    before, after = read_episodes(base_dir), read_episodes(after_dir)
    needed = [(before[i], e) for i, e in after.items() if tasks[i].needs_tool and i in before]
    return next((pair for pair in needed if solved(tasks[pair[1]["task_id"]], pair[1])), needed[0] if needed else None)


def main(argv: list[str] | None = None) -> None:
    cfg = job_config(SFTConfig, __doc__.splitlines()[0], argv)
    with user_errors():
        base, trained = before_and_after(cfg)
    out = Path(cfg.output_dir)
    steps, seconds = trained["steps"], trained["wall_seconds"]
    print(f"\nheld-out tool-world tasks: {base['n_tasks']}; SFT: {steps} steps in {seconds:.0f} s\n")
    print(metrics_markdown({"before SFT": base, "after SFT": trained["evaluation"]}))
    tasks = {t.id: t for t in world_tasks(evaluation_config(cfg, trained["checkpoint"], out / "eval"))[0]["test"]}
    pair = shown_task(out / "eval_base", out / "eval", tasks)
    if pair:
        print("\nOne held-out task, before SFT:\n" + transcript(pair[0]) + "\n\nafter SFT:\n" + transcript(pair[1]))
    print(f"\nreports: {out / 'eval_base' / 'report.md'}, {out / 'eval' / 'report.md'}")
    print(f"checkpoint: {trained['checkpoint']}")


if __name__ == "__main__":
    main()
