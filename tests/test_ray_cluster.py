"""A simulation across a real two-node Ray cluster started on this machine.

Two ``ray start --block`` processes (a head and a second node joining it),
each owned by this test and stopped by PID with their descendants (never
``ray stop``, which would stop every Ray on the machine). Every port is
asked of the OS, so concurrent runs on the machine do not collide. The
simulation is pointed at the head with ``federation.ray_address``; Ray's
cluster tables (read by a separate driver process) then say on which node
each of Flower's ClientApp actors ran. The state API (``ray.util.state``)
needs Ray's dashboard packages, which the project does not install.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from common.compose import compose_settings, finalize
from common.processes import ManagedProcess, free_port, running, tool_env, wait_for_port
from simulate import simulate

pytestmark = pytest.mark.slow

# Ray's own processes per node listen on these; each gets a free port of its own
NODE_PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                   "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                   "--runtime-env-agent-port")


def _ray_bin() -> str:
    return str(Path(tool_env()["PATH"].split(":")[0]) / "ray")


def _node_flags() -> list[str]:
    flags = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--block",
             "--disable-usage-stats", "--object-store-memory", str(80 * 2**20)]
    for flag in NODE_PORT_FLAGS:
        flags += [flag, str(free_port())]
    return flags


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture
def ray_cluster(tmp_path: Path) -> Iterator[str]:
    """A head and a second node, 1 CPU each; yields the head's GCS address."""
    port = free_port()
    # Ray keeps a node's sockets under its temp dir; a short path stays under the
    # 107-byte limit of a Unix socket path
    temp = Path("/tmp") / f"medfed-ray-{port}"
    head = ManagedProcess("ray-head", [
        _ray_bin(), "start", "--head", "--port", str(port), "--temp-dir", str(temp),
        "--include-dashboard", "false", "--ray-client-server-port", str(free_port()),
        *_node_flags()], tmp_path / "ray-head.log")
    worker = ManagedProcess("ray-node-2", [
        _ray_bin(), "start", "--address", f"127.0.0.1:{port}", "--temp-dir", str(temp),
        *_node_flags()], tmp_path / "ray-node-2.log")
    with running(head):
        wait_for_port("127.0.0.1", port, timeout_s=60, proc=head)
        with running(worker):
            yield f"127.0.0.1:{port}"


# A driver of its own reads the cluster's node table from its GCS (waiting for both
# nodes), then, once told the run is over (a line on stdin), its actor table
CLUSTER_TABLES = """
import json, sys, time, ray
from ray._private.state import actors
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + 60
while True:
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    if len(nodes) == 2 or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps(nodes), flush=True)
sys.stdin.readline()
print(json.dumps([{"class": a["ActorClassName"], "node": a["Address"]["NodeID"]}
                  for a in actors().values()]), flush=True)
"""


def _json_line(driver: subprocess.Popen[str]) -> list:
    assert driver.stdout is not None
    line = driver.stdout.readline()
    if not line:
        raise RuntimeError(f"the Ray driver exited with code {driver.wait()}")
    return list(json.loads(line))


def test_simulation_runs_across_two_ray_nodes(tmp_path: Path, ray_cluster: str) -> None:
    before = _children()
    driver = subprocess.Popen([sys.executable, "-c", CLUSTER_TABLES, ray_cluster],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=tool_env())
    try:
        nodes = _json_line(driver)
        assert len(nodes) == 2, f"the second Ray node did not join: {nodes}"
        _run_and_check(tmp_path, ray_cluster, driver, nodes)
    finally:
        driver.kill()
        driver.wait()
    # the simulation's processes are gone; the cluster (stopped by the fixture) outlives it
    left = []
    for pid in _children() - before:
        try:
            if "ray" not in " ".join(psutil.Process(pid).cmdline()):
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    assert left == []


def _run_and_check(tmp_path: Path, ray_cluster: str, driver: subprocess.Popen[str],
                   nodes: list[str]) -> None:
    run_dir = tmp_path / "run"
    settings = finalize(compose_settings([
        "data.samples_per_hospital=64", "federation.rounds=1", "evaluation.bootstrap=0",
        f"federation.ray_address={ray_cluster}", f"run_dir={run_dir}"]), base=tmp_path)
    summary = simulate(settings)
    assert summary["rounds"] == 1 and len(summary["hospitals"]) == 3
    # every hospital trained in round 1 (three sound replies)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = {r["hospital"] for r in rows if r["phase"] == "train" and r["round"] == 1}
    assert trained >= {"hospital-0", "hospital-1", "hospital-2"}
    # Flower sized its actor pool to the cluster (2 CPUs / 1 per hospital): one ClientApp
    # actor per node; with 3 hospitals queued per phase both actors took messages
    assert driver.stdin is not None
    driver.stdin.write("done\n")
    driver.stdin.flush()
    actors = _json_line(driver)
    flower = [a for a in actors if a["class"] == "ClientAppActor"]
    assert sorted(a["node"] for a in flower) == sorted(nodes), actors
