"""A JSON file that is only ever replaced whole, with an exclusive lock for updates.

Writers hold :func:`locked` across read-modify-write; :func:`write_json`
writes a temporary file in the same folder, flushes it to disk and renames
it over the target (``os.replace``, atomic on POSIX), then syncs the folder.
Readers never see a half-written file, and a crash at any point leaves the
previous file intact. POSIX only (``fcntl`` locks).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class FileUpdateError(RuntimeError):
    """The file could not be locked or replaced; the previous version is intact."""


@contextlib.contextmanager
def locked(path: Path, *, timeout_s: float) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (created beside ``path``).

    Raises:
        FileUpdateError: the folder cannot be created, or the lock stayed
            held by another process for ``timeout_s`` seconds.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115
    except OSError as err:
        raise FileUpdateError(f"cannot lock {path}: {err}") from None
    with handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise FileUpdateError(f"{path} stayed locked by another process for "
                                          f"{timeout_s:g} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_json(path: Path, doc: Any) -> None:
    """Replace ``path`` by ``doc`` as JSON, atomically and durably.

    Raises:
        FileUpdateError: anything failed (serializing, writing, syncing,
            renaming); the temporary file is removed and ``path`` is as before.
    """
    folder = path.parent
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(doc, indent=1, sort_keys=True, allow_nan=False))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except Exception as err:
        raise FileUpdateError(f"cannot write {path} ({err}); the previous version is "
                              "intact") from err
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
