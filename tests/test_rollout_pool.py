"""The elastic, self-healing rollout pool (``rollout.pool``) on a real two-node-capable Ray cluster
(``ray.cluster_utils.Cluster``: real raylets on this machine, nodes added and removed mid-test).

First the pool alone, with small echo workers (real Ray actors, no engine: what is tested is who
gets which request): a worker killed mid-request, its requests re-issued, the worker restarted by
Ray and caught up before it serves again; an elastic slot filled when a node comes and emptied
when it goes. Then the PPO job itself: its rollout pool grows when a node is added, shrinks when
it is removed, and takes back a killed worker, while every step completes on current weights.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rollout.pool import RolloutPool
from rollout.scheduler import Workers
from tests.drivers.private_cluster import private_cluster


@dataclass
class Reply:
    token_ids: list[int]
    versions: list[int] = field(default_factory=list)


class EchoWorker:
    """Answers a request with a pure function of (prompt, seed), tagged with the version it
    serves. With ``die_at``, the process exits on that request, once (a marker file remembers)."""

    def __init__(self, marker: str | None = None, die_at: int = 0):
        self.served, self.calls, self.marker, self.die_at = 0, 0, marker, die_at

    async def generate_one(self, prompt: list[int], sampling: dict) -> Reply:
        self.calls += 1
        if self.marker and self.calls == self.die_at and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        await asyncio.sleep(0.2)
        return Reply([sum(prompt) * 7 + sampling["seed"]], [self.served])

    def version(self) -> tuple[int, None]:
        return self.served, None

    def set_version(self, version: int) -> None:
        self.served = version

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def shutdown(self) -> None:
        pass


@pytest.fixture(scope="module")
def cluster():
    """A head of 4 CPUs offering one ``rollout`` slot; tests add and remove nodes."""
    head = {"num_cpus": 4, "resources": {"rollout": 1}, "object_store_memory": 400 * 2**20}
    with private_cluster(sys.modules[__name__], head) as made:
        yield made


def _echo_pool(marker: str, calls: dict) -> RolloutPool:
    import ray

    remote = ray.remote(EchoWorker)

    def spawn(slot: int, options: dict):
        # Worker 0 dies on its second request, once; Ray restarts it (max_restarts 1).
        return remote.options(num_cpus=0.1, max_restarts=1, **options).remote(marker if slot == 0 else None, 2)

    def set_versions(workers: list, version: int) -> dict:
        ray.get([w.set_version.remote(version) for w in workers])
        calls.setdefault("synced", []).append((len(workers), version))
        return {}

    def catch_up(workers: list, version: int) -> None:
        calls.setdefault("caught_up", []).append((len(workers), version))
        set_versions(workers, version)

    return RolloutPool(
        spawn, [{}, {}], [{"CPU": 0.1, "elastic": 1}],
        catch_up=catch_up, regroup=lambda ws: calls.setdefault("groups", []).append(len(ws)), sync=set_versions,
        ready_timeout_s=120, ping_timeout_s=5,
    )  # fmt: skip


def _until(condition, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


async def _requests(workers: Workers, n: int) -> list[int]:
    await workers.policy_version()
    replies = await asyncio.gather(*(workers.one(i, [i, i + 1], {"seed": 100 + i}) for i in range(n)))
    return [r.token_ids[0] for r in replies]


@pytest.mark.slow
def test_pool_reissues_a_lost_workers_requests_and_takes_it_back_caught_up(cluster, tmp_path):
    calls: dict = {}
    pool = _echo_pool(str(tmp_path / "died"), calls)
    try:
        assert len(pool.live()) == 2 and calls["groups"] == [2]
        assert [e.kind for e in pool.events] == ["requested"]  # the elastic slot waits for a node
        pool.sync(3)
        workers = Workers(pool)
        got = asyncio.run(_requests(workers, 8))
        # Every request answered as if nothing happened: worker 0 died on its second request and
        # that request, and any other it held, went to worker 1.
        assert got == [(2 * i + 1) * 7 + 100 + i for i in range(8)]
        assert (tmp_path / "died").exists() and workers.reissued >= 1
        assert [(e.kind, e.slot) for e in pool.events if e.kind != "requested"] == [("lost", 0)]
        assert len(pool.live()) == 1

        # Ray restarts it (at version 0, the checkpoint it started from): the pool catches it up
        # before it serves again, and forms the sync group over both.
        _until(lambda: len(pool.refresh()) == 2)
        assert [(e.kind, e.slot) for e in pool.events][-1] == ("restarted", 0)
        assert calls["caught_up"] == [(1, 3)] and calls["groups"][-1] == 2
        import ray

        assert [v for v, _ in ray.get([w.version.remote() for w in pool.live()])] == [3, 3]

        # A worker answering from an older version (restarted behind our back) is taken out, its
        # request re-issued, and it is caught up before it serves again.
        ray.get(pool.live()[1].set_version.remote(1))
        workers = Workers(pool)
        assert asyncio.run(_requests(workers, 4)) == [(2 * i + 1) * 7 + 100 + i for i in range(4)]
        assert workers.reissued >= 1 and pool.events[-1].kind == "lost" and "policy version 1" in pool.events[-1].detail
        assert len(pool.refresh()) == 2 and calls["caught_up"][-1] == (1, 3)
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_pool_fills_an_elastic_slot_when_a_node_comes_and_empties_it_when_it_goes(cluster, tmp_path):
    import ray

    calls: dict = {}
    pool = _echo_pool(str(tmp_path / "never"), calls)
    (tmp_path / "never").touch()  # nobody dies here
    try:
        pool.sync(2)
        assert len(pool.refresh()) == 2  # no node offers the elastic slot yet
        node = cluster.add_node(num_cpus=1, resources={"elastic": 1})
        cluster.wait_for_nodes()
        _until(lambda: len(pool.refresh(wait=True)) == 3)  # Ray places the waiting group, the worker starts
        live = pool.live()
        assert [(e.kind, e.slot) for e in pool.events][-1] == ("joined", 2)
        # It joined at the pool's version, on the new node, before serving anything.
        assert calls["caught_up"] == [(1, 2)] and calls["groups"][-1] == 3
        assert pool.events[-1].detail == f"on node {node.node_id}"
        assert [v for v, _ in ray.get([w.version.remote() for w in live])] == [2, 2, 2]
        assert asyncio.run(_requests(Workers(pool), 6)) == [(2 * i + 1) * 7 + 100 + i for i in range(6)]

        cluster.remove_node(node)
        assert len(pool.refresh()) == 2  # the ping finds it gone
        assert [(e.kind, e.slot) for e in pool.events][-1] == ("lost", 2) and calls["groups"][-1] == 2
        assert asyncio.run(_requests(Workers(pool), 4)) == [(2 * i + 1) * 7 + 100 + i for i in range(4)]
    finally:
        pool.shutdown()


class SumScorer:
    """A reward-model rank's interface: one score per sequence (here its sum); ``die``: exits on
    its first call."""

    def __init__(self, die: bool = False):
        self.die = die

    def rewards(self, sequences: list[list[int]]) -> list[float]:
        if self.die:
            os._exit(1)
        return [float(sum(s)) for s in sequences]


@pytest.mark.slow
def test_a_lost_scorers_share_is_scored_again_by_the_others(cluster):
    import ray
    from ray.exceptions import RayActorError

    from rollout.scorer import RewardScorer, ScorerConfig

    def actors(n: int, dies: int) -> list:
        return [ray.remote(SumScorer).options(num_cpus=0.1).remote(i == dies) for i in range(n)]

    sequences = [[i, i + 1] for i in range(11)]
    scorer = RewardScorer(actors(3, dies=1), None, ScorerConfig(max_batch=2), independent=True)
    assert scorer.rm_scores(sequences) == [float(2 * i + 1) for i in range(11)]
    assert scorer.lost == 1 and len(scorer.actors) == 2
    # Ranks that score together (ZeRO-3: every forward a collective) cannot go on without one.
    with pytest.raises(RayActorError):
        RewardScorer(actors(2, dies=0), None, ScorerConfig(max_batch=2), independent=False).rm_scores(sequences)


@pytest.mark.slow
def test_ppo_rollout_pool_grows_shrinks_and_takes_back_a_killed_worker(cluster, tmp_path, tiny_model_dir):
    """A PPO run of 4 steps whose rollout role is elastic (1 rank, up to 2, on ``rollout`` slots;
    the head offers one). After step 1 a node with a slot is added: the waiting placement group
    is placed and its worker joins. After step 2 that node goes (a spot preemption) and another
    comes: step 3 rolls out on the one worker left, while Ray restarts the lost one on the new
    node, where it rejoins. After step 3 the head's worker is killed: step 4 runs without it, and it
    too restarts and rejoins. Every step completes, each rolled out on the weights of the step
    before (a worker serving older ones is refused), and the workers serving after each step hold
    the learners' version.

    The run is also the one-update-per-step case (one epoch of one mini-batch, GRPO with the KL
    as a loss term): the trainer skips the actor's own log-prob pass (the training pass is on the
    sampling weights), so every ratio is exactly 1, and the engines' log-probs, those of whichever
    workers served the step (new or restarted), equal the learners'."""
    import ray

    from ray_jobs.ppo import PPOConfig, run_ppo
    from tooltune.config import load_config

    cfg = load_config(
        "configs/tiny/ppo.yaml", PPOConfig,
        [f"model={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", "tensorboard=false", "algorithm.estimator=grpo",
         "algorithm.kl_in_reward=false", "algorithm.kl_kind=k3", "algorithm.kl_coef=0.05", "roles.actor.num_ranks=1",
         "actor.micro_batch_size=4", "train.mini_batches=1", "actor.grad_accum_steps=2", "train.eval_every=100",
         "train.steps=4", "roles.rollout={num_ranks: 1, max_ranks: 2, cpus: 0.25, resources: {rollout: 1}, max_restarts: 2}"],
    )  # fmt: skip
    seen: list[dict] = []
    nodes: list = []

    def on_step(done: int, metrics: dict, roles) -> None:
        versions = ray.get([w.version.remote() for w in roles.workers])
        assert [v for v, _ in versions] == [done] * len(versions) and len({d for _, d in versions}) == 1, versions
        seen.append({"step": done} | {k: v for k, v in metrics.items() if k.startswith("pool/")})
        if done in (1, 2):
            if nodes:
                cluster.remove_node(nodes[-1])
            nodes.append(cluster.add_node(num_cpus=1, resources={"rollout": 1}))
            cluster.wait_for_nodes()
            if done == 1:
                _until(lambda: len(roles.pool.refresh(wait=True)) == 2)  # joined, caught up to version 1
        elif done == 3:
            _until(lambda: len(roles.pool.refresh()) == 2)  # the lost worker restarted on the new node
            ray.kill(roles.pool.members[0].handle, no_restart=False)
        else:
            _until(lambda: len(roles.pool.refresh()) == 2)  # the killed one restarted

    result = run_ppo(cfg, on_step=on_step)
    assert result["completed_steps"] == 4 and [s["step"] for s in seen] == [1, 2, 3, 4]
    assert [m["policy/version"] for m in result["history"]] == [1, 2, 3, 4]
    # Step 2 rolled out on both workers, steps 3 and 4 on the one left each time.
    assert [s["pool/live_workers"] for s in seen] == [1, 2, 1, 1], seen
    events = [json.loads(line) for line in (Path(cfg.output_dir) / "pool_events.jsonl").read_text().splitlines()]
    kinds = [(e["kind"], e["worker"], e["version"]) for e in events]
    assert kinds == [("requested", 1, 0), ("joined", 1, 1), ("lost", 1, 2), ("restarted", 1, 3), ("lost", 0, 3), ("restarted", 0, 4)], kinds
    assert events[1]["detail"] == f"on node {nodes[0].node_id}" and events[3]["detail"] == f"on node {nodes[1].node_id}"

    for m in result["history"]:
        assert m["policy/ratio"] == pytest.approx(1.0) and m["policy/clip_fraction"] == 0 and m["policy/approx_kl"] == pytest.approx(0.0, abs=1e-7)
        assert m["policy/vllm_logprob_gap"] < 1e-3  # fp32 engines, on the learners' weights
    # k3 at the sampling weights: 0 before any update, never negative after.
    assert result["history"][0]["policy/kl_ref"] == pytest.approx(0.0, abs=1e-4) and min(m["policy/kl_ref"] for m in result["history"]) >= 0
