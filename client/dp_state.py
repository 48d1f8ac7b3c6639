"""What a hospital keeps in its node state (``context.state``) between DP-SGD rounds.

A plain JSON-able dict, returned by :meth:`client.privacy.DPRound.finish`
and handed back as ``history`` to the next round's
:func:`client.privacy.start_dp_round`::

    {"format": "medfed-dp-state", "version": 1,
     "run_id": "123" | None, "dataset": "..." | None,      # from the ledger, if any
     "rounds": [[noise_multiplier, sample_rate, steps], ...],  # one per round, in order
     "calibration": {"target_epsilon": 8.0, "delta": 1e-05, "sample_rate": 0.0625,
                     "steps": 48, "accountant": "prv", "noise_multiplier": 1.02} | None}

``rounds`` is this run's accountant history, one mechanism per finished
round, so the epsilon after round k covers rounds 1..k. ``calibration``
memoizes the calibrated sigma (the calibration is deterministic; the memo
only saves its cost). Store it e.g. as ``ConfigRecord({"dp": json.dumps(state)})``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from client.accounting import Mechanism, calibrate_noise, check_mechanism
from common.config import PrivacyConfig

FORMAT = "medfed-dp-state"
VERSION = 1


@dataclass(frozen=True)
class Calibration:
    """A calibrated noise multiplier and exactly what it was calibrated for."""

    target_epsilon: float
    delta: float
    sample_rate: float
    steps: int
    accountant: str
    noise_multiplier: float


@dataclass(frozen=True)
class DPState:
    """This run's DP-SGD history at one hospital (see the module docs).

    Attributes:
        run_id: the run the ledger keys it under (None without a ledger).
        dataset: the ledger's dataset identity (None without a ledger).
        rounds: one ``(noise_multiplier, sample_rate, steps)`` per round.
        calibration: the memoized calibration, if sigma was calibrated.
    """

    run_id: str | None = None
    dataset: str | None = None
    rounds: tuple[Mechanism, ...] = ()
    calibration: Calibration | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> DPState:
        """Parse the dict :meth:`to_dict` made; None means the run's first round.

        Raises:
            ValueError: not a MedFed DP state, or a malformed entry.
        """
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping) or raw.get("format") != FORMAT \
                or raw.get("version") != VERSION or not isinstance(raw.get("rounds"), list):
            raise ValueError(f"history={raw!r:.200} is not a {FORMAT} dict of version {VERSION} "
                             "(pass the state that DPRound.finish returned, or None)")
        rounds = tuple(check_mechanism(m, where="history round") for m in raw["rounds"])
        cal = raw.get("calibration")
        try:
            calibration = None if cal is None else Calibration(**cal)
        except TypeError as err:
            raise ValueError(f"history calibration {cal!r} is malformed: {err}") from None
        for key in ("run_id", "dataset"):
            if raw.get(key) is not None and not isinstance(raw[key], str):
                raise ValueError(f"history {key}={raw[key]!r} must be a string or None")
        return cls(run_id=raw.get("run_id"), dataset=raw.get("dataset"), rounds=rounds,
                   calibration=calibration)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able dict to keep in ``context.state``."""
        return {"format": FORMAT, "version": VERSION, "run_id": self.run_id,
                "dataset": self.dataset, "rounds": [list(m) for m in self.rounds],
                "calibration": None if self.calibration is None
                else dataclasses.asdict(self.calibration)}

    def noise_multiplier(self, privacy: PrivacyConfig, *, sample_rate: float,
                         planned_steps: int) -> tuple[float, DPState]:
        """Sigma for a round: the fixed one, or the calibrated one (memoized).

        Calibrated sigma meets ``privacy.target_epsilon`` at ``privacy.delta``
        after ``planned_steps`` steps at ``sample_rate`` (this run alone).

        Returns:
            Sigma, and the state with the memo updated.
        """
        if privacy.noise_multiplier is not None:
            return float(privacy.noise_multiplier), self
        wanted = dict(target_epsilon=float(privacy.target_epsilon), delta=float(privacy.delta),
                      sample_rate=float(sample_rate), steps=int(planned_steps),
                      accountant=privacy.accountant)
        cal = self.calibration
        if cal is not None and {k: getattr(cal, k) for k in wanted} == wanted:
            return cal.noise_multiplier, self
        sigma = calibrate_noise(**wanted)  # type: ignore[arg-type]
        return sigma, dataclasses.replace(self, calibration=Calibration(**wanted,  # type: ignore[arg-type]
                                                                        noise_multiplier=sigma))
