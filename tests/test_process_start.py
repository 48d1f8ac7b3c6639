"""What every MedFed process sets up before its first batch.

- Idle OpenMP threads wait passively (common/cpu_waits.py).
- MONAI is imported without its eager walk of every module
  (common/monai_import.py), and builds the same networks.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys

from common.config import ModelConfig, TaskConfig
from common.models import build_model
from common.processes import tool_env

MODELS = {"cnn": ("classification", [28, 28], [16, 32, 64]),
          "unet": ("segmentation", [64, 64], [16, 32, 64, 128])}

PROBE = """
import json, os, sys
import server.baseline, client.app, torch
from common.config import ModelConfig, TaskConfig
from common.models import build_model
models = json.loads(sys.argv[1])
sums = {name: float(sum(p.double().sum() for p in build_model(
    TaskConfig(kind=kind, image_size=size), ModelConfig(name=name, channels=ch), seed=0
).state_dict().values())) for name, (kind, size, ch) in models.items()}
print(json.dumps({"policy": os.environ.get("OMP_WAIT_POLICY"), "sums": sums,
                  "mlflow": "mlflow" in sys.modules,
                  "monai_modules": sum(1 for m in sys.modules if m.split(".")[0] == "monai")}))
"""


def _checksum(name: str) -> float:
    kind, size, channels = MODELS[name]
    net = build_model(TaskConfig(kind=kind, image_size=size),
                      ModelConfig(name=name, channels=channels), seed=0)
    return float(sum(p.double().sum() for p in net.state_dict().values()))


def test_entry_points_wait_passively_and_import_monai_lean() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(MODELS)], env=env,
                         capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["policy"] == "PASSIVE"
    assert probe["mlflow"] is False
    # ``import monai`` would load every module its walk finds (less handlers/bundle/fl)
    import monai

    walked = [name for _, name, _ in pkgutil.walk_packages(monai.__path__, "monai.")
              if not name.startswith(("monai.handlers", "monai.bundle", "monai.fl"))]
    assert probe["monai_modules"] < 0.7 * len(walked)
    for name in MODELS:  # same networks, same seeded weights, whichever way MONAI came in
        assert probe["sums"][name] == _checksum(name)


def test_a_policy_the_user_exported_is_kept_and_inherited() -> None:
    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}
    code = ("import server, os; from common.processes import tool_env; "
            "print(os.environ['OMP_WAIT_POLICY'], tool_env()['OMP_WAIT_POLICY'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "ACTIVE ACTIVE"


def test_processes_started_by_medfed_inherit_the_policy() -> None:
    import server  # noqa: F401  (sets the policy in this process)

    assert tool_env()["OMP_WAIT_POLICY"] == os.environ["OMP_WAIT_POLICY"]
