"""Scoring a model on a dataset with MONAI's metrics, under plain metric names.

Classification: ``loss``, ``accuracy``, ``auc`` (ROC AUC; macro one-vs-rest
for more than two classes, with per-class ``auc-class-k``,
``sensitivity-class-k``, ``specificity-class-k``), and for two classes
``sensitivity`` and ``specificity`` (class 1 = positive) at a given
probability threshold (default: the larger probability). Segmentation:
``loss``, ``dice`` (mean foreground Dice per image) and ``hd95`` (95th
percentile Hausdorff distance in pixels/voxels, over images where both masks
are non-empty). Optionally each with a percentile bootstrap interval
(:mod:`common.intervals`) and, for two classes, the ROC counts on a
threshold grid from which a threshold is chosen later.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from monai.metrics import (
    ConfusionMatrixMetric,
    DiceMetric,
    HausdorffDistanceMetric,
)
from monai.networks.utils import one_hot
from torch import nn

from common import wire
from common.config import TaskConfig
from common.intervals import (
    Bootstrap,
    auc_of,
    classification_intervals,
    mean_interval,
    roc_counts,
)
from common.training import make_loss

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def predict(model: nn.Module, loader: Batches, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` over ``loader``.

    Returns:
        Logits ``[N, K, ...]`` and targets ``[N]`` / ``[N, 1, ...]`` on the CPU.
    """
    model.eval()
    logits, targets = [], []
    for images, target in loader:
        if images.shape[0] == 0:
            continue
        logits.append(model(images.to(device)).float().cpu())
        targets.append(target)
    if not logits:
        raise ValueError("cannot evaluate on an empty dataset")
    return torch.cat(logits), torch.cat(targets)


def _confusion_rates(pred: torch.Tensor, labels: torch.Tensor, num_classes: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sensitivity and specificity ``[K]`` (one-vs-rest) with MONAI."""
    cm = ConfusionMatrixMetric(metric_name=("sensitivity", "specificity"),
                               include_background=True, reduction="mean_batch")
    cm(one_hot(pred[:, None], num_classes, dim=1), one_hot(labels[:, None], num_classes, dim=1))
    sens, spec = cm.aggregate()
    return torch.as_tensor(sens).float(), torch.as_tensor(spec).float()


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, *,
                           threshold: float | None = None, boot: Bootstrap | None = None,
                           roc: bool = False) -> dict[str, Any]:
    """Metrics of logits ``[N, K]`` against class indices ``[N]``.

    Args:
        logits: model outputs ``[N, K]``.
        targets: class indices ``[N]`` (or ``[N, 1]``).
        threshold: two classes: class 1 is predicted when its probability is at
            least this (None: the larger probability wins, i.e. 0.5).
        boot: add ``<metric>-ci-low`` / ``-ci-high`` bootstrap intervals.
        roc: two classes: add ``roc-tp`` / ``roc-fp``, the true and false
            positives at each threshold of :func:`common.intervals.threshold_grid`.

    Returns:
        ``accuracy``, ``auc`` (NaN when only one class is present), for two
        classes ``sensitivity`` and ``specificity``, for more than two
        ``auc-class-k``, ``sensitivity-class-k``, ``specificity-class-k`` per class.
    """
    num_classes = logits.shape[1]
    probs = logits.softmax(dim=1)
    labels = targets.long().view(-1)
    if num_classes == 2 and threshold is not None:
        pred = (probs[:, 1] >= threshold).long()
    else:
        pred = probs.argmax(1)
    metrics: dict[str, Any] = {"accuracy": float((pred == labels).float().mean())}
    scores = probs[:, 1] if num_classes == 2 else probs
    metrics["auc"] = auc_of(scores.numpy(), labels.numpy())
    sens, spec = _confusion_rates(pred, labels, num_classes)
    if num_classes == 2:
        metrics.update(sensitivity=float(sens[1]), specificity=float(spec[1]))
    else:
        for k in range(num_classes):
            metrics[f"auc-class-{k}"] = auc_of(probs[:, k].numpy(), (labels == k).long().numpy())
            metrics[f"sensitivity-class-{k}"] = float(sens[k])
            metrics[f"specificity-class-{k}"] = float(spec[k])
    if boot is not None:
        metrics.update(classification_intervals(scores.numpy(), labels.numpy(), pred.numpy(),
                                                boot))
    if roc and num_classes == 2:
        metrics[wire.ROC_TP], metrics[wire.ROC_FP] = roc_counts(probs[:, 1].numpy(),
                                                                 labels.numpy())
    return metrics


def segmentation_metrics(logits: torch.Tensor, targets: torch.Tensor, *,
                         boot: Bootstrap | None = None) -> dict[str, Any]:
    """Dice and HD95 of logits ``[N, K, *spatial]`` against masks ``[N, 1, *spatial]``.

    ``dice`` is the mean over images of each image's mean foreground Dice
    (images with no foreground in the truth left out); ``hd95`` the mean over
    images where both masks have foreground (NaN if none). With ``boot``, each
    gets a bootstrap interval over images.
    """
    num_classes = logits.shape[1]
    pred = one_hot(logits.argmax(1, keepdim=True), num_classes, dim=1)
    truth = one_hot(targets.long(), num_classes, dim=1)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    per_image = _per_image(dice(pred, truth))
    metrics: dict[str, Any] = {"dice": _mean(per_image)}
    both = (pred[:, 1:].flatten(1).sum(1) > 0) & (truth[:, 1:].flatten(1).sum(1) > 0)
    hd95 = np.array([])
    if both.any():
        hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
        hd95 = _per_image(hd(pred[both], truth[both]))
    metrics["hd95"] = _mean(hd95)
    if boot is not None:
        for name, values in (("dice", per_image), ("hd95", hd95)):
            metrics[name + wire.CI_LOW], metrics[name + wire.CI_HIGH] = mean_interval(values, boot)
    return metrics


def _per_image(scores: Any) -> np.ndarray:
    """A MONAI metric's ``[N, C]`` scores as one value per image ``[N]`` (mean over classes)."""
    values = torch.as_tensor(scores).float().reshape(len(scores), -1).numpy()
    with np.errstate(invalid="ignore"):
        finite = np.where(np.isfinite(values), values, np.nan)
        counts = np.isfinite(finite).sum(1)
        sums = np.nansum(finite, 1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def evaluate(model: nn.Module, loader: Batches, *, task: TaskConfig, device: torch.device,
             boot: Bootstrap | None = None, threshold: float | None = None,
             roc: bool = False) -> dict[str, Any]:
    """Score ``model`` on every batch of ``loader``.

    Args:
        model, loader, task, device: what to score, on what, how.
        boot: add bootstrap intervals (``<metric>-ci-low`` / ``-ci-high``).
        threshold: two classes: the probability of class 1 from which it is predicted.
        roc: two classes: add the ROC counts on the threshold grid.

    Returns:
        ``loss`` and the task's metrics (see module docstring) plus
        ``num-examples``, the number of samples scored. Undefined values are NaN
        (or None for an interval).
    """
    logits, targets = predict(model, loader, device)
    return scores_of(logits, targets, task=task, boot=boot, threshold=threshold, roc=roc)


def scores_of(logits: torch.Tensor, targets: torch.Tensor, *, task: TaskConfig,
              boot: Bootstrap | None = None, threshold: float | None = None,
              roc: bool = False) -> dict[str, Any]:
    """:func:`evaluate`'s figures from predictions already made (:func:`predict`)."""
    loss = float(make_loss(task)(logits, targets))
    if task.kind == "classification":
        metrics = classification_metrics(logits, targets, threshold=threshold, boot=boot, roc=roc)
    else:
        metrics = segmentation_metrics(logits, targets, boot=boot)
    return {"loss": loss, **metrics, "num-examples": float(logits.shape[0])}
