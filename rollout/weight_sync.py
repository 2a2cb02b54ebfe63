"""The receiving end of a weight sync, inside vLLM's worker process (``worker_extension_cls``).

Nothing is half-loaded: every bucket is staged as it arrives (its checksum checked while the
next one is on the wire) and the engine is touched only once the plan and every bucket are
verified. The plan is checked before any byte moves, in checkpoint names, against the
checkpoint the engine started from: each of its tensors exactly once (vLLM's stacked
``qkv_proj``/``gate_up_proj`` are loaded from the separate q/k/v and gate/up names), with the
engine's shapes and dtype; a LoRA adapter against its config and the base's shapes. A refusal
raises ``WeightSyncRefused`` naming what was wrong, and the engine keeps its weights.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch

from tooltune.weights import (
    CHECKSUM_BYTES,
    Expected,
    SyncGroup,
    SyncPlan,
    WeightSyncRefused,
    bucket_views,
    checksum_problem,
    digest,
    dtype_name,
    lora_expected,
    plan_problems,
    stored_checksum,
    tensor_checksum,
)


class WeightSyncExtension:
    """Mixed into vLLM's worker class: ``self`` is the worker."""

    def weight_sync_join(self, addr: str, port: int, first_rank: int, world: int, timeout_s: float) -> None:
        """Join the sync group; this worker's rank is ``first_rank`` plus its rank in the engine."""
        self._checkpoint = self._checkpoint_shapes()
        self._sync_group = SyncGroup(addr, port, first_rank + self.rank, world, timeout_s, self.model_runner.device)

    def receive_weights(
        self, plan: dict[str, Any], loaded_version: int, adapter_dir: str | None = None, buckets: list[bytes] | None = None
    ) -> dict[str, Any]:
        """Receive, verify and load one sync: from the sync group, or from ``buckets`` (bytes taken
        from the object store). Full weights are loaded into the engine; a LoRA adapter is
        written to ``adapter_dir`` for the engine to load. Raises ``WeightSyncRefused``."""
        t0 = time.perf_counter()
        group = getattr(self, "_sync_group", None) if buckets is None else None
        if buckets is None and group is None:
            raise RuntimeError("no sync group: join it first (ray_jobs.weight_sync.connect_weight_sync)")
        try:
            parsed = SyncPlan.model_validate(plan)
            problems = plan_problems(parsed, self._expected(parsed), loaded_version)
        except ValueError as e:
            problems = [str(e)]
        if group is not None and not group.all_agree(not problems):
            problems = problems or ["another receiver refused it"]
        if problems:
            raise WeightSyncRefused(f"weights of version {plan.get('version')} refused: " + "; ".join(problems))

        staged, problems, checksums = self._stage(parsed, group, buckets)
        received_s = time.perf_counter() - t0
        if group is not None and not group.all_agree(not problems):
            problems = problems or ["another receiver refused it"]
        if problems:
            raise WeightSyncRefused(f"weights of version {parsed.version} refused: " + "; ".join(problems))

        t = time.perf_counter()
        tensors = [view for i, bucket in enumerate(parsed.buckets) for view in bucket_views(staged[i], bucket)]
        if parsed.kind == "full":
            self.reload_weights(weights_iterator=iter(tensors))
            load_s = time.perf_counter() - t
            self._refresh_tied_lm_head()
        else:
            load_s = 0.0
            if self.rank == 0:
                _write_adapter(adapter_dir, dict(tensors), parsed.adapter_config)
        return {
            "digest": digest(checksums),
            "received_s": round(received_s, 4),
            "load_s": round(load_s, 4),
            "apply_s": round(time.perf_counter() - t, 4),
            "receive_s": round(time.perf_counter() - t0, 4),
        }

    def _stage(
        self, plan: SyncPlan, group: SyncGroup | None, buckets: list[bytes] | None
    ) -> tuple[list[torch.Tensor], list[str], list[tuple[int, int]]]:
        """Every bucket's bytes, what is wrong with them, and their checksums. Bucket i's checksum
        is checked while bucket i+1 is on the wire."""
        staged: list[torch.Tensor] = []
        problems: list[str] = []
        sizes = [bucket.nbytes + CHECKSUM_BYTES for bucket in plan.buckets]
        if buckets is not None and [len(b) for b in buckets] != sizes:
            return staged, [f"bucket sizes {[len(b) for b in buckets]} differ from the plan's {sizes}"], []
        work = None
        for i, size in enumerate(sizes):
            if group is not None:
                buffer = self._staging_buffer(i, size, group.device)
                work = group.broadcast(buffer)
            else:
                buffer = torch.frombuffer(bytearray(buckets[i]), dtype=torch.uint8)
            if staged:
                problems += _checked(staged[-1], plan.buckets[i - 1], i - 1)
            if work is not None:
                work.wait()
            staged.append(buffer)
        if staged:
            problems += _checked(staged[-1], plan.buckets[-1], len(staged) - 1)
        return staged, problems, [stored_checksum(b, bucket) for b, bucket in zip(staged, plan.buckets)]

    def release_staging(self) -> None:
        """Drop the staging buffers (before the engine sleeps: colocated learners need the memory)."""
        self.__dict__.pop("_staging", None)

    def _staging_buffer(self, index: int, size: int, device: torch.device) -> torch.Tensor:
        # Kept from one sync to the next (about one copy of the weights): allocating and first
        # touching 270 MB took 0.2-0.3 s here, more than moving the bytes. (A GPU's caching
        # allocator would keep that memory reserved anyway.)
        staging = self.__dict__.setdefault("_staging", [])
        if index == len(staging):
            staging.append(torch.empty(0, dtype=torch.uint8, device=device))
        if staging[index].numel() != size:
            staging[index] = torch.empty(size, dtype=torch.uint8, device=device)
        return staging[index]

    def weight_sync_probe(self, nbytes: int) -> float:
        """Seconds of one raw broadcast of ``nbytes`` into this process (see the sender's probe),
        into memory already touched, as a sync's staging buffers are."""
        data = torch.zeros(nbytes, dtype=torch.uint8, device=self._sync_group.device)
        self._sync_group.all_agree(True)
        t0 = time.perf_counter()
        self._sync_group.broadcast(data).wait()
        return time.perf_counter() - t0

    def weights_digest(self) -> str:
        """sha256 of the engine's own (base) parameters as it holds them: LoRA syncs must leave it
        unchanged."""
        model = self.model_runner.model
        return tensor_checksum({n: p for n, p in model.named_parameters() if "lora" not in n})

    # ---- what this engine holds ---------------------------------------------------------
    def _checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the checkpoint the engine started from, read from its safetensors
        headers (no tensor is read). A tied LM head is not a tensor the engine loads."""
        from pathlib import Path

        from safetensors import safe_open

        model_config = self.vllm_config.model_config
        files = sorted(Path(model_config.model).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{model_config.model}: no *.safetensors to learn the engine's weight names from")
        shapes = {}
        for path in files:
            with safe_open(str(path), "pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        if getattr(model_config.hf_config, "tie_word_embeddings", False):
            shapes.pop("lm_head.weight", None)
        return shapes

    def _expected(self, plan: SyncPlan) -> Expected:
        if not hasattr(self, "_checkpoint"):
            self._checkpoint = self._checkpoint_shapes()
        if plan.kind == "full":
            dtype = dtype_name(self.vllm_config.model_config.dtype)
            return {name: (shape, dtype) for name, shape in self._checkpoint.items()}
        lora_config = self.vllm_config.lora_config
        if lora_config is None:
            raise WeightSyncRefused("a LoRA adapter for an engine started without rollout.enable_lora")
        return lora_expected(self._checkpoint, plan.adapter_config or {}, lora_config.max_lora_rank)

    def _refresh_tied_lm_head(self) -> None:
        # A tied LM head receives no weights of its own, so the in-place reload restores its old
        # kernel state; on CPU that holds a pre-packed GEMM of the old embedding. Re-pack it.
        model = self.model_runner.model
        lm_head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if lm_head is None or embed is None or not hasattr(lm_head, "quant_method"):
            return
        if lm_head.weight.data_ptr() == embed.weight.data_ptr():
            lm_head.quant_method.process_weights_after_loading(lm_head)


def _checked(buffer: torch.Tensor, bucket, index: int) -> list[str]:
    problem = checksum_problem(buffer, bucket, index)
    return [problem] if problem else []


def _write_adapter(directory: str | None, tensors: dict[str, torch.Tensor], config: dict[str, Any] | None) -> None:
    """A peft adapter directory, as vLLM loads one."""
    from safetensors.torch import save_file

    if directory is None:
        raise ValueError("a LoRA sync needs a directory to write the adapter to")
    os.makedirs(directory, exist_ok=True)
    # Views share their bucket's storage, which safetensors refuses to write: copies (an adapter is small).
    save_file({k: v.clone() for k, v in tensors.items()}, os.path.join(directory, "adapter_model.safetensors"))
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f)
