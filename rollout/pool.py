"""The rollout workers of a job as they come and go: an elastic, self-healing pool.

The role's ``num_ranks`` workers are placed at start (``cluster.placement.RoleGroup``) and
waited for. With ``max_ranks`` above ``num_ranks`` each extra worker asks for a placement
group of its own that nobody waits for: on an autoscaling cluster the pending request is what
makes the autoscaler add a node, and once Ray places it the pool starts a worker there. With
``max_restarts`` Ray restarts a worker whose process or node died (a spot preemption: once the
autoscaler brings a node for its rescheduled bundle).

No worker serves a batch before it holds the current weights: a new or restarted worker is
brought up to the pool's version (``catch_up``, one sync to it alone) before it joins, and the
sync group is formed again over the new membership (``regroup``). A worker that fails is taken
out at once; the generation requests it held are sent again, unchanged, to the others
(``rollout.scheduler.Workers``), so an episode loses nothing but its prefix cache and a sample is
the one it would have been (its seed is the episode's and turn's, not the worker's). Learners
stay fixed: a learner failure fails the job, which resumes from its last checkpoint.

The driver calls ``refresh`` before each rollout (it never waits: workers still starting join a
later step; with no worker alive it waits up to the role's ``ready_timeout_s``) and ``sync``
after each update. Every change is an event, logged and kept in ``events``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

logger = logging.getLogger(__name__)

State = Literal["starting", "live", "lost", "dead"]


@dataclass
class Member:
    slot: int  # 0 .. num_ranks-1: the role's bundles; from num_ranks on: the elastic extras
    handle: Any
    state: State
    probe: Any = None  # a pending ``version()`` call: answers once the worker is (back) up
    node: str | None = None


@dataclass
class Extra:
    """An elastic slot: its own placement group, and the worker in it once it is placed."""

    slot: int
    pg: Any
    member: Member | None = None
    ready: Any = None  # the one ``pg.ready()`` call (each call is a task that waits for a worker)


@dataclass
class Event:
    kind: Literal["joined", "lost", "restarted", "dead", "requested"]
    slot: int
    version: int
    detail: str = ""
    time: float = field(default_factory=time.time)

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "worker": self.slot, "version": self.version, "detail": self.detail, "time": self.time}

    def line(self) -> str:
        return f"rollout pool: worker {self.slot} {self.kind} at policy version {self.version}" + (
            f": {self.detail}" if self.detail else ""
        )


class RolloutPool:
    def __init__(
        self,
        spawn: Callable[[int, dict[str, Any]], Any],
        core_options: Sequence[dict[str, Any]],
        extra_bundles: Sequence[dict[str, float]] = (),
        *,
        catch_up: Callable[[list[Any], int], Any],
        regroup: Callable[[list[Any]], None],
        sync: Callable[[list[Any], int], dict[str, Any]],
        ready_timeout_s: float = 600.0,
        ping_timeout_s: float = 30.0,
        name: str = "rollout",
    ):
        """``spawn(slot, actor_options)`` starts a worker; ``core_options`` are the actor options
        of the role's ranks (placement included), ``extra_bundles`` one bundle per elastic slot.
        ``catch_up(workers, version)`` brings those workers to ``version``; ``regroup(workers)``
        forms the sync group over them; ``sync(workers, version)`` sends a new version to all."""
        import ray
        from ray.util.placement_group import placement_group

        self._spawn, self._catch_up, self._regroup, self._sync = spawn, catch_up, regroup, sync
        self.ready_timeout_s, self.ping_timeout_s = ready_timeout_s, ping_timeout_s
        self.version = 0
        self.events: list[Event] = []
        self.counts: Counter[str] = Counter()
        self.lock = threading.RLock()
        self.members = [Member(slot, spawn(slot, opts), "live") for slot, opts in enumerate(core_options)]
        self._grouped: list[Any] | None = None
        # The role's own workers are waited for (``ready_timeout_s``), as any role's are.
        ray.get([m.handle.version.remote() for m in self.members], timeout=ready_timeout_s)
        self._nodes(self.members)
        first = len(self.members)
        self.extras = [
            Extra(first + i, placement_group([b], strategy="PACK", name=f"tooltune-{name}-extra-{first + i}"))
            for i, b in enumerate(extra_bundles)
        ]
        for extra in self.extras:
            self._event("requested", extra.slot, f"a placement group for {extra_bundles[0]}")
        self._regroup_if_changed()

    # ---- what the rollout sees ---------------------------------------------------------------
    def live(self) -> list[Any]:
        return [m.handle for m in self._all() if m.state == "live"]

    def lost(self, handle: Any, reason: str) -> None:
        """A call to ``handle`` failed (or came back from an older version): stop sending it work
        until it answers again (restarted) and is caught up."""
        with self.lock:
            member = next((m for m in self._all() if m.handle is handle), None)
            if member is not None and member.state == "live":
                self._lose(member, reason)

    def wait_live(self) -> list[Any]:
        """The live workers, waiting (up to ``ready_timeout_s``) while there are none."""
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            live = self.refresh(ping=False)
            if live:
                return live
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no rollout worker has been alive for {self.ready_timeout_s:.0f} s "
                    f"({', '.join(f'worker {m.slot}: {m.state}' for m in self._all())})"
                )
            time.sleep(0.5)

    # ---- the driver's calls ------------------------------------------------------------------
    def refresh(self, ping: bool = True, wait: bool = False) -> list[Any]:
        """Start workers in newly placed elastic slots, take back the workers that answer again
        (caught up first), drop those that will not come back, and, with ``ping``, take out the
        live ones that no longer answer. ``wait``: until no worker is still starting. Returns the
        live workers (the sync group formed over them)."""
        import ray

        with self.lock:
            if ping:
                self._ping()
            while True:
                for extra in self.extras:
                    if extra.member is None and extra.ready is None:
                        extra.ready = extra.pg.ready()
                    if extra.member is None and ray.wait([extra.ready], timeout=0)[0]:
                        extra.member = Member(extra.slot, self._spawn(extra.slot, _pg_options(extra.pg)), "starting")
                        extra.member.probe = extra.member.handle.version.remote()
                pending = [m for m in self._all() if m.state in ("starting", "lost")]
                for member in pending:
                    if ray.wait([member.probe], timeout=0)[0]:
                        self._answered(member)
                if not wait or not any(m.state == "starting" for m in self._all()):
                    break
                time.sleep(0.5)
            self._regroup_if_changed()
            return self.live()

    def sync(self, version: int) -> dict[str, Any]:
        """Send ``version`` to every live worker. A worker that fails meanwhile is taken out and
        the others that did not get it are caught up one by one."""
        with self.lock:
            live = self.refresh() or self.wait_live()
            try:
                result = self._sync(live, version)
            except Exception as e:
                if not self._ping():
                    raise  # everyone answers: a refusal, not a lost worker
                logger.warning("weight sync to version %d lost a worker (%s): catching up the others", version, first_line(e))
                behind = [m.handle for m in self._all() if m.state == "live" and self._served(m.handle) < version]
                result = {"caught_up": len(behind)}
                if behind:
                    self._catch_up(behind, version)
                self._grouped = None
                self._regroup_if_changed()
            self.version = version
            return result

    def metrics(self) -> dict[str, float]:
        """Per step: live workers, and the events since the last call."""
        with self.lock:
            out = {"pool/live_workers": float(len(self.live()))}
            out |= {f"pool/{kind}": float(n) for kind, n in self.counts.items()}
            self.counts.clear()
            return out

    def count(self, kind: str, n: int = 1) -> None:
        with self.lock:
            self.counts[kind] += n

    def shutdown(self) -> None:
        """Release every worker's engine, kill the workers and remove the elastic slots' groups
        (the role's own group is closed by its owner)."""
        import ray

        handles = [m.handle for m in self._all() if m.state == "live"]
        done, _ = ray.wait([h.shutdown.remote() for h in handles], num_returns=len(handles), timeout=60) if handles else ([], [])
        for ref in done:
            try:
                ray.get(ref)
            except Exception as e:  # a worker that is gone has nothing left to release
                logger.info("rollout worker shutdown: %s", first_line(e))
        for member in self._all():
            ray.kill(member.handle)
        for extra in self.extras:
            ray.util.remove_placement_group(extra.pg)

    # ---- inside ------------------------------------------------------------------------------
    def _all(self) -> list[Member]:
        return self.members + [e.member for e in self.extras if e.member is not None]

    def _lose(self, member: Member, reason: str) -> None:
        """Out of service until its probe answers (restarted, or back) and it is caught up."""
        member.state, member.probe = "lost", member.handle.version.remote()
        self._event("lost", member.slot, reason)

    def _answered(self, member: Member) -> None:
        """A starting or lost worker's probe answered: it is up (caught up, then live) or gone."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        try:
            served, _ = ray.get(member.probe)
        except ActorUnavailableError:  # restarting (or its node unreachable): ask again next time
            member.probe = member.handle.version.remote()
            return
        except RayActorError as e:  # dead for good: no restart left
            member.state, member.probe = "dead", None
            self._event("dead", member.slot, first_line(e))
            return
        was = member.state
        member.probe = None
        try:
            if served < self.version:
                self._catch_up([member.handle], self.version)
        except RayActorError as e:
            self._lose(member, f"while catching up: {first_line(e)}")
            return
        member.state = "live"
        self._nodes([member])
        self._event("joined" if was == "starting" else "restarted", member.slot, f"on node {member.node}")

    def _ping(self) -> list[Member]:
        """Take out the live workers that do not answer ``version()`` within ``ping_timeout_s`` or
        answer from an older version (restarted in between: ``refresh`` catches them up before
        they serve again). Returns those taken out."""
        import ray
        from ray.exceptions import RayActorError

        live = [m for m in self._all() if m.state == "live"]
        if not live:
            return []
        refs = [m.handle.version.remote() for m in live]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.ping_timeout_s)
        gone = []
        for member, ref in zip(live, refs):
            reason = f"no answer within {self.ping_timeout_s:.0f} s"
            if ref in ready:
                try:
                    served, _ = ray.get(ref)
                    if served >= self.version:
                        continue
                    reason = f"serves version {served}: restarted"
                except RayActorError as e:
                    reason = first_line(e)
            self._lose(member, reason)
            gone.append(member)
        return gone

    def _served(self, handle: Any) -> int:
        import ray

        return ray.get(handle.version.remote(), timeout=self.ping_timeout_s)[0]

    def _regroup_if_changed(self) -> None:
        live = self.live()
        if self._grouped is None or [id(h) for h in live] != [id(h) for h in self._grouped]:
            if live:
                self._regroup(live)
            self._grouped = live

    def _nodes(self, members: list[Member]) -> None:
        import ray

        for member, node in zip(members, ray.get([m.handle.node_id.remote() for m in members])):
            member.node = node

    def _event(self, kind: str, slot: int, detail: str = "") -> None:
        event = Event(kind, slot, self.version, detail)  # type: ignore[arg-type]
        self.events.append(event)
        self.counts[kind] += 1
        print(event.line(), flush=True)  # in the job's log, whatever logging the job configured


def _pg_options(pg: Any) -> dict[str, Any]:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=0)}


def first_line(error: BaseException | str) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
