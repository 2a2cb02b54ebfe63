"""Placement of each role's actors, from config: each role in its own bundles, or colocated.

A role (learners of one model, a reference policy, rollout workers, reward scorers, …) asks
for ``num_ranks`` bundles of ``cpus``/``gpus`` each. Alone, a role gets its own placement group,
packed on few nodes or spread across them (``STRICT_SPREAD``: one rank per node). Roles named
together in ``PlacementConfig.colocate`` share one placement group instead: rank r of each
lands in bundle r, which holds the sum of their per-rank shares. That is how an actor, its
reference policy and the vLLM engine sit on the same GPUs (taking turns on its memory through
vLLM's sleep/wake): Ray only books the shares, the job decides who holds the memory when.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, model_validator

from tooltune.config import StrictModel

Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


class RoleConfig(StrictModel):
    num_ranks: int = Field(1, ge=1)
    cpus: float = Field(1.0, ge=0)
    gpus: float = Field(0.0, ge=0)
    # Custom resources per rank, e.g. {"spot": 1} to land on the nodes that offer them.
    resources: dict[str, float] = Field(default_factory=dict)
    strategy: Strategy = "PACK"
    # Ray waits for resources this long (an autoscaling cluster may need minutes to add nodes).
    ready_timeout_s: float = Field(600.0, gt=0)
    # Elastic roles (the PPO job's rollout workers): up to this many ranks. The ranks beyond
    # ``num_ranks`` each ask for a placement group nobody waits for; they join when placed (an
    # autoscaler adds nodes for them) and leave when their node goes.
    max_ranks: int | None = Field(None, ge=1)
    # Ray restarts a rank whose process or node died this many times (-1: always). Only for
    # roles that can take a rank back (rollout workers), not for learners in a process group.
    max_restarts: int = Field(0, ge=-1)

    @model_validator(mode="after")
    def _check_elastic(self) -> RoleConfig:
        if self.max_ranks is not None and self.max_ranks < self.num_ranks:
            raise ValueError(f"max_ranks ({self.max_ranks}) is below num_ranks ({self.num_ranks})")
        return self

    @property
    def extra_ranks(self) -> int:
        return (self.max_ranks or self.num_ranks) - self.num_ranks


class PlacementConfig(StrictModel):
    """Every role's resources, and which roles share bundles (the others get their own)."""

    roles: dict[str, RoleConfig]
    # Sets of role names; the roles of one set share one placement group, bundle for bundle.
    colocate: list[list[str]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_colocation(self) -> PlacementConfig:
        set_of: dict[str, int] = {}
        for i, names in enumerate(self.colocate):
            where = f"colocate[{i}]"
            if len(names) < 2:
                raise ValueError(f"{where}: a colocated set needs at least two roles, got {names}")
            for name in names:
                if name not in self.roles:
                    raise ValueError(f"{where}: unknown role {name!r} (roles: {', '.join(sorted(self.roles))})")
                if name in set_of:
                    raise ValueError(f"{where}: role {name!r} is already in colocate[{set_of[name]}]")
                set_of[name] = i
            members = {name: self.roles[name] for name in names}
            for key in ("num_ranks", "strategy"):
                values = {name: getattr(role, key) for name, role in members.items()}
                if len(set(values.values())) > 1:
                    raise ValueError(f"{where}: colocated roles need the same {key}, got {values}")
            gpus = {name: role.gpus for name, role in members.items()}
            # A share of one GPU per rank is what colocation means; Ray also refuses a fractional
            # request above 1.
            if sum(gpus.values()) > 1 + 1e-9:
                raise ValueError(f"{where}: colocated roles share one GPU per rank, their gpus add up past 1: {gpus}")
        return self

    def groups(self) -> list[list[str]]:
        """The role names of each placement group: the colocated sets, then every other role alone."""
        colocated = {name for names in self.colocate for name in names}
        return [list(names) for names in self.colocate] + [[name] for name in self.roles if name not in colocated]


def bundle(roles: list[RoleConfig]) -> dict[str, float]:
    """One bundle holding a rank of each of ``roles``: the sum of their shares."""
    cpus, gpus = sum(r.cpus for r in roles), sum(r.gpus for r in roles)
    custom: dict[str, float] = {}
    for role in roles:
        for key, amount in role.resources.items():
            custom[key] = custom.get(key, 0.0) + amount
    return {"CPU": cpus} | ({"GPU": gpus} if gpus else {}) | custom


class SharedGroup:
    """A ready placement group and how many roles use it: the last one to leave removes it."""

    def __init__(self, label: str, bundles: list[dict[str, float]], strategy: Strategy, timeout_s: float):
        import ray
        from ray.util.placement_group import placement_group

        self.pg = placement_group(bundles, strategy=strategy, name=f"tooltune-{label}")
        self.users = 0
        ready, _ = ray.wait([self.pg.ready()], timeout=timeout_s)
        if not ready:
            ray.util.remove_placement_group(self.pg)
            raise TimeoutError(
                f"placement group 'tooltune-{label}': {len(bundles)} x {bundles[0]} ({strategy}) not placeable "
                f"within {timeout_s:.0f} s (cluster has {ray.cluster_resources()})"
            )

    def leave(self) -> None:
        import ray

        self.users -= 1
        if self.users == 0:
            ray.util.remove_placement_group(self.pg)


class RoleGroup:
    """One role's ranks pinned to the bundles of a placement group: its own (``shared`` None) or
    one it shares with colocated roles (``place_roles`` makes those)."""

    def __init__(self, name: str, cfg: RoleConfig, shared: SharedGroup | None = None):
        self.name, self.cfg = name, cfg
        self.actors: list = []  # what spawn made, for close()
        self.group = shared or SharedGroup(name, [bundle([cfg])] * cfg.num_ranks, cfg.strategy, cfg.ready_timeout_s)
        self.group.users += 1
        self._left = False

    @property
    def pg(self):
        return self.group.pg

    def actor_options(self, rank: int) -> dict[str, Any]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return self.amounts() | {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=rank
            ),
        }

    def amounts(self) -> dict[str, Any]:
        """What one rank books of its bundle (and how often Ray restarts it)."""
        out: dict[str, Any] = {"num_cpus": self.cfg.cpus, "num_gpus": self.cfg.gpus}
        if self.cfg.resources:
            out["resources"] = dict(self.cfg.resources)
        if self.cfg.max_restarts:
            out["max_restarts"] = self.cfg.max_restarts
        return out

    def spawn(self, cls: type, make_args: Callable[[int], tuple]) -> list:
        """One actor per rank: ``make_args(rank)`` gives each constructor's arguments."""
        import ray

        remote = ray.remote(cls)
        actors = [remote.options(**self.actor_options(r)).remote(*make_args(r)) for r in range(self.cfg.num_ranks)]
        self.actors += actors
        return actors

    def close(self) -> None:
        """Kill the actors ``spawn`` made and leave the group: on an attached cluster, neither
        goes away with the driver."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        self.remove()

    def remove(self) -> None:
        """Leave the placement group (once; later calls do nothing). A group shared with
        colocated roles is removed when the last of them leaves, so closing one role never
        pulls the bundles from under another's actors."""
        if not self._left:
            self._left = True
            self.group.leave()


def place_roles(cfg: PlacementConfig) -> dict[str, RoleGroup]:
    """A ready ``RoleGroup`` per role of ``cfg``: one placement group per colocated set and per
    other role. If one cannot be placed, those already made are removed before the error."""
    made: list[RoleGroup] = []
    try:
        for names in cfg.groups():
            roles = [cfg.roles[name] for name in names]
            if len(names) == 1:
                made.append(RoleGroup(names[0], roles[0]))
                continue
            first = roles[0]
            timeout_s = max(r.ready_timeout_s for r in roles)
            shared = SharedGroup("+".join(names), [bundle(roles)] * first.num_ranks, first.strategy, timeout_s)
            made += [RoleGroup(name, role, shared) for name, role in zip(names, roles)]
    except BaseException:
        for group in made:
            group.remove()
        raise
    by_name = {group.name: group for group in made}
    return {name: by_name[name] for name in cfg.roles}
