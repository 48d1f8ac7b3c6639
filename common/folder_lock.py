"""One owner per folder: an exclusive ``flock`` on a lock file that names its holder.

A command that must be alone with a folder (the server with its run folder
and its site's SuperLink database) takes the lock for as long as it runs and
hands a copy of the locked descriptor to the long-lived processes it starts
(``ManagedProcess(pass_fds=...)``): the lock is then released only when all of
them have exited, so a process left running after its command was killed
still keeps the folder, and the next command is refused, naming its PID.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil


class FolderInUseError(RuntimeError):
    """Another process holds the folder's lock (the message names it)."""


def holders(lock_path: Path) -> list[psutil.Process]:
    """The processes that have ``lock_path`` open (found by PID, through ``/proc``)."""
    target, found = str(lock_path.resolve()), []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if any(f.path == target for f in proc.open_files()):
                found.append(proc)
    return found


def _recorded(lock_path: Path) -> str:
    """What the lock's holder wrote into it: its PID and command."""
    try:
        record = json.loads(lock_path.read_text())
        return f"PID {record['pid']} ({record['command']}, since {record['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def _refusal(lock_path: Path, purpose: str) -> FolderInUseError:
    procs = []
    for proc in holders(lock_path):
        with contextlib.suppress(psutil.Error):
            procs.append(f"PID {proc.pid} ({proc.name()})")
    pids = " ".join(p.split()[1] for p in procs)
    return FolderInUseError(
        f"{lock_path.parent} is in use ({purpose}): {lock_path} is held by "
        f"{', '.join(procs) or 'another process'}; it was taken by {_recorded(lock_path)}. "
        f"Stop that server first (or what it left running: kill {pids or 'PID'}), then "
        "start again")


@contextlib.contextmanager
def locked(lock_path: Path, purpose: str) -> Iterator[int]:
    """Hold ``lock_path`` exclusively while the block runs; yields the locked descriptor.

    Raises:
        FolderInUseError: another process holds it (names the PIDs that hold
            it and the command that took it).
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)  # closed first, so it does not count among the holders
        raise _refusal(lock_path, purpose) from None
    try:
        record = {"pid": os.getpid(), "command": " ".join(psutil.Process().cmdline()[:4]),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        yield fd
    finally:
        os.close(fd)
