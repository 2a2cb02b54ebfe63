"""The one way every job reads its config from the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from tooltune.config import ConfigError, StrictModel, load_config

C = TypeVar("C", bound=StrictModel)


def job_config(cls: type[C], description: str, argv: list[str] | None = None) -> C:
    """``--config FILE`` plus dotted ``key=value`` overrides; a bad config is one line, exit 2."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=1e-4")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, cls, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input the user can fix (config, data files) is one line on stderr and exit 2."""
    from tooltune.data import DataError

    try:
        yield
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
