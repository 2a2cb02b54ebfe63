"""When the tool loop's episodes generate, and on which workers.

``Scheduler`` sends each episode's turn at once, on its own (continuous batching, for workers
that take requests one at a time: ``generate_one``), or behind a barrier: once every live episode
is waiting, all their turns go as one batch (``schedule="turn_barrier"``, and workers that only
generate in batches). ``Workers`` puts local workers, Ray actor handles, lists of them and bare
``generate`` callables behind the same two calls.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import TYPE_CHECKING, Any

from rollout.pool import RolloutPool, first_line

if TYPE_CHECKING:
    from rollout.agent_loop import SamplingConfig


class Scheduler:
    """Generates the turns of ``live`` episodes: each at once, or with a barrier."""

    def __init__(self, workers: Workers, sampling: SamplingConfig, turn_end: int, live: int, barrier: bool):
        self.workers, self.sampling, self.turn_end = workers, sampling, turn_end
        self.live, self.barrier = live, barrier
        self.waiting: list[tuple[int, list[int], dict[str, Any], asyncio.Future]] = []
        self.dispatches: set[asyncio.Task] = set()

    async def generate(self, index: int, turn: int, prompt: list[int], budget: int) -> Any:
        sampling = self._sampling(index, turn, budget)
        if not self.barrier:
            return await self.workers.one(index, prompt, sampling)
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((index, prompt, sampling, future))
        self._release()
        return await future

    def leave(self) -> None:
        """An episode ended: the barrier stops waiting for it."""
        self.live -= 1
        self._release()

    def _release(self) -> None:
        if self.barrier and self.waiting and len(self.waiting) == self.live:
            # Episode order, not arrival order: the same batches whatever the tools' timing.
            batch, self.waiting = sorted(self.waiting, key=lambda w: w[0]), []
            task = asyncio.get_running_loop().create_task(self._dispatch(batch))
            self.dispatches.add(task)
            task.add_done_callback(self.dispatches.discard)

    async def _dispatch(self, batch: list[tuple[int, list[int], dict[str, Any], asyncio.Future]]) -> None:
        try:
            if self.workers.per_request:
                generations = await asyncio.gather(*(self.workers.one(i, p, s) for i, p, s, _ in batch))
            else:
                generations = await self.workers.batch([p for _, p, _, _ in batch], [s for _, _, s, _ in batch])
        except Exception as e:  # every waiting episode fails with the worker's error
            for *_, future in batch:
                future.set_exception(e)
            return
        for (*_, future), generation in zip(batch, generations):
            future.set_result(generation)

    def _sampling(self, index: int, turn: int, budget: int) -> dict[str, Any]:
        s = self.sampling
        out: dict[str, Any] = {"n": 1, "temperature": s.temperature, "top_p": s.top_p, "max_tokens": budget}
        out["stop_token_ids"] = [self.turn_end]
        if s.top_k:
            out["top_k"] = s.top_k
        if s.seed is not None:
            episode = index if self.workers.per_request else 0
            out["seed"] = (s.seed * 1_000_003 + episode * 1_009 + turn) % 2**31
        return out


class Workers:
    """One or more workers (local objects, Ray actor handles, or bare callables) behind one call;
    or a ``rollout.pool.RolloutPool``, whose workers may come and go during the rollout."""

    def __init__(self, worker: Any):
        self.pool: RolloutPool | None = worker if isinstance(worker, RolloutPool) else None
        if self.pool is not None:
            self.workers = self.pool.live() or self.pool.wait_live()
        else:
            self.workers = list(worker) if isinstance(worker, (list, tuple)) else [worker]
        if not self.workers:
            raise ValueError("no rollout worker given")
        self.per_request = all(_takes_requests(w) for w in self.workers)
        self.reissued = 0
        # Pool only: the oldest policy version a generation may come from (a worker restarted in
        # between serves an older one), each episode's worker, and one event per lost worker
        # that its other pending requests wait on beside their own reply.
        self.min_version: int | None = None
        self._assigned: dict[int, Any] = {}
        self._gone: dict[int, asyncio.Event] = {}

    async def one(self, index: int, prompt: list[int], sampling: dict[str, Any]) -> Any:
        """One generation. An episode stays on one worker: its earlier turns are in that
        engine's prefix cache. From a pool, a request whose worker is lost goes, unchanged, to
        another one."""
        if self.pool is None:
            method = self.workers[index % len(self.workers)].generate_one
            return await (method.remote(prompt, sampling) if hasattr(method, "remote") else method(prompt, sampling))
        from ray.exceptions import RayActorError

        while True:
            worker = await self._worker_for(index)
            call = asyncio.ensure_future(_awaited(worker.generate_one.remote(prompt, sampling)))
            gone = asyncio.ensure_future(self._gone_event(worker).wait())
            done, _ = await asyncio.wait({call, gone}, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if call not in done:  # its worker was lost meanwhile: abandon the request
                call.cancel()
                self._reissue(index)
                continue
            try:
                generation = call.result()
            except RayActorError as e:
                self._lose(worker, f"{type(e).__name__}: {first_line(e)}")
                self._reissue(index)
                continue
            served = [v for v in getattr(generation, "versions", []) if v is not None]
            if self.min_version is not None and served and min(served) < self.min_version:
                self._lose(worker, f"answered from policy version {min(served)} < {self.min_version}: restarted")
                self._reissue(index)
                continue
            return generation

    async def batch(self, prompts: list[list[int]], samplings: list[dict[str, Any]]) -> list[Any]:
        """One generation per prompt, over batched ``generate`` calls: one per sampling (requests
        near the end of their token budget differ in ``max_tokens``) and worker."""
        groups: dict[str, list[int]] = {}
        for index, sampling in enumerate(samplings):
            groups.setdefault(json.dumps(sampling, sort_keys=True), []).append(index)
        out: list[Any] = [None] * len(prompts)
        todo = list(groups.values())
        while todo:
            workers = self.workers if self.pool is None else (self.pool.live() or await asyncio.to_thread(self.pool.wait_live))
            calls = []
            for indices in todo:
                for worker, shard in zip(workers, _split(indices, len(workers))):
                    if shard:
                        calls.append((worker, shard, _submit(worker, [prompts[i] for i in shard], samplings[shard[0]])))
            todo = []
            for worker, shard, call in calls:
                try:
                    results = await call
                except Exception as e:
                    if self.pool is None or not _is_lost(e):
                        raise
                    self._lose(worker, f"{type(e).__name__}: {first_line(e)}")
                    self.reissued += len(shard)
                    self.pool.count("reissued", len(shard))
                    todo.append(shard)
                    continue
                if len(results) != len(shard):
                    raise RuntimeError(f"a worker returned {len(results)} results for {len(shard)} prompts")
                for index, result in zip(shard, results):
                    if len(result.samples) != 1:
                        raise RuntimeError(f"expected 1 sample per prompt, got {len(result.samples)}")
                    out[index] = result.samples[0]
        return out

    async def policy_version(self) -> int | None:
        """The version every worker serves (``version()``), or None when a worker cannot tell.
        A pool's workers serve its version (it catches up any that join)."""
        if self.pool is not None:
            self.min_version = self.pool.version
            return self.pool.version
        versions = set()
        for worker in self.workers:
            method = getattr(worker, "version", None)
            if method is None:
                return None
            reply = await method.remote() if hasattr(method, "remote") else method()
            versions.add(reply[0] if isinstance(reply, tuple) else reply)
        if len(versions) > 1:
            raise RuntimeError(f"rollout workers serve different policy versions: {sorted(versions)}")
        return versions.pop()

    # ---- a pool's workers coming and going ------------------------------------------------------
    async def _worker_for(self, index: int) -> Any:
        assert self.pool is not None
        worker = self._assigned.get(index)
        live = self.pool.live()
        if worker is None or not any(worker is w for w in live):  # new, or its worker taken out meanwhile
            live = live or await asyncio.to_thread(self.pool.wait_live)
            worker = self._assigned[index] = live[index % len(live)]
        return worker

    def _gone_event(self, worker: Any) -> asyncio.Event:
        return self._gone.setdefault(id(worker), asyncio.Event())

    def _lose(self, worker: Any, reason: str) -> None:
        assert self.pool is not None
        self.pool.lost(worker, reason)
        self._gone_event(worker).set()
        self._gone.pop(id(worker), None)  # a later request to it (once back) waits on a fresh one
        for index in [i for i, w in self._assigned.items() if w is worker]:
            del self._assigned[index]

    def _reissue(self, index: int) -> None:
        self.reissued += 1
        self._assigned.pop(index, None)
        if self.pool is not None:
            self.pool.count("reissued")


async def _awaited(ref: Any) -> Any:
    return await ref


def _is_lost(error: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(error, RayActorError)


def _takes_requests(worker: Any) -> bool:
    method = getattr(worker, "generate_one", None)
    return method is not None and (hasattr(method, "remote") or inspect.iscoroutinefunction(method))


def _submit(worker: Any, prompts: list[list[int]], sampling: dict[str, Any]) -> asyncio.Future:
    """Start a batched generation; awaiting the result gives its results. A local worker runs
    here, on the loop's thread (every episode is waiting for it anyway), where its engine lives."""
    method = getattr(worker, "generate", worker)
    if hasattr(method, "remote"):
        return asyncio.ensure_future(method.remote(prompts, sampling))
    future = asyncio.get_running_loop().create_future()
    future.set_result(method(prompts, sampling))
    return future


def _split(items: list[int], parts: int) -> list[list[int]]:
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for part in range(parts):
        end = start + size + (part < extra)
        out.append(items[start:end])
        start = end
    return out
