"""Distillation benchmark.

    python -m benchmarks.distill --part loss    # top-k loss vs full-vocab KL: peak memory, step time

1. ``loss``: the distillation loss's forward and backward from the student's final hidden states,
   at SmolLM2-135M's sizes (49,152-token vocabulary, hidden 576, a frozen LM head as in a LoRA
   student), on the same tokens and dtype, three ways:
   - the top-k loss (``trainers.distill.head_loss`` with the forward KL over the teacher's top-k
     plus the tail bucket, rows in chunks);
   - the full-vocabulary KL (``log_softmax`` of the whole batch's logits against the teacher's
     full log-prob rows, autograd), the obvious alternative;
   - the floor: the LM-head matmul alone with its backward to the hidden states.
   Extra peak memory is the peak while a variant runs less the memory before it (inputs, the
   teacher's targets of each kind, the head: allocated beforehand and not counted); on CPU the
   process's resident-set high-water mark, reset before each variant (Linux ``clear_refs``), on
   GPU ``torch.cuda.max_memory_allocated``. Times are medians of repetitions taken in turn.
   Writes ``topk_memory_ratio`` (top-k extra peak / full-vocab extra peak) and
   ``topk_time_over_floor`` (top-k step time / floor step time).

2. ``pipeline``: teacher scoring throughput (tokens/s, top-k of every position) of the sharded
   teacher with 1 stage and with 2 stages, on the same sequences (the smol tier's SFT
   conversations, SmolLM2-135M), the machine's CPUs split evenly over the stages; the two
   settings are taken in turn, ``reps`` times each. Writes ``pipeline_speedup`` (2 stages / 1).

3. ``learning``: teacher = the tiny tier's recorded SFT model, student = its first layer plus
   LoRA (``configs/tiny/distill.yaml``), each mode at the same steps and batch (the token count
   each trained on is recorded); teacher and students scored on the held-out split of the
   teacher's world. ``--trial NAME [--set k=v ...]`` scores validation only (trials[NAME]); the
   record (no ``--trial``) scores test, once. Writes ``teacher_accuracy``, ``student_accuracy``
   (logit mode), ``student_retention`` (student / teacher exact-call accuracy),
   ``response_based_accuracy``, ``on_policy_accuracy`` (None: the mode is not built yet) and
   ``student_params_ratio`` (all parameters, embeddings included, tied ones once).

Writes ``benchmarks/results/distill.json`` (each part's keys; a part run again replaces its own
keys and leaves the other parts' as recorded) and a section of ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import OtherCpuShare, machine_info, write_result
from tooltune.provenance import provenance
from trainers.distill import distill_token_loss, head_loss

RESULTS = Path(__file__).parent / "results"
NAME = "distill"


# ---- part 1: the loss --------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def extra_peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak memory while ``fn`` runs, less the memory in use just before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark to the current RSS
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def loss_variants(tokens: int, vocab: int, hidden: int, k: int, chunk_tokens: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """The three variants as closures over the same inputs (allocated here, before any is run)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(device=device, dtype=dtype).requires_grad_(False)
    torch.nn.init.normal_(head.weight, std=hidden**-0.5)
    h = (torch.randn(tokens, hidden, generator=g) * 2).to(device=device, dtype=dtype).requires_grad_(True)
    with torch.no_grad():
        teacher = torch.log_softmax((head(h) + torch.randn(tokens, vocab, generator=g).to(device, dtype)).float(), dim=-1)
        top, ids = teacher.topk(k, dim=-1)
        tail = teacher.scatter(-1, ids, float("-inf")).logsumexp(-1)
    targets = {"ids": ids.to(torch.int32), "logp": top, "tail_logp": tail}
    weights = torch.full((tokens,), 1.0 / tokens, device=device)
    grad_out = torch.randn(tokens, vocab, generator=g).to(device=device, dtype=dtype)

    def topk() -> None:
        total, _ = head_loss(h, head, distill_token_loss, targets, weights, chunk_tokens=chunk_tokens)
        total.backward()
        h.grad = None

    def full_vocab() -> None:
        student = torch.log_softmax(head(h).float(), dim=-1)
        total = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="sum") / tokens
        total.backward()
        h.grad = None

    def floor() -> None:
        torch.autograd.grad(head(h), h, grad_outputs=grad_out)

    # The same quantity two ways: the top-k loss with k = V would equal the full KL; with k < V
    # it is the bucketed KL, never above it.
    with torch.no_grad():
        check = {
            "topk_loss": head_loss(h, head, distill_token_loss, targets, weights, chunk_tokens=chunk_tokens)[0].item(),
            "full_kl": (torch.nn.functional.kl_div(torch.log_softmax(head(h).float(), -1), teacher, log_target=True, reduction="sum") / tokens).item(),
        }
    return {"topk": topk, "full_vocab": full_vocab, "floor": floor}, check


def run_loss(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    variants, check = loss_variants(args.tokens, args.vocab, args.hidden, args.k, args.chunk_tokens, dtype, device)
    peaks = {name: extra_peak_bytes(fn, device) for name, fn in variants.items()}  # also the warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    with OtherCpuShare() as others:
        for _ in range(args.reps):
            for name, fn in variants.items():
                times[name].append(timed(fn, device))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    result = {
        "topk_memory_ratio": round(peaks["topk"] / peaks["full_vocab"], 4),
        "topk_time_over_floor": round(med["topk"] / med["floor"], 4),
        "loss": {
            "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden, "k": args.k,
            "chunk_tokens": args.chunk_tokens, "dtype": args.dtype, "device": str(device), "reps": args.reps,
            "extra_peak_mib": {n: round(b / 2**20, 1) for n, b in peaks.items()},
            "step_s_median": {n: round(t, 4) for n, t in med.items()},
            "step_s": {n: [round(t, 4) for t in ts] for n, ts in times.items()},
            "full_vocab_time_over_floor": round(med["full_vocab"] / med["floor"], 4),
            "values": check,
            "others_cpu_share": others.value,
        },
    }  # fmt: skip
    return result


def loss_summary(r: dict[str, Any]) -> str:
    s = r["loss"]
    peaks, med = s["extra_peak_mib"], s["step_s_median"]
    return "\n".join(
        [
            f"Loss forward + backward from the student's hidden states: {s['tokens']} tokens, vocabulary {s['vocab']}, "
            f"hidden {s['hidden']}, {s['dtype']} on {s['device']}, frozen LM head, top-{s['k']} in chunks of "
            f"{s['chunk_tokens']} rows; medians of {s['reps']} runs taken in turn.",
            "",
            "| | extra peak memory (MiB) | step (s) |",
            "|---|---|---|",
            f"| top-k forward KL + tail bucket (`trainers.distill.head_loss`) | {peaks['topk']} | {med['topk']:.3f} |",
            f"| full-vocabulary KL (log_softmax + kl_div, autograd) | {peaks['full_vocab']} | {med['full_vocab']:.3f} |",
            f"| floor: LM-head matmul and its backward | {peaks['floor']} | {med['floor']:.3f} |",
            "",
            f"**topk_memory_ratio {r['topk_memory_ratio']:.3f}** (top-k / full-vocab extra peak), "
            f"**topk_time_over_floor {r['topk_time_over_floor']:.3f}**; the full-vocab KL takes "
            f"{s['full_vocab_time_over_floor']:.2f}x the floor.",
        ]
    )


# ---- part 2: the pipeline ----------------------------------------------------------------------


def pipeline_sequences(n: int, seq_len: int, model_dir: str) -> list[list[int]]:
    """The first ``n`` training conversations of the smol SFT world, tokenized for ``model_dir``."""
    from transformers import AutoTokenizer

    from ray_jobs.sft import SFTConfig
    from tooltune.config import load_config
    from trainers.sft import load_sft_conversations, tokenize_all

    data = load_config("configs/smol/sft.yaml", SFTConfig, [f"data.limit={n}"]).data
    tok = AutoTokenizer.from_pretrained(model_dir)
    return [ex["input_ids"] for ex in tokenize_all(tok, load_sft_conversations(data)[0][:n], [], seq_len)]


def run_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    import os

    from cluster.local import local_ray
    from tooltune.models import resolve_model
    from trainers.teacher import ShardedTeacher

    model = resolve_model(args.model)
    seqs = pipeline_sequences(args.sequences, args.seq_len, model)
    tokens = sum(map(len, seqs))
    cpus = float(len(os.sched_getaffinity(0)))
    rates: dict[int, list[float]] = {1: [], 2: []}
    # (No share of other processes' CPU here: the stages are Ray actors, other processes themselves.)
    with local_ray():
        # In turn, one teacher at a time (it holds the CPUs), each warmed up on one micro-batch.
        for _ in range(args.reps):
            for stages in (1, 2):
                teacher = ShardedTeacher(model, stages=stages, k=args.k, cpus_per_stage=cpus / stages, dtype=args.teacher_dtype,
                                         max_in_flight=args.max_in_flight, name=f"teacher-{stages}")  # fmt: skip
                try:
                    teacher.score_sequences(seqs[: args.micro_batch_size], args.micro_batch_size, 0)
                    start = time.perf_counter()
                    teacher.score_sequences(seqs, args.micro_batch_size, 0)
                    rates[stages].append(tokens / (time.perf_counter() - start))
                finally:
                    teacher.shutdown()
    med = {s: statistics.median(r) for s, r in rates.items()}
    return {
        "pipeline_speedup": round(med[2] / med[1], 4),
        "pipeline": {
            "model": args.model, "dtype": args.teacher_dtype, "sequences": len(seqs), "tokens": tokens, "k": args.k,
            "micro_batch_size": args.micro_batch_size, "max_in_flight": args.max_in_flight, "cpus": cpus, "reps": args.reps,
            "tokens_per_s_median": {f"{s}_stage": round(v, 1) for s, v in med.items()},
            "tokens_per_s": {f"{s}_stage": [round(x, 1) for x in r] for s, r in rates.items()},
        },
    }  # fmt: skip


def pipeline_summary(r: dict[str, Any]) -> str:
    p = r["pipeline"]
    med = p["tokens_per_s_median"]
    return "\n".join(
        [
            f"Teacher scoring (top-{p['k']} of every position) of {p['sequences']} tool-world conversations "
            f"({p['tokens']} tokens), {p['model']} {p['dtype']}, micro-batches of {p['micro_batch_size']}, "
            f"up to {p['max_in_flight']} in flight; {p['cpus']:g} CPUs split over the stages; medians of {p['reps']} runs.",
            "",
            "| stages | tokens/s |",
            "|---|---|",
            f"| 1 | {med['1_stage']} |",
            f"| 2 | {med['2_stage']} |",
            "",
            f"**pipeline_speedup {r['pipeline_speedup']:.3f}** (2 stages / 1 stage).",
        ]
    )


# ---- part 3: learning ---------------------------------------------------------------------------

TEACHER_RUN = "runs/bench-sft/tiny-trial-single-digits-10k"  # the tiny tier's recorded SFT (benchmarks/results/sft.json)
DISTILL_CONFIG = "configs/tiny/distill.yaml"
RUNS = Path("runs/bench-distill")
MODES = ("logit", "response")


def run_learning(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.sft import score
    from ray_jobs.distill import RUN_INDEPENDENT_KEYS, DistillConfig, run_distill
    from ray_jobs.sft import SFTConfig, saved_config_changes
    from tooltune.config import ConfigError, load_config
    from tooltune.models import resolve_model

    split = "validation" if args.trial else "test"
    teacher = resolve_model(args.teacher)
    sft = load_config("configs/tiny/sft.yaml", SFTConfig, ["evaluation.enabled=false"])
    name = f"trial-{args.trial}" if args.trial else "record"

    def accuracy(model: str, where: Path, label: str) -> dict[str, Any]:
        cell = score(sft, model, split, None, where, label)["all"]["argument_accuracy"]
        return {"exact_call_accuracy": cell["value"], "ci95": cell["ci95"]}

    result: dict[str, Any] = {"split": split, "teacher": teacher, "overrides": list(args.set), "selected_on": "validation"}
    result["teacher_scores"] = accuracy(teacher, RUNS / f"teacher-eval-{split}", "teacher (tiny SFT)")
    students = {}
    for mode in args.modes:
        overrides = [f"teacher.model={teacher}", f"mode={mode}", f"output_dir={RUNS / f'{name}-{mode}'}", "resume=true", *args.set]
        cfg = load_config(DISTILL_CONFIG, DistillConfig, overrides)
        out = Path(cfg.output_dir)
        try:
            changes = saved_config_changes(out, cfg, RUN_INDEPENDENT_KEYS)
        except (OSError, ConfigError):
            changes = None
        done = out / "result.json"
        finished = changes == [] and done.exists() and json.loads(done.read_text())["completed_steps"] == json.loads(done.read_text())["steps"]
        trained = json.loads(done.read_text()) if finished else run_distill(cfg)
        students[mode] = {
            "run_dir": str(out), "steps": trained["steps"], "train_tokens": trained.get("train_tokens"),
            "wall_seconds": trained["wall_seconds"], "student_params_ratio": trained["student_params_ratio"],
            "scoring": trained["scoring"], **accuracy(trained["checkpoint"], out / f"eval_{split}", f"student ({mode})"),
        }  # fmt: skip
    result["students"] = students
    t = result["teacher_scores"]["exact_call_accuracy"]
    logit, response = students.get("logit"), students.get("response")
    result |= {
        "teacher_accuracy": t,
        "student_accuracy": logit["exact_call_accuracy"] if logit else None,
        "student_retention": round(logit["exact_call_accuracy"] / t, 4) if logit and t else None,
        "response_based_accuracy": response["exact_call_accuracy"] if response else None,
        "on_policy_accuracy": None,
        "student_params_ratio": next(iter(students.values()))["student_params_ratio"] if students else None,
    }
    return result


def learning_summary(r: dict[str, Any]) -> str:
    rows = ["| model | exact-call accuracy (95% CI) | steps | training tokens |", "|---|---|---|---|"]
    t = r["teacher_scores"]
    rows.append(f"| teacher (tiny SFT) | {t['exact_call_accuracy']:.3f} {t['ci95']} | | |")
    for mode, s in r["students"].items():
        rows.append(f"| student, {mode} | {s['exact_call_accuracy']:.3f} {s['ci95']} | {s['steps']} | {s['train_tokens']} |")
    return "\n".join(
        [f"Tiny tier, {r['split']} split; student = the teacher's first layer + LoRA, "
         f"{r['student_params_ratio']} of its parameters.", "", *rows, "",
         f"**student_retention {r['student_retention']}** (logit student / teacher)."]  # fmt: skip
    )


# ---- recording ----------------------------------------------------------------------------------


def record(part: str, part_result: dict[str, Any], summary: str, settings: dict[str, Any], root: Path | None = None) -> Path:
    """This part's keys replace their previous values in ``distill.json``; the others stay.
    ``root``: the benchmarks directory (tests point it elsewhere)."""
    path = (root / "results" if root else RESULTS) / f"{NAME}.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    info = machine_info()
    parts = previous.get("parts", {})
    parts[part] = {"summary": summary, "provenance": provenance(settings, machine=info["machine"])}
    result = {k: v for k, v in previous.items() if k not in ("parts", "machine", "date")} | part_result
    result |= info | {"parts": parts}
    body = "\n\n".join(f"### {name}\n\n{p['summary']}" for name, p in parts.items())
    return write_result(NAME, result, body, root=root)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["loss", "pipeline", "learning"], required=True)
    p.add_argument("--trial", help="learning: record as trials[NAME], scored on validation only")
    p.add_argument("--set", nargs="*", default=[], help="learning: overrides of configs/tiny/distill.yaml")
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    p.add_argument("--teacher", default=TEACHER_RUN, help="learning: the teacher run or checkpoint")
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repetition; prints, writes nothing")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--model", default="smollm2", help="pipeline: the teacher ('smollm2', 'tiny' or a path)")
    p.add_argument("--teacher-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--max-in-flight", type=int, default=4)
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.vocab, args.reps, args.sequences = 256, 4096, 1, 8
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    parts = {"loss": (run_loss, loss_summary), "pipeline": (run_pipeline, pipeline_summary), "learning": (run_learning, learning_summary)}
    run, summarise = parts[args.part]
    result = run(args)
    summary = summarise(result)
    settings = {k: v for k, v in vars(args).items() if k != "quick"}
    if args.part == "learning" and args.trial:
        # A trial is kept beside the record, never in its keys.
        path = RESULTS / f"{NAME}.json"
        previous = json.loads(path.read_text()) if path.exists() else {}
        trials = previous.get("trials", {}) | {args.trial: result | {"summary": summary}}
        text = "\n\n".join(f"Trial {n} (validation):\n\n{t['summary']}" for n, t in trials.items())
        print(f"wrote {record('trials', {'trials': trials}, text, settings)}")
    elif not args.quick:
        print(f"wrote {record(args.part, result, summary, settings)}")
    print(summary)


if __name__ == "__main__":
    main()
