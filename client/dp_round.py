"""One DP-SGD round at a hospital, start to end, with the ledger as its only history.

:func:`dp_train_round` is the whole protocol; the ClientApp and tests call it:

1. plan: Poisson loader from secret coins, its sample rate and steps, the
   noise multiplier (fixed, or calibrated to the run's planned end);
2. check + reserve, atomically under the ledger's lock: the planned round
   together with everything the ledger counts on this data (every run's
   settled rounds, every open reservation) must stay within the hospital's
   ceiling, else :class:`~client.dp_sgd.BudgetExceededError` and nothing
   is trained or written;
3. make private and train, empty Poisson batches included (noise-only,
   accounted steps);
4. settle: the reservation is replaced by the mechanisms Opacus recorded;
5. report: epsilons computed from the ledger after settling.

Any number of processes running rounds on the same data and ledger at once
therefore never take it past the ceiling together. A round that raises
before settling releases its reservation (nothing left the hospital); a
process that dies leaves it counted.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.data import DataLoader

from client.dp_sgd import (
    BudgetExceededError,
    PerSampleLoss,
    PrivacyReport,
    calibrate_noise,
    epsilon_spent,
    make_private,
    poisson_loader,
)
from client.privacy_ledger import Check, LedgerError, Mechanism, PrivacyLedger
from common.config import PrivacyConfig, TaskConfig
from common.training import train_epochs


def ceiling_check(ceiling_epsilon: float | None, *, delta: float, accountant: str) -> Check:
    """A ledger check refusing a round that would take the epsilon past ``ceiling_epsilon``."""
    def check(counted: list[Mechanism], planned: list[Mechanism]) -> None:
        if ceiling_epsilon is None:
            return
        would_be = epsilon_spent(counted + planned, delta=delta, accountant=accountant)
        if would_be > ceiling_epsilon:
            spent = epsilon_spent(counted, delta=delta, accountant=accountant)
            raise BudgetExceededError(
                f"privacy ceiling: this round would bring epsilon on this hospital's data from "
                f"{spent:.3f} to {would_be:.3f} (delta={delta:g}), above the hospital's "
                f"ceiling max-epsilon={ceiling_epsilon:g}; the round is declined and nothing "
                "was trained")
    return check


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, poisson: DataLoader, *,
           sigma: float, privacy: PrivacyConfig, task: TaskConfig, epochs: int,
           device: torch.device, class_weights: torch.Tensor | None) -> list[Mechanism]:
    """Train one round with DP-SGD; the mechanisms Opacus recorded.

    With ``privacy.max_physical_batch`` set, Opacus' ``BatchMemoryManager``
    splits each Poisson batch into chunks of at most that many samples; the
    optimizer clips and sums per chunk and noises and steps (and the
    accountant counts) once per logical batch, so the mechanism is the same.
    """
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    dp = make_private(model=model, optimizer=optimizer, loader=poisson, noise_multiplier=sigma,
                      max_grad_norm=privacy.max_grad_norm, accountant=privacy.accountant,
                      grad_sample_mode=privacy.grad_sample_mode,
                      criterion=PerSampleLoss(task, class_weights))
    with contextlib.ExitStack() as chunks:
        loader = dp.loader
        if privacy.max_physical_batch:
            loader = chunks.enter_context(BatchMemoryManager(
                data_loader=dp.loader, optimizer=dp.optimizer,
                max_physical_batch_size=privacy.max_physical_batch))
        train_epochs(dp.model, loader, dp.optimizer, task=task, epochs=epochs, device=device,
                     on_empty_batch=dp.empty_batch, class_weights=class_weights,
                     criterion=dp.criterion)
    return dp.finish()


def dp_train_round(*, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                   task: TaskConfig, device: torch.device, privacy: PrivacyConfig,
                   ledger: PrivacyLedger, dataset: str, run_id: str, planned_epochs: int,
                   round_epochs: int, ceiling_epsilon: float | None = None,
                   delta: float | None = None,
                   class_weights: torch.Tensor | None = None) -> PrivacyReport:
    """Train ``model`` in place for one DP-SGD round, accounted in ``ledger``.

    Args:
        model: the global model on ``device``, weights loaded (Opacus hooks it
            for the round and unhooks it after).
        optimizer: optimizer over ``model``.
        loader: the training loader; its batch size B sets the sample rate
            1/ceil(N/B) for N training samples.
        task: decides the loss.
        device: where to compute.
        privacy: clipping norm, noise (fixed or target epsilon), accountant.
        ledger: the hospital's ledger, the only record of what was spent.
        dataset: the identity of the data in ``ledger``.
        run_id: the federated run (its rounds form one record).
        planned_epochs: epochs the whole run plans (rounds x local epochs);
            a calibrated sigma meets ``privacy.target_epsilon`` after them.
        round_epochs: epochs of this round.
        ceiling_epsilon: the most epsilon the hospital allows on its data.
        delta: delta for accounting and calibration; default ``privacy.delta``.
        class_weights: fixed classification class weights ``[K]`` (independent
            of the data: a per-sample factor before clipping), or None.

    Returns:
        The privacy figures after this round.

    Raises:
        BudgetExceededError: the round would cross ``ceiling_epsilon``;
            nothing was trained or recorded.
        LedgerError: the ledger cannot be read or written.
    """
    delta = privacy.delta if delta is None else delta
    poisson = poisson_loader(loader)
    # Account with the rate and step count Opacus records (1/len of the Poisson
    # loader, never below the rate it samples at), so checks and reports agree
    steps_per_epoch = len(poisson)
    sample_rate = 1.0 / steps_per_epoch
    sigma = privacy.noise_multiplier or calibrate_noise(
        target_epsilon=privacy.target_epsilon, delta=delta, sample_rate=sample_rate,
        steps=planned_epochs * steps_per_epoch, accountant=privacy.accountant)
    planned = [(sigma, sample_rate, round_epochs * steps_per_epoch)]
    check = ceiling_check(ceiling_epsilon, delta=delta, accountant=privacy.accountant)
    reservation = ledger.reserve(dataset, run_id, planned, check=check)
    try:
        used = _train(model, optimizer, poisson, sigma=sigma, privacy=privacy, task=task,
                      epochs=round_epochs, device=device, class_weights=class_weights)
    except BaseException:
        with contextlib.suppress(LedgerError):  # if it stays, it stays counted
            ledger.release(dataset, reservation)
        raise
    ledger.settle(dataset, reservation, used, delta=delta, accountant=privacy.accountant)
    run = ledger.run_history(dataset, run_id)
    return PrivacyReport(
        epsilon=epsilon_spent(ledger.counted(dataset), delta=delta, accountant=privacy.accountant),
        run_epsilon=epsilon_spent(run, delta=delta, accountant=privacy.accountant),
        delta=delta, noise_multiplier=sigma, sample_rate=sample_rate,
        steps=sum(n for _, _, n in run), accountant=privacy.accountant)
