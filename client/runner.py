"""The hospital's runner: takes each task from its SuperNode and answers it with approved code.

    python -m client.runner --runtime-api-address 127.0.0.1:PORT --home HOME \\
        --secret-file HOME/runtime.secret

``python -m client`` starts it next to the SuperNode, which runs with
``--isolation process``: the node then starts no ClientApp itself, and every
message waits as a task on its local runtime API (loopback only) until a
process claims it. The runner claims them (Flower's ``AcquireTask``, signed
with the shared secret the node was started with, so no other local process
can claim one) and hands each to a ``python -m client.task``
process (:mod:`client.task`) of the task's run and bundle: the one that
answered that run's last message when it is idle, a new one otherwise.
Flower's own ``flower-superexec`` starts a ``flwr-clientapp`` per message;
keeping one per run means PyTorch and MONAI are imported once a run, not
twice a round, while a run never shares a process with another run or
bundle. An idle process is stopped when a task of another run comes, after
:data:`IDLE_S` without a task, and with the runner (by PID).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient

from client.approval import ApprovalError, AppStore
from common.logs import medfed_logger
from common.processes import stop_children_on_signals, stop_pids, tool_env, wait_for_port

POLL_S = 0.5
"""Seconds between two looks for a new task (Flower's SuperExec waits 1 s)."""
IDLE_S = 600.0
"""Seconds an idle task process waits for its run's next task before it is stopped."""
CLOSE_S = 10.0
"""Seconds a closed task process has to exit by itself."""
ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"
SECRET_FILE = "runtime.secret"

log = medfed_logger()


def write_secret(home: Path) -> Path:
    """A fresh shared secret for the node and the runner (32 random bytes, mode 0600)."""
    path = home / SECRET_FILE
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_bytes(32))
    return path


def runner_argv(runtime_api_address: str, home: Path, secret_file: Path) -> list[str]:
    """``python -m client.runner`` command line for one hospital."""
    return [sys.executable, "-m", "client.runner", "--runtime-api-address", runtime_api_address,
            "--home", str(home), "--secret-file", str(secret_file)]


@dataclass
class TaskProcess:
    """A ``python -m client.task`` process answering the tasks of one run and bundle.

    Attributes:
        proc: the process; its standard input takes one task token per line.
        key: (run ID, bundle hash) of the tasks it may answer.
        ready: read end of the pipe on which it writes ``idle`` after each task.
        busy: answering a task now.
        idle_since: ``time.monotonic()`` when it last became idle.
    """

    proc: subprocess.Popen[bytes]
    key: tuple[int, str]
    ready: int
    busy: bool = True
    idle_since: float = 0.0

    @classmethod
    def start(cls, key: tuple[int, str], address: str, home: Path) -> TaskProcess:
        """Start a task process for ``key``'s tasks (the runner's child, stopped with it)."""
        read_end, write_end = os.pipe()
        argv = [sys.executable, "-m", "client.task", "--runtime-api-address", address,
                "--home", str(home), "--parent-pid", str(os.getpid()),
                "--ready-fd", str(write_end)]
        try:
            proc = subprocess.Popen(argv, env=tool_env(), stdin=subprocess.PIPE,
                                    pass_fds=(write_end,))
        except OSError:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        os.set_blocking(read_end, False)
        return cls(proc=proc, key=key, ready=read_end)

    def hand(self, token: str) -> bool:
        """Give it the task of ``token``; False if it is gone."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(token.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return False
        self.busy = True
        return True

    def poll(self) -> bool:
        """Note whether it finished its task; False once the process has ended."""
        with contextlib.suppress(BlockingIOError):
            if os.read(self.ready, 4096):
                self.busy, self.idle_since = False, time.monotonic()
        return self.proc.poll() is None

    def close(self) -> None:
        """End its input and the ready pipe: an idle process exits (stopped by PID if it
        has not within :data:`CLOSE_S`)."""
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        os.close(self.ready)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=CLOSE_S)
        if self.proc.poll() is None:
            stop_pids([self.proc.pid], grace_s=5)


def assign(pool: list[TaskProcess], key: tuple[int, str], token: str, address: str,
           home: Path) -> None:
    """Hand a claimed task to an idle process of its run and bundle, or to a new one.

    Idle processes of other runs are closed first: a hospital answers one
    run at a time, and each holds PyTorch, MONAI and the run's data.
    """
    for other in [p for p in pool if not p.busy and p.key != key]:
        other.close()
        pool.remove(other)
    for candidate in [p for p in pool if not p.busy and p.key == key]:
        if candidate.hand(token):
            log.info("[MedFed] runner: task of run %d handed to task process %d", key[0],
                     candidate.proc.pid)
            return
        candidate.close()
        pool.remove(candidate)
    fresh = TaskProcess.start(key, address, home)
    pool.append(fresh)
    log.info("[MedFed] runner: task process %d started for a task of run %d (bundle %s)",
             fresh.proc.pid, key[0], key[1][:16] or "unnamed")
    if not fresh.hand(token):
        log.error("[MedFed] runner: task process %d ended before it took its task",
                  fresh.proc.pid)


def tidy(pool: list[TaskProcess], now: float) -> list[TaskProcess]:
    """The processes still running, less idle ones past :data:`IDLE_S` and idle duplicates."""
    kept: list[TaskProcess] = []
    for proc in pool:
        alive = proc.poll()
        stale = not proc.busy and (now - proc.idle_since > IDLE_S or any(
            not k.busy and k.key == proc.key for k in kept))
        if alive and not stale:
            kept.append(proc)
        else:
            proc.close()
    return kept


def serve(address: str, home: Path, secret: bytes) -> None:
    """Claim tasks and hand each to a task process, until interrupted; then stop them by PID."""
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=secret,
                                                   protected_methods={ACQUIRE_TASK})],
        retry_invoker=make_simple_http_retry_invoker())
    pool: list[TaskProcess] = []
    try:
        while True:
            pool = tidy(pool, time.monotonic())
            claimed = client.AcquireTask(AcquireTaskRequest(
                supported_task_types=[TaskType.CLIENT_APP]))
            if claimed.HasField("task") and claimed.token:
                assign(pool, (claimed.task.run_id, claimed.task.fab_hash), claimed.token,
                       address, home)
            time.sleep(POLL_S)
    finally:
        stop_pids([p.proc.pid for p in pool if p.proc.poll() is None], grace_s=5)
        for proc in pool:
            proc.close()
        client.close()


def main(argv: list[str]) -> int:
    """Run until SIGTERM or Ctrl-C; the exit code."""
    p = argparse.ArgumentParser(prog="python -m client.runner", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime-api-address", required=True, help="HOST:PORT of the node's "
                                                                "runtime API (loopback)")
    p.add_argument("--home", type=Path, required=True, help="the hospital's node folder")
    p.add_argument("--secret-file", type=Path, required=True, help="the node's shared secret")
    p.add_argument("--wait-s", type=float, default=120, help="wait this long for the node")
    args = p.parse_args(argv)
    stop_children_on_signals()
    host, _, port = args.runtime_api_address.rpartition(":")
    try:
        secret = args.secret_file.read_bytes()
        wait_for_port(host, int(port), timeout_s=args.wait_s)
        approved = AppStore(args.home).approved()
        log.info("[MedFed] runner: answering only the %d app bundle(s) approved in %s%s",
                 len(approved), args.home / "apps" / "approved.json",
                 "" if approved else f"; approve MedFed's with `python -m client approve "
                 f"--source MEDFED_CHECKOUT --home {args.home}`")
        serve(args.runtime_api_address, args.home.resolve(), secret)
    except KeyboardInterrupt:
        return 0
    except (OSError, TimeoutError, ApprovalError) as err:
        log.error("[MedFed] runner stopped: %s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
