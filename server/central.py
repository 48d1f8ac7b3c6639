"""Central evaluation: the global model scored on a held-out set at the server."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from common.config import Settings
from common.data import load_central_test
from common.evaluation import evaluate
from common.models import build_model
from common.training import resolve_device

CentralEval = Callable[[dict[str, torch.Tensor]], dict[str, float]]


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
