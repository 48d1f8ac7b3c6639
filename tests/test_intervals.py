"""Bootstrap intervals, ROC counts and the validation threshold, against known cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from common import wire
from common.config import EvaluationConfig
from common.evaluation import classification_metrics, segmentation_metrics
from common.intervals import (
    Bootstrap,
    Confusion,
    classification_intervals,
    combined_bounds,
    counts_intervals,
    mean_interval,
    roc_counts,
)
from server.strategy import weighted_mean
from server.threshold import Threshold, at_threshold, choose, from_validation

Z95 = 1.959964


def test_a_proportions_interval_matches_the_binomial_standard_error() -> None:
    """Known case: the bootstrap interval of a proportion p of n is ~p +- 1.96 sqrt(p(1-p)/n)."""
    n, p = 400, 0.8
    hits = np.zeros(n)
    hits[: int(n * p)] = 1.0
    low, high = mean_interval(hits, Bootstrap(resamples=2000, seed=3))
    half = Z95 * math.sqrt(p * (1 - p) / n)  # 0.0392
    assert low == pytest.approx(p - half, abs=0.006)
    assert high == pytest.approx(p + half, abs=0.006)


def test_the_same_seed_gives_the_same_interval_and_another_seed_nearly() -> None:
    values = np.random.default_rng(0).normal(0.8, 0.1, size=200)
    a, b = mean_interval(values, Bootstrap(seed=1)), mean_interval(values, Bootstrap(seed=1))
    c = mean_interval(values, Bootstrap(seed=2))
    assert a == b
    assert a[0] == pytest.approx(c[0], abs=0.005) and a[1] == pytest.approx(c[1], abs=0.005)


def test_counts_bootstrap_equals_resampling_the_images() -> None:
    """Sensitivity etc. at a threshold depend only on the confusion cells: drawing them from
    a multinomial gives the interval resampling the images gives."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    prob = np.clip(0.35 * labels + 0.65 * rng.random(300), 0, 1)
    predicted = (prob >= 0.5).astype(np.int64)
    by_images = classification_intervals(prob, labels, predicted, Bootstrap(4000, seed=5))
    tp, fp = roc_counts(prob, labels)
    by_counts = counts_intervals([Confusion.at(tp, fp, 50)], Bootstrap(4000, seed=6))
    for name in ("sensitivity", "specificity", "accuracy"):
        for side in (wire.CI_LOW, wire.CI_HIGH):
            assert by_counts[name + side] == pytest.approx(by_images[name + side], abs=0.012)
    assert by_counts["accuracy"] == pytest.approx(float(np.mean(predicted == labels)))


def test_roc_counts_start_with_the_class_sizes_and_never_grow() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    tp, fp = roc_counts(np.array([0.1, 0.6, 0.4, 0.8, 1.0]), labels)
    assert (tp[0], fp[0]) == (3, 2) and len(tp) == 101
    assert (tp[50], fp[50]) == (2, 1)  # threshold 0.50: 0.8 and 1.0 positive, 0.6 false
    assert tp[-1] == 1 and fp[-1] == 0
    assert all(a >= b for a, b in zip(tp, tp[1:], strict=False))


def test_a_perfect_classifiers_auc_interval_is_one() -> None:
    logits = torch.tensor([[2.0, -2.0]] * 20 + [[-2.0, 2.0]] * 20)
    labels = torch.tensor([0] * 20 + [1] * 20)
    metrics = classification_metrics(logits, labels, boot=Bootstrap(200), roc=True)
    assert metrics["auc"] == 1.0
    assert metrics["auc-ci-low"] == metrics["auc-ci-high"] == 1.0
    assert metrics[wire.ROC_TP][0] == 20 and metrics[wire.ROC_FP][0] == 20


def test_more_than_two_classes_get_per_class_figures() -> None:
    torch.manual_seed(0)
    labels = torch.arange(60) % 3
    logits = torch.nn.functional.one_hot(labels, 3).float() * 2 + torch.randn(60, 3)
    metrics = classification_metrics(logits, labels, boot=Bootstrap(100))
    for k in range(3):
        assert 0.5 < metrics[f"auc-class-{k}"] <= 1.0
        assert 0.0 <= metrics[f"sensitivity-class-{k}"] <= 1.0
    assert metrics["auc-ci-low"] <= metrics["auc"] <= metrics["auc-ci-high"]
    assert wire.ROC_TP not in metrics  # no threshold for more than two classes


def test_segmentation_intervals_cover_the_mean_dice() -> None:
    torch.manual_seed(0)
    truth = (torch.rand(12, 1, 16, 16) > 0.5).long()
    logits = torch.cat([1 - truth, truth], 1).float() * 2 + torch.randn(12, 2, 16, 16)
    metrics = segmentation_metrics(logits, truth, boot=Bootstrap(200))
    assert metrics["dice-ci-low"] <= metrics["dice"] <= metrics["dice-ci-high"]
    assert metrics["hd95-ci-low"] <= metrics["hd95"] <= metrics["hd95-ci-high"]


def test_two_equal_hospitals_narrow_the_interval_by_root_two() -> None:
    """Known case: the weighted mean of two independent equal-sized estimates with
    half-width h has half-width h / sqrt(2)."""
    low, high = combined_bounds([0.8, 0.8], [0.7, 0.7], [0.9, 0.9], [50, 50])
    assert low == pytest.approx(0.8 - 0.1 / math.sqrt(2))
    assert high == pytest.approx(0.8 + 0.1 / math.sqrt(2))


def test_the_overall_row_combines_intervals_and_sums_counts() -> None:
    def reply(auc: float, tp: list[int]) -> RecordDict:
        return RecordDict({wire.METRICS: MetricRecord({
            wire.NUM_EXAMPLES: 50, "auc": auc, "auc-ci-low": auc - 0.1, "auc-ci-high": auc + 0.1,
            wire.ROC_TP: tp})})
    overall = weighted_mean([reply(0.8, [5] * 101), reply(0.8, [3] * 101)], wire.NUM_EXAMPLES)
    assert overall["auc"] == pytest.approx(0.8)
    assert overall["auc-ci-high"] == pytest.approx(0.8 + 0.1 / math.sqrt(2))
    assert overall[wire.ROC_TP] == [8] * 101


def _counts(sens: list[float], spec: list[float], pos: int = 1000, neg: int = 1000
            ) -> tuple[list[int], list[int]]:
    """ROC counts with the given sensitivity / specificity at each of the 101 thresholds."""
    return [round(s * pos) for s in sens], [round((1 - p) * neg) for p in spec]


def test_youden_picks_the_threshold_of_largest_sensitivity_plus_specificity() -> None:
    grid = np.linspace(0, 1, 101)
    sens = list(np.clip(1.2 - grid, 0, 1))      # falls from 1 after 0.2
    spec = list(np.clip(grid / 0.7, 0, 1))      # reaches 1 at 0.7
    tp, fp = _counts(sens, spec)
    chosen = choose(tp, fp, EvaluationConfig(), "known curve")
    assert chosen.value == 0.7 and chosen.method == "youden"  # J = 0.5 + 1 - 1, the maximum
    target = choose(tp, fp, EvaluationConfig(threshold="sensitivity", target_sensitivity=0.9),
                    "known curve")
    assert target.value == 0.3  # the highest threshold with sensitivity >= 0.9
    fixed = choose(tp, fp, EvaluationConfig(threshold="fixed", fixed_threshold=0.4), "x")
    assert fixed.value == 0.4 and "not chosen on data" in fixed.chosen_on


def test_the_threshold_comes_from_pooled_validation_and_applies_to_test_counts() -> None:
    rng = np.random.default_rng(2)
    sites = {}
    for name in ("a", "b"):
        labels = rng.integers(0, 2, 200)
        prob = np.clip(0.5 * labels + 0.5 * rng.random(200) + 0.1, 0, 1)  # best cut near 0.6
        val_tp, val_fp = roc_counts(prob[:100], labels[:100])
        tp, fp = roc_counts(prob[100:], labels[100:])
        sites[name] = {wire.NUM_EXAMPLES: 100.0, "accuracy": 0.0, wire.ROC_TP: tp,
                       wire.ROC_FP: fp, "val-" + wire.ROC_TP: val_tp, "val-" + wire.ROC_FP: val_fp}
    threshold = from_validation(sites, EvaluationConfig(), round_=3)
    assert isinstance(threshold, Threshold) and 0.5 <= threshold.value <= 0.65
    assert "pooled validation splits of 2 hospital(s), round 3 (200 images)" in threshold.chosen_on
    hospitals, overall = at_threshold(sites, {}, threshold, Bootstrap(300))
    for row in hospitals.values():
        assert row["threshold"] == threshold.value
        assert row["accuracy-ci-low"] <= row["accuracy"] <= row["accuracy-ci-high"]
    pooled = Confusion.at(np.add(sites["a"][wire.ROC_TP], sites["b"][wire.ROC_TP]),
                          np.add(sites["a"][wire.ROC_FP], sites["b"][wire.ROC_FP]),
                          threshold.index)
    assert overall["sensitivity"] == pytest.approx(pooled.rates()["sensitivity"])
