"""Every shipped config loads into its job's typed config (the GPU ones included)."""

from pathlib import Path

import pytest

from tooltune.config import load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*/*.yaml"))


def job_class(name: str):
    from ray_jobs.distill import DistillConfig
    from ray_jobs.evaluate import EvalConfig
    from ray_jobs.ppo import PPOConfig
    from ray_jobs.preferences import PreferencesConfig
    from ray_jobs.reward_model import RewardModelConfig
    from ray_jobs.sft import SFTConfig
    from ray_jobs.smoke import SmokeConfig

    jobs = {"smoke": SmokeConfig, "sft": SFTConfig, "evaluate": EvalConfig}
    # A variant names its job before a dash: sft-overcall.yaml is an SFT config.
    return (jobs | {"preferences": PreferencesConfig, "reward_model": RewardModelConfig, "ppo": PPOConfig, "distill": DistillConfig})[name.split("-")[0]]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_validates(path):
    load_config(path, job_class(path.stem))


def test_every_tier_has_sft_and_evaluate():
    tiers = {p.parent.name for p in CONFIGS}
    assert {"tiny", "smol", "gpu"} <= tiers
    for tier in tiers - {"tiny"}:
        assert {p.stem for p in CONFIGS if p.parent.name == tier} >= {"sft", "evaluate"}
