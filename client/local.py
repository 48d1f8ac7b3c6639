"""One hospital's side of a round, as plain functions (no Flower types).

The ClientApp handlers unpack a message, call these, and pack the reply.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from client.dp_round import dp_train_round
from client.hospital import Hospital
from client.privacy_ledger import PrivacyLedger
from client.site_cache import SiteCache
from common import wire
from common.augment import augmented
from common.config import Settings, settings_to_json
from common.data import SiteData, load_site
from common.evaluation import evaluate
from common.intervals import Bootstrap
from common.models import build_model
from common.schedule import round_lr
from common.training import loss_class_weights, make_optimizer, resolve_device, train_epochs
from common.transfer import freeze_for_round

StateDict = Mapping[str, torch.Tensor]


@dataclass
class RoundResult:
    """A hospital's training result for one round.

    Attributes:
        weights: the locally trained state dict (CPU tensors).
        metrics: scalars for the reply (see :func:`train_round`).
    """

    weights: dict[str, torch.Tensor]
    metrics: dict[str, float]


SITES = SiteCache()
"""This process' hospitals' datasets (at most 1 GiB of tensors; see :mod:`client.site_cache`)."""


def split_settings(settings: Settings, hospital: Hospital) -> Settings:
    """``settings`` with a deployed hospital's own split of its own folder.

    The server's ``seed``, ``data.val_fraction``, ``data.test_fraction`` and
    ``data.slice_block`` would otherwise decide which of the hospital's
    images are held out, and could move them between runs.
    """
    split = hospital.split
    if split is None or not hospital.data_path:
        return settings
    data = dataclasses.replace(settings.data, val_fraction=split.val_fraction,
                               test_fraction=split.test_fraction, slice_block=split.slice_block)
    return dataclasses.replace(settings, seed=split.seed, data=data)


def site_data(settings: Settings, hospital: Hospital) -> SiteData:
    """This hospital's train/val/test splits, read once per process and run.

    Reading and resampling volumes takes longer than a round's evaluation,
    and a simulated hospital's process (a Ray actor) serves every round of
    the run, so the splits are memoised on the complete settings (hence per
    run) and the hospital, keeping at most ``SITES.max_bytes`` of hospitals'
    datasets in memory (an actor serves any hospital, so a cache of a few
    hospitals rebuilt the data of nearly every message beyond a handful of
    hospitals). A deployed hospital's ClientApp process serves one message
    and reads its data each time. Errors are not memoised.
    """
    own = split_settings(settings, hospital)
    return SITES.get((settings_to_json(own), hospital.index, hospital.data_path),
                     lambda: load_site(own, hospital.index, data_path=hospital.data_path))


def _device(settings: Settings, hospital: Hospital) -> torch.device:
    return resolve_device(hospital.device or settings.train.device)


def _loader(dataset: Dataset, settings: Settings, *, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=settings.data.batch_size, shuffle=shuffle,
                      num_workers=settings.data.num_workers, generator=generator)


def load_global(settings: Settings, weights: StateDict, device: torch.device) -> torch.nn.Module:
    """Build the experiment's model and load the global weights into it.

    Raises:
        ValueError: the weights do not fit the configured model (names the keys).
    """
    model = build_model(settings.task, settings.model)
    missing, unexpected = model.load_state_dict(dict(weights), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"global weights do not match model.name={settings.model.name}: "
            f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    return model.to(device)


def ledger_path(settings: Settings, hospital: Hospital) -> Path:
    """The hospital's privacy ledger.

    A deployed hospital's own ``ledger-path`` (the server's ``run_dir`` and
    ``privacy.ledger_dir`` are ignored); in simulation
    ``privacy.ledger_dir``, else ``<run_dir>/privacy-ledgers``.
    """
    if hospital.ledger_path:
        return Path(hospital.ledger_path)
    folder = settings.privacy.ledger_dir or str(Path(settings.run_dir) / "privacy-ledgers")
    return Path(folder) / f"{hospital.name}.json"


def dataset_id(settings: Settings, hospital: Hospital) -> str:
    """Identity of the data this hospital trains on, as its ledger keys it.

    A hospital with its own folder (deployment) is keyed by that folder
    alone: its images are the same patients whatever the federation's size,
    split or seed, so every run on them composes in one history. A deployed
    hospital without one trains on a share of the experiment's source that
    the server's seed and split choose, so it is keyed by the whole source:
    every run on it counts against one budget. A simulated hospital is keyed
    by its partition of the shared source.
    """
    if hospital.data_path:
        return f"folder:{Path(hospital.data_path).resolve()}"
    data = settings.data
    source = f"{data.source}:{data.path or 'synthetic'}"
    if hospital.deployed:
        return f"{source}:any-share"
    return (f"{source}:split={data.split}:seed={settings.seed}:"
            f"part={hospital.index}/{settings.federation.num_hospitals}")


def _augmented(settings: Settings, train: Dataset, seed: int) -> Dataset:
    """The training split with this round's augmentation (``augment``).

    Seeded by the run, hospital and round, except under DP-SGD: there the
    augmentation's coins come from the operating system, as Poisson
    sampling's do, so they are part of the mechanism's secret randomness.
    """
    if settings.privacy.mode == "dp_sgd":
        seed = secrets.randbits(63)
    return augmented(train, settings.augment, settings.task, seed=seed)


def _dp_train(settings: Settings, hospital: Hospital, model: torch.nn.Module,
              optimizer: torch.optim.Optimizer, loader: DataLoader, *, device: torch.device,
              run_id: str, class_weights: torch.Tensor | None = None) -> dict[str, float]:
    """One DP-SGD round on the hospital's ledger; the reply metrics (no loss, no timing)."""
    fed = settings.federation
    report = dp_train_round(
        model=model, optimizer=optimizer, loader=loader, task=settings.task, device=device,
        class_weights=class_weights,
        privacy=settings.privacy, ledger=PrivacyLedger(ledger_path(settings, hospital)),
        dataset=dataset_id(settings, hospital), run_id=run_id,
        planned_epochs=fed.rounds * fed.local_epochs, round_epochs=fed.local_epochs,
        ceiling_epsilon=hospital.max_epsilon,
        delta=hospital.accounting_delta(settings.privacy.delta))
    # N, the training split's size: the same whatever Poisson sampling drew
    count = len(loader.dataset)  # type: ignore[arg-type]
    return {wire.NUM_EXAMPLES: float(count), wire.HOSPITAL: float(hospital.index),
            **report.metrics()}


def train_round(settings: Settings, hospital: Hospital, weights: StateDict, *,
                server_round: int, proximal_mu: float = 0.0,
                run_id: str = "local") -> RoundResult:
    """Train the global model on this hospital's training split.

    Args:
        settings: the experiment.
        hospital: this hospital's identity and own settings.
        weights: global weights received from the server.
        server_round: 1-based round number (seeds the local shuffling).
        proximal_mu: FedProx weight sent by the server (0 = plain local SGD).
        run_id: the federated run (keys this run's record in the ledger).

    Returns:
        The trained weights and the reply metrics. Without DP-SGD:
        ``num-examples`` (samples seen), loss, steps, seconds. With DP-SGD
        only ``num-examples`` = N (the training split's size) and the
        cumulative privacy figures: nothing computed from the images
        without noise.

    Raises:
        RoundDeclinedError: the hospital's policy forbids the round, or
            DP-SGD would cross its ceiling (``BudgetExceededError``);
            nothing was trained or recorded.
    """
    hospital.check_round(settings.privacy.mode)
    device = _device(settings, hospital)
    model = load_global(settings, weights, device)
    freeze_for_round(model, settings.model.freeze, settings.model.freeze_rounds, server_round)
    lr = round_lr(settings.train, server_round, settings.federation.rounds)
    optimizer = make_optimizer(model, settings.train, lr=lr)
    seed = settings.seed * 100_003 + hospital.index * 1_009 + server_round
    train = site_data(settings, hospital).train
    weighting = loss_class_weights(settings.train, settings.task, train)
    loader = _loader(_augmented(settings, train, seed), settings, shuffle=True, seed=seed)
    if settings.privacy.mode == "dp_sgd":
        metrics = _dp_train(settings, hospital, model, optimizer, loader, device=device,
                            run_id=run_id, class_weights=weighting)
    else:
        started = time.perf_counter()
        result = train_epochs(model, loader, optimizer, task=settings.task,
                              epochs=settings.federation.local_epochs, device=device,
                              amp=settings.train.amp, proximal_mu=proximal_mu,
                              class_weights=weighting)
        metrics = {
            wire.NUM_EXAMPLES: float(result.num_examples),
            wire.TRAIN_LOSS: result.loss,
            wire.TRAIN_STEPS: float(result.steps),
            wire.TRAIN_SECONDS: time.perf_counter() - started,
            wire.HOSPITAL: float(hospital.index),
            wire.UNIT_WEIGHT: 1.0,
        }
    weights_out = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return RoundResult(weights=weights_out, metrics=metrics)


def evaluate_round(settings: Settings, hospital: Hospital, weights: StateDict, *,
                   validate: bool = False) -> dict[str, Any]:
    """Score the global model on this hospital's held-out test split.

    The test split never takes part in training; when a hospital has none,
    its validation split is used.

    Args:
        settings: the experiment.
        hospital: this hospital's identity and own settings.
        weights: global weights received from the server.
        validate: also score the validation split (model selection), under
            ``val-`` names (``val-loss``, ``val-num-examples``, ...).

    Returns:
        Metric name to value (see :mod:`common.evaluation`), with
        ``num-examples`` and ``hospital``: on the test split with bootstrap
        intervals (seeded by the experiment's seed and the hospital) and, for
        two classes, the ROC counts (``roc-tp``, ``roc-fp``); on the validation
        split the ROC counts too, from which the server chooses the threshold.
    """
    device = _device(settings, hospital)
    model = load_global(settings, weights, device)
    data = site_data(settings, hospital)
    split = data.test if len(data.test) > 0 else data.val  # type: ignore[arg-type]
    boot = Bootstrap(settings.evaluation.bootstrap, settings.evaluation.confidence,
                     seed=settings.seed + hospital.index)
    metrics = evaluate(model, _loader(split, settings, shuffle=False, seed=0),
                       task=settings.task, device=device, boot=boot, roc=True)
    if validate and len(data.val) > 0:  # type: ignore[arg-type]
        scores = evaluate(model, _loader(data.val, settings, shuffle=False, seed=0),
                          task=settings.task, device=device, roc=True)
        metrics.update({wire.VALIDATION_PREFIX + k: v for k, v in scores.items()})
    metrics[wire.HOSPITAL] = float(hospital.index)
    metrics[wire.UNIT_WEIGHT] = 1.0
    # An undefined figure (AUC on one class, HD95 with empty masks) is left out
    return {k: v for k, v in metrics.items() if defined(v)}


def defined(value: object) -> bool:
    """Whether a metric value can be sent: a finite number or a list of counts."""
    if isinstance(value, list):
        return True
    return isinstance(value, int | float) and math.isfinite(value)
