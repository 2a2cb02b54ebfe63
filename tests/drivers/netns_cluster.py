"""Three Ray nodes on one machine, each a real ``ray start`` in its own network namespace with its
own address on a bridge (10.77.0.1 head, .2 and .3 workers), so actors on different nodes talk
over TCP exactly as on a cluster. Run as root of its own user, mount, PID and network namespaces
(``tests/test_multinode.py`` starts it under ``unshare``); everything it starts ends with them.

    python -m tests.drivers.netns_cluster OUT_DIR JOB_DRIVER_MODULE [ARGS...]

runs ``python -m JOB_DRIVER_MODULE ARGS...`` on the head's namespace with ``RAY_ADDRESS`` set,
and exits with its status.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cluster.local import head_env, ray_bin

SUBNET = "10.77.0"
BRIDGE_IP = f"{SUBNET}.254"


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def in_ns(pid: int, *cmd: str) -> list[str]:
    return ["nsenter", f"--net=/proc/{pid}/ns/net", *cmd]


def make_node(i: int) -> int:
    """A network namespace held by a sleeping process, linked to the bridge, with address .i."""
    holder = subprocess.Popen(["unshare", "--net", "sleep", "infinity"])
    time.sleep(0.2)
    sh("ip", "link", "add", f"veth{i}", "type", "veth", "peer", "name", "eth0", "netns", str(holder.pid))
    sh("ip", "link", "set", f"veth{i}", "master", "br0")
    sh("ip", "link", "set", f"veth{i}", "up")
    for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0"],
                ["ip", "link", "set", "eth0", "up"], ["ip", "route", "add", "default", "via", BRIDGE_IP]):  # fmt: skip
        subprocess.run(in_ns(holder.pid, *cmd), check=True)
    return holder.pid


def main(out_dir: str, module: str, *args: str) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "link", "add", "br0", "type", "bridge")
    sh("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", "br0")
    sh("ip", "link", "set", "br0", "up")
    nodes = [make_node(i) for i in (1, 2, 3)]
    # Short: Ray's socket paths under it must stay within AF_UNIX's 107 bytes.
    temp = tempfile.mkdtemp(prefix="tt-ray-", dir="/tmp")
    ray = ray_bin()
    env = head_env()
    # The head holds no CPU: every role lands on the two workers (two CPUs each).
    for i, pid in enumerate(nodes, 1):
        common = [f"--node-ip-address={SUBNET}.{i}", f"--temp-dir={temp}/node{i}", "--disable-usage-stats"]
        if i == 1:
            cmd = [ray, "start", "--head", "--port=6379", "--num-cpus=0", "--include-dashboard=false", *common]
        else:
            cmd = [ray, "start", f"--address={SUBNET}.1:6379", "--num-cpus=2", *common]
        subprocess.run(in_ns(pid, *cmd), check=True, env=env, stdout=subprocess.DEVNULL)
    driver_env = dict(env, RAY_ADDRESS=f"{SUBNET}.1:6379")
    try:
        return subprocess.run(in_ns(nodes[0], sys.executable, "-m", module, *args), env=driver_env).returncode
    finally:
        # Only this PID namespace's Ray processes are visible to ray stop here.
        subprocess.run([ray, "stop", "--force"], capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
