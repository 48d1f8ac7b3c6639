"""Sample-level DP-SGD at a hospital (Opacus), accounted across rounds and runs.

Each round a fresh Opacus ``PrivacyEngine`` wraps the model with Poisson
sampling and per-sample clipping, but its accountant is given the history of
every earlier round of this run (kept in the node's state), so the epsilon
after round k covers rounds 1..k. Earlier runs on the same data come from the
hospital's :class:`~client.privacy_ledger.PrivacyLedger` and are composed in.

What an epsilon here means: an (epsilon, delta) sample-level guarantee for
this hospital's training data over everything released so far (all rounds
of this run, plus earlier runs in the ledger): for any one patient image,
the distribution of all model updates this hospital sent changes by at most
a factor e^epsilon (plus delta) whether or not that image was in its data.
It says nothing about other hospitals' data, about evaluation metrics (which
are not noised), or about data reused outside MedFed.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from client.privacy_ledger import Mechanism
from common import wire
from common.config import PrivacyConfig

if TYPE_CHECKING:
    from opacus import PrivacyEngine

# Opacus is imported inside the functions that use it: the import costs about
# a second per process, and the ClientApp imports this module in every run,
# with or without DP-SGD.


class BudgetExceededError(RuntimeError):
    """Training this round would take a hospital past its privacy ceiling."""


def epsilon_spent(history: Sequence[Mechanism], *, delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of all ``history`` composed in one accountant (0 if empty)."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(float(z), float(q), int(n)) for z, q, n in history]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str) -> float:
    """The noise multiplier that reaches ``target_epsilon`` after ``steps`` steps.

    Deterministic in its arguments, so every round of a run computes the same
    sigma. Raises ValueError when the target cannot be met.
    """
    if target_epsilon <= 0 or steps <= 0:
        raise ValueError(f"cannot calibrate noise for epsilon={target_epsilon}, steps={steps}")
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps,
                                      accountant=accountant, epsilon_tolerance=0.005))


@dataclass(frozen=True)
class PrivacyReport:
    """A hospital's privacy spend after a round.

    Attributes:
        epsilon: cumulative epsilon on this data (this run and earlier runs).
        run_epsilon: cumulative epsilon of this run's rounds alone.
        delta: the delta both epsilons hold at.
        noise_multiplier: sigma used this round (noise std / clipping norm).
        sample_rate: Poisson sampling probability per step.
        steps: DP-SGD steps taken in this run so far.
        accountant: ``prv`` or ``rdp``.
    """

    epsilon: float
    run_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str

    def metrics(self) -> dict[str, float]:
        """The figures as reply metrics (wire names)."""
        return {wire.EPSILON: self.epsilon, "run-epsilon": self.run_epsilon,
                wire.DELTA: self.delta, wire.NOISE_MULTIPLIER: self.noise_multiplier,
                wire.SAMPLE_RATE: self.sample_rate, wire.DP_STEPS: float(self.steps)}


@dataclass
class DPRound:
    """One round of DP-SGD: use :attr:`model`, :attr:`optimizer`, :attr:`loader`, then finish."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    engine: PrivacyEngine
    hooks: Any
    privacy: PrivacyConfig
    delta: float
    noise_multiplier: float
    sample_rate: float
    prior: list[Mechanism] = field(default_factory=list)

    def empty_batch(self) -> None:
        """Prepare a noise-only step for a batch Poisson sampling left empty.

        Call instead of forward/backward, then ``optimizer.step()`` as usual:
        the step adds noise and is accounted like every other.
        """
        for param in self.model.parameters():
            if param.requires_grad:
                param.grad_sample = torch.zeros(  # type: ignore[attr-defined]
                    0, *param.shape, device=param.device)

    def finish(self) -> tuple[PrivacyReport, list[Mechanism]]:
        """Stop the per-sample hooks; return the report and this run's history."""
        self.hooks.cleanup()
        history = [(float(z), float(q), int(n)) for z, q, n in self.engine.accountant.history]
        kind = self.privacy.accountant
        report = PrivacyReport(
            epsilon=epsilon_spent(self.prior + history, delta=self.delta, accountant=kind),
            run_epsilon=epsilon_spent(history, delta=self.delta, accountant=kind),
            delta=self.delta, noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate, steps=sum(n for _, _, n in history), accountant=kind)
        return report, history


def _secret_generator() -> torch.Generator:
    """A torch generator seeded from the operating system's entropy."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def start_dp_round(*, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                   privacy: PrivacyConfig, planned_epochs: int, round_epochs: int,
                   run_history: Sequence[Mechanism], prior_history: Sequence[Mechanism] = (),
                   ceiling_epsilon: float | None = None, delta: float | None = None) -> DPRound:
    """Make ``model`` private for one round, after checking the hospital's ceiling.

    Args:
        model: the global model, weights loaded (Opacus hooks it in place).
        optimizer: optimizer over ``model``.
        loader: the training loader; its batch size sets the sample rate.
        privacy: clipping norm, noise (fixed or target epsilon), accountant.
        planned_epochs: epochs the whole run plans (rounds x local epochs);
            a calibrated sigma meets ``privacy.target_epsilon`` after them.
        round_epochs: epochs of this round.
        run_history: mechanisms of this run's earlier rounds (node state).
        prior_history: mechanisms of earlier runs on this data (ledger).
        ceiling_epsilon: the most epsilon the hospital allows on its data.
        delta: delta for accounting; defaults to ``privacy.delta``.

    Raises:
        BudgetExceededError: this round would take the cumulative epsilon on
            this data past ``ceiling_epsilon``; nothing has been trained.
    """
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

    delta = privacy.delta if delta is None else delta
    # Poisson sampling and noise draw from OS entropy, never from the run's
    # seed (which the server knows): amplification by sampling needs secret coins
    poisson = DPDataLoader.from_data_loader(loader, generator=_secret_generator())
    # Account with the rate and step count Opacus records (1/len of the Poisson
    # loader, never below the rate it samples at), so checks and reports agree
    steps_per_epoch = len(poisson)
    sample_rate = 1.0 / steps_per_epoch
    sigma = privacy.noise_multiplier or calibrate_noise(
        target_epsilon=privacy.target_epsilon, delta=delta, sample_rate=sample_rate,
        steps=planned_epochs * steps_per_epoch, accountant=privacy.accountant)
    planned = [*prior_history, *run_history, (sigma, sample_rate, round_epochs * steps_per_epoch)]
    would_be = epsilon_spent(planned, delta=delta, accountant=privacy.accountant)
    if ceiling_epsilon is not None and would_be > ceiling_epsilon:
        spent = epsilon_spent([*prior_history, *run_history], delta=delta,
                              accountant=privacy.accountant)
        raise BudgetExceededError(
            f"privacy ceiling: this round would bring epsilon on this hospital's data from "
            f"{spent:.3f} to {would_be:.3f} (delta={delta:g}), above the hospital's ceiling "
            f"max-epsilon={ceiling_epsilon:g}; the round is declined and nothing was trained")
    engine = PrivacyEngine(accountant=privacy.accountant)
    hooks, dp_optimizer, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=poisson, noise_multiplier=sigma,
        max_grad_norm=privacy.max_grad_norm, poisson_sampling=False, wrap_model=False,
        noise_generator=_secret_generator())
    hooks.forbid_grad_accumulation()  # as make_private does for Poisson sampling
    engine.accountant.history = [(float(z), float(q), int(n)) for z, q, n in run_history]
    return DPRound(model=model, optimizer=dp_optimizer, loader=dp_loader, engine=engine,
                   hooks=hooks, privacy=privacy, delta=delta, noise_multiplier=sigma,
                   sample_rate=sample_rate, prior=list(prior_history))
