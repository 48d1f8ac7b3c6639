"""Simulate several hospitals training one model together, on this machine.

    python simulate.py                          # synthetic data, 3 hospitals
    python simulate.py experiment=pneumonia     # PneumoniaMNIST, 3 hospitals
    python simulate.py experiment=brain_mri federation.rounds=3

Arguments are Hydra overrides of ``conf/`` (``--help`` lists the groups).
Runs Flower's simulation engine (Ray) through Flower's own CLI against a
local simulation SuperLink that this script starts and, whatever happens,
stops again by PID. Writes a run folder (``runs/<name>-<time>`` unless
``run_dir=...``) with the resolved config, per-round per-hospital metrics,
``summary.json``, checkpoints and the final model.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil

from common.atomic import atomic_file
from common.compose import CONF_DIR, compose_settings, finalize, settings_yaml
from common.config import ConfigError, FederationConfig, Settings
from common.logs import medfed_logger
from common.participation import taking_part
from common.processes import (
    ManagedProcess,
    free_port,
    running,
    stop_children_on_signals,
    wait_for_port,
)
from server.report import ERROR_FILE
from server.runner import Connection, RunFailedError, flwr_bin, submit_and_follow
from server.summary_table import print_summary

PROJECT_DIR = Path(__file__).resolve().parent
log = medfed_logger()


def simulation_superlink(run_dir: Path, port: int, ray_address: str | None = None
                         ) -> ManagedProcess:
    """A SuperLink in simulation mode on ``127.0.0.1:port``, logging to the run folder.

    With ``ray_address`` the simulation joins that Ray cluster: Flower 1.41's
    federation config has no Ray address, but its Ray backend calls
    ``ray.init()`` without one, which then connects to ``RAY_ADDRESS``.
    """
    argv = [flwr_bin("flower-superlink"), "--simulation", "--insecure",
            "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation"]
    # Flower's SuperExec looks for new tasks (the simulation is the only one)
    # once a second by default, and keeps looking, over HTTP to the SuperLink,
    # for the whole run: every 0.5 s costs at most half a second once, where
    # every 0.1 s cost about 8 CPU-s more per default run (2 cores, 2 pairs)
    env = {"FLWR_HOME": str(run_dir / "flwr-home"), "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.5"}
    if ray_address is not None:
        env["RAY_ADDRESS"] = ray_address
    return ManagedProcess("superlink", argv, run_dir / "superlink.log", env=env)


def ray_init_args(fed: FederationConfig) -> dict[str, int]:
    """Flower's ``init-args-*`` federation keys: a local Ray's CPUs, nothing for a cluster.

    Ray refuses resource arguments when it connects to an existing cluster;
    the cluster's nodes declare their own.
    """
    return {} if fed.ray_address is not None else {"init-args-num-cpus": ray_cpus(fed)}


def ray_cpus(fed: FederationConfig) -> int:
    """CPUs Ray may hand out: enough for ``parallel_hospitals`` at once, at least the cores."""
    cores = os.cpu_count() or 1
    return max(fed.parallel_hospitals * fed.num_cpus, fed.num_cpus, cores)


def simulate(settings: Settings, *, verbose: bool = False, project_dir: Path = PROJECT_DIR
             ) -> dict:
    """Run the federated simulation described by ``settings``; return its summary.

    ``project_dir`` is the Flower app to run (this project unless a test
    passes another app built on the same packages).
    """
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(settings_yaml(settings))
    fed = settings.federation
    log.info("[MedFed] %s: %d hospitals x %d rounds -> %s", settings.name,
             fed.num_hospitals, fed.rounds, run_dir)
    port = free_port()
    with running(simulation_superlink(run_dir, port, fed.ray_address)) as (superlink,):
        wait_for_port("127.0.0.1", port, timeout_s=60, proc=superlink)
        return submit_and_follow(
            settings,
            Connection(name="medfed-simulation", address=f"127.0.0.1:{port}"),
            project_dir=project_dir,
            flwr_home=run_dir / "flwr-home",
            federation_config={
                "num-supernodes": len(taking_part(settings)),  # data.hospitals
                "client-resources-num-cpus": fed.num_cpus,
                "client-resources-num-gpus": fed.num_gpus,
                **ray_init_args(fed),
            },
            verbose=verbose,
        )


def refuse_data(settings: Settings) -> bool:
    """Check every simulated hospital's folder before Flower starts; True on errors.

    The errors go to the terminal and to the run folder's ``error.txt`` (each
    file named). Synthetic and MedMNIST sources have no hospital folder to check.
    """
    if settings.data.source != "folder":
        return False
    # Imported here: reading images needs torch and MONAI, which a synthetic or
    # MedMNIST run's launcher never loads (it only starts and follows Flower)
    from common.data import DataError, site_folders
    from common.data.check import check_folder

    root = Path(str(settings.data.path))
    try:
        folders = (dict(enumerate(site_folders(settings))) if settings.data.split == "natural"
                   else {0: root})
    except DataError as err:
        lines = [f"[{err.kind}] {err}"]
    else:
        lines = []
        for hospital, folder in folders.items():
            if hospital in taking_part(settings) or settings.data.split != "natural":
                report = check_folder(folder, settings, hospital=hospital)
                for line in report.lines():
                    log.info("[MedFed] %s", line)
                lines += [f"[{p.kind}] {p.message}" for p in report.errors]
    if lines:
        text = f"{len(lines)} data problem(s); no Flower process was started:\n" + "\n".join(
            f"  {line}" for line in lines)
        run_dir = Path(settings.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(run_dir / ERROR_FILE, "w") as handle:
            handle.write(text + "\n")
        print(f"error: {text}", file=sys.stderr)
    return bool(lines)


def main(argv: list[str], *, started: float | None = None) -> int:
    """Command line: Hydra overrides in, exit code out (0 = run completed).

    ``started``: when the user's wait began (seconds since the epoch; the
    command line passes its process's start); default: now.
    """
    started = time.time() if started is None else started
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        groups = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
        for group in groups:
            options = ", ".join(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))
            print(f"  {group}: {options}")
        return 0
    stop_children_on_signals()
    verbose = "--verbose" in argv
    overrides = [a for a in argv if a != "--verbose"]
    try:
        settings = finalize(compose_settings(overrides), base=Path.cwd())
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if refuse_data(settings):
        return 2
    try:
        summary = simulate(settings, verbose=verbose)
    except RunFailedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; every process started was stopped", file=sys.stderr)
        return 130
    # what the user waited (Flower's start and exit included), not only the ServerApp's part
    print_summary(summary, run_dir=Path(settings.run_dir), total_s=time.time() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], started=psutil.Process().create_time()))  # imports included
