"""Weight sync, the driver's side: where a learner group and the rollout workers meet.

    connect_weight_sync(learners, workers)             # once: the sync group
    timings = sync_weights(learners, workers, version)  # after each policy update

Learner rank 0 hosts a private process group (gloo on CPU, NCCL on GPU) that every rollout
engine process joins. A sync: rank 0 plans it (names, shapes, dtypes, buckets, version; no
gather), each worker starts receiving that plan, then every learner rank sends (under ZeRO-3
each bucket is a gather all ranks join; rank 0 broadcasts). The plan passes through here, the
bytes do not. The receivers agree on the plan before any byte moves and on the bytes before
any engine loads them, so a refusal (``WeightSyncRefused``, raised here) leaves every worker
on the version it had. With the object-store transport (``WeightSyncConfig.transport``),
rank 0 puts the buckets in the object store and the workers fetch them: nothing streams, but
it needs no network path between the processes beyond Ray's. There each worker verifies on its
own (no group to vote in): a refusal leaves that worker on its version, and the driver sees the
error; workers that accepted serve the new one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from tooltune.weights import SyncPlan, WeightSyncConfig


def _actors(learners: Any) -> Sequence[Any]:
    """A ``LearnerGroup`` or its actors."""
    return getattr(learners, "actors", learners)


def connect_weight_sync(learners: Any, workers: Sequence[Any], cfg: WeightSyncConfig | None = None) -> None:
    """Set up the sync group between learner rank 0 and every worker's engine processes
    (nothing to set up for the object-store transport)."""
    import ray

    cfg = cfg or WeightSyncConfig()
    if cfg.transport != "group":
        return
    sender = _actors(learners)[0]
    ranks = [t["ranks"] for t in ray.get([w.weight_target.remote() for w in workers])]
    world = 1 + sum(ranks)
    addr, port = ray.get(sender.master_address.remote())
    firsts = [1 + sum(ranks[:i]) for i in range(len(workers))]
    ray.get(
        [sender.weight_sync_join.remote(addr, port, 0, world, cfg.timeout_s)]
        + [w.weight_sync_join.remote(addr, port, first, world, cfg.timeout_s) for w, first in zip(workers, firsts)]
    )


def sync_weights(learners: Any, workers: Sequence[Any], version: int, cfg: WeightSyncConfig | None = None) -> dict[str, Any]:
    """Send the learners' current weights (or LoRA adapter) to every worker as ``version``.

    Returns timings: ``sync_s`` end to end as seen here (verification and loading included),
    the plan's ``bytes`` and ``buckets``, and rank 0's and the first worker's own timings.
    """
    import ray

    cfg = cfg or WeightSyncConfig()
    t0 = time.perf_counter()
    actors = _actors(learners)
    dtypes = {t["dtype"] for t in ray.get([w.weight_target.remote() for w in workers])}
    if len(dtypes) != 1:
        raise ValueError(f"rollout workers serve different dtypes {sorted(dtypes)}: one sync cannot fit them all")
    plan = ray.get(actors[0].weights_plan.remote(version, cfg.bucket_bytes, dtypes.pop()))
    if cfg.transport == "group":
        # Receivers first: the send blocks until every receiver has agreed on the plan.
        received = [w.receive_weights.remote(plan) for w in workers]
        sent = ray.get([a.send_weights.remote(plan, "group") for a in actors])[0]
        results = ray.get(received)
    else:
        sent = ray.get([a.send_weights.remote(plan, "object_store") for a in actors])[0]
        buckets = sent.pop("buckets")
        results = ray.get([w.receive_weights.remote(plan, buckets) for w in workers])
    return {
        "sync_s": round(time.perf_counter() - t0, 4),
        "bytes": SyncPlan.model_validate(plan).total_bytes,
        "buckets": len(plan["buckets"]),
        "kind": plan["kind"],
        "sender": sent,
        "receiver": results[0],
    }
