"""The hospital's runner: takes each task from its SuperNode and answers it with approved code.

    python -m client.runner --runtime-api-address 127.0.0.1:PORT --home HOME \\
        --secret-file HOME/runtime.secret

``python -m client`` starts it next to the SuperNode, which runs with
``--isolation process``: the node then starts no ClientApp itself, and every
message waits as a task on its local runtime API (loopback only) until a
process claims it. The runner claims them (Flower's ``AcquireTask``, signed
with the shared secret the node was started with, so no other local process
can claim one) and starts ``python -m client.task`` for each
(:mod:`client.task`): one process per message, as Flower's own
``flower-superexec`` starts ``flwr-clientapp``. It stops those processes by
PID when it is stopped.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient

from client.approval import ApprovalError, AppStore
from client.task import TOKEN_ENV
from common.logs import medfed_logger
from common.processes import stop_children_on_signals, stop_pids, tool_env, wait_for_port

POLL_S = 0.5
"""Seconds between two looks for a new task (Flower's SuperExec waits 1 s)."""
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


def launch(token: str, address: str, home: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m client.task`` for one claimed task (its token in the environment)."""
    argv = [sys.executable, "-m", "client.task", "--runtime-api-address", address,
            "--home", str(home), "--parent-pid", str(os.getpid())]
    return subprocess.Popen(argv, env={**tool_env(), TOKEN_ENV: token})


def serve(address: str, home: Path, secret: bytes) -> None:
    """Claim tasks and start a process for each, until interrupted; then stop them by PID."""
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=secret,
                                                   protected_methods={ACQUIRE_TASK})],
        retry_invoker=make_simple_http_retry_invoker())
    tasks: list[subprocess.Popen[bytes]] = []
    try:
        while True:
            tasks = [task for task in tasks if task.poll() is None]
            claimed = client.AcquireTask(AcquireTaskRequest(
                supported_task_types=[TaskType.CLIENT_APP]))
            if claimed.HasField("task") and claimed.token:
                tasks.append(launch(claimed.token, address, home))
            time.sleep(POLL_S)
    finally:
        stop_pids([task.pid for task in tasks if task.poll() is None], grace_s=5)
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
