"""Placement of each role's actors: one placement group per role, from config.

A role (learners of one model, rollout workers, reward scorers, …) asks for ``num_ranks``
bundles of ``cpus``/``gpus`` each, packed on few nodes or spread across them. Colocating two
roles is giving them the same group (fractional GPUs per actor).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from tooltune.config import StrictModel


class RoleConfig(StrictModel):
    num_ranks: int = Field(1, ge=1)
    cpus: float = Field(1.0, ge=0)
    gpus: float = Field(0.0, ge=0)
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Ray waits for resources this long (an autoscaling cluster may need minutes to add nodes).
    ready_timeout_s: float = Field(600.0, gt=0)


class RoleGroup:
    """A ready placement group and the per-rank actor options that pin actors to its bundles."""

    def __init__(self, name: str, cfg: RoleConfig):
        import ray
        from ray.util.placement_group import placement_group

        self.name, self.cfg = name, cfg
        self.actors: list = []  # what spawn made, for close()
        bundle = {"CPU": cfg.cpus} | ({"GPU": cfg.gpus} if cfg.gpus else {})
        self.pg = placement_group([dict(bundle) for _ in range(cfg.num_ranks)], strategy=cfg.strategy, name=f"tooltune-{name}")
        ready, _ = ray.wait([self.pg.ready()], timeout=cfg.ready_timeout_s)
        if not ready:
            ray.util.remove_placement_group(self.pg)
            raise TimeoutError(
                f"role {name!r}: {cfg.num_ranks} x {bundle} not placeable within {cfg.ready_timeout_s:.0f} s "
                f"(cluster has {ray.cluster_resources()})"
            )

    def actor_options(self, rank: int) -> dict[str, Any]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {
            "num_cpus": self.cfg.cpus,
            "num_gpus": self.cfg.gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=rank
            ),
        }

    def spawn(self, cls: type, make_args: Callable[[int], tuple]) -> list:
        """One actor per rank: ``make_args(rank)`` gives each constructor's arguments."""
        import ray

        actors = [ray.remote(cls).options(**self.actor_options(r)).remote(*make_args(r)) for r in range(self.cfg.num_ranks)]
        self.actors += actors
        return actors

    def close(self) -> None:
        """Kill the actors ``spawn`` made and remove the group: on an attached cluster, neither
        goes away with the driver."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        self.remove()

    def remove(self) -> None:
        import ray

        ray.util.remove_placement_group(self.pg)
