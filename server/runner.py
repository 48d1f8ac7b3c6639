"""Submit a MedFed run to a SuperLink with Flower's CLI and follow it to the end.

Used by ``simulate.py`` (a local simulation SuperLink) and by the ``server``
command (a deployment SuperLink with TLS). The validated settings travel as
one JSON string in Flower's run config (key ``medfed-config``), written to a
TOML file in the run folder and passed with ``flwr run --run-config``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common import wire
from common.config import Settings, settings_to_json
from common.logs import medfed_logger
from common.processes import stop_pids, tool_env
from server.app_stage import stage_app
from server.report import SUMMARY_FILE

RUN_CONFIG_FILE = "run_config.toml"
FLWR_LOG = "flwr_run.log"
APP_STAGE = ".flwr-app"
"""Folder of the run folder holding the app's files while ``flwr run`` bundles them."""

log = medfed_logger()


class RunFailedError(RuntimeError):
    """The federated run did not complete."""


@dataclass(frozen=True)
class Connection:
    """How Flower's CLI reaches a SuperLink (one ``[superlink.<name>]`` entry).

    Attributes:
        name: connection name in ``$FLWR_HOME/config.toml``.
        address: ``host:port`` of the SuperLink's control API.
        root_certificates: CA certificate file for TLS; None = insecure.
    """

    name: str
    address: str
    root_certificates: str | None = None


def flwr_bin(name: str) -> str:
    """Path of a Flower console script installed next to this Python."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def write_flwr_config(flwr_home: Path, connection: Connection) -> None:
    """Write ``$FLWR_HOME/config.toml`` holding the one connection MedFed uses."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{connection.name}"', "",
             f"[superlink.{connection.name}]", f'address = "{connection.address}"']
    if connection.root_certificates:
        lines.append(f"root-certificates = {json.dumps(str(connection.root_certificates))}")
    else:
        lines.append("insecure = true")
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def write_run_config(settings: Settings, run_dir: Path) -> Path:
    """Write the run-config override file carrying the settings as JSON."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_CONFIG_FILE
    # A JSON string literal is a valid TOML basic string
    path.write_text(f"{wire.RUN_CONFIG_KEY} = {json.dumps(settings_to_json(settings))}\n")
    return path


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's CLI and servers."""
    return {**tool_env(), "FLWR_HOME": str(flwr_home)}


def _is_progress(line: str) -> bool:
    return "[MedFed]" in line or "ERROR" in line or "Traceback" in line or "Error" in line


def _last_error(log_path: Path) -> str | None:
    """The last exception line Flower logged (``SomethingError: ...``), if any."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines()
             if re.match(r"^\w+(Error|Exception): ", line.strip())]
    return lines[-1] if lines else None


def submit_and_follow(
    settings: Settings,
    connection: Connection,
    *,
    project_dir: Path,
    flwr_home: Path,
    federation_config: Mapping[str, object] | None = None,
    verbose: bool = False,
) -> dict:
    """Submit the run, stream its log, and return ``summary.json``.

    Lines tagged ``[MedFed]`` (round progress), warnings about hospitals and
    errors are echoed; the full log goes to ``run_dir/flwr_run.log``.

    Raises:
        RunFailedError: the run ended without writing its summary (the
            server's error is quoted).
    """
    run_dir = Path(settings.run_dir)
    write_flwr_config(flwr_home, connection)
    # The app's files, copied where Flower's bundle walk is quick (server/app_stage.py)
    stage = stage_app(project_dir, run_dir / APP_STAGE)
    argv = [flwr_bin("flwr"), "run", str(stage), connection.name,
            "--run-config", str(write_run_config(settings, run_dir)), "--stream"]
    if federation_config:
        pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in federation_config.items())
        argv += ["--federation-config", pairs]
    summary_path = run_dir / SUMMARY_FILE
    summary_path.unlink(missing_ok=True)
    with open(run_dir / FLWR_LOG, "a") as log_file:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=flwr_env(flwr_home), cwd=project_dir, start_new_session=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log_file.write(line)
                log_file.flush()
                if verbose or _is_progress(line):
                    print(line.rstrip(), flush=True)
            code = proc.wait()
        finally:
            if proc.poll() is None:
                stop_pids([proc.pid])
            shutil.rmtree(stage, ignore_errors=True)
    if not summary_path.exists():
        error = run_dir / "error.txt"
        reason = error.read_text().splitlines()[0] if error.exists() else _last_error(
            run_dir / FLWR_LOG) or f"flwr exited {code}"
        raise RunFailedError(f"the federated run failed: {reason} (full log: {run_dir / FLWR_LOG})")
    result: dict = json.loads(summary_path.read_text())
    return result
