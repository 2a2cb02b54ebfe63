"""The ``tooltune`` command: offline model preparation, the tool world, and jobs on a Ray cluster
(a driver-layer module: it reaches the domain and ``cluster``).

    tooltune models prepare smollm2 [--out DIR] [--force]
    tooltune models prepare tiny --out DIR
    tooltune world --out DIR [key=value ...]
    tooltune head start|stop [--num-cpus N] [--port P] [--dashboard-port P]
    tooltune submit JOB --config FILE [key=value ...] [--address URL] [--follow] [--retries N]
    tooltune status|logs|stop ID [--address URL]
"""

from __future__ import annotations

import argparse
import sys


def _models_prepare(args: argparse.Namespace) -> None:
    from tooltune import models

    if args.name == "smollm2":
        path = models.prepare_smollm2(args.out, force=args.force)
    else:
        path = models.build_tiny_model(args.out) if args.out else models.tiny_model()
    print(path)


def _world(args: argparse.Namespace) -> None:
    from tooltune.config import apply_overrides
    from tooltune.world import WorldConfig, format_world_stats, run_world

    cfg = apply_overrides(WorldConfig(), args.overrides, source="tooltune world")
    print(format_world_stats(run_world(args.out, cfg)))


def _head(args: argparse.Namespace) -> None:
    from cluster.local import head_down, head_up

    if args.action == "start":
        address = head_up(args.num_cpus, args.port, args.dashboard_port)
        print(f"head up; submit jobs to {address} (dashboard there too); `tooltune head stop` ends it")
    else:
        head_down()


def _submit(args: argparse.Namespace) -> None:
    from cluster import submit as sub

    address = args.address or sub.default_address()
    spec = sub.job_spec(args.job, args.config, args.overrides, address)
    resources = {"entrypoint_num_cpus": args.entrypoint_num_cpus, "entrypoint_num_gpus": args.entrypoint_num_gpus}
    if not args.follow and not args.retries:
        job_id = sub.submit(spec, address, args.token_file, args.submission_id, **resources)
        print(f"submitted {job_id}: {spec.entrypoint()}")
        print(f"watch it: tooltune status {job_id} / tooltune logs {job_id} (--address {address})")
        return
    ids, status = sub.submit_with_retries(spec, address, args.retries, args.token_file, follow=args.follow, **resources)
    if status != "SUCCEEDED":
        raise SystemExit(1)


def _job_action(args: argparse.Namespace) -> None:
    from cluster import submit as sub

    c = sub.client(args.address or sub.default_address(), args.token_file)
    if args.command == "status":
        info = c.get_job_info(args.id)
        print(f"{args.id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    elif args.command == "logs":
        print(c.get_job_logs(args.id), end="")
    else:
        print(f"{args.id}: stop {'requested' if c.stop_job(args.id) else 'not needed (already ended)'}")


def main(argv: list[str] | None = None) -> None:
    from tooltune.config import ConfigError

    parser = argparse.ArgumentParser(prog="tooltune", description="Teach language models to call tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="prepare models offline").add_subparsers(dest="action", required=True)
    prep = models.add_parser("prepare", help="build or convert a model into a cached checkpoint")
    prep.add_argument("name", choices=["smollm2", "tiny"])
    prep.add_argument("--out", help="output directory (default: the cache)")
    prep.add_argument("--force", action="store_true", help="rebuild even if cached")
    prep.set_defaults(func=_models_prepare)

    world = sub.add_parser("world", help="generate the seeded tool world as Parquet splits")
    world.add_argument("--out", required=True)
    world.add_argument("overrides", nargs="*", help="WorldConfig overrides, e.g. seed=3 n_train=2000")
    world.set_defaults(func=_world)

    head = sub.add_parser("head", help="a local Ray head (loopback only) for job submission")
    head.add_argument("action", choices=["start", "stop"])
    head.add_argument("--num-cpus", type=int)
    head.add_argument("--port", type=int, default=6379)
    head.add_argument("--dashboard-port", type=int, default=8265)
    head.set_defaults(func=_head)

    def remote(p: argparse.ArgumentParser) -> None:
        p.add_argument("--address", help="job server, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS or that)")
        p.add_argument("--token-file", help="file holding the cluster's auth token (else Ray's own lookup)")

    submit = sub.add_parser("submit", help="submit a job (ray_jobs.JOB) to a Ray cluster")
    submit.add_argument("job", help="sft, ppo, distill, preferences, reward_model, evaluate or demo")
    submit.add_argument("--config", required=True)
    submit.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=1e-4")
    submit.add_argument("--follow", action="store_true", help="stream its logs until it ends")
    submit.add_argument("--retries", type=int, default=0, help="resubmit a failed job N times; each resumes")
    submit.add_argument("--submission-id")
    submit.add_argument("--entrypoint-num-cpus", type=float)
    submit.add_argument("--entrypoint-num-gpus", type=float)
    remote(submit)
    submit.set_defaults(func=_submit)
    for name, text in (("status", "a job's status"), ("logs", "a job's logs"), ("stop", "stop a job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("id")
        remote(p)
        p.set_defaults(func=_job_action)

    # Overrides may follow --config (argparse would take them for the subcommand's positional too early).
    args, extra = parser.parse_known_args(argv)
    bad = extra if args.command != "submit" else [x for x in extra if x.startswith("-") or "=" not in x]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from cluster.submit import SubmitError

    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, SubmitError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
