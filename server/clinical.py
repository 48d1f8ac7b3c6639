"""The clinical figures of ``summary.json``: the chosen threshold and confidence intervals.

After the last round the summary holds the selected round's test figures as
the hospitals sent them (each with its own bootstrap intervals, AUC, Dice
and HD95, and ROC counts). :func:`clinical_summary` then

1. chooses the decision threshold on the pooled validation splits of the
   selected round (two classes; :mod:`server.threshold`) and recomputes each
   hospital's and the overall sensitivity, specificity and accuracy at it,
   with intervals;
2. scores the selected model on the central test set at that threshold, with
   intervals, and writes ``central_predictions.npz`` (:func:`server.central.final_central`);
3. records ``threshold`` and ``intervals`` and leaves the ROC counts out of
   the summary (they stay in ``metrics.jsonl``).

Intervals: percentile bootstrap (``evaluation.bootstrap`` resamples,
``evaluation.confidence``), seeded. A hospital's AUC, Dice and HD95
intervals are its own, over its test images; sensitivity, specificity and
accuracy are bootstrapped from its confusion counts; ``overall`` intervals
of AUC, Dice and HD95 combine the hospitals' (normal approximation of a
weighted mean of independent hospitals), those of the rates come from a
bootstrap stratified by hospital.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.config import Settings
from common.intervals import Bootstrap
from server.central import final_central
from server.report import SUMMARY_FILE, atomic_write_text
from server.threshold import Threshold, at_threshold, from_validation, without_counts

METHOD = ("percentile bootstrap over each test set's images (seeded); overall: AUC, Dice and "
          "HD95 combine the hospitals' intervals (normal approximation, hospitals independent), "
          "sensitivity, specificity and accuracy a bootstrap stratified by hospital")


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (nested) replaced by None, for JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def bootstrap_of(settings: Settings) -> Bootstrap:
    """The run's bootstrap settings (seeded by the experiment's seed)."""
    return Bootstrap(settings.evaluation.bootstrap, settings.evaluation.confidence,
                     seed=settings.seed)


def intervals_note(settings: Settings) -> dict[str, Any]:
    """``summary.json["intervals"]``."""
    return {"confidence": settings.evaluation.confidence,
            "resamples": settings.evaluation.bootstrap, "method": METHOD}


def two_classes(settings: Settings) -> bool:
    """Whether the run has a decision threshold to choose."""
    return settings.task.kind == "classification" and settings.task.num_classes == 2


def clinical_summary(settings: Settings, summary: Mapping[str, Any],
                     weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``summary`` with the threshold, intervals and central figures; rewritten to disk.

    Args:
        settings: the experiment (``evaluation.*``).
        summary: as :meth:`server.report.RunRecorder.write_summary` wrote it.
        weights: the selected model's weights (scored on the central test set).
    """
    out = dict(summary)
    threshold: Threshold | None = None
    hospitals, overall = dict(out.get("hospitals", {})), dict(out.get("overall", {}))
    if two_classes(settings):
        chosen = (out.get("selection") or {}).get("round")
        threshold = from_validation(hospitals, settings.evaluation, chosen)
        hospitals, overall = at_threshold(hospitals, overall, threshold, bootstrap_of(settings))
        out["threshold"] = threshold.to_json()
    central = final_central(settings, weights, Path(settings.run_dir),
                            threshold=None if threshold is None else threshold.value)
    out["hospitals"] = {name: without_counts(m) for name, m in hospitals.items()}
    out["overall"] = without_counts(overall)
    if central is not None:
        out["central"] = central
    if isinstance(out.get("last_round"), dict):
        last = out["last_round"]
        out["last_round"] = {**last, "hospitals": {n: without_counts(m) for n, m in
                                                    last.get("hospitals", {}).items()},
                             "overall": without_counts(last.get("overall", {}))}
    out["intervals"] = intervals_note(settings)
    out = finite(out)
    atomic_write_text(Path(settings.run_dir) / SUMMARY_FILE, json.dumps(out, indent=2) + "\n")
    return out
