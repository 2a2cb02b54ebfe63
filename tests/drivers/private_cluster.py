"""A ``ray.cluster_utils.Cluster`` (real raylets on this machine) that nothing else attaches to:
Ray's address file goes to a private, short temp dir (socket paths under it have a length limit)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from types import ModuleType
from typing import Any


@contextlib.contextmanager
def private_cluster(module: ModuleType, head: dict[str, Any], nodes: tuple[dict[str, Any], ...] = ()) -> Iterator[Any]:
    """A head with ``head``'s node arguments and one node per entry of ``nodes``, this process
    connected to it. ``module``'s classes travel to the workers by value (they cannot import a
    test module)."""
    import ray
    from ray.cluster_utils import Cluster

    ray.cloudpickle.register_pickle_by_value(module)
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir = tempfile.mkdtemp(prefix="ttcl", dir="/tmp")
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args=head | {"include_dashboard": False})
        for node in nodes:
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        yield cluster
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR")
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(temp_dir, ignore_errors=True)
