"""Personalisation at a hospital: fine-tune the global model locally, score both.

Plain functions, no Flower types; the ClientApp's evaluate handler calls
:func:`personalise_and_score` when the server's evaluation config asks for
``personalise-epochs``.

Why plain fine-tuning rather than a FedPer-style local head: it works for
every MONAI network MedFed builds (classifiers and segmenters have no common
"head" to keep local), it leaves the federated phase untouched (every
hospital trains and sends the whole model, so the server's reply checks,
robust aggregation and both kinds of DP stay exactly as they are), and it
compares two models on the same test split: the federated model and the
same model adapted to this hospital. A hospital that wants a local head
only can still have one: ``personalise.freeze`` keeps named layers (e.g.
the feature extractor) at the global values while the rest is tuned.

The fine-tune runs on the hospital's training split (with the run's
augmentation and loss, as in a federated round) for at most
``personalise.epochs`` epochs, scores its validation split after each one
and keeps the epoch with the lowest validation loss, stopping after
``personalise.patience`` epochs without improvement; when no epoch beats
the global model on validation, the global model is kept (``personal-epochs``
= 0). Both models are then scored on the test split (never used in
training or selection).

What leaves: the global model's usual evaluation metrics and the
personalised model's under ``personal-`` names (``personal-auc``, ...,
``personal-epochs``). The personalised weights never leave the hospital:
they are not part of the reply and are not written anywhere.

When it is skipped (only the global model's metrics are sent, nothing is
fine-tuned): under ``privacy.mode=dp_sgd`` and at a hospital whose policy
sets a privacy ceiling (``max-epsilon``): the fine-tune would see its
training images without noise and its metrics would leave, outside any
epsilon the hospital accounts; and at a hospital whose ``allowed-metrics``
do not name ``personal-epochs`` (of the other ``personal-`` metrics, only
those it names are sent).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from client.hospital import Hospital
from client.local import StateDict, evaluate_round, load_global, site_data
from common import wire
from common.augment import augmented
from common.config import Settings
from common.evaluation import evaluate
from common.logs import medfed_logger
from common.training import loss_class_weights, make_optimizer, resolve_device, train_epochs
from common.transfer import freeze

log = medfed_logger()


def skip_reason(settings: Settings, hospital: Hospital) -> str | None:
    """Why this hospital must not personalise in this run, or None if it may."""
    if settings.privacy.mode == "dp_sgd":
        return ("privacy.mode=dp_sgd: a fine-tune without noise would spend privacy no "
                "epsilon accounts for")
    if hospital.max_epsilon is not None:
        return (f"the hospital's policy sets max-epsilon={hospital.max_epsilon:g}: it trains "
                "only with DP-SGD")
    if wire.PERSONAL_EPOCHS not in hospital.allowed_metrics:
        return f"the hospital's {wire.ALLOWED_METRICS} do not name {wire.PERSONAL_EPOCHS}"
    return None


def _loader(dataset: Dataset, settings: Settings, *, shuffle: bool, seed: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=settings.data.batch_size, shuffle=shuffle,
                      num_workers=settings.data.num_workers,
                      generator=torch.Generator().manual_seed(seed))


def _val_loss(model: nn.Module, loader: DataLoader | None, settings: Settings,
              device: torch.device) -> float:
    """Validation loss of ``model`` (+inf when the hospital has no validation split)."""
    if loader is None:
        return math.inf
    return evaluate(model, loader, task=settings.task, device=device)["loss"]


def fine_tune(settings: Settings, hospital: Hospital, model: nn.Module, *, epochs: int,
              device: torch.device) -> int:
    """Fine-tune ``model`` in place on the training split; keep the best validation epoch.

    Args:
        settings: the experiment (``personalise.*``, ``train.*``, ``task``).
        hospital: this hospital (its data).
        model: the global model on ``device``; on return it holds the kept
            epoch's weights (the global ones when no epoch was kept).
        epochs: the most fine-tuning epochs.
        device: where to compute.

    Returns:
        The kept model's fine-tuning epochs (0: no epoch lowered the
        validation loss, so the global weights were kept). Without a
        validation split the last epoch is kept.
    """
    tune = settings.personalise
    data = site_data(settings, hospital)
    val = _loader(data.val, settings, shuffle=False) if len(data.val) > 0 else None  # type: ignore[arg-type]
    if tune.freeze:
        freeze(model, tune.freeze, key="personalise.freeze")
    optimizer = make_optimizer(model, settings.train, lr=tune.lr or settings.train.lr)
    weighting = loss_class_weights(settings.train, settings.task, data.train)
    best_loss, kept, waited = _val_loss(model, val, settings, device), 0, 0
    best_state = copy.deepcopy(model.state_dict())
    for epoch in range(1, epochs + 1):
        seed = settings.seed * 100_003 + hospital.index * 1_009 + 7_919 * epoch
        train = augmented(data.train, settings.augment, settings.task, seed=seed)
        train_epochs(model, _loader(train, settings, shuffle=True, seed=seed), optimizer,
                     task=settings.task, epochs=1, device=device, amp=settings.train.amp,
                     class_weights=weighting)
        loss = _val_loss(model, val, settings, device)
        if val is None or loss < best_loss:
            best_loss, best_state, kept, waited = loss, copy.deepcopy(model.state_dict()), epoch, 0
            continue
        waited += 1
        if waited >= tune.patience:
            break
    model.load_state_dict(best_state)
    return kept


def personalise_and_score(settings: Settings, hospital: Hospital, weights: StateDict, *,
                          epochs: int) -> dict[str, float]:
    """Score the global model, fine-tune it locally, score the personalised one.

    Args:
        settings: the experiment.
        hospital: this hospital's identity and own settings.
        weights: the global weights received (the final or selected model).
        epochs: the most fine-tuning epochs (the server's ``personalise-epochs``).

    Returns:
        The global model's test metrics (as :func:`client.local.evaluate_round`)
        plus, unless :func:`skip_reason` says otherwise, the personalised
        model's under ``personal-`` names and ``personal-epochs``.
    """
    metrics = evaluate_round(settings, hospital, weights)
    reason = skip_reason(settings, hospital)
    if reason is not None:
        log.info("[MedFed] %s: personalisation skipped: %s", hospital.name, reason)
        return metrics
    device = resolve_device(hospital.device or settings.train.device)
    model = load_global(settings, weights, device)
    kept = fine_tune(settings, hospital, model, epochs=epochs, device=device)
    data = site_data(settings, hospital)
    split = data.test if len(data.test) > 0 else data.val  # type: ignore[arg-type]
    personal = evaluate(model, _loader(split, settings, shuffle=False), task=settings.task,
                        device=device)
    personal = {wire.PERSONAL_PREFIX + key: value for key, value in personal.items()
                if math.isfinite(value)}
    personal[wire.PERSONAL_EPOCHS] = float(kept)
    # Only the personal- names the hospital lets leave
    return {**metrics, **{k: v for k, v in personal.items() if k in hospital.allowed_metrics}}
