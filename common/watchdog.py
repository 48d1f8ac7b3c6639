"""A command's processes die with it, however it ends (SIGKILL included).

Flower's ``flower-superlink``, ``flower-superexec`` and ``flwr-serverapp``
(and MedFed's own children) start in their own sessions, so neither a
process group nor the terminal takes them down when the command that
started them is killed: they are re-parented and keep running. Commands
that start processes call :func:`start_watchdog` first:

1. the command makes itself a *child subreaper* (Linux ``prctl``
   ``PR_SET_CHILD_SUBREAPER``): while it lives, a process orphaned anywhere
   below it is re-parented to it, so every process it started, directly or
   not, stays its descendant;
2. a small watchdog process (``python -m common.watchdog``, in its own
   session, so Ctrl-C does not reach it) records the command's descendants,
   by PID and start time, every :data:`INTERVAL_S` seconds;
3. when the command is gone (its watchdog is re-parented), the watchdog
   freezes every recorded process that still runs (SIGSTOP, so none can
   start another), adds their descendants (frozen too), then sends them
   SIGTERM, and SIGKILL to those alive :data:`GRACE_S` seconds later.

Nothing is matched by name. What it cannot see: a process started less than
:data:`INTERVAL_S` before the command died whose parent also exited in that
window, and anything after a SIGKILL of the watchdog itself.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable

import psutil

INTERVAL_S = 0.25
"""Seconds between two records of the watched command's descendants."""
GRACE_S = 5.0
"""Seconds between SIGTERM and SIGKILL for what the command left."""
PR_SET_CHILD_SUBREAPER = 36
"""``prctl`` option (``linux/prctl.h``)."""


def become_subreaper() -> bool:
    """Make this process the subreaper of its descendants (Linux); whether it worked."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0


def start_watchdog() -> subprocess.Popen[bytes]:
    """Start the watchdog of this process (see the module doc); returns it.

    The watchdog's messages go to this process' stderr.
    """
    become_subreaper()
    argv = [sys.executable, "-m", "common.watchdog", "--parent", str(os.getpid())]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def watch(parent_pid: int, interval_s: float = INTERVAL_S) -> list[psutil.Process]:
    """Record ``parent_pid``'s descendants until it is gone; returns those still running."""
    me = os.getpid()
    seen: dict[int, psutil.Process] = {}
    parent = psutil.Process(parent_pid)
    while os.getppid() == parent_pid:
        with contextlib.suppress(psutil.Error):
            for child in parent.children(recursive=True):
                if child.pid != me:
                    seen.setdefault(child.pid, child)
        seen = {pid: proc for pid, proc in seen.items() if proc.is_running()}
        time.sleep(interval_s)
    return [proc for proc in seen.values() if proc.is_running()]


def freeze(roots: Iterable[psutil.Process]) -> list[psutil.Process]:
    """SIGSTOP ``roots`` and, once each is stopped, its children, down the whole tree."""
    me, frozen, todo = os.getpid(), dict[int, psutil.Process](), list(roots)
    while todo:
        proc = todo.pop()
        if proc.pid in frozen or proc.pid == me:
            continue
        with contextlib.suppress(psutil.Error):
            proc.suspend()
            frozen[proc.pid] = proc
            todo.extend(proc.children())
    return list(frozen.values())


def take_down(procs: list[psutil.Process], grace_s: float = GRACE_S) -> None:
    """SIGTERM (then SIGCONT) the frozen ``procs``; SIGKILL those alive after ``grace_s``."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
            proc.resume()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


def describe(procs: list[psutil.Process]) -> str:
    """``PID (name)`` of each process, for the log line."""
    parts = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            parts.append(f"{proc.pid} ({proc.name()})")
    return ", ".join(parts)


def main(argv: list[str]) -> int:
    """Watch ``--parent`` until it is gone, then stop what it left; the exit code."""
    parser = argparse.ArgumentParser(prog="python -m common.watchdog", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parent", type=int, required=True, help="PID of the watched command")
    parser.add_argument("--interval", type=float, default=INTERVAL_S)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the command, not for us
    try:
        left = watch(args.parent, args.interval)
    except psutil.NoSuchProcess:
        return 0  # gone before we looked: it started nothing
    frozen = freeze(left)
    if frozen:
        print(f"[MedFed] process {args.parent} is gone; stopping the {len(frozen)} processes "
              f"it left running: {describe(frozen)}", file=sys.stderr, flush=True)
        take_down(frozen)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
