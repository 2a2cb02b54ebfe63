"""Linux namespaces for the cluster tests: the ``unshare`` prefix that isolates a Ray instance (its
own PID namespace, so ending it ends everything it started; optionally its own network), and
whether it works on this machine."""

from __future__ import annotations

import os
import subprocess


def unshare(net: bool = False) -> list[str]:
    return ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", *(["--net"] if net else []),
            "--kill-child"]  # fmt: skip


def permitted(prefix: list[str], *probe: str) -> bool:
    """``prefix probe...`` succeeds here. ``TOOLTUNE_TEST_NO_NAMESPACES`` says no, to run the
    tests' fallbacks on a machine where namespaces work."""
    if os.environ.get("TOOLTUNE_TEST_NO_NAMESPACES"):
        return False
    try:
        return subprocess.run([*prefix, *probe], capture_output=True).returncode == 0
    except FileNotFoundError:  # no unshare, ip or nsenter
        return False
