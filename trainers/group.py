"""A learner group: N ``Learner`` ranks of one model, placed together, driven as one."""

from __future__ import annotations

from typing import Any

from cluster.placement import RoleConfig, RoleGroup
from trainers.learner import Learner, LearnerConfig


class LearnerGroup:
    def __init__(self, name: str, role: RoleConfig, cfg: LearnerConfig, placement: RoleGroup | None = None):
        """``placement``: the role's bundles when ``place_roles`` made them (colocated with other
        roles); by default the group gets its own."""
        import ray

        self.placement = placement or RoleGroup(name, role)
        self.cfg, self.world_size = cfg, self.placement.cfg.num_ranks
        payload = cfg.model_dump()
        self.actors = self.placement.spawn(Learner, lambda r: (payload, r, self.world_size))
        addr, port = ray.get(self.actors[0].master_address.remote())
        ray.get([a.setup.remote(addr, port) for a in self.actors])

    def all(self, method: str, *args: Any) -> list[Any]:
        """Call ``method`` with the same arguments on every rank (collectives need all ranks)."""
        import ray

        return ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def each(self, method: str, per_rank: list[tuple]) -> list[Any]:
        """Call ``method`` on rank r with ``per_rank[r]``."""
        import ray

        return ray.get([getattr(a, method).remote(*args) for a, args in zip(self.actors, per_rank, strict=True)])

    def first(self, method: str, *args: Any) -> Any:
        """Call ``method`` on rank 0 alone (work that needs no collective)."""
        import ray

        return ray.get(getattr(self.actors[0], method).remote(*args))

    def shutdown(self) -> None:
        """Kill the ranks and leave the placement group (``RoleGroup.close``)."""
        self.placement.close()


def shares(rows: list[Any], parts: int) -> list[list[Any]]:
    """``rows`` cut into ``parts`` contiguous shares, sizes differing by at most one."""
    size, extra = divmod(len(rows), parts)
    bounds = [r * size + min(r, extra) for r in range(parts + 1)]
    return [rows[bounds[r] : bounds[r + 1]] for r in range(parts)]


def per_rank(group: LearnerGroup, method: str, rows: list[Any], *args: Any) -> list[Any]:
    """``method`` over ``rows`` split into one share per rank, results back in row order (every
    rank is called: under ZeRO-3 the forward passes are collectives)."""
    results = group.each(method, [(share, *args) for share in shares(rows, group.world_size)])
    return [r for part in results for r in part]
