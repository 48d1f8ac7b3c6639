"""The decision threshold, chosen on validation, and the test figures at it.

Two-class models output a probability of class 1; which probability counts
as positive is a clinical choice, made here on the pooled validation splits
of the selected model, never on a test split:

- ``youden`` (default): the grid threshold maximising Youden's J =
  sensitivity + specificity - 1 on the pooled validation images;
- ``sensitivity``: the highest grid threshold whose pooled validation
  sensitivity reaches ``evaluation.target_sensitivity``;
- ``fixed``: ``evaluation.fixed_threshold``, not chosen on data.

Hospitals send, with each evaluation, the true and false positives of their
validation and test images at every threshold of the grid
(:func:`common.intervals.roc_counts`); the server sums the validation counts,
picks the threshold, and recomputes each hospital's sensitivity, specificity
and accuracy at it from the test counts, with bootstrap intervals from the
counts (:func:`common.intervals.counts_intervals`, exact for these
statistics), and the overall figures from the pooled counts (a bootstrap
stratified by hospital).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common import wire
from common.config import EvaluationConfig
from common.intervals import Bootstrap, Confusion, counts_intervals, threshold_grid

VAL_TP, VAL_FP = wire.VALIDATION_PREFIX + wire.ROC_TP, wire.VALIDATION_PREFIX + wire.ROC_FP
RATES = ("sensitivity", "specificity", "accuracy")


@dataclass(frozen=True)
class Threshold:
    """The threshold in use.

    Attributes:
        value: probability of class 1 from which class 1 is predicted.
        index: its position on :func:`common.intervals.threshold_grid`.
        method: ``youden``, ``sensitivity`` or ``fixed``.
        chosen_on: what it was chosen on, in words.
    """

    value: float
    index: int
    method: str
    chosen_on: str

    def to_json(self) -> dict[str, Any]:
        """``summary.json["threshold"]``."""
        return {"value": self.value, "method": self.method, "chosen_on": self.chosen_on}


def grid_index(value: float) -> int:
    """The grid position of a threshold (the nearest grid value)."""
    return int(np.argmin(np.abs(threshold_grid() - value)))


def choose(tp: Sequence[int], fp: Sequence[int], evaluation: EvaluationConfig,
           where: str) -> Threshold:
    """The threshold ``evaluation.threshold`` asks for, from pooled ROC counts.

    Args:
        tp, fp: true / false positives at each grid threshold (element 0: all
            positives / negatives).
        evaluation: the method and its parameters.
        where: the images counted, in words (for ``chosen_on``).
    """
    grid = threshold_grid()
    pos, neg = float(tp[0]), float(fp[0])
    if evaluation.threshold == "fixed" or pos == 0 or neg == 0:
        return fixed(evaluation, "" if evaluation.threshold == "fixed" else
                     f"; {where} has only one class")
    sens = np.asarray(tp, dtype=float) / pos
    spec = 1.0 - np.asarray(fp, dtype=float) / neg
    if evaluation.threshold == "sensitivity":
        reaching = np.flatnonzero(sens >= evaluation.target_sensitivity)
        index = int(reaching.max())  # threshold 0 always reaches sensitivity 1
        detail = f"highest threshold with sensitivity >= {evaluation.target_sensitivity:g}"
    else:
        youden = sens + spec - 1.0
        best = np.flatnonzero(np.isclose(youden, youden.max()))
        index = int(best[np.argmin(np.abs(grid[best] - 0.5))])  # ties: nearest 0.5
        detail = f"Youden's J = {youden[index]:.4f}"
    return Threshold(float(grid[index]), index, evaluation.threshold,
                     f"{where} ({int(pos + neg)} images): {detail}, validation sensitivity "
                     f"{sens[index]:.4f}, specificity {spec[index]:.4f}")


def fixed(evaluation: EvaluationConfig, why: str = "") -> Threshold:
    """``evaluation.fixed_threshold``, not chosen on data (``why``: the reason, if any)."""
    value = evaluation.fixed_threshold
    return Threshold(value, grid_index(value), "fixed", f"not chosen on data{why}")


def from_validation(hospitals: Mapping[str, Mapping[str, Any]], evaluation: EvaluationConfig,
                    round_: int | None) -> Threshold:
    """The threshold from the hospitals' validation counts of one round (summed)."""
    having = [m for m in hospitals.values()
              if isinstance(m.get(VAL_TP), list) and isinstance(m.get(VAL_FP), list)]
    if not having or evaluation.threshold == "fixed":
        return fixed(evaluation, "" if evaluation.threshold == "fixed" else
                     "; no hospital sent validation ROC counts")
    tp = np.sum([m[VAL_TP] for m in having], axis=0)
    fp = np.sum([m[VAL_FP] for m in having], axis=0)
    where = (f"pooled validation splits of {len(having)} hospital(s)"
             + (f", round {round_}" if round_ is not None else ""))
    return choose([int(v) for v in tp], [int(v) for v in fp], evaluation, where)


def confusion(metrics: Mapping[str, Any], threshold: Threshold) -> Confusion | None:
    """A site's test confusion counts at the threshold, if it sent its ROC counts."""
    tp, fp = metrics.get(wire.ROC_TP), metrics.get(wire.ROC_FP)
    if not isinstance(tp, list) or not isinstance(fp, list):
        return None
    return Confusion.at(tp, fp, threshold.index)


def at_threshold(hospitals: Mapping[str, Mapping[str, Any]], overall: Mapping[str, Any],
                 threshold: Threshold, boot: Bootstrap
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Hospitals' and overall test figures with sensitivity, specificity and accuracy
    recomputed at ``threshold`` (sites without ROC counts keep the figures they sent at
    0.5, marked by the absence of ``threshold``)."""
    out: dict[str, dict[str, Any]] = {}
    strata = []
    for index, (name, metrics) in enumerate(sorted(hospitals.items())):
        cells = confusion(metrics, threshold)
        row = dict(metrics)
        if cells is not None:
            strata.append(cells)
            seeded = Bootstrap(boot.resamples, boot.confidence, boot.seed + index)
            row.update(counts_intervals([cells], seeded), threshold=threshold.value)
        out[name] = row
    pooled = dict(overall)
    if strata and len(strata) == len(hospitals):
        pooled.update(counts_intervals(strata, boot), threshold=threshold.value)
    return out, pooled


def without_counts(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` without the ROC-count lists (they stay in ``metrics.jsonl``)."""
    return {k: v for k, v in metrics.items() if k not in wire.ROC_LISTS}
