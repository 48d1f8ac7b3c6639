"""Idle OpenMP threads wait passively in every MedFed process (common/cpu_waits.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from common.processes import tool_env


def _run(code: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().splitlines()[-1]


def test_entry_points_set_passive_waits_before_torch_loads() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import sys, os; import server.baseline, client.app; "
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    assert _run(code, env) == "PASSIVE True"


def test_a_policy_the_user_exported_is_kept_and_inherited() -> None:
    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}
    code = ("import server, os; from common.processes import tool_env; "
            "print(os.environ['OMP_WAIT_POLICY'], tool_env()['OMP_WAIT_POLICY'])")
    assert _run(code, env) == "ACTIVE ACTIVE"


def test_processes_started_by_medfed_inherit_the_policy() -> None:
    import server  # noqa: F401  (sets the policy in this process)

    assert tool_env()["OMP_WAIT_POLICY"] == os.environ["OMP_WAIT_POLICY"]
