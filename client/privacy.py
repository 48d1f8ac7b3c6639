"""Sample-level DP-SGD at a hospital with Opacus, accounted across rounds and runs.

One call per federated round, in a fresh process each time if need be::

    dp = start_dp_round(model=model, optimizer=optimizer, loader=loader,
                        privacy=settings.privacy, planned_epochs=rounds * local_epochs,
                        round_epochs=local_epochs, history=state_or_none,
                        ceiling_epsilon=hospital_max_epsilon, ledger=ledger_or_none)
    with dp:                                   # any exception: nothing recorded
        for _ in range(local_epochs):
            for x, y in dp.loader:             # never an empty batch (see below)
                dp.optimizer.zero_grad()
                criterion(dp.model(x), y).backward()
                dp.optimizer.step()            # exactly one step per batch drawn
        report, state = dp.finish()            # before the update leaves the hospital
    # keep `state` (a JSON-able dict) in context.state; send the weights and report

Empty Poisson batches: Opacus' Poisson sampling can draw an empty batch. The
accounting counts every step, and skipping one would make "a batch was
empty" leak outside the analysis, so :attr:`DPRound.loader` never hands an
empty batch to the caller: it takes the noise-only optimizer step itself
(clipped sum of nothing plus the same Gaussian noise, accounted like any
other step) and draws the next batch. The caller's loop needs no special
case. It must, however, call ``optimizer.step()`` exactly once per batch it
draws and draw at most ``round_epochs`` epochs; otherwise
:class:`DPUsageError` is raised before anything else is trained. With
``max_physical_batch`` a large batch arrives in chunks, still one step each
(see :mod:`client.poisson_loader`). The loss must be a mean over samples of
per-sample losses (cross-entropy, MONAI's Dice with ``batch=False``): a loss
that mixes samples breaks per-sample clipping.

What the numbers mean: see :class:`PrivacyReport` and :mod:`client.accounting`.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader

from client.accounting import BudgetExceededError, Mechanism, canonical, check_ceiling, epsilon_of
from client.dp_model import check_dp_model
from client.dp_state import DPState
from client.ledger import PrivacyLedger, Reservation, Spend
from client.poisson_loader import DPUsageError, GuardedLoader, StepTally, first_tensor
from common import wire
from common.config import PrivacyConfig

__all__ = ["BudgetExceededError", "DPRound", "DPUsageError", "PrivacyReport", "start_dp_round"]

RUN_EPSILON = "run-epsilon"
"""Reply metric: epsilon of this run's rounds alone."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrivacyReport:
    """A hospital's sample-level privacy spend after a round.

    Attributes:
        epsilon: the epsilon at ``delta`` of everything released from this
            hospital's training data so far: every DP-SGD step of every
            round of this run up to this one, composed in one accountant with
            every step the ledger records on the same data from other runs
            (without a ledger: this run only).
        run_epsilon: the same for this run's rounds alone.
        delta: the delta both epsilons hold at (``privacy.delta``).
        noise_multiplier: sigma of this round (noise std / clipping norm).
        sample_rate: this round's Poisson sampling probability per step.
        steps: DP-SGD steps of this run so far, all rounds.
        rounds: rounds of this run so far, this one included.
        accountant: ``prv`` or ``rdp``.
    """

    epsilon: float
    run_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    rounds: int
    accountant: str

    def as_metrics(self) -> dict[str, float]:
        """The figures as reply metrics, under the shared wire names."""
        return {wire.EPSILON: self.epsilon, RUN_EPSILON: self.run_epsilon,
                wire.DELTA: self.delta, wire.NOISE_MULTIPLIER: self.noise_multiplier,
                wire.SAMPLE_RATE: self.sample_rate, wire.DP_STEPS: float(self.steps)}


class DPRound:
    """One round of DP-SGD: train with :attr:`model`, :attr:`optimizer`, :attr:`loader`.

    Attributes:
        model: the caller's model (hooked in place; state_dict keys unchanged).
        optimizer: Opacus' DPOptimizer over it: clips, noises, accounts.
        loader: Poisson-sampled batches, never empty (see the module docs).
        noise_multiplier: sigma of this round.
        sample_rate: Poisson sampling probability per step.
        max_steps: steps this round was cleared for (``round_epochs`` epochs).
    """

    def __init__(self, *, model: nn.Module, engine: PrivacyEngine, hooks: Any,
                 optimizer: DPOptimizer, loader: DPDataLoader, privacy: PrivacyConfig,
                 state: DPState, spend: Spend, max_steps: int, max_physical: int | None,
                 ledger: PrivacyLedger | None, reservation: Reservation | None) -> None:
        self.model, self.optimizer, self._engine, self._hooks = model, optimizer, engine, hooks
        self._privacy, self._state, self._spend = privacy, state, spend
        self._ledger, self._reservation = ledger, reservation
        self.noise_multiplier = float(optimizer.noise_multiplier)
        self.sample_rate = float(loader.sample_rate)
        self.max_steps = max_steps
        self._progress = StepTally()
        self._done = False

        def count_step(opt: DPOptimizer) -> None:  # runs before the parameter update
            if self._progress.steps >= max_steps:
                raise DPUsageError(f"this round was cleared for {max_steps} DP-SGD steps")
            # The sampler's true rate: Opacus' own hook accounts 1 / len(Poisson loader),
            # which is larger for loader lengths L where int(1 / (1 / L)) == L - 1
            engine.accountant.step(noise_multiplier=opt.noise_multiplier,
                                   sample_rate=self.sample_rate * opt.accumulated_iterations)
            self._progress.steps += 1

        optimizer.attach_step_hook(count_step)
        self.loader = GuardedLoader(loader, self._progress, optimizer=optimizer, limit=max_steps,
                                    max_physical=max_physical, noise_step=self._noise_only_step)

    def _noise_only_step(self) -> None:
        """The step of an empty batch: the noised sum of no gradients, accounted."""
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def __enter__(self) -> DPRound:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()

    def abort(self) -> None:
        """End a round whose update will not be sent: unhook, drop its reservation."""
        if self._done:
            return
        self._done = True
        self._unhook()
        if self._ledger is not None and self._reservation is not None:
            self._ledger.cancel(self._reservation)

    def _unhook(self) -> None:
        self._hooks.cleanup()
        for p in self.model.parameters():
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)

    def finish(self) -> tuple[PrivacyReport, dict[str, Any]]:
        """Record the round as released and report the cumulative spend.

        Call it after training and before the update leaves the hospital;
        if it raises, the update must not be sent.

        Returns:
            The report after this round, and the new node state: a JSON-able
            dict to keep in ``context.state`` and pass as ``history`` next
            round (see :mod:`client.dp_state`).

        Raises:
            DPUsageError: finished twice, or a drawn batch was never stepped
                (then the round is aborted and nothing recorded).
            LedgerError: the ledger cannot be written (the round stays
                reserved in the ledger, counted as spent).
        """
        if self._done:
            raise DPUsageError("this DP round is already finished or aborted")
        this_round: Mechanism = (self.noise_multiplier, self.sample_rate, self._progress.steps)
        expected = canonical([*self._spend.run, this_round])
        if self._progress.steps != self._progress.drawn or self.optimizer._step_skip_queue \
                or canonical(self._engine.accountant.history) != expected:
            self.abort()
            raise DPUsageError(
                f"{self._progress.drawn} batches drawn, {self._progress.steps} steps taken, "
                f"accountant {self._engine.accountant.history} vs {expected}: every batch "
                "drawn needs exactly one optimizer.step(); round aborted, nothing recorded")
        self._done = True
        self._unhook()
        delta, kind = self._privacy.delta, self._privacy.accountant
        if self._ledger is not None and self._reservation is not None:
            spend, total, own = self._ledger.commit(self._reservation, steps=this_round[2],
                                                    accountant=kind, delta=delta)
            run = spend.run
        else:
            run = [*self._spend.run, this_round]
            total = own = epsilon_of(run, delta=delta, accountant=kind)
        report = PrivacyReport(epsilon=total, run_epsilon=own, delta=delta,
                               noise_multiplier=self.noise_multiplier,
                               sample_rate=self.sample_rate, steps=sum(m[2] for m in run),
                               rounds=len(run), accountant=kind)
        log.info("DP-SGD round %d done: epsilon=%.4f (this run %.4f) at delta=%g, %d steps",
                 report.rounds, total, own, delta, report.steps)
        state = DPState(run_id=self._state.run_id, dataset=self._state.dataset, rounds=tuple(run),
                        calibration=self._state.calibration)
        return report, state.to_dict()


def _check_args(*, privacy: PrivacyConfig, optimizer: torch.optim.Optimizer, loader: DataLoader,
                planned_epochs: int, round_epochs: int, ceiling_epsilon: float | None,
                ceiling_delta: float | None, max_physical_batch: int | None) -> None:
    if not isinstance(privacy, PrivacyConfig) or privacy.mode != "dp_sgd":
        raise ValueError(f"privacy must be a PrivacyConfig with mode='dp_sgd', got {privacy!r}")
    for key, value in (("planned_epochs", planned_epochs), ("round_epochs", round_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r} must be an integer >= 1")
    if round_epochs > planned_epochs:
        raise ValueError(f"round_epochs={round_epochs} exceeds planned_epochs={planned_epochs}")
    if ceiling_epsilon is not None and not (0 < ceiling_epsilon < math.inf):
        raise ValueError(f"ceiling_epsilon={ceiling_epsilon!r} must be > 0 (or None)")
    if ceiling_delta is not None and not 0 < ceiling_delta < 1:
        raise ValueError(f"ceiling_delta={ceiling_delta!r} must lie in (0, 1) (or None)")
    if max_physical_batch is not None and (isinstance(max_physical_batch, bool)
                                           or not isinstance(max_physical_batch, int)
                                           or max_physical_batch < 1):
        raise ValueError(f"max_physical_batch={max_physical_batch!r} must be an integer >= 1 "
                         "(or None)")
    if isinstance(optimizer, DPOptimizer):
        raise ValueError("optimizer is already a DPOptimizer: pass the plain torch optimizer")
    if not isinstance(loader, DataLoader) or isinstance(loader, DPDataLoader):
        raise ValueError("loader must be a plain torch DataLoader over the training split "
                         "(its batch size sets the Poisson sample rate)")
    if len(loader) < 1 or len(loader.dataset) < 1:  # type: ignore[arg-type]
        raise ValueError("loader has no training samples")


def _state_for(history: dict[str, Any] | None, ledger: PrivacyLedger | None) -> DPState:
    state = DPState.from_dict(history)
    if ledger is None:
        return state
    for key in ("run_id", "dataset"):
        mine, theirs = getattr(state, key), getattr(ledger, key)
        if mine is not None and mine != theirs:
            raise ValueError(f"history is from {key}={mine!r} but the ledger is for {theirs!r}: "
                             "pass this run's own node state (or None in its first round)")
    return DPState(run_id=ledger.run_id, dataset=ledger.dataset, rounds=state.rounds,
                   calibration=state.calibration)


def _make_private(*, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                  privacy: PrivacyConfig, sigma: float
                  ) -> tuple[PrivacyEngine, Any, DPOptimizer, DPDataLoader]:
    """Opacus hooks, DPOptimizer and Poisson loader, all randomness from OS entropy."""
    device = next(model.parameters()).device
    noise = torch.Generator(device=device)
    noise.manual_seed(secrets.randbits(63))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=privacy.accountant)
    hooks, dp_optimizer, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
        max_grad_norm=privacy.max_grad_norm, poisson_sampling=True, wrap_model=False,
        noise_generator=noise)
    # Never sample from the caller's (seeded, hence predictable) loader generator
    dp_loader.batch_sampler.generator = torch.Generator().manual_seed(  # type: ignore[union-attr]
        secrets.randbits(63))
    return engine, hooks, dp_optimizer, dp_loader


def start_dp_round(*, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                   privacy: PrivacyConfig, planned_epochs: int, round_epochs: int,
                   history: dict[str, Any] | None, ceiling_epsilon: float | None,
                   ledger: PrivacyLedger | None, ceiling_delta: float | None = None,
                   max_physical_batch: int | None = None) -> DPRound:
    """Check the budget, then make ``model`` private for one round of DP-SGD.

    Args:
        model: the global model, weights already loaded, DP-ready (no
            BatchNorm, no in-place ops); Opacus hooks it in place.
        optimizer: a plain torch optimizer over ``model``'s parameters.
        loader: the training loader; ``1 / len(loader)`` becomes the Poisson
            sample rate and ``len(loader)`` the steps per epoch (as in Opacus).
        privacy: clipping norm, fixed sigma or target epsilon, delta, accountant.
        planned_epochs: epochs the whole run plans at this hospital (rounds x
            local epochs); a calibrated sigma spends exactly
            ``privacy.target_epsilon`` (within 0.5 %, never above) over them.
        round_epochs: epochs of this round; the round may take at most that
            many epochs of steps.
        history: the state the previous round's :meth:`DPRound.finish`
            returned (kept in ``context.state``); None in a run's first round.
        ceiling_epsilon: the hospital's own ceiling on the epsilon of its
            data, all runs in the ledger included; None = only the ledger's
            stored ceiling (if any) applies.
        ledger: the hospital's ledger for this data and run; None = account
            this run only (simulations without a ledger, tests).
        ceiling_delta: the delta of ``ceiling_epsilon``; None = ``privacy.delta``.
        max_physical_batch: bound on the samples per forward/backward pass:
            larger Poisson batches come in chunks, one ``optimizer.step()``
            each, the privacy step taken after the last (bounds memory, same
            privacy); None = whole batches.

    Returns:
        The round, already recorded as reserved in the ledger.

    Raises:
        BudgetExceededError: this round's steps would take the epsilon past a
            ceiling; nothing was hooked, trained or recorded.
        ModelError: Opacus cannot train ``model`` (names the reason).
        LedgerError: the ledger cannot be read or trusted (names the file).
        ValueError: a bad argument or history.
    """
    _check_args(privacy=privacy, optimizer=optimizer, loader=loader, planned_epochs=planned_epochs,
                round_epochs=round_epochs, ceiling_epsilon=ceiling_epsilon,
                ceiling_delta=ceiling_delta, max_physical_batch=max_physical_batch)
    state = _state_for(history, ledger)
    check_dp_model(model, sample_shape=tuple(first_tensor(loader.dataset[0]).shape))
    sample_rate = 1 / len(loader)
    per_epoch = int(1 / sample_rate)  # what Opacus' Poisson sampler yields per epoch
    sigma, state = state.noise_multiplier(privacy, sample_rate=sample_rate,
                                          planned_steps=planned_epochs * per_epoch)
    planned: Mechanism = (sigma, sample_rate, round_epochs * per_epoch)
    c_delta = privacy.delta if ceiling_delta is None else ceiling_delta
    reservation = None
    if ledger is not None:
        reservation, spend = ledger.reserve(
            run_history=list(state.rounds), planned=planned, accountant=privacy.accountant,
            ceiling_epsilon=ceiling_epsilon, ceiling_delta=c_delta)
    else:
        check_ceiling(spent_history=state.rounds, planned=planned, delta=c_delta,
                      ceiling_epsilon=ceiling_epsilon, accountant=privacy.accountant)
        spend = Spend(others=[], run=list(state.rounds))
    try:
        engine, hooks, dp_optimizer, dp_loader = _make_private(
            model=model, optimizer=optimizer, loader=loader, privacy=privacy, sigma=sigma)
        if (dp_loader.sample_rate, len(dp_loader)) != (sample_rate, per_epoch):
            hooks.cleanup()
            raise RuntimeError(f"Opacus sampled at {dp_loader.sample_rate} x {len(dp_loader)}, "
                               f"not {sample_rate} x {per_epoch}")
    except BaseException:
        if ledger is not None and reservation is not None:
            ledger.cancel(reservation)
        raise
    engine.accountant.history = canonical(spend.run)
    log.info("DP-SGD round: sigma=%.4f, sample rate %.4g, up to %d steps, clip %g",
             sigma, sample_rate, planned[2], privacy.max_grad_norm)
    return DPRound(model=model, engine=engine, hooks=hooks, optimizer=dp_optimizer,
                   loader=dp_loader, privacy=privacy, state=state, spend=spend,
                   max_steps=planned[2], max_physical=max_physical_batch, ledger=ledger,
                   reservation=reservation)
