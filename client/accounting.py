"""Privacy accounting of DP-SGD: mechanisms, their epsilon, noise calibration, ceilings.

A DP-SGD step at a hospital is one Poisson-subsampled Gaussian mechanism:
every training sample joins the batch independently with probability
``sample_rate``, per-sample gradients are clipped to L2 norm ``C``, and
Gaussian noise of standard deviation ``noise_multiplier * C`` is added to
their sum. A :data:`Mechanism` ``(noise_multiplier, sample_rate, steps)``
records ``steps`` such steps in a row; a *history* is the list of them in the
order they ran.

What an epsilon here means: the (epsilon, delta) sample-level differential
privacy guarantee, under add/remove-one-sample adjacency, of *everything
released* by all the steps of a history composed together (sequential
composition, computed by one Opacus accountant over the whole history): for
any one training image, the probability of any set of outcomes of the
released model updates changes by at most a factor ``e**epsilon`` plus
``delta`` whether that image is in the data or not. It assumes the Poisson
sampling and the noise are secret to every observer, and says nothing about
other hospitals' data or about unnoised outputs (evaluation metrics).

Composition across rounds and runs is exact for the accountant used: the
epsilon after round k is the accountant over rounds 1..k, never a per-round
figure; separate runs on the same data compose by concatenating their
histories into one accountant at one delta.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

Mechanism = tuple[float, float, int]
"""``(noise_multiplier, sample_rate, steps)``: ``steps`` DP-SGD steps at one sigma and rate."""

ACCOUNTANTS = ("prv", "rdp")
CALIBRATION_TOLERANCE = 0.005
"""Calibrated sigma gives an epsilon in ``[target * (1 - this), target]``."""


class BudgetExceededError(RuntimeError):
    """Training would take a hospital's data past its privacy ceiling.

    Attributes:
        spent: epsilon already spent on the data (at ``delta``).
        would_be: epsilon the refused training would have brought it to.
        ceiling: the most epsilon the hospital allows on this data.
        delta: the delta all three epsilons hold at.
    """

    def __init__(self, *, spent: float, would_be: float, ceiling: float, delta: float,
                 what: str = "this round") -> None:
        self.spent, self.would_be, self.ceiling, self.delta = spent, would_be, ceiling, delta
        super().__init__(
            f"privacy ceiling: {what} would bring epsilon on this hospital's data from "
            f"{spent:.4f} (spent) to {would_be:.4f}, above its ceiling epsilon={ceiling:g} "
            f"(all at delta={delta:g}); declined, nothing trained or recorded")


def check_mechanism(value: Any, *, where: str) -> Mechanism:
    """Validate one ``(noise_multiplier, sample_rate, steps)`` triple.

    Raises:
        ValueError: not three numbers, sigma not finite and > 0, rate not in
            (0, 1], or steps not an integer >= 0; the message names ``where``.
    """
    try:
        sigma, rate, steps = value
        ok = (not isinstance(steps, bool) and float(steps) == int(steps) and int(steps) >= 0
              and math.isfinite(float(sigma)) and float(sigma) > 0 and 0 < float(rate) <= 1)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"{where}: {value!r} is not a DP-SGD mechanism [noise_multiplier > 0, "
            "sample_rate in (0, 1], steps >= 0]")
    return float(sigma), float(rate), int(steps)


def canonical(history: Iterable[Sequence[float]]) -> list[Mechanism]:
    """The history as one continuous Opacus accountant would hold it.

    Consecutive entries with the same sigma and sample rate are merged (as
    Opacus' accountants do step by step) and zero-step entries dropped, so
    that rounds accounted separately and one uninterrupted run give the very
    same accountant input, hence the very same epsilon.
    """
    merged: list[Mechanism] = []
    for sigma, rate, steps in history:
        if steps == 0:
            continue
        if merged and merged[-1][:2] == (sigma, rate):
            merged[-1] = (float(sigma), float(rate), merged[-1][2] + int(steps))
        else:
            merged.append((float(sigma), float(rate), int(steps)))
    return merged


def epsilon_of(history: Iterable[Sequence[float]], *, delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of all of ``history`` composed in one accountant.

    Args:
        history: mechanisms in the order they ran (any number of rounds/runs).
        delta: the delta of the guarantee, in (0, 1).
        accountant: ``prv`` (numerically tight upper bound) or ``rdp``.

    Returns:
        The epsilon (0.0 for an empty history). PRV returns its upper bound.

    Raises:
        ValueError: an unknown accountant or a delta outside (0, 1).
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant={accountant!r} is not valid; allowed: prv, rdp")
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta!r} must lie in (0, 1)")
    merged = canonical(history)
    if not merged:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = list(merged)
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str) -> float:
    """The noise multiplier whose ``steps`` steps at ``sample_rate`` spend ``target_epsilon``.

    Deterministic in its arguments (Opacus' ``get_noise_multiplier`` bisection),
    so every round of a run that plans the same training gets the same sigma.
    The epsilon of ``[(sigma, sample_rate, steps)]`` lies in
    ``[target_epsilon * (1 - CALIBRATION_TOLERANCE), target_epsilon]``.

    Raises:
        ValueError: a non-positive target or step count, or a target so small
            that no noise multiplier up to Opacus' limit meets it.
    """
    if not target_epsilon > 0 or steps <= 0 or not 0 < sample_rate <= 1:
        raise ValueError(
            f"cannot calibrate noise for target_epsilon={target_epsilon!r}, steps={steps!r}, "
            f"sample_rate={sample_rate!r}: each must be > 0 (rate <= 1)")
    try:
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
            steps=steps, accountant=accountant,
            epsilon_tolerance=CALIBRATION_TOLERANCE * target_epsilon)
    except ValueError as err:
        raise ValueError(
            f"no noise multiplier reaches target_epsilon={target_epsilon:g} at delta={delta:g} "
            f"in {steps} steps at sample rate {sample_rate:.4g} ({err}); raise the target "
            "or train fewer steps") from None
    return float(sigma)


def check_ceiling(*, spent_history: Sequence[Mechanism], planned: Mechanism,
                  ceiling_epsilon: float | None, delta: float, accountant: str,
                  what: str = "this round") -> None:
    """Refuse ``planned`` if, added to what was spent, it would cross the ceiling.

    Args:
        spent_history: every mechanism already applied to the data (all runs).
        planned: the mechanism about to run.
        ceiling_epsilon: the most epsilon allowed on the data; None = none.
        delta: the delta the ceiling holds at.
        accountant: ``prv`` or ``rdp``.
        what: names the refused training in the error message.

    Raises:
        BudgetExceededError: that epsilon would exceed ``ceiling_epsilon``.
    """
    if ceiling_epsilon is None:
        return
    would_be = epsilon_of([*spent_history, planned], delta=delta, accountant=accountant)
    if would_be > ceiling_epsilon:
        spent = epsilon_of(spent_history, delta=delta, accountant=accountant)
        raise BudgetExceededError(spent=spent, would_be=would_be, ceiling=ceiling_epsilon,
                                  delta=delta, what=what)
