"""The ``tooltune`` command: offline model preparation and the tool world.

    tooltune models prepare smollm2 [--out DIR] [--force]
    tooltune models prepare tiny --out DIR
    tooltune world --out DIR [key=value ...]
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

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
