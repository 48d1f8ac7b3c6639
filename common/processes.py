"""Start and stop the Flower processes MedFed owns (SuperLink, SuperNodes, CLI).

Every process is started in its own session and stopped by PID: the process
itself and the descendants it spawned (ServerApp, ClientApp, Ray workers),
collected before the stop signal, never by a broad name match.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "PYTHONUNBUFFERED": "1",
}

# Ray's raylet starts one idle worker per CPU for the first driver, with no job
# environment; Flower's Ray backend gives its actors a runtime environment
# (PYTHONPATH), so none of those workers is ever used, and on 2 cores their
# start (each a Python that imports Ray) delays the actors that train. Off,
# the default simulation took 2.5 s less on average over 5 interleaved A/B
# pairs (55.7 vs 58.0 s in the last 3; one pair of 5 went the other way). A
# value exported by the user is kept.
RAY_START_ENV = {"RAY_prestart_worker_first_driver": "0"}


def tool_env() -> dict[str, str]:
    """This environment, quiet, with this Python's scripts first on ``PATH``.

    Flower's SuperLink starts ``flower-superexec`` and friends by name, so the
    virtual environment's ``bin`` must be on ``PATH`` even when it is not
    activated.
    """
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    return {**RAY_START_ENV, **os.environ, **QUIET_ENV, "PATH": f"{bin_dir}{os.pathsep}{path}"}


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the OS for a TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, *, timeout_s: float, proc: ManagedProcess | None = None
                  ) -> None:
    """Block until ``host:port`` accepts TCP connections.

    Raises:
        TimeoutError: nothing listened within ``timeout_s`` seconds.
        RuntimeError: ``proc`` exited while we waited (its log is named).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{proc.name} exited with code {proc.poll()} before listening on {host}:{port}; "
                f"see {proc.log_path}:\n{proc.tail()}"
            )
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listened on {host}:{port} within {timeout_s:.0f} s")


@dataclass
class ManagedProcess:
    """A child process whose output goes to a log file, stopped with its descendants.

    Attributes:
        name: a label for messages (``superlink``, ``hospital-1``).
        argv: the command line.
        log_path: file receiving the process' stdout and stderr.
        pass_fds: descriptors the process inherits (a folder lock it keeps
            held while it runs, see :mod:`common.folder_lock`).
    """

    name: str
    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    pass_fds: tuple[int, ...] = ()
    _popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> ManagedProcess:
        """Start the process in a new session (so Ctrl-C reaches only us)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {**tool_env(), **(self.env or {})}
        self._popen = subprocess.Popen(
            list(self.argv), stdout=self._log, stderr=subprocess.STDOUT, env=env,
            cwd=self.cwd, start_new_session=True, pass_fds=self.pass_fds,
        )
        return self

    @property
    def pid(self) -> int:
        """PID of the started process."""
        if self._popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._popen.pid

    def poll(self) -> int | None:
        """Exit code, or None while running."""
        return None if self._popen is None else self._popen.poll()

    def wait(self, timeout_s: float | None = None) -> int:
        """Wait for the process to exit and return its exit code."""
        if self._popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._popen.wait(timeout=timeout_s)

    def tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, *, grace_s: float = 10.0) -> None:
        """Stop the process and every descendant it has, by PID.

        SIGTERM first (Flower and Ray shut down cleanly on it), SIGKILL for
        whatever is still alive after ``grace_s`` seconds.
        """
        if self._popen is None:
            return
        stop_pids([self._popen.pid], grace_s=grace_s)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=1)
        if self._log is not None:
            self._log.close()
            self._log = None


def _tree(pids: Sequence[int]) -> list[psutil.Process]:
    procs: list[psutil.Process] = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            procs.append(root)
            procs.extend(root.children(recursive=True))
    return procs


def stop_pids(pids: Sequence[int], *, grace_s: float = 10.0) -> None:
    """Terminate the given PIDs and all their descendants (collected first)."""
    procs = _tree(pids)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


@contextlib.contextmanager
def running(*processes: ManagedProcess) -> Iterator[tuple[ManagedProcess, ...]]:
    """Start the processes and stop them all on exit, also on errors and Ctrl-C."""
    started: list[ManagedProcess] = []
    try:
        for proc in processes:
            started.append(proc.start())
        yield processes
    finally:
        for proc in reversed(started):
            proc.stop()


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_children_on_signals() -> None:
    """Turn SIGTERM (and an ignored SIGINT) into KeyboardInterrupt.

    Commands that start processes call this first, so ``kill PID`` or Ctrl-C
    unwinds their ``finally`` blocks and stops every child they started,
    instead of leaving them orphaned.
    """
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
