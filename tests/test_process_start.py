"""Every MedFed process starts with passive OpenMP waits and a lean MONAI import."""

from __future__ import annotations

import os
import subprocess
import sys

from common.processes import RAY_START_ENV, tool_env


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


# Threads released together import the ServerApp and the ClientApp, as Flower's
# simulation process does (without common.monai_first, MONAI's own import and the
# lean one alike fail so now and then with "partially initialized module")
CONCURRENT_IMPORTS = """
import importlib, sys, threading
names = sys.argv[1:]
barrier, errors = threading.Barrier(len(names)), []
def load(name):
    barrier.wait()
    try:
        importlib.import_module(name)
    except BaseException as err:
        errors.append(f"{name}: {err!r}")
threads = [threading.Thread(target=load, args=(n,)) for n in names]
[t.start() for t in threads]; [t.join() for t in threads]
import torch
from monai.networks.nets import UNet
net = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,))
shape = tuple(net(torch.zeros(1, 1, 16, 16)).shape)
walked = "monai.apps.detection.networks.retinanet_detector" in sys.modules
print(errors, shape, walked)
"""
APPS = ["server.app", "client.app", "client.app", "server.app"]


def _imports(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", CONCURRENT_IMPORTS, *APPS], env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_apps_imported_by_threads_at_once_load_monai_lean_and_whole() -> None:
    env = {k: v for k, v in tool_env().items() if k != "MEDFED_MONAI_IMPORT"}
    assert _imports(env) == "[] (1, 2, 16, 16) False"


def test_monai_own_import_is_kept_on_request() -> None:
    assert _imports({**tool_env(), "MEDFED_MONAI_IMPORT": "eager"}) == "[] (1, 2, 16, 16) True"


def test_ray_starts_no_idle_workers_for_medfeds_processes() -> None:
    """A real local Ray, started with MedFed's environment, prestarts no worker.

    Flower's actors run in a job runtime environment, so workers Ray starts
    ahead for the bare driver are never used: on 2 cores they only delay the
    hospitals' start (common/processes.py, RAY_START_ENV).
    """
    code = ("import time, psutil, ray; ray.init(num_cpus=2, include_dashboard=False); "
            "time.sleep(4); me = psutil.Process(); "  # an idle worker's title is ray::IDLE
            "print(sum(p.name() == 'ray::IDLE' for p in me.children(recursive=True)))")
    env = {k: v for k, v in tool_env().items() if k != "RAY_prestart_worker_first_driver"}
    assert tool_env()["RAY_prestart_worker_first_driver"] == "0"
    assert _run(code, {**env, **RAY_START_ENV}) == "0"
    assert _run(code, {**env, "RAY_prestart_worker_first_driver": "1"}) != "0"  # the default


def test_a_ray_setting_the_user_exported_is_kept() -> None:
    env = {**os.environ, "RAY_prestart_worker_first_driver": "1"}
    code = ("from common.processes import tool_env; "
            "print(tool_env()['RAY_prestart_worker_first_driver'])")
    assert _run(code, env) == "1"
