"""Ray's fake multi-node autoscaler with our own base config (the pip wheel lacks Ray's example).

Every "node" the autoscaler launches is one more raylet on this machine, with the resources its
node type declares (fake GPUs included): enough to test that a job's pending placement makes
the autoscaler add nodes and that idle nodes go away. Starting and stopping it runs ``ray stop
--force``, which ends every Ray process this user can see: run it in its own PID and network
namespace (``tests/test_autoscaling.py`` does) or on a machine with nothing else on Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from cluster.local import head_env, ray_bin

BASE = Path(__file__).resolve().parent / "fake" / "multinode.yaml"


class FakeAutoscalingCluster:
    """A head with ``head_resources`` and worker node types that scale from ``min_workers``."""

    def __init__(self, head_resources: dict[str, float], worker_node_types: dict[str, Any], **overrides: Any):
        self.head_resources = dict(head_resources)
        cfg = yaml.safe_load(BASE.read_text())
        cfg["available_node_types"] = {
            **worker_node_types,
            "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
        }
        cfg.update(overrides)
        self.config = cfg

    def start(self) -> None:
        subprocess.run([ray_bin(), "stop", "--force"], check=True, capture_output=True)
        fd, path = tempfile.mkstemp(suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self.config, f)
        res = dict(self.head_resources)
        cmd = [ray_bin(), "start", "--head", f"--autoscaling-config={path}", f"--num-cpus={res.pop('CPU', 0)}",
               f"--num-gpus={res.pop('GPU', 0)}", "--include-dashboard=false"]  # fmt: skip
        if res:
            cmd.append(f"--resources={json.dumps(res)}")
        env = head_env() | {"AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
        subprocess.run(cmd, check=True, env=env, capture_output=True)

    def shutdown(self) -> None:
        subprocess.run([ray_bin(), "stop", "--force"], check=True, capture_output=True)
