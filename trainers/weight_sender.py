"""The learner side of a weight sync (the protocol is ``tooltune.weights``).

Rank 0 of a learner group plans a sync from parameter metadata alone (no gather). Then every
rank walks the plan bucket by bucket: under ZeRO-3 each bucket's parameters are gathered (a
collective, so every rank enters it) and released before the next, so the extra memory is about
one bucket. Rank 0 alone packs the bucket (cast to the receiver's dtype, checksum appended) and
sends it while the next bucket is gathered and packed. With LoRA only the adapter leaves, under
peft's saved names and with peft's adapter config: nothing is merged, the base never changes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, Literal

import torch

from tooltune.weights import CHECKSUM_BYTES, SyncGroup, SyncPlan, dtype_name, pack_bucket, plan_buckets


class WeightSender:
    """Sends one rank's model (a transformers causal LM, or a peft LoRA model around one)."""

    def __init__(self, module: torch.nn.Module, rank: int, zero3: bool):
        self.module, self.rank, self.zero3 = module, rank, zero3
        self.group: SyncGroup | None = None
        self._pack_buffers: list[torch.Tensor] = []

    def join(self, addr: str, port: int, rank: int, world: int, timeout_s: float) -> None:
        """Join the sync group as its sender (``rank`` 0; only learner rank 0 joins)."""
        if rank != 0 or self.rank != 0:
            raise ValueError(
                f"learner rank {self.rank} cannot join the sync group as {rank}: learner rank 0 sends, as rank 0"
            )
        self.group = SyncGroup(addr, port, 0, world, timeout_s, _device_of(self.module))

    @property
    def kind(self) -> Literal["full", "lora"]:
        from peft import PeftModel

        return "lora" if isinstance(self.module, PeftModel) else "full"

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """What a sync sends, in module order (layer by layer, as the engine reloads best).

        Full: parameters and persistent buffers in checkpoint names; a tied LM head appears once
        (parameters are listed once each), under the embedding's name. LoRA: the adapter's
        tensors, in the names peft saves them under (its adapter name left out).
        """
        if self.kind == "lora":
            adapter = self.module.active_adapter
            for name, param in self.module.named_parameters():
                if "lora_" in name:
                    yield name.replace(f".{adapter}.", "."), param
            return
        yield from self.module.named_parameters()
        for prefix, sub in self.module.named_modules():
            for name, buf in sub._buffers.items():
                if buf is not None and name not in sub._non_persistent_buffers_set:
                    yield (f"{prefix}.{name}" if prefix else name), buf

    def plan(self, version: int, bucket_bytes: int, dtype: str | None = None) -> SyncPlan:
        """The sync of ``version``: buckets of about ``bucket_bytes``, tensors cast to ``dtype``
        (the receiver's; None keeps each tensor's own). Under ZeRO-3 the shapes are the full ones."""
        specs = [(n, tuple(getattr(t, "ds_shape", t.shape)), dtype or dtype_name(t.dtype)) for n, t in self.tensors()]
        return plan_buckets(specs, bucket_bytes, version, self.kind, self.adapter_config())

    def adapter_config(self) -> dict[str, Any] | None:
        """peft's adapter config as its ``adapter_config.json`` holds it (sets as lists)."""
        if self.kind != "lora":
            return None
        config = self.module.peft_config[self.module.active_adapter].to_dict()
        return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))

    def send(self, plan: SyncPlan, transport: Literal["group", "object_store"]) -> dict[str, Any]:
        """Every rank calls this with the same ``plan``. Over the group, the receivers first agree
        on the plan (or all refuse it, and nothing moves), then the buckets stream, then they
        agree on what arrived. Rank 0 returns its timings and ``applied`` (group), or the
        buckets' object references (object store); other ranks return ``{}``."""
        import torch.distributed as dist

        t0 = time.perf_counter()
        tensors = dict(self.tensors())
        sending = self.rank == 0
        if sending and transport == "group" and self.group is None:
            raise RuntimeError("no sync group: join it first (ray_jobs.weight_sync.connect_weight_sync)")
        go = True
        if sending and transport == "group":
            go = self.group.all_agree(True)
        if self.zero3:
            # The other ranks take part in every gather, so they must learn that nothing will be sent.
            flag = torch.tensor([int(go)], device=_device_of(self.module))
            dist.broadcast(flag, src=0)
            go = bool(flag.item())
        if not go:
            return {"applied": False} if sending else {}

        stats = {"gather_s": 0.0, "pack_s": 0.0, "send_wait_s": 0.0}
        buffers = self._buffers(max(b.nbytes for b in plan.buckets) + CHECKSUM_BYTES) if sending else []
        pending: list[Any] = [None, None]
        refs = []
        for i, bucket in enumerate(plan.buckets):
            t = time.perf_counter()
            with _gathered([tensors[e.name] for e in bucket.entries], self.zero3):
                stats["gather_s"] += time.perf_counter() - t
                if not sending:
                    continue
                slot = i % 2
                if pending[slot] is not None:
                    t = time.perf_counter()
                    pending[slot].wait()
                    stats["send_wait_s"] += time.perf_counter() - t
                t = time.perf_counter()
                wire = buffers[slot][: bucket.nbytes + CHECKSUM_BYTES]
                pack_bucket([tensors[e.name] for e in bucket.entries], bucket, wire)
                stats["pack_s"] += time.perf_counter() - t
            if transport == "group":
                pending[slot] = self.group.broadcast(wire)
            else:
                refs.append(_put(wire))
        if not sending:
            return {}
        t = time.perf_counter()
        for work in pending:
            if work is not None:
                work.wait()
        stats["send_wait_s"] += time.perf_counter() - t
        out: dict[str, Any] = {k: round(v, 4) for k, v in stats.items()}
        if transport == "group":
            out["applied"] = self.group.all_agree(True)
        else:
            out["buckets"] = refs
        return out | {"send_s": round(time.perf_counter() - t0, 4), "bytes": plan.total_bytes}

    def _buffers(self, size: int) -> list[torch.Tensor]:
        """Two buffers: one is packed while the other is on the wire. Kept from one sync to the
        next, since fresh memory costs a page fault per page on first touch."""
        if not self._pack_buffers or self._pack_buffers[0].numel() < size:
            device = _device_of(self.module)
            self._pack_buffers = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2)]
        return self._pack_buffers

    def probe(self, nbytes: int) -> float:
        """Seconds of one raw broadcast of ``nbytes`` over the sync group, after a barrier: the
        transport's floor, against which a whole sync is measured."""
        data = torch.ones(nbytes, dtype=torch.uint8, device=self.group.device)
        self.group.all_agree(True)
        t0 = time.perf_counter()
        self.group.broadcast(data).wait()
        return time.perf_counter() - t0


def _gathered(params: list[torch.Tensor], enabled: bool):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, enabled=enabled)


def _put(wire: torch.Tensor):
    import ray

    return ray.put(wire.cpu().numpy())


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device

