"""Job submission to a real local head (``ray start --head`` on loopback): ``tooltune submit``
and plain ``ray job submit`` run the tiny SFT job; status, logs and stop work on it; a job whose
driver is killed is retried and resumes, matching an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.submit import SubmitError, is_loopback, job_spec
from tests.drivers.local_head import kill_and_retry, local_head, losses, tooltune

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The tiny SFT job, cut short: 6 steps on a small world, a checkpoint every step.
SMALL = [
    "data.world.n_train=200", "data.world.n_validation=20", "data.world.n_test=20", "train.max_steps=6",
    "train.eval_every=100", "train.save_every=1", "train.keep_last=2", "evaluation.during_training_every=null",
    "learners.cpus=1", "tensorboard=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def head():
    with local_head() as address:
        yield address


def test_job_spec_checks_before_submitting(tmp_path):
    spec = job_spec("sft", ROOT / "configs/tiny/sft.yaml", ["learner.lr=0.001"], "http://127.0.0.1:8265")
    # The entrypoint is what one would type, the config relative to the uploaded project; a
    # relative output_dir is made absolute in this checkout for a local head.
    assert spec.entrypoint() == (
        f"python -m ray_jobs.sft --config configs/tiny/sft.yaml learner.lr=0.001 output_dir={ROOT / 'runs/tiny-sft'}"
    )
    assert spec.entrypoint(resume=True).endswith(" resume=true") and spec.config.learner.lr == 0.001
    assert spec.runtime_env["working_dir"] == str(ROOT) and ".venv/" in spec.runtime_env["excludes"]
    with pytest.raises(SubmitError, match="output_dir 'runs/tiny-sft' is relative: on a remote cluster"):
        job_spec("sft", ROOT / "configs/tiny/sft.yaml", [], "http://10.0.0.7:8265")
    remote = job_spec("sft", ROOT / "configs/tiny/sft.yaml", ["output_dir=/shared/runs/a"], "ray-head:8265")
    assert "TOOLTUNE_CACHE" not in remote.runtime_env["env_vars"]  # this machine's paths stay here
    outside = tmp_path / "c.yaml"
    outside.write_text((ROOT / "configs/tiny/sft.yaml").read_text())
    with pytest.raises(SubmitError, match="must be inside the project directory"):
        job_spec("sft", outside, [], "http://127.0.0.1:8265")
    with pytest.raises(SubmitError, match=r"unknown key 'learner.lrr'"):
        job_spec("sft", ROOT / "configs/tiny/sft.yaml", ["learner.lrr=1"], "http://127.0.0.1:8265")
    with pytest.raises(SubmitError, match="unknown job 'sftt'"):
        job_spec("sftt", ROOT / "configs/tiny/sft.yaml", [], "http://127.0.0.1:8265")
    assert is_loopback("http://localhost:8265") and is_loopback("127.0.0.1:8265") and not is_loopback("http://10.1.2.3")


@pytest.fixture(scope="module")
def whole(head, tmp_path_factory) -> Path:
    """The small SFT job submitted with ``tooltune submit --follow``, run to the end."""
    run = tmp_path_factory.mktemp("whole") / "run"
    out = tooltune("submit", "sft", "--config", "configs/tiny/sft.yaml", *SMALL, f"output_dir={run}",
                   "--address", head, "--follow")  # fmt: skip
    assert "SUCCEEDED" in out.stdout, out.stdout[-3000:]
    job_id = out.stdout.split("submitted ", 1)[1].split()[0]
    assert json.loads((run / "provenance.json").read_text())["ray_job_id"] == job_id
    assert sorted(losses(run)) == list(range(1, 7))
    return run


@pytest.mark.slow
def test_tooltune_submit_and_plain_ray_job_submit_run_the_tiny_sft_job(head, whole, tmp_path):
    b = tmp_path / "b"

    # The README's command as written, from a shell whose PATH has no virtual environment: the
    # head (started with the stack's bin first on its PATH) gives the entrypoint its python.
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "RAY_ADDRESS")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != BIN)
    plain = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", head, "--working-dir", ".", "--",
         "python", "-m", "ray_jobs.sft", "--config", "configs/tiny/sft.yaml", *SMALL, f"output_dir={b}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert plain.returncode == 0 and "succeeded" in plain.stdout.lower(), plain.stdout[-3000:] + plain.stderr[-3000:]
    assert losses(b) == pytest.approx(losses(whole), rel=1e-6)  # the same job, the same numbers

    # status, logs and stop on a job that would run for long.
    out = tooltune("submit", "sft", "--config", "configs/tiny/sft.yaml", *SMALL, "train.max_steps=100000",
                   f"output_dir={tmp_path / 'c'}", "--address", head)  # fmt: skip
    job_id = out.stdout.split("submitted ", 1)[1].split(":")[0]
    deadline = time.time() + 300
    while "RUNNING" not in tooltune("status", job_id, "--address", head).stdout:
        assert time.time() < deadline, "the job never started"
        time.sleep(1)
    assert "stop requested" in tooltune("stop", job_id, "--address", head).stdout
    while "STOPPED" not in (status := tooltune("status", job_id, "--address", head).stdout):
        assert time.time() < deadline and "FAILED" not in status and "SUCCEEDED" not in status, status
        time.sleep(1)
    assert tooltune("logs", job_id, "--address", head).stdout.strip(), "a stopped job keeps its logs"


@pytest.mark.slow
def test_a_killed_job_is_retried_and_resumes_like_an_uninterrupted_run(head, whole, tmp_path):
    """The driver is killed (as a lost head process or a preempted node would) after a few
    steps: ``--retries`` submits again with ``resume=true``, and the run picks up its last
    checkpoint; its losses from there equal those of a run never interrupted."""
    cut = tmp_path / "cut"
    ids = kill_and_retry("sft", "configs/tiny/sft.yaml", [*SMALL, f"output_dir={cut}"], cut, head, tmp_path)
    resumed_from = json.loads((cut / "provenance.json").read_text())
    assert resumed_from["ray_job_id"] == ids[1]
    assert sorted(losses(cut)) == list(range(1, 7))
    assert losses(cut) == pytest.approx(losses(whole), rel=1e-6)


def test_token_from_a_file_travels_in_a_header_and_nowhere_else(tmp_path, capsys):
    from cluster.submit import auth_headers

    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    assert auth_headers(str(token)) == {"Authorization": "Bearer s3cret-token"}
    assert auth_headers(None) == {}  # Ray's own lookup (RAY_AUTH_TOKEN, ~/.ray/auth_token)
    (tmp_path / "empty").write_text("")
    with pytest.raises(SubmitError, match="empty token file"):
        auth_headers(str(tmp_path / "empty"))
    spec = job_spec("sft", ROOT / "configs/tiny/sft.yaml", ["output_dir=/shared/x"], "http://10.0.0.7:8265")
    assert "s3cret" not in spec.entrypoint() + str(spec.runtime_env)
