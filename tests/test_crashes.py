"""Crashes on either side cost no work: real processes killed with SIGKILL.

Fast tests use small real processes (python, sleep); the slow ones a real
deployment on loopback (TLS, registered keys, three hospitals) as
tests/test_deployment.py runs it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from common.folder_lock import FolderInUseError, locked
from common.processes import ManagedProcess
from server.checkpoint import (
    CHECKPOINT,
    PREVIOUS,
    Checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from server.superlink import ensure_free
from tests.conftest import ROOT, stop_leftovers
from tests.test_deployment import Federation, crash, output

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@contextlib.contextmanager
def medfed_log() -> Iterator[list[str]]:
    """The lines MedFed's logger writes while the block runs."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("medfed")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def checkpoint(round_: int) -> Checkpoint:
    return Checkpoint(round_, {"w": torch.full((3,), float(round_))}, {})


def test_the_previous_checkpoint_is_kept_and_a_damaged_latest_falls_back(tmp_path: Path) -> None:
    for round_ in (1, 2, 3):
        save_checkpoint(tmp_path, checkpoint(round_))
    assert sorted(p.name for p in tmp_path.iterdir()) == [PREVIOUS, CHECKPOINT]
    assert load_checkpoint(tmp_path).round == 3  # type: ignore[union-attr]
    rows = [{"round": r, "phase": p, "hospital": "overall"} for r in (1, 2, 3)
            for p in ("train", "round")]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    latest = tmp_path / CHECKPOINT
    latest.write_bytes(latest.read_bytes()[:100])  # truncated, as by a full disk
    with medfed_log() as lines:
        restored = load_checkpoint(tmp_path)
    assert restored is not None and restored.round == 2
    assert torch.equal(restored.weights["w"], torch.full((3,), 2.0))
    assert any(f"cannot read checkpoint {latest}" in line and f"resuming from "
               f"{tmp_path / PREVIOUS} instead (round 2)" in line for line in lines)
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in kept if r["phase"] == "round"] == [1, 2]  # round 3 runs again

    (tmp_path / PREVIOUS).write_bytes(b"")
    with pytest.raises(ValueError, match="no readable checkpoint") as err:
        load_checkpoint(tmp_path)
    assert str(latest) in str(err.value) and str(tmp_path / PREVIOUS) in str(err.value)


PARENT = """
import subprocess, sys, time
from common.watchdog import start_watchdog
start_watchdog()
# a child in its own session leaves a grandchild (own session) and exits: an orphan
subprocess.Popen([sys.executable, "-c", "import subprocess, time; "
                  "subprocess.Popen(['sleep', '120'], start_new_session=True)"],
                 start_new_session=True).wait()
subprocess.Popen(['sleep', '121'], start_new_session=True)
print('ready', flush=True)
time.sleep(120)
"""


def test_processes_in_their_own_sessions_die_with_a_sigkilled_parent(tmp_path: Path) -> None:
    """The orphan is re-parented to the command (subreaper); the watchdog stops all of it."""
    parent = ManagedProcess("parent", [sys.executable, "-c", PARENT], tmp_path / "parent.out",
                            cwd=ROOT).start()
    try:
        deadline = time.monotonic() + 30
        while "ready" not in parent.tail():
            assert time.monotonic() < deadline, parent.tail()
            time.sleep(0.2)
        time.sleep(1)  # at least one record by the watchdog
        tree = psutil.Process(parent.pid).children(recursive=True)
        sleeps = [p for p in tree if p.name() == "sleep"]
        assert len(sleeps) == 2 and all(p.ppid() == parent.pid for p in sleeps)
        os.kill(parent.pid, signal.SIGKILL)
        _, alive = psutil.wait_procs(tree, timeout=20)
        assert not alive, f"left running: {alive}"
        assert "is gone; stopping the 2 processes it left running" in parent.tail()
    finally:
        parent.stop(grace_s=2)


def test_a_held_folder_and_port_name_their_holder(tmp_path: Path) -> None:
    """A process started with the locked descriptor keeps the folder after its starter
    let go: the next claim is refused, naming it; a taken port names its listener."""
    lock = tmp_path / "run" / "server.lock"
    with locked(lock, "a MedFed server runs there") as fd:
        orphan = ManagedProcess("orphan", ["sleep", "60"], tmp_path / "sleep.out",
                                pass_fds=(fd,)).start()
    try:
        with pytest.raises(FolderInUseError) as err, locked(lock, "a MedFed server runs there"):
            pass
        assert f"PID {orphan.pid} (sleep)" in str(err.value)
        assert f"kill {orphan.pid}" in str(err.value)
        assert f"PID {os.getpid()}" in str(err.value)  # who took it first
    finally:
        orphan.stop(grace_s=2)
    with locked(lock, "a MedFed server runs there"):
        pass  # free again once its holder exited
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"held by PID {os.getpid()} "):
            ensure_free("127.0.0.1", port)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Federation]:
    """A provisioned loopback federation (three hospitals); every process stopped after."""
    fed = Federation(tmp_path)
    try:
        yield fed
    finally:
        fed.stop()
        stop_leftovers(tmp_path)


def flower_descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def command_lines(procs: list[psutil.Process]) -> str:
    lines = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            lines.append(" ".join(proc.cmdline()))
    return "\n".join(lines)


@pytest.mark.slow
def test_a_sigkilled_server_leaves_nothing_and_resume_completes(
        deployment: Federation) -> None:
    """SIGKILL of the server process alone after round 2: its SuperLink, SuperExec,
    ServerApp, gate and CLI all stop. A second server on the folder meanwhile is refused,
    naming the PID. With the latest checkpoint truncated, --resume restores round 1 from the
    one before and completes: each round once in metrics.jsonl."""
    fed = deployment
    plan = ["federation.rounds=3", "federation.min_train=2", "federation.fraction_evaluate=0"]
    for name in ("site-a", "site-b", "site-c"):
        fed.hospital(name)
    server = fed.server(*plan)
    fed.wait_round(1, server)
    rival = ManagedProcess("rival", [sys.executable, "-m", "server", "--certs",
                                     str(fed.certs.folder), "--host", "127.0.0.1", "--port",
                                     str(fed.port), "--resume", f"run_dir={fed.run_dir}"],
                           fed.root / "rival.out", cwd=ROOT).start()
    fed.started.append(rival)
    assert rival.wait(timeout_s=60) == 1
    assert "is in use (a MedFed server runs there)" in output(rival)
    assert f"taken by PID {server.pid}" in output(rival)

    fed.wait_round(2, server)
    tree = flower_descendants(server.pid)
    assert "flower-superlink" in command_lines(tree) and "flwr-serverapp" in command_lines(tree)
    os.kill(server.pid, signal.SIGKILL)
    server.wait(timeout_s=10)
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"left running:\n{command_lines(alive)}"

    latest = fed.run_dir / CHECKPOINT
    latest.write_bytes(latest.read_bytes()[:1000])
    resumed = fed.server(*plan, resume=True)
    assert resumed.wait(timeout_s=300) == 0, output(resumed)[-3000:]
    assert f"resuming from {fed.run_dir / PREVIOUS} instead (round 1)" in output(resumed)
    assert "resuming after round 1 of 3" in output(resumed)
    assert fed.rounds_done() == [1, 2, 3]
    train = [r["round"] for r in fed.rows()
             if r["phase"] == "train" and r["hospital"] == "overall"]
    assert train == [1, 2, 3]
    assert fed.summary()["rounds"] == 3


@pytest.mark.slow
def test_a_hospital_restarted_at_once_after_a_crash_rejoins(deployment: Federation) -> None:
    """site-c is SIGKILLed (node, runner and command) after round 1 and restarted within
    5 s: refused because the coordinator still holds its old session, it ends that session
    with its own key, connects again and trains in a later round."""
    fed = deployment
    plan = ["federation.rounds=4", "federation.min_train=2", "federation.fraction_evaluate=0"]
    nodes = {name: fed.hospital(name) for name in ("site-a", "site-b", "site-c")}
    server = fed.server(*plan)
    fed.wait_round(1, server)
    crash(nodes["site-c"])
    restarted = fed.start("site-c-again", nodes["site-c"].argv)  # same kit and home
    assert server.wait(timeout_s=400) == 0, output(server)[-3000:]
    assert "still held this hospital's previous session" in output(restarted)
    assert "it was ended, connecting again" in output(restarted)
    assert "not registered" not in output(restarted)
    assert restarted.poll() is None, output(restarted)[-2000:]
    trained = {r["round"] for r in fed.rows() if r["phase"] == "train"
               and r["hospital"] in ("hospital-2", "site-c") and "error" not in r}
    assert trained & {3, 4}, f"site-c trained in rounds {sorted(trained)} only"
