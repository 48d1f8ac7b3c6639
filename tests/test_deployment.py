"""Deployment end to end on loopback: real server and hospital processes, TLS, registered keys."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from common.processes import ManagedProcess, free_port
from server.provision import provision
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

SMALL = ["data.samples_per_hospital=48", "model.channels=[8,16]", "data.batch_size=16"]


class Federation:
    """A provisioned federation on loopback whose processes the test starts and stops."""

    def __init__(self, root: Path, hospitals: list[str]) -> None:
        self.root, self.port = root, free_port()
        self.hospitals = hospitals
        provision(root / "deploy", hosts=["localhost", "127.0.0.1"], hospitals=hospitals,
                  server_address=f"127.0.0.1:{self.port}")
        self.run_dir = root / "run"
        self.started: list[ManagedProcess] = []

    def server(self, *overrides: str, resume: bool = False, insecure: bool = False
               ) -> ManagedProcess:
        argv = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--insecure"] if insecure else ["--certs", str(self.root / "deploy" / "server")]
        argv += ["--resume"] if resume else []
        argv += [f"run_dir={self.run_dir}", *SMALL, *overrides]
        return self._start("server", argv)

    def hospital(self, index: int, *, name: str | None = None, insecure: bool = False,
                 kit: str | None = None) -> ManagedProcess:
        name = name or self.hospitals[index]
        folder = self.root / "deploy" / "hospitals" / (kit or name)
        argv = [sys.executable, "-m", "client", "--superlink", f"127.0.0.1:{self.port}",
                "--name", name, "--partition-id", str(index), "--num-partitions", "3",
                "--log", str(self.root / f"{name}-node.log")]
        if insecure:
            argv += ["--insecure", "--max-restarts", "0"]
        else:
            argv += ["--key", str(folder / f"{kit or name}.key"), "--ca", str(folder / "ca.crt")]
        return self._start(name, argv)

    def _start(self, name: str, argv: list[str]) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.root / f"{name}.out", cwd=ROOT).start()
        self.started.append(proc)
        return proc

    def rows(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def wait_round(self, round_: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(r["phase"] == "round" and r["round"] >= round_ for r in self.rows()):
                return
            time.sleep(1)
        raise TimeoutError(f"round {round_} not reached in {timeout_s} s")

    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())

    def stop(self) -> None:
        for proc in reversed(self.started):
            proc.stop()


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    fed = Federation(tmp_path, ["site-a", "site-b", "site-c"])
    try:
        yield fed
    finally:
        fed.stop()
        left = {p.pid for p in psutil.Process().children(recursive=True)} - before
        assert not left, f"processes left running: {left}"


def _output(proc: ManagedProcess) -> str:
    return proc.log_path.read_text(errors="replace")


def test_tls_auth_three_hospitals_and_a_stranger(federation: Federation) -> None:
    """Three registered hospitals train 2 rounds over TLS; an unregistered key and a
    plain-text node are refused, and the run is unaffected."""
    server = federation.server("federation.rounds=2", "federation.min_train=3")
    for i in range(3):
        federation.hospital(i)
    # a stranger: it trusts the federation's CA but its key was never registered
    provision(federation.root / "other", hosts=["localhost"], hospitals=["intruder"],
              server_address="x")
    stranger_kit = federation.root / "other" / "hospitals" / "intruder"
    stranger = ManagedProcess("intruder", [
        sys.executable, "-m", "client", "--superlink", f"127.0.0.1:{federation.port}",
        "--name", "intruder", "--partition-id", "0", "--num-partitions", "3",
        "--key", str(stranger_kit / "intruder.key"),
        "--ca", str(federation.root / "deploy" / "server" / "ca.crt"),
        "--max-restarts", "0", "--log", str(federation.root / "intruder-node.log")],
        federation.root / "intruder.out", cwd=ROOT).start()
    federation.started.append(stranger)
    plain = federation.hospital(0, name="plaintext", insecure=True)
    assert server.wait(timeout_s=400) == 0, _output(server)[-3000:]
    summary = federation.summary()
    assert summary["rounds"] == 2
    assert set(summary["hospitals"]) == {"hospital-0", "hospital-1", "hospital-2"}
    assert all(0 <= m["auc"] <= 1 for m in summary["hospitals"].values())
    # the stranger's key was refused by SuperNode authentication
    assert stranger.wait(timeout_s=60) != 0
    assert "Failed to activate SuperNode" in (federation.root / "intruder-node.log").read_text()
    # the plain-text node never got through TLS
    plain.stop()
    assert "SuperNode ID" not in (federation.root / "plaintext-node.log").read_text()


def test_hospital_killed_mid_run_and_server_resumed(federation: Federation) -> None:
    """A hospital dies in round 2; the run goes on with two. The server is then stopped
    and resumed from its checkpoint: round numbers continue, not restart."""
    server = federation.server("federation.rounds=4", "federation.min_train=2",
                               "federation.min_evaluate=2")
    nodes = [federation.hospital(i) for i in range(3)]
    federation.wait_round(1, timeout_s=300)
    nodes[2].stop()  # hospital site-c dies (its node and ClientApps, by PID)
    federation.wait_round(2, timeout_s=300)
    server.stop()  # the coordinating site goes down after round 2
    done = max(r["round"] for r in federation.rows() if r["phase"] == "round")
    assert 2 <= done < 4
    resumed = federation.server("federation.rounds=4", "federation.min_train=2",
                                "federation.min_evaluate=2", resume=True)
    assert resumed.wait(timeout_s=400) == 0, _output(resumed)[-3000:]
    rounds = [r["round"] for r in federation.rows() if r["phase"] == "round"]
    assert rounds == list(range(1, 5)), rounds
    assert federation.summary()["rounds"] == 4
    assert "resuming after round" in _output(resumed)
