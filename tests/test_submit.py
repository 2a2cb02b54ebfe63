"""Job submission to a real local head (``ray start --head`` on loopback): ``tooltune submit``
and plain ``ray job submit`` run the tiny SFT job; status, logs and stop work on it; a job whose
driver is killed is retried and resumes, matching an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.local import head_command, head_env
from cluster.submit import SubmitError, is_loopback, job_spec
from tests.drivers.namespaces import permitted, unshare
from trainers.learner import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The tiny SFT job, cut short: 6 steps on a small world, a checkpoint every step.
SMALL = [
    "data.world.n_train=200", "data.world.n_validation=20", "data.world.n_test=20", "train.max_steps=6",
    "train.eval_every=100", "train.save_every=1", "train.keep_last=2", "evaluation.during_training_every=null",
    "learners.cpus=1", "tensorboard=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A loopback head on free ports, in its own PID namespace where permitted (ending it ends
    every process it started, and nothing else), else in its own process group."""
    temp = tmp_path_factory.mktemp("ray")
    dashboard = free_port()
    cmd = head_command(num_cpus=2, port=free_port(), dashboard_port=dashboard, temp_dir=str(temp), block=True)
    cmd += [f"--{name}={free_port()}" for name in (
        "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port",
    )]  # fmt: skip
    isolated = permitted(unshare(), "true")
    if isolated:
        cmd = [*unshare(), *cmd]
    print(f"head: {'own PID namespace' if isolated else 'own process group (unshare not permitted)'}")
    log = open(temp / "head.log", "w")
    proc = subprocess.Popen(cmd, env=head_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 120
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"head did not come up: {(temp / 'head.log').read_text()[-2000:]}") from None
                time.sleep(1)
        yield address
    finally:
        # SIGKILL: in its own PID namespace the head's init goes and every process there with it;
        # otherwise its process group does (a graceful `ray start --block` exit takes ~30 s).
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def tooltune(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    # ``python -m`` from the project: this checkout's code (the console script imports the
    # checkout the environment was installed from).
    out = subprocess.run([sys.executable, "-m", "ray_jobs.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"tooltune {' '.join(args)} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def driver_pids(marker: str, job: str = "sft") -> list[int]:
    """Python processes running ``ray_jobs.JOB`` whose command line holds ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and f"ray_jobs.{job}".encode() in argv and marker.encode() in argv and b"python" in argv[0]:
            pids.append(int(proc.name))
    return pids


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


# The tiny PPO job, small: GRPO (no critic), no reward model, one actor rank, one rollout worker.
PPO = [
    "train.steps=4", "train.save_every=1", "train.eval_every=100", "algorithm.estimator=grpo",
    "algorithm.kl_in_reward=false", "algorithm.kl_kind=k3", "roles.actor.num_ranks=1", "actor.micro_batch_size=4",
    "roles.rollout.num_ranks=1", "tensorboard=false", "ray.object_store_gib=0.3",
]  # fmt: skip


@pytest.mark.slow
def test_a_killed_ppo_job_is_retried_and_resumes_like_an_uninterrupted_run(head, tmp_path, tiny_model_dir):
    """The same for the PPO job: killed after step 2, retried, its steps 3 and 4 (rewards,
    generated tokens, losses, KL) are those of the run never interrupted."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = [f"model={tiny_model_dir}", *PPO]
    out = tooltune("submit", "ppo", "--config", "configs/tiny/ppo.yaml", *args, f"output_dir={whole}", "--address", head, "--follow")
    assert "SUCCEEDED" in out.stdout, out.stdout[-3000:]
    kill_and_retry("ppo", "configs/tiny/ppo.yaml", [*args, f"output_dir={cut}"], cut, head, tmp_path)

    def steps(run: Path) -> dict[int, dict]:
        return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r}

    before, after = steps(whole), steps(cut)
    assert sorted(before) == sorted(after) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("reward/total", "batch/generated_tokens", "batch/sequence_tokens", "policy/version"):
            assert after[step][key] == before[step][key], (step, key)
        for key in ("train/loss", "policy/kl_ref", "policy/entropy"):
            assert after[step][key] == pytest.approx(before[step][key], rel=1e-4, abs=1e-6), (step, key)


def kill_and_retry(job: str, config: str, overrides: list[str], run: Path, head: str, tmp_path: Path) -> list[str]:
    """Submit with ``--retries 1``, SIGKILL the driver once the run logged step 2, and wait for
    the retry to succeed. Returns both attempts' job ids."""
    from cluster.submit import client, submit_with_retries

    spec = job_spec(job, ROOT / config, overrides, head)
    cut = run
    result: dict = {}
    log = open(tmp_path / "retries.log", "w")
    runner = threading.Thread(target=lambda: result.update(zip(("ids", "status"), submit_with_retries(
        spec, head, retries=1, follow=False, out=log))))  # fmt: skip
    runner.start()
    deadline = time.time() + 600
    while not ((cut / "metrics.jsonl").exists() and len(losses(cut)) >= 2):
        assert time.time() < deadline and runner.is_alive(), "the first attempt never reached step 2"
        time.sleep(0.2)
    # The driver's pid as this machine sees it (the head may run in its own PID namespace).
    drivers = [pid for pid in driver_pids(f"output_dir={cut}", job) if pid != os.getpid()]
    assert len(drivers) == 1, drivers
    os.kill(drivers[0], signal.SIGKILL)
    c = client(head)
    runner.join(600)
    log.close()
    assert result["status"] == "SUCCEEDED" and len(result["ids"]) == 2, (tmp_path / "retries.log").read_text()
    assert c.get_job_status(result["ids"][0]).value == "FAILED"
    assert "resume=true" in c.get_job_info(result["ids"][1]).entrypoint
    return result["ids"]


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
