"""A hospital's privacy ledger: what has been spent on its data, across runs.

One JSON file on the hospital's disk, the only record of a run's privacy
history (no copy in the node's state or in an accountant). For each dataset
(an identity string the caller chooses: a folder, or a source and
partition) it holds, per federated run, the DP-SGD mechanisms applied to
that data, ``(noise multiplier, sample rate, steps)`` triples, and the
rounds being trained right now as *reservations*.

A round is accounted in two steps, each under an exclusive lock on a
``.lock`` file beside the ledger, so any number of processes (runs) training
on the same data at once are accounted as if they ran one after the other:

1. :meth:`PrivacyLedger.reserve`: the round's planned mechanism is checked
   against everything already counted (all settled runs plus all open
   reservations) and, in the same locked step, recorded as a reservation.
   A round that does not fit is refused and nothing is written.
2. :meth:`PrivacyLedger.settle`: after training, the reservation is replaced
   by what was really spent (never more than reserved). A round that failed
   before anything left the hospital is :meth:`~PrivacyLedger.release`\\ d.

A process that dies between the two leaves its reservation in the file,
still counted: conservative (budget may be counted that was never used,
never the reverse). Writes are atomic (temporary file, flushed, then
:func:`os.replace`), so a crash mid-write leaves the previous ledger; a file
that cannot be parsed is reported, never silently reset to zero. Reads take
no lock (the file is replaced whole). A run's record only grows.

How runs compose: every mechanism ever applied to the same data goes into
one accountant (sequential composition), so the epsilon of the whole ledger
is computed over the concatenated history, which is at most the sum of the
separate runs' epsilons at the same delta and usually much less.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.atomic import atomic_file

Mechanism = tuple[float, float, int]
"""One DP-SGD phase: (noise multiplier, sample rate, steps)."""

VERSION = 2
READABLE = (1, 2)
"""Ledger versions this code reads (version 1 had no reservations)."""

Check = Callable[[list[Mechanism], list[Mechanism]], None]
"""``check(counted, planned)``: raises to refuse a reservation."""


def steps_by_mechanism(history: list[Mechanism]) -> dict[tuple[float, float], int]:
    """Total steps per (noise multiplier, sample rate) in ``history``.

    Opacus' accountants merge consecutive steps of the same mechanism into one
    entry, so the number of entries says nothing about how much was spent.
    """
    totals: dict[tuple[float, float], int] = {}
    for z, q, n in history:
        totals[(z, q)] = totals.get((z, q), 0) + n
    return totals


def _mechanisms(rows: list[Any]) -> list[Mechanism]:
    return [(float(z), float(q), int(n)) for z, q, n in rows]


def _settled(entry: dict[str, Any]) -> list[Mechanism]:
    """A dataset entry's settled mechanisms, run by run."""
    return [m for _, run in sorted(entry.get("runs", {}).items())
            for m in _mechanisms(run["history"])]


def _open(entry: dict[str, Any]) -> list[Mechanism]:
    """A dataset entry's reserved (not yet settled) mechanisms."""
    return [m for _, held in sorted(entry.get("reservations", {}).items())
            for m in _mechanisms(held["history"])]


class LedgerError(RuntimeError):
    """The ledger file cannot be read or written; the message names the file."""


@dataclass(frozen=True)
class PrivacyLedger:
    """The ledger file of one hospital.

    Attributes:
        path: the JSON file (created on first write; its folder too).
    """

    path: Path

    def _load(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"version": VERSION, "datasets": {}}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as err:
            raise LedgerError(
                f"privacy ledger {self.path} cannot be read ({err}); it is left untouched. "
                "Restore it from backup: without it the spend on this data is unknown"
            ) from None
        if not isinstance(data, dict) or data.get("version") not in READABLE \
                or not isinstance(data.get("datasets"), dict):
            raise LedgerError(f"privacy ledger {self.path} is not a MedFed ledger (version "
                              f"{VERSION}); it is left untouched")
        data["version"] = VERSION
        return data

    def _entry(self, dataset: str) -> dict[str, Any]:
        entry: dict[str, Any] = self._load()["datasets"].get(dataset, {})
        return entry

    def history(self, dataset: str) -> list[Mechanism]:
        """Every mechanism settled for ``dataset``, over all runs (run by run)."""
        return _settled(self._entry(dataset))

    def reserved(self, dataset: str) -> list[Mechanism]:
        """The mechanisms of rounds reserved on ``dataset`` and not settled yet."""
        return _open(self._entry(dataset))

    def counted(self, dataset: str) -> list[Mechanism]:
        """What counts against ``dataset``'s budget: settled runs plus open reservations."""
        entry = self._entry(dataset)
        return _settled(entry) + _open(entry)

    def run_history(self, dataset: str, run_id: str) -> list[Mechanism]:
        """The mechanisms settled for run ``run_id`` on ``dataset`` (empty if none)."""
        run = self._entry(dataset).get("runs", {}).get(run_id)
        return _mechanisms(run["history"]) if run else []

    def reserve(self, dataset: str, run_id: str, planned: list[Mechanism], *,
                check: Check) -> str:
        """Check ``planned`` against all that is counted and reserve it, in one locked step.

        Args:
            dataset: the data the round trains on.
            run_id: the federated run the round belongs to.
            planned: the round's mechanisms, as it will run them.
            check: called with (everything counted, ``planned``) while the
                lock is held; raises to refuse (then nothing is written).

        Returns:
            The reservation's id, for :meth:`settle` or :meth:`release`.
        """
        with self._locked():
            data = self._load()
            entry = data["datasets"].setdefault(dataset, {"runs": {}})
            check(_settled(entry) + _open(entry), planned)
            reservation = uuid.uuid4().hex
            entry.setdefault("reservations", {})[reservation] = {
                "run": run_id, "history": [list(m) for m in planned],
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "host": socket.gethostname(), "pid": os.getpid()}
            self._write(data)
        return reservation

    def settle(self, dataset: str, reservation: str, used: list[Mechanism],
               **note: float | str) -> None:
        """Replace a reservation by what the round really spent (``used``).

        ``used`` is added to the run's record; ``note`` (e.g. ``delta``,
        ``accountant``, ``epsilon``) is stored beside it for people reading
        the file.

        Raises:
            LedgerError: no such open reservation, or ``used`` spends more
                steps of some mechanism than were reserved; the ledger is
                left unchanged (the reservation stays counted).
        """
        with self._locked():
            data = self._load()
            entry = data["datasets"].get(dataset, {})
            held = entry.get("reservations", {}).get(reservation)
            if held is None:
                raise LedgerError(f"privacy ledger {self.path}: no open reservation "
                                  f"{reservation} on {dataset}; the round is not settled")
            allowed = steps_by_mechanism(_mechanisms(held["history"]))
            if any(steps > allowed.get(key, 0) for key, steps in steps_by_mechanism(used).items()):
                raise LedgerError(f"privacy ledger {self.path}: the round used {used}, more "
                                  f"than its reservation {held['history']}; it stays counted")
            del entry["reservations"][reservation]
            run = entry["runs"].setdefault(held["run"], {"history": []})
            for z, q, n in used:  # consecutive steps of one mechanism in one entry, as Opacus
                last = run["history"][-1] if run["history"] else None
                if last is not None and (float(last[0]), float(last[1])) == (z, q):
                    last[2] = int(last[2]) + n
                else:
                    run["history"].append([z, q, n])
            run.update(note, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            self._write(data)

    def release(self, dataset: str, reservation: str) -> None:
        """Drop a reservation whose round failed before anything left the hospital."""
        with self._locked():
            data = self._load()
            open_ = data["datasets"].get(dataset, {}).get("reservations", {})
            if open_.pop(reservation, None) is not None:
                self._write(data)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive lock on ``<ledger>.lock`` (blocks while another process holds it)."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock_path, "a")  # noqa: SIM115 (held across the yield)
        except OSError as err:
            raise LedgerError(f"cannot lock privacy ledger {self.path}: {err}") from None
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write(self, data: dict[str, Any]) -> None:
        try:
            with atomic_file(self.path, "w") as handle:
                json.dump(data, handle, indent=2)
        except OSError as err:
            raise LedgerError(f"cannot write privacy ledger {self.path}: {err}") from None
