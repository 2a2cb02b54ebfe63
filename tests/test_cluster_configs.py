"""The cluster configs (Ray cluster launcher for AWS and GCP, KubeRay manifests, the image) parse,
hold what they must, agree with pyproject.toml, and offer every resource the GPU job configs'
placements ask for."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from cluster.resources import Demand, NodeType, demands, node_types, unmet
from cluster.submit import config_class
from tooltune.config import load_config

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = [ROOT / "cluster/aws.yaml", ROOT / "cluster/gcp.yaml"]
KUBERAY = ROOT / "cluster/kuberay/raycluster.yaml"
RAYJOBS = {"ppo": ROOT / "cluster/kuberay/rayjob-ppo.yaml", "distill": ROOT / "cluster/kuberay/rayjob-distill.yaml"}
GPU_JOBS = {"sft": "configs/gpu/sft.yaml", "ppo": "configs/gpu/ppo.yaml", "distill": "configs/gpu/distill.yaml",
            "evaluate": "configs/gpu/evaluate.yaml"}  # fmt: skip
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned(name: str, deps: list[str]) -> str:
    return next(re.split(r"==", d)[1] for d in deps if re.match(rf"{re.escape(name)}(\[.*\])?==", d))


RAY = pinned("ray", PYPROJECT["project"]["dependencies"])
VLLM = pinned("vllm", PYPROJECT["project"]["optional-dependencies"]["gpu"])
PY = "py" + re.search(r">=(\d)\.(\d+)", PYPROJECT["project"]["requires-python"]).expand(r"\1\2")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_configs_have_a_cpu_head_and_gpu_types_from_zero_spot_with_fallback(path):
    cfg = load(path)
    for key in ("cluster_name", "provider", "auth", "head_node_type", "available_node_types", "idle_timeout_minutes",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"):  # fmt: skip
        assert key in cfg, f"{path.name}: no {key}"
    assert cfg["provider"]["type"] in ("aws", "gcp") and 0 < cfg["idle_timeout_minutes"] <= 30
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] > 0 for t in gpu.values())

    def spot(t: dict) -> bool:
        nc = t["node_config"]
        return nc.get("InstanceMarketOptions", {}).get("MarketType") == "spot" or nc.get("scheduling", {}).get("provisioningModel") == "SPOT"

    # Every spot type has an on-demand twin offering the same resources (the fallback).
    for name, t in gpu.items():
        if spot(t):
            assert any(not spot(o) and o["resources"] == t["resources"] for o in gpu.values()), f"{name}: no on-demand fallback"
    assert any(not spot(t) for t in gpu.values())
    # The project, installed by the one install script with the GPU extra; Ray from its environment,
    # with token authentication on.
    assert any(re.search(r"cluster/install\.sh \S+ gpu$", c) for c in cfg["setup_commands"])
    venv = re.search(r"install\.sh (\S+) gpu", " ".join(cfg["setup_commands"])).group(1).replace("~", "$HOME")
    for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert f"PATH={venv}/bin:$PATH" in c and "RAY_AUTH_MODE=token" in c, c
    assert any("--autoscaling-config" in c for c in cfg["head_start_ray_commands"])
    assert ".venv" in cfg["rsync_exclude"] and "runs" in cfg["rsync_exclude"]


def test_kuberay_cluster_autoscales_from_zero_and_matches_the_image_and_pins():
    rc = load(KUBERAY)
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["rayVersion"] == RAY
    groups = spec["workerGroupSpecs"]
    assert groups and all(g["minReplicas"] == 0 and g["maxReplicas"] > 0 for g in groups)
    assert any("spot" in g["groupName"] for g in groups) and any("spot" not in g["groupName"] for g in groups)
    dockerfile = (ROOT / "cluster/Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(RAY)}-{PY}-gpu$", dockerfile, re.M)
    assert re.search(r"^RUN bash cluster/install\.sh (\S+) gpu", dockerfile, re.M)
    images = {c["image"] for g in [spec["headGroupSpec"], *groups] for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1 and images.pop().endswith(f":{PYPROJECT['project']['version']}-gpu")
    for g in [spec["headGroupSpec"], *groups]:
        env = {e["name"]: e for e in g["template"]["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]


def test_install_script_gpu_branch_installs_the_pinned_vllm():
    script = (ROOT / "cluster/install.sh").read_text()
    gpu_branch = script.split("else", 1)[1].split("fi", 1)[0]
    assert f"vllm=={VLLM}" in gpu_branch and "[gpu,test]" in gpu_branch


@pytest.mark.parametrize("job", sorted(RAYJOBS))
def test_rayjobs_run_their_config_on_the_raycluster_with_retries(job):
    doc = load(RAYJOBS[job])
    assert doc["kind"] == "RayJob" and doc["spec"]["backoffLimit"] >= 1 and doc["spec"]["shutdownAfterJobFinishes"]
    assert doc["spec"]["rayClusterSpec"] == load(KUBERAY)["spec"]
    entry = doc["spec"]["entrypoint"]
    config = re.search(rf"python -m ray_jobs\.{job} --config (\S+)$", entry).group(1)
    cfg = load_config(ROOT / config, config_class(job))
    assert cfg.resume and cfg.output_dir.startswith("/shared/")  # a retry resumes from shared storage


@pytest.mark.parametrize("cluster", [*LAUNCHER, KUBERAY, *RAYJOBS.values()], ids=lambda p: p.name)
@pytest.mark.parametrize("job", sorted(GPU_JOBS))
def test_every_placement_of_the_gpu_jobs_fits_the_cluster(job, cluster):
    cfg = load_config(ROOT / GPU_JOBS[job], config_class(job))
    wanted = demands(job, cfg)
    assert wanted and any(b.get("GPU") for d in wanted for b in d.bundles)
    assert unmet(wanted, node_types(cluster)) == []


def test_demands_follow_the_job_config():
    ppo = load_config(ROOT / "configs/gpu/ppo.yaml", config_class("ppo"))
    by_label = {d.label: d for d in demands("ppo", ppo)}
    assert by_label["rollout"].bundles == [{"CPU": 4.0, "GPU": 1.0}] * 4 and by_label["rollout"].strategy == "SPREAD"
    # The elastic rollout workers (max_ranks 8): one single-bundle group each, asked for from the start.
    assert [by_label[f"rollout-extra-{i}"].bundles for i in range(4)] == [[{"CPU": 4.0, "GPU": 1.0}]] * 4
    assert "rollout-extra-4" not in by_label
    colocated = ppo.model_copy(update={"roles": ppo.roles.model_copy(update={
        "colocate": [["actor", "reference"]],
        "actor": ppo.roles.actor.model_copy(update={"gpus": 0.5, "num_ranks": 2}),
        "reference": ppo.roles.reference.model_copy(update={"gpus": 0.5}),
    })})  # fmt: skip
    by_label = {d.label: d for d in demands("ppo", colocated)}
    assert by_label["actor+reference"].bundles == [{"CPU": 8.0, "GPU": 1.0}] * 2
    distill = load_config(ROOT / "configs/gpu/distill.yaml", config_class("distill"))
    labels = {d.label: d for d in demands("distill", distill)}
    assert labels["teacher"].bundles == [{"CPU": 4.0, "GPU": 1.0}] * 4
    assert "learners" in labels and not any(k.startswith(("response.", "on_policy.")) for k in labels)


def test_unmet_says_what_does_not_fit():
    nodes = [NodeType("head", {"CPU": 0.0}, 1), NodeType("gpu", {"CPU": 8.0, "GPU": 2.0}, 2)]
    ok = [Demand("learners", [{"CPU": 4.0, "GPU": 1.0}] * 4, "PACK")]
    assert unmet(ok, nodes) == []
    assert unmet([Demand("big", [{"CPU": 1.0, "GPU": 4.0}], "PACK")], nodes) == ["big: no node type holds a bundle of {'CPU': 1.0, 'GPU': 4.0}"]
    wide = unmet([Demand("spread", [{"CPU": 1.0, "GPU": 1.0}] * 3, "STRICT_SPREAD")], nodes)
    assert wide == ["spread: STRICT_SPREAD over 3 nodes, at most 2 can host one"]
    pack = unmet([Demand("pack", [{"CPU": 4.0, "GPU": 1.0}] * 3, "STRICT_PACK")], nodes)
    assert pack == ["pack: STRICT_PACK of {'CPU': 12.0, 'GPU': 3.0} fits no single node type"]
    assert unmet([Demand("many", [{"CPU": 1.0, "GPU": 1.0}] * 5, "PACK")], nodes) == ["the job asks 5 GPU in all, the cluster offers at most 4"]
