"""A hospital's privacy ledger: every DP-SGD step ever run on its data, across runs.

One JSON file on the hospital's disk, keyed by a *dataset identity* the
caller chooses (a string that names the patients' images, e.g. the data
folder; the same patients must always get the same identity). For each
federated run on that data it records the run id, the accountant history
(one ``noise_multiplier, sample_rate, steps`` entry per round), the epsilon
and delta, and timestamps::

    {"format": "medfed-privacy-ledger", "version": 1,
     "datasets": {"<dataset>": {
         "ceiling": {"epsilon": 8.0, "delta": 1e-05},          # optional
         "runs": {"<run id>": {
             "started": "...", "updated": "...", "accountant": "prv", "delta": 1e-05,
             "epsilon": 2.9,       # all runs on this dataset, after this run's last round
             "run_epsilon": 1.7,   # this run's rounds alone
             "history": [{"noise_multiplier": 1.1, "sample_rate": 0.0625, "steps": 16,
                          "status": "released", "id": "...", "at": "..."}]}}}}}

How runs compose: sequential composition. The spend on a dataset is one
accountant over the concatenated histories of all its runs, at one delta;
that is what :meth:`PrivacyLedger.epsilon` and every ceiling check compute.
It is far below the sum of the runs' separate epsilons in practice; that sum
(with the deltas added up) is basic composition's bound, valid but loose.

Rounds are *reserved* before training (under a file lock, after the ceiling
check, so two runs training on the same data at once cannot both slip under
the ceiling) and marked *released* when the round finishes, before its
update may leave the hospital. A reservation left behind by a process that
died mid-round stays counted as spent: the ledger cannot prove its update
never left. Errors never reset the spend: a ledger that cannot be read
raises :class:`LedgerError` naming the file, and every write is atomic
(temporary file in the same folder, fsync, ``os.replace``), so a crash leaves
the previous ledger intact (see :mod:`client.atomic_file`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client.accounting import Mechanism, canonical, check_ceiling, check_mechanism, epsilon_of
from client.atomic_file import FileUpdateError, locked, write_json

FORMAT = "medfed-privacy-ledger"
VERSION = 1
RELEASED, RESERVED = "released", "reserved"

log = logging.getLogger(__name__)


class LedgerError(RuntimeError):
    """The ledger file cannot be read, trusted or written; the message names the file."""


@dataclass(frozen=True)
class Reservation:
    """A round cleared against the ceiling and recorded as reserved.

    Attributes:
        id: the ledger entry's id.
        mechanism: the most this round may spend (its planned steps).
    """

    id: str
    mechanism: Mechanism


@dataclass(frozen=True)
class Spend:
    """What the ledger holds for one run on one dataset.

    Attributes:
        others: every mechanism on the dataset outside this run's released
            rounds: other runs (released or reserved) and this run's
            abandoned reservations.
        run: this run's released rounds, in order (one mechanism per round).
    """

    others: list[Mechanism]
    run: list[Mechanism]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class PrivacyLedger:
    """One hospital's ledger file, seen from one run on one dataset.

    Attributes:
        path: the JSON file (created with its folder on first write).
        dataset: identity of the data (the same patients, the same string).
        run_id: the federated run (Flower's run id).
        lock_timeout_s: how long to wait for another process's write.
    """

    path: Path
    dataset: str
    run_id: str
    lock_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        for key in ("dataset", "run_id"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ValueError(f"PrivacyLedger {key} must be a non-empty string, "
                                 f"got {getattr(self, key)!r}")

    # Reading ---------------------------------------------------------------

    def read(self) -> dict[str, Any]:
        """The whole ledger document, validated (an empty ledger if no file yet).

        Raises:
            LedgerError: unreadable or not a valid MedFed ledger; names the file.
        """
        if not self.path.exists():
            return {"format": FORMAT, "version": VERSION, "datasets": {}}
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise self._corrupt(f"cannot be read ({err})") from None
        self._validate(doc)
        return doc

    def _corrupt(self, what: str) -> LedgerError:
        return LedgerError(
            f"privacy ledger {self.path} {what}. It was left untouched and nothing was "
            "trained: without it the privacy already spent on this data is unknown. "
            "Restore the file from a backup (never delete it to start from zero)")

    def _validate(self, doc: Any) -> None:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT \
                or doc.get("version") != VERSION or not isinstance(doc.get("datasets"), dict):
            raise self._corrupt(f"is not a {FORMAT} file of version {VERSION}")
        for name, entry in doc["datasets"].items():
            runs = entry.get("runs") if isinstance(entry, dict) else None
            if not isinstance(runs, dict):
                raise self._corrupt(f"has no 'runs' for dataset {name!r}")
            ceiling = entry.get("ceiling")
            if ceiling is not None and not (isinstance(ceiling, dict)
                                            and _positive(ceiling.get("epsilon"))
                                            and _positive(ceiling.get("delta"))):
                raise self._corrupt(f"has a bad ceiling for dataset {name!r}: {ceiling!r}")
            for run_id, run in runs.items():
                history = run.get("history") if isinstance(run, dict) else None
                if not isinstance(history, list):
                    raise self._corrupt(f"has no history for run {run_id!r} of {name!r}")
                for item in history:
                    if not isinstance(item, dict) or item.get("status") not in (RELEASED,
                                                                                 RESERVED):
                        raise self._corrupt(f"has a bad entry in run {run_id!r}: {item!r}")
                    try:
                        _mechanism(item)
                    except ValueError as err:
                        raise self._corrupt(f"has a bad entry in run {run_id!r}: {err}") from None

    def _runs(self, doc: dict[str, Any]) -> dict[str, Any]:
        return doc["datasets"].get(self.dataset, {}).get("runs", {})

    def spend(self, doc: dict[str, Any] | None = None) -> Spend:
        """Split what the ledger holds into this run's released rounds and the rest."""
        runs = self._runs(self.read() if doc is None else doc)
        others: list[Mechanism] = []
        run: list[Mechanism] = []
        for run_id, entry in runs.items():
            for item in entry["history"]:
                own = run_id == self.run_id and item["status"] == RELEASED
                (run if own else others).append(_mechanism(item))
        return Spend(others=others, run=run)

    def ceiling(self) -> tuple[float, float] | None:
        """The ``(epsilon, delta)`` ceiling stored for this dataset, if any."""
        stored = self.read()["datasets"].get(self.dataset, {}).get("ceiling")
        return None if stored is None else (float(stored["epsilon"]), float(stored["delta"]))

    def epsilon(self, *, delta: float, accountant: str) -> float:
        """Epsilon at ``delta`` spent on this dataset by every run the ledger records."""
        spend = self.spend()
        return epsilon_of([*spend.others, *spend.run], delta=delta, accountant=accountant)

    # Writing ---------------------------------------------------------------

    def set_ceiling(self, *, epsilon: float, delta: float) -> None:
        """Store the most ``epsilon`` (at ``delta``) ever to be spent on this dataset."""
        if not (_positive(epsilon) and 0 < delta < 1):
            raise ValueError(f"ceiling epsilon={epsilon!r} must be > 0 and delta={delta!r} "
                             "in (0, 1)")
        with self._locked():
            doc = self.read()
            self._dataset(doc)["ceiling"] = {"epsilon": float(epsilon), "delta": float(delta)}
            self._write(doc)

    def reserve(self, *, run_history: list[Mechanism], planned: Mechanism, accountant: str,
                ceiling_epsilon: float | None, ceiling_delta: float) -> tuple[Reservation, Spend]:
        """Check the ceiling and reserve one round, atomically under the file lock.

        Args:
            run_history: this run's released rounds as the node state knows them.
            planned: the round's mechanism with its planned (maximum) steps.
            accountant: ``prv`` or ``rdp``.
            ceiling_epsilon: the caller's ceiling; the stored ceiling applies too.
            ceiling_delta: the delta of the caller's ceiling.

        Returns:
            The reservation and the spend before it (``run`` reconciled: the
            longer of the node state's and the ledger's history of this run).

        Raises:
            BudgetExceededError: the round would cross a ceiling; nothing written.
            LedgerError: the ledger is unreadable, or disagrees with the state.
        """
        with self._locked():
            doc = self.read()
            spend = self._reconcile(self.spend(doc), run_history)
            spent = [*spend.others, *spend.run]
            check_ceiling(spent_history=spent, planned=planned, ceiling_epsilon=ceiling_epsilon,
                          delta=ceiling_delta, accountant=accountant)
            stored = self._dataset(doc).get("ceiling")
            if stored is not None:
                check_ceiling(spent_history=spent, planned=planned,
                              ceiling_epsilon=stored["epsilon"], delta=stored["delta"],
                              accountant=accountant)
            reservation = Reservation(id=uuid.uuid4().hex, mechanism=planned)
            entry = self._run_entry(doc)
            recorded = sum(1 for i in entry["history"] if i["status"] == RELEASED)
            missing = [_item(m, RELEASED) for m in spend.run[recorded:]]
            entry["history"] += [*missing, _item(planned, RESERVED, reservation.id)]
            self._write(doc)
        return reservation, spend

    def commit(self, reservation: Reservation, *, steps: int, accountant: str,
               delta: float) -> tuple[Spend, float, float]:
        """Mark a reserved round released with the steps it really took.

        Returns:
            The spend after the round, the epsilon on the dataset (all runs)
            and the epsilon of this run alone, both at ``delta``.

        Raises:
            LedgerError: the reservation is gone, or the ledger cannot be written.
        """
        if not 0 <= steps <= reservation.mechanism[2]:
            raise ValueError(f"steps={steps} outside the reserved 0..{reservation.mechanism[2]}")
        with self._locked():
            doc = self.read()
            entry = self._reserved_entry(doc, reservation)
            history = entry["history"]
            at = next(i for i, item in enumerate(history) if item.get("id") == reservation.id)
            sigma, rate, _ = reservation.mechanism
            history[at] = _item((sigma, rate, steps), RELEASED, reservation.id)
            if steps == 0:
                del history[at]
            spend = self.spend(doc)
            own = epsilon_of(spend.run, delta=delta, accountant=accountant)
            total = epsilon_of([*spend.others, *spend.run], delta=delta,
                               accountant=accountant) if canonical(spend.others) else own
            entry.update(epsilon=total, run_epsilon=own, delta=delta, accountant=accountant,
                         updated=_now())
            self._write(doc)
        return spend, total, own

    def cancel(self, reservation: Reservation) -> None:
        """Drop a reservation whose round ended before its update left the hospital."""
        with self._locked():
            doc = self.read()
            entry = self._reserved_entry(doc, reservation)
            entry["history"] = [i for i in entry["history"] if i.get("id") != reservation.id]
            entry["updated"] = _now()
            self._write(doc)

    def _reconcile(self, spend: Spend, state: list[Mechanism]) -> Spend:
        recorded = spend.run
        if state[:len(recorded)] == recorded:
            return Spend(others=spend.others, run=list(state))
        if recorded[:len(state)] == state:
            log.warning("privacy ledger %s holds %d rounds of run %s, the node state %d: "
                        "using the ledger's", self.path, len(recorded), self.run_id, len(state))
            return spend
        raise LedgerError(
            f"privacy ledger {self.path} and the node state disagree about run {self.run_id} "
            f"on {self.dataset!r}: ledger {recorded}, state {state}; check the ledger path")

    def _dataset(self, doc: dict[str, Any]) -> dict[str, Any]:
        entry: dict[str, Any] = doc["datasets"].setdefault(self.dataset, {"runs": {}})
        return entry

    def _run_entry(self, doc: dict[str, Any]) -> dict[str, Any]:
        now = _now()
        fresh: dict[str, Any] = {"started": now, "updated": now, "accountant": None, "delta": None,
                 "epsilon": None, "run_epsilon": None, "history": []}
        entry: dict[str, Any] = self._dataset(doc)["runs"].setdefault(self.run_id, fresh)
        entry["updated"] = now
        return entry

    def _reserved_entry(self, doc: dict[str, Any], reservation: Reservation) -> dict[str, Any]:
        entry = self._runs(doc).get(self.run_id)
        if entry is None or not any(i.get("id") == reservation.id for i in entry["history"]):
            raise LedgerError(f"privacy ledger {self.path} lost reservation {reservation.id} "
                              f"of run {self.run_id}; was the file replaced mid-round?")
        result: dict[str, Any] = entry
        return result

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            with locked(self.path, timeout_s=self.lock_timeout_s):
                yield
        except FileUpdateError as err:
            raise LedgerError(f"privacy ledger: {err}") from None

    def _write(self, doc: dict[str, Any]) -> None:
        try:
            write_json(self.path, doc)
        except FileUpdateError as err:
            raise LedgerError(f"privacy ledger: {err}; this round's update must not be "
                              "sent") from err


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _mechanism(item: dict[str, Any]) -> Mechanism:
    return check_mechanism((item.get("noise_multiplier"), item.get("sample_rate"),
                            item.get("steps")), where="ledger entry")


def _item(mechanism: Mechanism, status: str, entry_id: str | None = None) -> dict[str, Any]:
    sigma, rate, steps = mechanism
    return {"noise_multiplier": sigma, "sample_rate": rate, "steps": steps, "status": status,
            "id": entry_id or uuid.uuid4().hex, "at": _now()}
