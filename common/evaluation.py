"""Scoring a model on a dataset with MONAI's metrics, under plain metric names.

Classification: ``loss``, ``accuracy``, ``auc`` (ROC AUC; macro one-vs-rest
for more than two classes), and for two classes ``sensitivity`` and
``specificity`` (class 1 = positive). Segmentation: ``loss``, ``dice`` (mean
foreground Dice per image) and ``hd95`` (95th percentile Hausdorff distance
in pixels/voxels, over images where both masks are non-empty).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from monai.metrics import (
    ConfusionMatrixMetric,
    DiceMetric,
    HausdorffDistanceMetric,
    ROCAUCMetric,
)
from monai.networks.utils import one_hot
from torch import nn

from common.config import TaskConfig
from common.training import make_loss

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def _value(result: Any) -> float:
    """A MONAI metric's aggregate (tensor, array or float) as a Python float."""
    if isinstance(result, tuple | list):
        result = result[0]
    return float(torch.as_tensor(result).float().mean())


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


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Metrics of logits ``[N, K]`` against class indices ``[N]``."""
    num_classes = logits.shape[1]
    probs = logits.softmax(dim=1)
    labels = targets.long().view(-1)
    metrics = {"accuracy": float((probs.argmax(1) == labels).float().mean())}
    auc = ROCAUCMetric(average="macro")
    if num_classes == 2:
        auc(probs[:, 1], labels)
    else:
        auc(probs, one_hot(labels[:, None], num_classes, dim=1))
    try:
        metrics["auc"] = _value(auc.aggregate())
    except (ValueError, AssertionError):
        metrics["auc"] = math.nan  # one class only: AUC undefined
    if num_classes == 2:
        cm = ConfusionMatrixMetric(metric_name=("sensitivity", "specificity"),
                                   include_background=False)
        pred = one_hot(probs.argmax(1)[:, None], 2, dim=1)
        cm(pred, one_hot(labels[:, None], 2, dim=1))
        sens, spec = (_value(t) for t in cm.aggregate())
        metrics.update(sensitivity=sens, specificity=spec)
    return metrics


def segmentation_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Dice and HD95 of logits ``[N, K, *spatial]`` against masks ``[N, 1, *spatial]``."""
    num_classes = logits.shape[1]
    pred = one_hot(logits.argmax(1, keepdim=True), num_classes, dim=1)
    truth = one_hot(targets.long(), num_classes, dim=1)
    dice = DiceMetric(include_background=False, reduction="mean", ignore_empty=True)
    dice(pred, truth)
    metrics = {"dice": _value(dice.aggregate())}
    both = (pred[:, 1:].flatten(1).sum(1) > 0) & (truth[:, 1:].flatten(1).sum(1) > 0)
    if both.any():
        hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="mean")
        hd(pred[both], truth[both])
        metrics["hd95"] = _value(hd.aggregate())
    else:
        metrics["hd95"] = math.nan
    return metrics


def evaluate(model: nn.Module, loader: Batches, *, task: TaskConfig, device: torch.device
             ) -> dict[str, float]:
    """Score ``model`` on every batch of ``loader``.

    Returns:
        ``loss`` and the task's metrics (see module docstring) plus
        ``num-examples``, the number of samples scored.
    """
    logits, targets = predict(model, loader, device)
    loss = float(make_loss(task)(logits, targets))
    if task.kind == "classification":
        metrics = classification_metrics(logits, targets)
    else:
        metrics = segmentation_metrics(logits, targets)
    return {"loss": loss, **metrics, "num-examples": float(logits.shape[0])}
