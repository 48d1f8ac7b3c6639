"""A hospital's privacy ledger: what has been spent on its data, across runs.

One JSON file on the hospital's disk. For each dataset (an identity string
the caller chooses: source, path, partition) it records, per federated run,
the DP-SGD mechanisms applied to that data: ``(noise multiplier, sample rate,
steps)`` triples. The ledger is written atomically (temporary file in the
same folder, flushed to disk, then :func:`os.replace`), so a crash mid-write
leaves the previous ledger intact; a file that cannot be parsed is reported,
never silently reset to zero. Writes hold an exclusive lock on a ``.lock``
file beside the ledger, so two runs training on the same data at once do not
lose each other's record (reads need no lock: the file is replaced whole).
A run's record only grows: a write with fewer steps under any (noise, rate)
than already recorded for that run is refused.

How runs compose: every mechanism ever applied to the same data goes into
one accountant (sequential composition), so the epsilon of the whole ledger
is computed over the concatenated history, which is at most the sum of the
separate runs' epsilons at the same delta and usually much less.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.atomic import atomic_file

Mechanism = tuple[float, float, int]
"""One DP-SGD phase: (noise multiplier, sample rate, steps)."""

VERSION = 1


def steps_by_mechanism(history: list[Mechanism]) -> dict[tuple[float, float], int]:
    """Total steps per (noise multiplier, sample rate) in ``history``.

    Opacus' accountants merge consecutive steps of the same mechanism into one
    entry, so the number of entries says nothing about how much was spent.
    """
    totals: dict[tuple[float, float], int] = {}
    for z, q, n in history:
        totals[(z, q)] = totals.get((z, q), 0) + n
    return totals


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
        if not isinstance(data, dict) or data.get("version") != VERSION \
                or not isinstance(data.get("datasets"), dict):
            raise LedgerError(f"privacy ledger {self.path} is not a MedFed ledger (version "
                              f"{VERSION}); it is left untouched")
        return data

    def history(self, dataset: str, *, exclude_run: str | None = None) -> list[Mechanism]:
        """Every mechanism recorded for ``dataset``, optionally leaving one run out."""
        runs = self._load()["datasets"].get(dataset, {}).get("runs", {})
        return [(float(z), float(q), int(n)) for run_id, run in sorted(runs.items())
                if run_id != exclude_run for z, q, n in run["history"]]

    def run_history(self, dataset: str, run_id: str) -> list[Mechanism]:
        """The mechanisms recorded for run ``run_id`` on ``dataset`` (empty if none)."""
        run = self._load()["datasets"].get(dataset, {}).get("runs", {}).get(run_id)
        return [(float(z), float(q), int(n)) for z, q, n in run["history"]] if run else []

    def record(self, dataset: str, run_id: str, history: list[Mechanism], *,
               epsilon: float, delta: float, accountant: str) -> None:
        """Store ``history`` as run ``run_id``'s spend on ``dataset`` (replacing it).

        Raises:
            LedgerError: ``history`` has fewer steps of some mechanism than
                the ledger already holds for this run (the ledger is left
                unchanged), or the file cannot be read or written.
        """
        with self._locked():
            data = self._load()
            runs = data["datasets"].setdefault(dataset, {"runs": {}})["runs"]
            before = steps_by_mechanism(self.run_history(dataset, run_id))
            after = steps_by_mechanism(history)
            if any(after.get(key, 0) < steps for key, steps in before.items()):
                raise LedgerError(
                    f"privacy ledger {self.path}: run {run_id} already has "
                    f"{sum(before.values())} DP-SGD steps recorded on {dataset}; refusing to "
                    f"replace them with a history of {sum(after.values())} steps")
            runs[run_id] = {"history": [list(m) for m in history], "epsilon": epsilon,
                            "delta": delta, "accountant": accountant,
                            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            self._write(data)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive lock on ``<ledger>.lock`` (blocks while another writer holds it)."""
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
