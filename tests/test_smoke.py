"""The foundation: real vLLM + real DeepSpeed ZeRO-2 learners + a verified weight sync, in Ray."""

import pytest

from ray_jobs.smoke import SmokeConfig, run_smoke


@pytest.mark.slow
def test_smoke_vllm_logprobs_match_learners_after_weight_update():
    import time

    import ray

    from cluster.local import local_ray

    # Ray started here, so the job attaches to it, as under `ray job submit`: whatever the job
    # leaves behind (actors, placement groups) would keep holding the cluster's CPUs.
    with local_ray():
        result = run_smoke(SmokeConfig())
        deadline = time.time() + 30
        while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
            time.sleep(0.5)
        assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
    assert result["generated_tokens"] > 0
    assert result["ranks_agree"], "ZeRO ranks ended the step with different weights"
    # Before the sync vLLM still serves the old weights: the learners' step must show.
    assert result["max_logprob_diff_before_sync"] > 10 * SmokeConfig().tolerance
    assert result["max_logprob_diff_after_sync"] < SmokeConfig().tolerance
    assert result["synced"]


def test_bad_config_path_is_one_line(capsys):
    from ray_jobs.smoke import main

    with pytest.raises(SystemExit) as e:
        main(["--config", "/nonexistent/smoke.yaml"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "/nonexistent/smoke.yaml" in err


def test_malformed_config_is_one_line(tmp_path, capsys):
    from ray_jobs.smoke import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("zero_stage: [1,\n  zero_stage: 2\n")
    with pytest.raises(SystemExit) as e:
        main(["--config", str(bad)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.yaml" in err

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("learnerz: 2\n")
    with pytest.raises(SystemExit):
        main(["--config", str(unknown)])
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "learnerz" in err
