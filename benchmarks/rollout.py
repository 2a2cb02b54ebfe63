"""Rollout benchmark: sampled tokens per second of the vLLM worker against the transformers one,
and of the tool loop with each episode at its own pace against a barrier at every turn.

    python -m benchmarks.rollout --loop-model DIR  # the recorded run (both parts)
    python -m benchmarks.rollout --quick           # a smoke run of the harness (prints, writes nothing)

Generation. Same model (SmolLM2-135M-Instruct, converted by ``tooltune models prepare smollm2``), same dtype,
same prompts (tool-world queries rendered with the tool template), same sampling (temperature
1.0, ``ignore_eos`` so every sample is exactly ``max_new_tokens`` long and both sides count the
same tokens). Each side runs with its best settings, measured here rather than assumed: vLLM
with each CPU binding in ``--vllm-bind``, transformers with every core and each batch size in
``--hf-batch``; the fastest of each is compared. Every measurement runs in a fresh process, so
no engine or thread binding of one leaks into the next. Only ``generate`` is timed, after a
warm-up call; engine start-up is reported apart.

Tool loop. Held-out tool-world tasks (the test split: single, parallel, multi-step and no-tool)
through ``rollout.agent_loop`` on one vLLM worker (bf16, the faster binding above), sampling on
(temperature 1, per-request seeds, so both schedules sample the same episodes), the world's real
tools each slowed by ``--tool-latency-ms`` (an API's round trip). The same worker runs both
schedules, prefix cache emptied before each: ``turn_barrier`` (every live episode finishes its
turn before any starts the next, the loop's earlier algorithm) and ``episode`` (continuous
batching). The engine's idle share is the share of the loop's wall time in which the engine had
no request to run, measured in its own step loop. ``--loop-model`` should call tools (an SFT
checkpoint): SmolLM2-Instruct itself almost never does, and then no tool ever runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.common import OtherCpuShare, machine_info, write_result
from tooltune.provenance import provenance

MODEL_NAME = "SmolLM2-135M-Instruct"
# Above this share of the CPU used by other processes during a run, the result says so.
BUSY = 0.05


def tool_prompts(model_dir: str, count: int, seed: int) -> list[list[int]]:
    """``count`` tool-world queries, each rendered with its offered tools and the tool template."""
    from transformers import AutoTokenizer

    from tooltune.chat import render_prompt
    from tooltune.world import WorldConfig, generate_world

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tasks = generate_world(WorldConfig(seed=seed, n_train=0, n_validation=0, n_test=count))["test"]
    messages = [[{"role": "user", "content": t.query}] for t in tasks]
    texts = [render_prompt(tokenizer, m, t.tools) for m, t in zip(messages, tasks)]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


# ---- one measurement, in its own process ------------------------------------------------------
def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Start one worker, warm it up, time one ``generate`` over all prompts, shut it down."""
    if spec["engine"] == "loop":
        return measure_loop(spec)
    prompts = json.loads(Path(spec["prompts_file"]).read_text())
    t0 = time.perf_counter()
    if spec["engine"] == "vllm":
        from rollout.vllm_worker import RolloutWorker

        worker = RolloutWorker(spec["config"])
    else:
        from rollout.hf_worker import HFRolloutWorker

        worker = HFRolloutWorker(spec["config"])
    startup = time.perf_counter() - t0
    try:
        worker.generate(prompts[:2], {"n": 1, "temperature": 1.0, "max_tokens": 8})
        with OtherCpuShare() as others:
            t0 = time.perf_counter()
            out = worker.generate(prompts, spec["sampling"])
            seconds = time.perf_counter() - t0
    finally:
        worker.shutdown()
    tokens = sum(len(s.token_ids) for r in out for s in r.samples)
    return {
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "startup_s": round(startup, 1),
        "others_cpu_share": others.value,
    }


def slowed_registry(latency_s: float, calls: list[str]) -> Any:
    """The world's tools, each call first waiting ``latency_s`` (and logged in ``calls``)."""
    from tooltune.tools import ToolRegistry
    from tooltune.world import world_registry

    registry = ToolRegistry()
    for tool in world_registry():

        def slow(_fn=tool.fn, _name=tool.name, **arguments: Any) -> Any:
            time.sleep(latency_s)
            calls.append(_name)
            return _fn(**arguments)

        registry.add(tool.name, tool.description, tool.parameters, slow)
    return registry


def measure_loop(spec: dict[str, Any]) -> dict[str, Any]:
    """One worker; after a warm-up, the same tasks through the loop under each schedule, ``repeats``
    times in alternating order (on a shared machine, load that drifts then falls on both)."""
    from transformers import AutoTokenizer

    from rollout.agent_loop import LoopConfig, run_episodes
    from rollout.vllm_worker import RolloutWorker
    from tooltune.world import WorldConfig, generate_world

    tasks = generate_world(WorldConfig(seed=spec["seed"], n_train=0, n_validation=0, n_test=spec["tasks"]))["test"]
    tokenizer = AutoTokenizer.from_pretrained(spec["config"]["model"])
    calls: list[str] = []
    registry = slowed_registry(spec["tool_latency_s"], calls)
    loop = LoopConfig.model_validate(spec["loop"])
    worker = RolloutWorker(spec["config"])
    rows: dict[str, list[dict[str, Any]]] = {schedule: [] for schedule in spec["schedules"]}
    order = [s for repeat in range(spec["repeats"]) for s in spec["schedules"][:: 1 if repeat % 2 == 0 else -1]]
    try:
        warm_up = loop.model_copy(update={"max_turns": 1, "max_new_tokens": 8})
        run_episodes(tasks[:4], worker, tokenizer, warm_up, registry)
        for schedule in order:
            worker.llm.reset_prefix_cache()
            calls.clear()
            worker.reset_engine_stats()
            with OtherCpuShare() as others:
                t0 = time.perf_counter()
                out = run_episodes(tasks, worker, tokenizer, loop.model_copy(update={"schedule": schedule}), registry)
                seconds = time.perf_counter() - t0
            engine = worker.engine_stats()
            tokens = sum(t.episode.num_generated_tokens for t in out)
            rows[schedule].append({
                "tokens": tokens,
                "seconds": round(seconds, 3),
                "tokens_per_s": round(tokens / seconds, 1),
                "engine_wall_s": round(engine["wall_s"], 3),
                "engine_idle_s": round(engine["idle_s"], 3),
                "engine_step_s": round(engine["step_s"], 3),
                "engine_steps": engine["steps"],
                "turns": sum(len(t.episode.turns) for t in out),
                "tool_calls": len(calls),
                "end_reasons": dict(Counter(t.episode.end_reason.value for t in out)),
                "others_cpu_share": others.value,
            })  # fmt: skip
    finally:
        worker.shutdown()
    return {"rows": {schedule: _pooled(repeats) for schedule, repeats in rows.items()},
            "categories": dict(Counter(t.category for t in tasks))}  # fmt: skip


def _pooled(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """One schedule's repeats as one run: totals, and shares of the total time."""
    keys = ("tokens", "seconds", "engine_wall_s", "engine_idle_s", "engine_step_s")
    total = {k: sum(r[k] for r in repeats) for k in keys}
    others = [r["others_cpu_share"] for r in repeats]
    return {
        "tokens": total["tokens"],
        "seconds": round(total["seconds"], 3),
        "tokens_per_s": round(total["tokens"] / total["seconds"], 1),
        "engine_idle_share": round(total["engine_idle_s"] / total["engine_wall_s"], 4),
        "engine_step_share": round(total["engine_step_s"] / total["engine_wall_s"], 4),
        "engine_steps": sum(r["engine_steps"] for r in repeats),
        "turns": sum(r["turns"] for r in repeats),
        "tool_calls": sum(r["tool_calls"] for r in repeats),
        "others_cpu_share": None if None in others else round(sum(others) / len(others), 3),
        "repeats": repeats,
    }


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.rollout", "--child", json.dumps(spec), "--child-out", str(out)]
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{spec['engine']} measurement failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


# ---- the comparisons --------------------------------------------------------------------------
def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from tooltune.models import prepare_smollm2

    # Taken before anything runs: the load at the end includes this benchmark's own threads.
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    model = str(prepare_smollm2())
    result: dict[str, Any] = {}
    bind = args.vllm_bind[0]
    if "generate" in args.parts:
        result |= generate_rows(args, model)
        bind = result["runs"][result["best_vllm"]]["config"]["cpu_threads_bind"]
    if "loop" in args.parts:
        result |= loop_rows(args, model if args.loop_model == "smollm2" else args.loop_model, bind)
    result["load_avg_at_start"] = load_at_start
    busy = {k: r["others_cpu_share"] for k, r in _all_runs(result).items() if (r["others_cpu_share"] or 0) > BUSY}
    notes = [args.note] if args.note else []
    if busy:
        notes.append(f"other processes used this share of the machine's CPU during these runs: {busy}")
    if notes:
        result["note"] = "; ".join(notes)
    info = machine_info()
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "child_out", "note")}
    return result | info | {"provenance": provenance(settings, machine=info["machine"])}


def _all_runs(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    loop = {f"loop {k}": r for k, r in result.get("loop", {}).get("runs", {}).items()}
    return result.get("runs", {}) | loop


def generate_rows(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """The fastest vLLM and transformers settings, on the same prompts and sampling."""
    prompts = tool_prompts(model, args.prompts, args.seed)
    # No per-request seed: both workers are seeded at start (the transformers worker has no
    # per-request seed in a batch).
    sampling = {"n": args.n, "temperature": 1.0, "max_tokens": args.max_new_tokens, "ignore_eos": True}
    longest = max(len(p) for p in prompts) + args.max_new_tokens
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps(prompts))
        base = {"prompts_file": str(prompts_file), "sampling": sampling}
        for attn in args.hf_attn:
            for batch in args.hf_batch:
                config = {"model": model, "dtype": args.dtype, "seed": args.seed, "attn_implementation": attn,
                          "max_batch_sequences": batch, "num_threads": args.hf_threads}  # fmt: skip
                name = f"hf attn={attn} batch={batch}"
                runs[name] = run_child({**base, "engine": "hf", "config": config}) | {"config": config}
                print(f"{name}: {runs[name]}", flush=True)
        for bind in args.vllm_bind:
            config = {"model": model, "dtype": args.dtype, "seed": args.seed, "max_model_len": max(1024, longest),
                      "kv_cache_gib": args.vllm_kv_cache_gib, "cpu_threads_bind": bind}  # fmt: skip
            runs[f"vllm bind={bind}"] = run_child({**base, "engine": "vllm", "config": config}) | {"config": config}
            print(f"vllm bind={bind}: {runs[f'vllm bind={bind}']}", flush=True)

    best_hf = max((k for k in runs if k.startswith("hf")), key=lambda k: runs[k]["tokens_per_s"])
    best_vllm = max((k for k in runs if k.startswith("vllm")), key=lambda k: runs[k]["tokens_per_s"])
    if runs[best_hf]["tokens"] != runs[best_vllm]["tokens"]:
        raise RuntimeError(f"token counts differ: hf {runs[best_hf]['tokens']} vs vllm {runs[best_vllm]['tokens']}")
    vllm_tps, hf_tps = runs[best_vllm]["tokens_per_s"], runs[best_hf]["tokens_per_s"]
    return {
        "vllm_tokens_per_s": vllm_tps,
        "hf_tokens_per_s": hf_tps,
        "ratio": round(vllm_tps / hf_tps, 2),
        "model": MODEL_NAME,
        "dtype": args.dtype,
        "prompts": len(prompts),
        "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1),
        "samples_per_prompt": args.n,
        "max_new_tokens": args.max_new_tokens,
        "tokens_per_side": runs[best_vllm]["tokens"],
        "sampling": sampling,
        "best_vllm": best_vllm,
        "best_hf": best_hf,
        "runs": runs,
    }


def loop_rows(args: argparse.Namespace, model: str, bind: str) -> dict[str, Any]:
    """The tool loop under both schedules, on the same worker, tasks and seeds."""
    loop = {
        "max_turns": args.loop_max_turns,
        "max_new_tokens": args.loop_max_new_tokens,
        "max_total_tokens": 2048,
        "samples_per_task": args.loop_samples,
        "sampling": {"temperature": 1.0, "seed": args.seed},
    }
    config = {"model": model, "dtype": args.dtype, "seed": args.seed, "max_model_len": 2048,
              "kv_cache_gib": args.vllm_kv_cache_gib, "cpu_threads_bind": bind}  # fmt: skip
    spec = {"engine": "loop", "config": config, "loop": loop, "tasks": args.loop_tasks, "seed": args.seed,
            "tool_latency_s": args.tool_latency_ms / 1000, "schedules": ["turn_barrier", "episode"],
            "repeats": args.loop_repeats}  # fmt: skip
    measured = run_child(spec)
    runs = measured["rows"]
    print(f"loop: {runs}", flush=True)
    new, barrier = runs["episode"], runs["turn_barrier"]
    return {
        "loop_tokens_per_s": new["tokens_per_s"],
        "barrier_loop_tokens_per_s": barrier["tokens_per_s"],
        "loop_speedup": round(new["tokens_per_s"] / barrier["tokens_per_s"], 2),
        "loop_engine_idle_share": new["engine_idle_share"],
        "loop": {
            "model": model,
            "tasks": args.loop_tasks,
            "episodes": args.loop_tasks * args.loop_samples,
            "categories": measured["categories"],
            "tool_latency_ms": args.tool_latency_ms,
            "repeats": args.loop_repeats,
            "loop_config": loop,
            "worker_config": config,
            "runs": runs,
        },
    }


def summary(r: dict[str, Any]) -> str:
    lines = []
    if "runs" in r:
        lines += [
            f"{r['model']}, {r['dtype']}: {r['prompts']} tool prompts (mean {r['prompt_tokens_mean']:.0f} tokens) x "
            f"n={r['samples_per_prompt']} x {r['max_new_tokens']} sampled tokens (temperature 1, fixed length).",
            "",
            "| worker | settings | tokens/s | generate s | start-up s | CPU used by other processes |",
            "|---|---|---|---|---|---|",
        ]
        for name, run in r["runs"].items():
            best = " (best)" if name in (r["best_vllm"], r["best_hf"]) else ""
            worker = "vLLM `RolloutWorker`" if name.startswith("vllm") else "transformers `HFRolloutWorker`"
            lines.append(
                f"| {worker} | {name.split(' ', 1)[1]}{best} | {run['tokens_per_s']:.0f} | {run['seconds']:.1f} "
                f"| {run['startup_s']:.1f} | {_share(run['others_cpu_share'])} |"
            )
        speeds = f"{r['vllm_tokens_per_s']:.0f} vs {r['hf_tokens_per_s']:.0f} tokens/s"
        lines += ["", f"**vLLM / transformers: {r['ratio']:.2f}x** ({speeds}).", ""]
    if "loop" in r:
        loop = r["loop"]
        lines += [
            f"Tool loop: `{loop['model']}`, {loop['episodes']} episodes of {loop['tasks']} held-out tool-world tasks "
            f"({', '.join(f'{k} {v}' for k, v in loop['categories'].items())}), at most "
            f"{loop['loop_config']['max_turns']} turns of {loop['loop_config']['max_new_tokens']} sampled tokens, "
            f"every tool call slowed by {loop['tool_latency_ms']:g} ms; each schedule run {loop['repeats']}x, "
            "in alternating order, and pooled.",
            "",
            "| schedule | tokens/s | tokens | s | engine idle | in engine steps | engine steps | turns | tool calls "
            "| others' CPU |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, run in loop["runs"].items():
            lines.append(
                f"| {name} | {run['tokens_per_s']:.0f} | {run['tokens']} | {run['seconds']:.1f} "
                f"| {run['engine_idle_share']:.1%} | {run['engine_step_share']:.0%} | {run['engine_steps']} "
                f"| {run['turns']} | {run['tool_calls']} | {_share(run['others_cpu_share'])} |"
            )
        lines += ["", f"**Each episode at its own pace / a barrier at every turn: {r['loop_speedup']:.2f}x**; "
                  f"engine idle {r['loop_engine_idle_share']:.1%} of the loop's time."]  # fmt: skip
    return "\n".join(lines).strip()


def _share(value: float | None) -> str:
    return "?" if value is None else f"{value:.0%}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def csv(kind):
        return lambda text: [kind(x) for x in text.split(",") if x]

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="a small run of each part, one setting per side; prints, writes nothing"
    )
    p.add_argument("--parts", type=csv(str), default=["generate", "loop"], help="comma list; writes only with both")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--vllm-bind", type=csv(str), default=["auto", "all"], help="comma list of RolloutConfig.cpu_threads_bind"
    )
    p.add_argument("--vllm-kv-cache-gib", type=float, default=2.0)
    p.add_argument("--hf-batch", type=csv(int), default=[8, 16], help="comma list of sequences per generate call")
    p.add_argument("--hf-attn", type=csv(str), default=["eager"], help="comma list of attention implementations")
    p.add_argument("--hf-threads", type=int, default=None, help="torch threads (default: every usable core)")
    p.add_argument("--loop-model", default="smollm2", help="checkpoint directory, or smollm2 (the prepared base)")
    p.add_argument("--loop-tasks", type=int, default=32, help="held-out tool-world tasks")
    p.add_argument("--loop-samples", type=int, default=2, help="episodes per task")
    p.add_argument("--loop-max-turns", type=int, default=4)
    p.add_argument("--loop-max-new-tokens", type=int, default=128, help="per turn")
    p.add_argument("--tool-latency-ms", type=float, default=50.0, help="added to every tool call")
    p.add_argument("--loop-repeats", type=int, default=2, help="runs of each schedule, in alternating order")
    p.add_argument("--note", default=None, help="recorded with the result, e.g. that the machine was busy")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.parts) - {"generate", "loop"}
    if unknown or not args.parts:
        p.error(f"--parts takes generate and/or loop, got {args.parts}")
    if args.quick:
        args.prompts, args.n, args.max_new_tokens = min(args.prompts, 4), min(args.n, 2), min(args.max_new_tokens, 16)
        args.vllm_bind, args.hf_batch, args.hf_attn = args.vllm_bind[:1], args.hf_batch[:1], args.hf_attn[:1]
        args.loop_tasks, args.loop_samples, args.loop_repeats = min(args.loop_tasks, 8), 1, 1
        args.loop_max_turns = min(args.loop_max_turns, 3)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        Path(args.child_out).write_text(json.dumps(measure(json.loads(args.child))))
        return
    result = run_benchmark(args)
    if not args.quick and set(args.parts) == {"generate", "loop"}:
        path = write_result("rollout", result, summary(result))
        print(f"wrote {path}")
    print(summary(result))


if __name__ == "__main__":
    main()
