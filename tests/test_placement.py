"""Placement from config: colocated roles land in the same bundles, the others apart, on a real
two-node Ray cluster (``ray.cluster_utils.Cluster``: two raylets on this machine)."""

from __future__ import annotations

import sys
import time

import pytest

from cluster.placement import PlacementConfig, RoleConfig, bundle, place_roles
from tests.drivers.private_cluster import private_cluster
from tooltune.config import ConfigError, validate_config


def roles(**ranks_and_shares) -> dict:
    return {name: {"num_ranks": n, "cpus": cpus, "gpus": gpus} for name, (n, cpus, gpus) in ranks_and_shares.items()}


def test_a_colocated_bundle_holds_every_roles_share():
    actor, reference = RoleConfig(cpus=1, gpus=0.5), RoleConfig(cpus=0.5, gpus=0.25)
    rollout = RoleConfig(cpus=2, gpus=0.25)
    assert bundle([actor, reference, rollout]) == {"CPU": 3.5, "GPU": 1.0}
    assert bundle([RoleConfig(cpus=0.5)]) == {"CPU": 0.5}
    spot = RoleConfig(cpus=1, resources={"spot": 1}), RoleConfig(cpus=1, resources={"spot": 0.5, "nvme": 1})
    assert bundle(list(spot)) == {"CPU": 2.0, "spot": 1.5, "nvme": 1.0}


def test_elastic_roles_reach_max_ranks_and_book_their_resources():
    from cluster.placement import RoleGroup

    role = RoleConfig(num_ranks=2, max_ranks=5, cpus=0.5, resources={"spot": 1}, max_restarts=-1)
    assert role.extra_ranks == 3 and RoleConfig(num_ranks=2).extra_ranks == 0
    with pytest.raises(ValueError, match=r"max_ranks \(1\) is below num_ranks \(2\)"):
        RoleConfig(num_ranks=2, max_ranks=1)
    group = RoleGroup.__new__(RoleGroup)  # amounts() reads the config only: no placement group needed
    group.cfg = role
    assert group.amounts() == {"num_cpus": 0.5, "num_gpus": 0.0, "resources": {"spot": 1.0}, "max_restarts": -1}


def test_groups_are_the_colocated_sets_then_each_other_role():
    four = roles(actor=(2, 1, 0), critic=(2, 1, 0), reference=(2, 1, 0), rollout=(2, 1, 0))
    cfg = PlacementConfig.model_validate({"roles": four, "colocate": [["rollout", "actor"]]})
    assert cfg.groups() == [["rollout", "actor"], ["critic"], ["reference"]]


@pytest.mark.parametrize(
    ("colocate", "role_changes", "message"),
    [
        ([["actor", "critic"]], {}, "colocate[0]: unknown role 'critic'"),
        ([["actor", "reference"], ["rollout", "actor"]], {}, "colocate[1]: role 'actor' is already in colocate[0]"),
        ([["actor"]], {}, "colocate[0]: a colocated set needs at least two roles"),
        ([["actor", "rollout"]], {"rollout": {"num_ranks": 1}}, "colocate[0]: colocated roles need the same num_ranks"),
        ([["actor", "rollout"]], {"rollout": {"strategy": "STRICT_SPREAD"}}, "need the same strategy"),
        ([["actor", "reference", "rollout"]], {"actor": {"gpus": 0.5}, "rollout": {"gpus": 0.6}}, "gpus add up past 1"),
    ],
)
def test_bad_colocation_is_an_error_naming_the_role_and_key(colocate, role_changes, message):
    data = {"roles": roles(actor=(2, 1, 0), reference=(2, 1, 0), rollout=(2, 1, 0)), "colocate": colocate}
    for name, changes in role_changes.items():
        data["roles"][name] |= changes
    with pytest.raises(ConfigError, match="placement.yaml") as e:
        validate_config(data, PlacementConfig, "placement.yaml")
    assert message in str(e.value)


def test_shares_that_fill_one_gpu_are_accepted():
    data = {"roles": roles(actor=(2, 1, 0.5), reference=(2, 1, 0.25), rollout=(2, 1, 0.25))}
    PlacementConfig.model_validate(data | {"colocate": [["actor", "reference", "rollout"]]})


class Probe:
    """Reports where Ray put it: placement group, bundle and node."""

    def where(self) -> tuple[str | None, int | None, str]:
        import ray

        context = ray.get_runtime_context()
        # The runtime context names the group but not the bundle; the bundle's own resources
        # (``CPU_group_<index>_<group id>``) that this actor holds do.
        held = ray._private.worker.global_worker.core_worker.resource_ids()
        indices = {int(key.split("_")[2]) for key in held if key.startswith("CPU_group_") and key.count("_") == 3}
        assert len(indices) <= 1, held
        return context.get_placement_group_id(), indices.pop() if indices else None, context.get_node_id()


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a worker node of 2 CPUs each, private to this module."""
    small = {"num_cpus": 2, "object_store_memory": 80 * 2**20}
    with private_cluster(sys.modules[__name__], small, (small,)) as cluster:
        yield cluster


def where(group) -> list[tuple[str | None, int | None, str]]:
    import ray

    return ray.get([a.where.remote() for a in group.spawn(Probe, lambda r: ())])


@pytest.mark.slow
def test_colocated_roles_share_bundles_and_spread_roles_do_not(two_nodes):
    import ray

    cfg = PlacementConfig.model_validate(
        {
            "roles": {
                "actor": {"num_ranks": 2, "cpus": 0.5, "strategy": "STRICT_SPREAD"},
                "reference": {"num_ranks": 2, "cpus": 0.25, "strategy": "STRICT_SPREAD"},
                "reward": {"num_ranks": 2, "cpus": 0.5, "strategy": "STRICT_SPREAD"},
            },
            "colocate": [["actor", "reference"]],
        }
    )
    groups = place_roles(cfg)
    try:
        actor, reference, reward = (where(groups[name]) for name in ("actor", "reference", "reward"))
        shared = groups["actor"].pg.id.hex()
        # Rank r of each colocated role sits in bundle r of the one shared group.
        assert actor == reference
        assert [(pg, index) for pg, index, _ in actor] == [(shared, 0), (shared, 1)]
        # The shared bundles hold both roles' shares: 0.5 + 0.25 CPU each.
        table = ray.util.placement_group_table(groups["actor"].pg)
        assert table["bundles"] == {0: {"CPU": 0.75}, 1: {"CPU": 0.75}}
        # The other role has a group of its own.
        own = groups["reward"].pg.id.hex()
        assert own != shared
        assert [(pg, index) for pg, index, _ in reward] == [(own, 0), (own, 1)]
        # STRICT_SPREAD: one rank per node, for the shared group and for the role alone.
        assert len({node for *_, node in actor}) == 2
        assert len({node for *_, node in reward}) == 2
    finally:
        for group in groups.values():
            group.close()


@pytest.mark.slow
def test_a_shared_group_outlives_the_first_role_to_close(two_nodes):
    import ray

    cfg = PlacementConfig(
        roles={"actor": RoleConfig(num_ranks=2, cpus=0.5), "rollout": RoleConfig(num_ranks=2, cpus=0.5)},
        colocate=[["actor", "rollout"]],
    )
    groups = place_roles(cfg)
    pg = groups["actor"].pg
    try:
        groups["actor"].close()
        groups["actor"].close()  # a second close leaves nothing twice
        assert ray.util.placement_group_table(pg)["state"] == "CREATED"
        assert [index for _, index, _ in where(groups["rollout"])] == [0, 1]
    finally:
        groups["rollout"].close()
    deadline = time.time() + 10
    while ray.util.placement_group_table(pg)["state"] != "REMOVED" and time.time() < deadline:
        time.sleep(0.1)
    assert ray.util.placement_group_table(pg)["state"] == "REMOVED"


@pytest.mark.slow
def test_a_group_that_cannot_be_placed_removes_those_made_before(two_nodes):
    import ray

    cfg = PlacementConfig(
        roles={
            "actor": RoleConfig(num_ranks=2, cpus=0.5),
            # Three ranks, one per node, on two nodes: never placeable.
            "reward": RoleConfig(num_ranks=3, cpus=0.1, strategy="STRICT_SPREAD", ready_timeout_s=1),
        },
    )
    with pytest.raises(TimeoutError, match="tooltune-reward"):
        place_roles(cfg)
    deadline = time.time() + 10
    while ray.available_resources().get("CPU", 0) < 4 and time.time() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == 4
