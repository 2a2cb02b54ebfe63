"""What a job asks a cluster for, what a cluster config offers, and whether the one fits the other.

``demands(job, cfg)`` lists a job's placement groups (bundles and strategy) as the job would
make them; ``node_types(path)`` reads the node types of a Ray cluster-launcher YAML or a KubeRay
RayCluster / RayJob manifest (resources per node, how many at most); ``unmet(demands, nodes)``
says in words what does not fit: a bundle no node type holds, a STRICT_SPREAD group wider than
the nodes that could host it, a job asking more GPUs or CPUs than the cluster has at full scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cluster.placement import PlacementConfig, RoleConfig, bundle
from tooltune.config import StrictModel


@dataclass
class Demand:
    label: str
    bundles: list[dict[str, float]]
    strategy: str


@dataclass
class NodeType:
    name: str
    resources: dict[str, float]
    max_count: int


def _role_demand(label: str, role: RoleConfig) -> Demand:
    return Demand(label, [bundle([role])] * role.num_ranks, role.strategy)


def _roles_in(cfg: StrictModel, prefix: str = "") -> list[tuple[str, RoleConfig]]:
    found = []
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if isinstance(value, RoleConfig):
            found.append((prefix + name, value))
        elif isinstance(value, StrictModel):
            found += _roles_in(value, f"{prefix}{name}.")
    return found


def demands(job: str, cfg: StrictModel) -> list[Demand]:
    """The placement groups ``job`` makes with ``cfg`` (every role it may start)."""
    if job == "ppo":
        from ray_jobs.ppo import placement

        pc: PlacementConfig = placement(cfg)
        groups = [
            Demand("+".join(names), [bundle([pc.roles[n] for n in names])] * pc.roles[names[0]].num_ranks,
                   pc.roles[names[0]].strategy)
            for names in pc.groups()
        ]  # fmt: skip
        # The elastic rollout workers: one placement group each, asked for from the start.
        extra = pc.roles["rollout"]
        return groups + [Demand(f"rollout-extra-{i}", [bundle([extra])], "PACK") for i in range(extra.extra_ranks)]
    out = []
    if job == "distill":
        t = cfg.teacher
        stage = {"CPU": t.cpus_per_stage} | ({"GPU": t.gpus_per_stage} if t.gpus_per_stage else {})
        out.append(Demand("teacher", [stage] * t.stages, "PACK"))
        skip = {"response", "on_policy"} - {cfg.mode}
        roles = [(n, r) for n, r in _roles_in(cfg) if n.split(".")[0] not in skip]
    else:
        roles = _roles_in(cfg)
    return out + [_role_demand(name, role) for name, role in roles]


def _k8s_resources(group: dict[str, Any]) -> dict[str, float]:
    params = group.get("rayStartParams", {}) or {}
    container = group["template"]["spec"]["containers"][0]
    limits = (container.get("resources") or {}).get("limits", {})

    def cpus(v: Any) -> float:
        v = str(v)
        return float(v[:-1]) / 1000 if v.endswith("m") else float(v)

    cpu = float(params["num-cpus"]) if "num-cpus" in params else cpus(limits.get("cpu", 0))
    gpu = float(params["num-gpus"]) if "num-gpus" in params else float(limits.get("nvidia.com/gpu", 0))
    return {"CPU": cpu} | ({"GPU": gpu} if gpu else {})


def node_types(path: str | Path) -> list[NodeType]:
    """Node types of a cluster-launcher YAML, a KubeRay RayCluster, or a RayJob's cluster spec."""
    doc = yaml.safe_load(Path(path).read_text())
    if "available_node_types" in doc:
        head = doc["head_node_type"]
        return [
            NodeType(name, {k: float(v) for k, v in spec.get("resources", {}).items()},
                     1 if name == head else int(spec.get("max_workers", doc.get("max_workers", 0))))
            for name, spec in doc["available_node_types"].items()
        ]  # fmt: skip
    spec = doc["spec"]
    spec = spec.get("rayClusterSpec", spec)
    nodes = [NodeType("head", _k8s_resources(spec["headGroupSpec"]), 1)]
    for group in spec.get("workerGroupSpecs", []):
        nodes.append(NodeType(group["groupName"], _k8s_resources(group), int(group.get("maxReplicas", group.get("replicas", 0)))))
    return nodes


def _fits(b: dict[str, float], node: NodeType) -> bool:
    return all(node.resources.get(k, 0.0) + 1e-9 >= v for k, v in b.items() if v)


def unmet(wanted: list[Demand], nodes: list[NodeType]) -> list[str]:
    """Everything in ``wanted`` the cluster of ``nodes`` cannot give, one line each (empty: fits)."""
    problems = []
    for d in wanted:
        hosts = [n for n in nodes if n.max_count > 0 and _fits(d.bundles[0], n)]
        if not hosts:
            problems.append(f"{d.label}: no node type holds a bundle of {d.bundles[0]}")
            continue
        if d.strategy == "STRICT_SPREAD" and sum(n.max_count for n in hosts) < len(d.bundles):
            problems.append(f"{d.label}: STRICT_SPREAD over {len(d.bundles)} nodes, at most {sum(n.max_count for n in hosts)} can host one")
        if d.strategy == "STRICT_PACK":
            whole = {k: v * len(d.bundles) for k, v in d.bundles[0].items()}
            if not any(_fits(whole, n) for n in hosts):
                problems.append(f"{d.label}: STRICT_PACK of {whole} fits no single node type")
    for key in ("GPU", "CPU"):
        asked = sum(b.get(key, 0.0) for d in wanted for b in d.bundles)
        offered = sum(n.resources.get(key, 0.0) * n.max_count for n in nodes)
        if asked > offered + 1e-9:
            problems.append(f"the job asks {asked:g} {key} in all, the cluster offers at most {offered:g}")
    return problems
