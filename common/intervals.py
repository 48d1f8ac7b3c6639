"""Percentile bootstrap confidence intervals and ROC counts on a threshold grid.

Every interval here is a percentile bootstrap: the images scored are
resampled with replacement ``resamples`` times (seeded), the metric is
recomputed on each resample, and the interval is the ``(1 - confidence) / 2``
and ``(1 + confidence) / 2`` quantiles of those values. A metric undefined on
a resample (AUC with one class drawn) is left out of that interval; an
interval with fewer than half its resamples defined is undefined (None).

Sensitivity, specificity and accuracy at a fixed threshold depend on the
images only through the four cells of the confusion matrix, so resampling
images is the same as drawing the cells from a multinomial with the observed
proportions: :func:`counts_intervals` bootstraps them from counts alone,
which is how the server bootstraps a hospital's figures at a threshold chosen
after the hospital scored its images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_roc_auc

from common.wire import CI_HIGH as HIGH
from common.wire import CI_LOW as LOW
from common.wire import CLINICAL_METRICS

GRID_SIZE = 101
"""Thresholds of the ROC grid: 0.00, 0.01, ..., 1.00 (probability of class 1)."""

Interval = tuple[float | None, float | None]


def threshold_grid() -> np.ndarray:
    """The ROC grid's thresholds, shape ``[GRID_SIZE]``, from 0 to 1."""
    return np.round(np.linspace(0.0, 1.0, GRID_SIZE), 2)


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are drawn.

    Attributes:
        resamples: bootstrap resamples (0 = no intervals).
        confidence: coverage, e.g. 0.95.
        seed: seed of the resampling (the same seed gives the same interval).
    """

    resamples: int = 500
    confidence: float = 0.95
    seed: int = 0

    def bounds(self, values: Sequence[float]) -> Interval:
        """The percentile interval of bootstrap ``values`` (None where undefined)."""
        finite = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
        if self.resamples == 0 or finite.size < max(1, self.resamples // 2):
            return None, None
        tail = (1.0 - self.confidence) / 2.0
        low, high = np.quantile(finite, [tail, 1.0 - tail])
        return float(low), float(high)

    def indices(self, n: int) -> np.ndarray:
        """Resampled image indices, shape ``[resamples, n]``."""
        rng = np.random.default_rng(self.seed)
        return rng.integers(0, n, size=(self.resamples, n))


def resampled(statistic: Callable[[np.ndarray], float], n: int, boot: Bootstrap) -> Interval:
    """The interval of ``statistic(indices)`` over bootstrap resamples of ``n`` images."""
    if n == 0 or boot.resamples == 0:
        return None, None
    return boot.bounds([statistic(idx) for idx in boot.indices(n)])


def auc_of(probs: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC with MONAI (macro one-vs-rest for ``probs [N, K>2]``); NaN if undefined.

    Args:
        probs: probability of class 1 ``[N]`` (two classes) or of each class ``[N, K]``.
        labels: class indices ``[N]``.
    """
    if probs.ndim == 1:
        if labels.min() == labels.max():
            return math.nan
        auc = compute_roc_auc(torch.from_numpy(probs), torch.from_numpy(labels))
        return float(np.asarray(auc).mean())
    present = np.unique(labels)
    if present.size < 2:
        return math.nan
    aucs = [auc_of(probs[:, k], (labels == k).astype(np.int64)) for k in present]
    return float(np.mean(aucs))


def classification_intervals(probs: np.ndarray, labels: np.ndarray, predicted: np.ndarray,
                             boot: Bootstrap) -> dict[str, float | None]:
    """Intervals of AUC, accuracy and (two classes) sensitivity and specificity.

    Args:
        probs: probability of class 1 ``[N]`` (two classes) or of each class ``[N, K]``.
        labels: true class indices ``[N]``.
        predicted: predicted class indices ``[N]`` (at the threshold in use).
        boot: how to resample.

    Returns:
        ``auc-ci-low``, ``auc-ci-high``, ``accuracy-ci-low``, ... (None where undefined).
    """
    n = labels.shape[0]
    out: dict[str, float | None] = {}
    stats: dict[str, Callable[[np.ndarray], float]] = {
        "auc": lambda i: auc_of(probs[i], labels[i]),
        "accuracy": lambda i: float(np.mean(predicted[i] == labels[i])),
    }
    if probs.ndim == 1:
        stats["sensitivity"] = lambda i: _rate(predicted[i], labels[i], 1)
        stats["specificity"] = lambda i: _rate(predicted[i], labels[i], 0)
    for name, statistic in stats.items():
        out[name + LOW], out[name + HIGH] = resampled(statistic, n, boot)
    return out


def _rate(predicted: np.ndarray, labels: np.ndarray, cls: int) -> float:
    """Share of the images of class ``cls`` predicted as ``cls`` (NaN if there are none)."""
    mask = labels == cls
    return float(np.mean(predicted[mask] == cls)) if mask.any() else math.nan


def mean_interval(values: np.ndarray, boot: Bootstrap) -> Interval:
    """Interval of the mean of per-image ``values`` ``[N]`` (NaN entries left out)."""
    finite = values[np.isfinite(values)]
    return resampled(lambda i: float(np.mean(finite[i])), finite.shape[0], boot)


def roc_counts(prob1: np.ndarray, labels: np.ndarray) -> tuple[list[int], list[int]]:
    """True and false positives at each grid threshold (``prob1 >= t`` is positive).

    Args:
        prob1: probability of class 1 ``[N]``.
        labels: 0/1 labels ``[N]``.

    Returns:
        ``(tp, fp)``, each ``GRID_SIZE`` counts; ``tp[0]`` and ``fp[0]`` are the
        numbers of positive and negative images (threshold 0).
    """
    grid = threshold_grid()
    positive = prob1[None, :] >= grid[:, None] - 1e-9
    tp = (positive & (labels[None, :] == 1)).sum(axis=1)
    fp = (positive & (labels[None, :] == 0)).sum(axis=1)
    return [int(v) for v in tp], [int(v) for v in fp]


@dataclass(frozen=True)
class Confusion:
    """Confusion counts of one set of images at one threshold."""

    tp: int
    fn: int
    tn: int
    fp: int

    @classmethod
    def at(cls, tp: Sequence[float], fp: Sequence[float], index: int) -> Confusion:
        """The counts at grid threshold ``index`` from :func:`roc_counts` lists."""
        pos, neg = int(tp[0]), int(fp[0])
        return cls(tp=int(tp[index]), fn=pos - int(tp[index]), tn=neg - int(fp[index]),
                   fp=int(fp[index]))

    def rates(self) -> dict[str, float | None]:
        """``sensitivity``, ``specificity``, ``accuracy`` (None where undefined)."""
        return _rates(np.array([[self.tp, self.fn, self.tn, self.fp]], dtype=float))[0]


def _rates(cells: np.ndarray) -> list[dict[str, float | None]]:
    """Rates of each row of ``cells [R, 4]`` (tp, fn, tn, fp)."""
    out = []
    for tp, fn, tn, fp in cells:
        total = tp + fn + tn + fp
        out.append({"sensitivity": float(tp / (tp + fn)) if tp + fn else None,
                    "specificity": float(tn / (tn + fp)) if tn + fp else None,
                    "accuracy": float((tp + tn) / total) if total else None})
    return out


def counts_intervals(strata: Sequence[Confusion], boot: Bootstrap) -> dict[str, float | None]:
    """Sensitivity, specificity, accuracy of the pooled ``strata`` with bootstrap intervals.

    Each stratum (a hospital's test split) is resampled on its own, with its
    own size (a stratified bootstrap), by drawing its four cells from a
    multinomial with its observed proportions; the resampled cells are pooled.

    Returns:
        ``sensitivity``, ``sensitivity-ci-low``, ``sensitivity-ci-high`` and the same
        for ``specificity`` and ``accuracy`` (None where undefined).
    """
    pooled = np.zeros((1, 4))
    draws = np.zeros((boot.resamples, 4))
    rng = np.random.default_rng(boot.seed)
    for s in strata:
        cells = np.array([s.tp, s.fn, s.tn, s.fp], dtype=float)
        pooled[0] += cells
        n = int(cells.sum())
        if n > 0 and boot.resamples > 0:
            draws += rng.multinomial(n, cells / n, size=boot.resamples)
    out: dict[str, float | None] = dict(_rates(pooled)[0])
    resampled_rates = _rates(draws)
    for name in ("sensitivity", "specificity", "accuracy"):
        values = [r[name] for r in resampled_rates]
        out[name + LOW], out[name + HIGH] = boot.bounds(
            [math.nan if v is None else v for v in values])
    return out


def combined_bounds(estimates: Sequence[float], lows: Sequence[float], highs: Sequence[float],
                    weights: Sequence[float], *, upper: float | None = 1.0) -> Interval:
    """Interval of a weighted mean of independent estimates from their own intervals.

    The normal approximation of a weighted mean of independent hospitals'
    estimates: each side's half-width is ``sqrt(sum((w_i / W)^2 h_i^2))``, with
    ``h_i`` that side's half-width of hospital ``i``'s interval.

    Args:
        estimates, lows, highs, weights: per hospital (same length).
        upper: the metric's largest possible value (None for HD95).
    """
    total = float(sum(weights))
    if total <= 0 or not estimates:
        return None, None
    share = np.asarray(weights, dtype=float) / total
    est = np.asarray(estimates, dtype=float)
    mean = float(np.sum(share * est))
    below = math.sqrt(float(np.sum((share * (est - np.asarray(lows, dtype=float))) ** 2)))
    above = math.sqrt(float(np.sum((share * (np.asarray(highs, dtype=float) - est)) ** 2)))
    high = mean + above
    return max(0.0, mean - below), (min(upper, high) if upper is not None else high)


def overall_intervals(rows: Sequence[Mapping[str, Any]], weighting_key: str
                      ) -> dict[str, float]:
    """Each clinical metric's overall interval from the sites' own (:func:`combined_bounds`).

    Args:
        rows: one site's metrics each, with ``<metric>``, ``<metric>-ci-low``,
            ``<metric>-ci-high`` and ``weighting_key`` (its number of images).
    """
    out: dict[str, float] = {}
    for metric in CLINICAL_METRICS:
        low_key, high_key = metric + LOW, metric + HIGH
        having = [r for r in rows if all(isinstance(r.get(k), int | float)
                                         for k in (metric, low_key, high_key))]
        if not having:
            continue
        low, high = combined_bounds(
            [float(r[metric]) for r in having], [float(r[low_key]) for r in having],
            [float(r[high_key]) for r in having],
            [float(r.get(weighting_key, 0.0)) for r in having],
            upper=None if metric == "hd95" else 1.0)
        if low is not None and high is not None:
            out[low_key], out[high_key] = low, high
    return out
