"""A hospital's privacy ledger: what has been spent on its data, across runs.

One JSON file on the hospital's disk. For each dataset (an identity string
the caller chooses: source, path, partition) it records, per federated run,
the DP-SGD mechanisms applied to that data: ``(noise multiplier, sample rate,
steps)`` triples. The ledger is written atomically (temporary file in the
same folder, flushed to disk, then :func:`os.replace`), so a crash mid-write
leaves the previous ledger intact; a file that cannot be parsed is reported,
never silently reset to zero.

How runs compose: every mechanism ever applied to the same data goes into
one accountant (sequential composition), so the epsilon of the whole ledger
is computed over the concatenated history, which is at most the sum of the
separate runs' epsilons at the same delta and usually much less.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.atomic import atomic_file

Mechanism = tuple[float, float, int]
"""One DP-SGD phase: (noise multiplier, sample rate, steps)."""

VERSION = 1


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

    def record(self, dataset: str, run_id: str, history: list[Mechanism], *,
               epsilon: float, delta: float, accountant: str) -> None:
        """Store ``history`` as run ``run_id``'s spend on ``dataset`` (replacing it)."""
        data = self._load()
        runs = data["datasets"].setdefault(dataset, {"runs": {}})["runs"]
        runs[run_id] = {"history": [list(m) for m in history], "epsilon": epsilon,
                        "delta": delta, "accountant": accountant,
                        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._write(data)

    def _write(self, data: dict[str, Any]) -> None:
        try:
            with atomic_file(self.path, "w") as handle:
                json.dump(data, handle, indent=2)
        except OSError as err:
            raise LedgerError(f"cannot write privacy ledger {self.path}: {err}") from None
