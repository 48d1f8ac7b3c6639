"""Central evaluation: the global model scored on a held-out set at the server.

Every round: the test figures of the global model (no intervals, for speed).
At the end of a run (:func:`final_central`): the selected model's figures at
the chosen threshold with bootstrap intervals, and ``central_predictions.npz``
for the run report, which holds only predictions on this central test set
(which the coordinator owns): classification ``probs [N, K]`` float32 and
``labels [N]`` int64; segmentation up to :data:`SLICES` slices ``images
[S, C, H, W]`` float32, ``truth [S, H, W]`` and ``pred [S, H, W]`` uint8
(for 3D, each volume's slice along the last axis with the most foreground).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.atomic import atomic_file
from common.config import Settings
from common.data import load_central_test
from common.evaluation import evaluate, predict, scores_of
from common.intervals import Bootstrap
from common.models import build_model
from common.training import resolve_device

CentralEval = Callable[[dict[str, torch.Tensor]], dict[str, float]]
PREDICTIONS_FILE = "central_predictions.npz"
SLICES = 4


def central_evaluator(settings: Settings) -> CentralEval | None:
    """A function scoring global weights on the source's central test set.

    Returns:
        None when ``data.central_test`` is off or the source has no test set.
    """
    if not settings.data.central_test:
        return None
    dataset = load_central_test(settings)
    if dataset is None:
        return None
    loader = DataLoader(dataset, batch_size=max(64, settings.data.batch_size))
    device = resolve_device(settings.train.device)
    model = build_model(settings.task, settings.model).to(device)

    def score(weights: dict[str, torch.Tensor]) -> dict[str, float]:
        model.load_state_dict(weights)
        return evaluate(model, loader, task=settings.task, device=device)

    return score


def final_central(settings: Settings, weights: Mapping[str, torch.Tensor], run_dir: Path, *,
                  threshold: float | None) -> dict[str, Any] | None:
    """The selected model's central figures with intervals; writes ``central_predictions.npz``.

    Returns:
        The metrics (``threshold`` included for two classes), or None without a central
        test set.
    """
    dataset = load_central_test(settings) if settings.data.central_test else None
    if dataset is None:
        return None
    device = resolve_device(settings.train.device)
    model = build_model(settings.task, settings.model).to(device)
    model.load_state_dict(dict(weights))
    loader = DataLoader(dataset, batch_size=max(64, settings.data.batch_size))
    boot = Bootstrap(settings.evaluation.bootstrap, settings.evaluation.confidence,
                     seed=settings.seed)
    logits, targets = predict(model, loader, device)
    metrics = scores_of(logits, targets, task=settings.task, boot=boot, threshold=threshold)
    if settings.task.kind == "classification":
        arrays = {"probs": logits.softmax(1).numpy().astype(np.float32),
                  "labels": targets.long().view(-1).numpy()}
        if threshold is not None and settings.task.num_classes == 2:
            metrics["threshold"] = threshold
    else:
        arrays = _slices(dataset, logits.argmax(1), targets[:, 0].long())
    with atomic_file(run_dir / PREDICTIONS_FILE, "wb") as handle:
        np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]
    return metrics


def _slices(dataset: Any, pred: torch.Tensor, truth: torch.Tensor) -> dict[str, np.ndarray]:
    """Up to :data:`SLICES` 2D slices with the most true foreground, for pictures."""
    if truth.ndim == 4:  # 3D [N, H, W, D]: each volume's slice with the most foreground
        depth = truth.flatten(1, 2).sum(1).argmax(1)
        images = torch.stack([dataset[i][0][..., int(d)] for i, d in enumerate(depth)])
        pick = torch.arange(truth.shape[0])
        truth, pred = truth[pick, ..., depth], pred[pick, ..., depth]
    else:
        images = torch.stack([dataset[i][0] for i in range(len(truth))])
    order = truth.flatten(1).sum(1).argsort(descending=True)[:SLICES]
    return {"images": images[order].float().numpy(),
            "truth": truth[order].numpy().astype(np.uint8),
            "pred": pred[order].numpy().astype(np.uint8)}
