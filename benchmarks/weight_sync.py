"""Weight-sync benchmark: a learner's weights into a vLLM worker, against the floor no sync avoids.

    python -m benchmarks.weight_sync            # the recorded run
    python -m benchmarks.weight_sync --quick    # fewer repetitions: prints, writes nothing

SmolLM2-135M-Instruct (``tooltune models prepare smollm2``) in bf16, a DeepSpeed learner and a
vLLM ``RolloutWorker`` in two Ray actors (two processes) on this machine, connected by
``ray_jobs.weight_sync`` over gloo. The floor has two parts, measured in the same processes:
``raw_broadcast_s``, one raw ``torch.distributed`` broadcast of the sync's bytes over the same
group, and ``engine_load_s``, vLLM's ``reload_weights`` of tensors already in the engine's
process (timed inside each sync). ``full_sync_s`` is one whole sync as the driver sees it:
plan, gather, pack, checksums, transport, verification, load. Each figure is the median of
``--reps`` runs after a warm-up; syncs and raw broadcasts alternate, so both see the same load
from other processes. A LoRA adapter (r=16 on every linear layer) is then synced
into an engine serving adapters: ``lora_sync_s`` and ``lora_bytes_ratio`` (its bytes over the
full sync's).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from benchmarks.common import machine_info, other_share, write_result
from tooltune.provenance import provenance
from tooltune.weights import WeightSyncConfig

MODEL_NAME = "SmolLM2-135M-Instruct"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Above this share of the CPU used by other processes during the run, the result says so.
BUSY = 0.05


def start(model: str, lora: bool) -> tuple[Any, Any]:
    """One learner rank and one rollout worker, in actors of a CPU each, joined in a sync group."""
    import ray

    from ray_jobs.weight_sync import connect_weight_sync
    from rollout.vllm_worker import RolloutWorker
    from trainers.learner import Learner

    learner_cfg = {"model": model, "dtype": "bfloat16", "zero_stage": 2, "micro_batch_size": 1}
    if lora:
        learner_cfg["lora"] = {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR}
    worker_cfg = {"model": model, "dtype": "bfloat16", "max_model_len": 512, "kv_cache_gib": 0.5}
    if lora:
        worker_cfg |= {"enable_lora": True, "max_lora_rank": 16}
    learner = ray.remote(Learner).options(num_cpus=1).remote(learner_cfg, 0, 1)
    worker = ray.remote(RolloutWorker).options(num_cpus=1).remote(worker_cfg)
    addr, port = ray.get(learner.master_address.remote())
    ray.get([learner.setup.remote(addr, port), worker.version.remote()])
    connect_weight_sync([learner], [worker])
    return learner, worker


def stop(*actors: Any) -> None:
    import ray

    ray.get([a.shutdown.remote() for a in actors if hasattr(a, "shutdown")])
    for actor in actors:
        ray.kill(actor)


def full_syncs(learner: Any, worker: Any, reps: int, cfg: WeightSyncConfig) -> tuple[list[dict[str, Any]], list[float]]:
    """``reps`` full syncs, each followed by one raw broadcast of the same bytes over the same
    group (the slower side's seconds), after a warm-up of both: interleaved, so that both see the
    same load from the machine's other processes."""
    import ray

    from ray_jobs.weight_sync import sync_weights

    syncs, raw = [], []
    for version in range(1, reps + 2):
        syncs.append(sync_weights([learner], [worker], version, cfg))
        receiving = worker.weight_sync_probe.remote(syncs[-1]["bytes"])
        raw.append(max(ray.get([receiving, learner.weight_sync_probe.remote(syncs[-1]["bytes"])])))
    return syncs[1:], raw[1:]


def lora_syncs(learner: Any, worker: Any, reps: int, cfg: WeightSyncConfig) -> list[dict[str, Any]]:
    from ray_jobs.weight_sync import sync_weights

    return [sync_weights([learner], [worker], version, cfg) for version in range(1, reps + 2)][1:]


class OthersCpu:
    """The share of the machine's CPU that processes other than this benchmark's (this one, its
    Ray and its actors: everything it started) used while timed work ran, over every ``with``
    block it was entered for (``benchmarks.common.OtherCpuShare`` counts only its own process,
    and here the work runs in actors)."""

    def __init__(self) -> None:
        self.busy_s = self.own_s = self.wall_s = 0.0

    def __enter__(self) -> OthersCpu:
        self._start = (_busy_seconds(), _tree_seconds(), time.monotonic())
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own, t0 = self._start
        self.busy_s += _busy_seconds() - busy
        self.own_s += _tree_seconds() - own
        self.wall_s += time.monotonic() - t0

    @property
    def value(self) -> float:
        return other_share(self.busy_s, self.own_s, self.wall_s, os.cpu_count() or 1)


def _busy_seconds() -> float:
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def _tree_seconds() -> float:
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from cluster.local import RayConfig, local_ray
    from tooltune.models import prepare_smollm2

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    model = str(prepare_smollm2())
    cfg = WeightSyncConfig(bucket_mb=args.bucket_mb)
    others = OthersCpu()
    with local_ray(RayConfig(object_store_gib=1.0)):
        learner, worker = start(model, lora=False)
        try:
            with others:
                full, raw = full_syncs(learner, worker, args.reps, cfg)
        finally:
            stop(worker, learner)
        learner, worker = start(model, lora=True)
        try:
            with others:
                lora = lora_syncs(learner, worker, args.reps, cfg)
        finally:
            stop(worker, learner)

    full_s, raw_s = median([s["sync_s"] for s in full]), median(raw)
    load_s = median([s["receiver"]["load_s"] for s in full])
    result = {
        "full_sync_s": full_s,
        "raw_broadcast_s": raw_s,
        "engine_load_s": load_s,
        "full_over_floor": round(full_s / (raw_s + load_s), 3),
        "full_over_raw": round(full_s / raw_s, 3),
        "lora_sync_s": median([s["sync_s"] for s in lora]),
        "lora_bytes_ratio": round(lora[0]["bytes"] / full[0]["bytes"], 4),
        "full_bytes": full[0]["bytes"],
        "lora_bytes": lora[0]["bytes"],
        "buckets": full[0]["buckets"],
        "bucket_mb": args.bucket_mb,
        "model": MODEL_NAME,
        "dtype": "bfloat16",
        "reps": args.reps,
        # Where a full sync's time goes (medians): the sender's packing (copy and checksum) and
        # waits on the wire; the receiver's time until every bucket was in and checked, and the
        # time to load them (vLLM's reload and the tied LM head's repacking).
        "full_parts_s": {
            "sender_pack_s": median([s["sender"]["pack_s"] for s in full]),
            "sender_send_wait_s": median([s["sender"]["send_wait_s"] for s in full]),
            "receiver_received_s": median([s["receiver"]["received_s"] for s in full]),
            "receiver_apply_s": median([s["receiver"]["apply_s"] for s in full]),
        },
        "runs": {"full_sync_s": [s["sync_s"] for s in full], "raw_broadcast_s": [round(r, 4) for r in raw],
                 "lora_sync_s": [s["sync_s"] for s in lora]},  # fmt: skip
        "others_cpu_share": others.value,
        "load_avg_at_start": load_at_start,
    }
    notes = [args.note] if args.note else []
    if others.value > BUSY:
        notes.append(f"other processes used {others.value:.0%} of the machine's CPU while the syncs ran")
    if notes:
        result["note"] = "; ".join(notes)
    info = machine_info()
    settings = {k: v for k, v in vars(args).items() if k != "note"}
    return result | info | {"provenance": provenance(settings, machine=info["machine"])}


def summary(r: dict[str, Any]) -> str:
    mb = r["full_bytes"] / 2**20
    return "\n".join(
        [
            f"{r['model']}, {r['dtype']}: learner -> vLLM worker in two processes, gloo, {mb:.0f} MB in "
            f"{r['buckets']} buckets of {r['bucket_mb']:g} MB; medians of {r['reps']} runs.",
            "",
            "| | seconds |",
            "|---|---|",
            f"| one full sync (plan, gather, pack, checksums, transport, verification, load) | {r['full_sync_s']:.3f} |",
            f"| floor: one raw broadcast of the same bytes, same processes | {r['raw_broadcast_s']:.3f} |",
            f"| floor: vLLM `reload_weights` of tensors in its process | {r['engine_load_s']:.3f} |",
            f"| LoRA adapter sync (r=16, all linear layers, {r['lora_bytes'] / 2**20:.1f} MB) | {r['lora_sync_s']:.3f} |",
            "",
            f"**full sync / floor: {r['full_over_floor']:.2f}x** (full sync / raw broadcast: {r['full_over_raw']:.2f}x); "
            f"**LoRA bytes / full bytes: {r['lora_bytes_ratio']:.3f}**.",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 repetitions; prints, writes nothing")
    p.add_argument("--reps", type=int, default=9, help="timed repetitions of each measurement (after a warm-up)")
    p.add_argument("--bucket-mb", type=float, default=WeightSyncConfig().bucket_mb)
    p.add_argument("--note", default=None, help="recorded with the result, e.g. that the machine was busy")
    args = p.parse_args(argv)
    if args.quick:
        args.reps = min(args.reps, 2)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run_benchmark(args)
    if not args.quick:
        print(f"wrote {write_result('weight_sync', result, summary(result))}")
    print(summary(result))


if __name__ == "__main__":
    main()
