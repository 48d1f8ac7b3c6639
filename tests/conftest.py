"""Shared fixtures: real data locations, Flower task identity, small settings."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from flwr.supercore.task_identity import TaskIdentity

from common.compose import compose_settings, finalize
from common.config import Settings
from common.processes import stop_pids

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PNEUMONIA = SHARED / "data" / "pneumoniamnist" / "pneumoniamnist.npz"
BRAIN = SHARED / "data" / "brain-mri"

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


@pytest.fixture
def flower_identity() -> Iterator[None]:
    """Set the task identity Flower's runtime sets before it runs an app."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def small_settings(tmp_path: Path, *overrides: str) -> Settings:
    """Default (synthetic) settings, shrunk for tests, with the run folder in tmp_path.

    Two Ray actors (``federation.parallel_hospitals=2``, this machine's cores)
    instead of the default three: on such tiny rounds each actor's start
    (importing PyTorch and MONAI, about 12 CPU-s) costs more than the waves it
    saves (default simulation: round 1 32 s against 39 s on 2 cores). The
    default simulation test keeps three.
    """
    base = ["data.samples_per_hospital=64", "federation.rounds=2", f"run_dir={tmp_path / 'run'}",
            "federation.parallel_hospitals=2"]
    return finalize(compose_settings([*base, *overrides]), base=ROOT)


def needs_shared(path: Path) -> pytest.MarkDecorator:
    """Skip a test when ../shared/data is not beside the checkout."""
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not found (../shared missing)")


def stop_leftovers(tmp_path: Path) -> None:
    """Stop, by PID, every process whose command line names ``tmp_path``; then fail if any was.

    Called after a test stopped the processes it started: anything still running
    with the test's folder in its command line was started (indirectly) by it.
    """
    time.sleep(0.5)
    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if str(tmp_path) in " ".join(proc.info["cmdline"] or []):
                left.append(proc.info["pid"])
    stop_pids(left, grace_s=5)
    assert not left, f"processes left running: {left}"
