"""Sample-level DP-SGD at a hospital (Opacus): the pieces of one round.

Each round a fresh Opacus ``PrivacyEngine`` wraps the model with Poisson
sampling and per-sample clipping; its accountant records only this round's
steps. What was spent before (earlier rounds of this run, earlier runs on
the same data) lives in the hospital's
:class:`~client.privacy_ledger.PrivacyLedger` alone, and every epsilon is
computed over that history by :func:`epsilon_spent`. The protocol of a round
(reserve, make private, train, settle) is :func:`client.dp_round.dp_train_round`.

What an epsilon here means: an (epsilon, delta) sample-level guarantee for
this hospital's training data over everything released so far (all rounds
of this run, plus earlier runs in the ledger): for any one patient image,
the distribution of all model updates this hospital sent changes by at most
a factor e^epsilon (plus delta) whether or not that image was in its data
(Opacus' add/remove-one accounting). The training reply also carries
``num-examples`` = N, the size of the training split, and ``sample-rate`` =
1/ceil(N/B): N is revealed and treated as public. The epsilon says nothing
about other hospitals' data, about evaluation metrics (which are not
noised), about when the reply arrives (wall-clock time depends on the
batches drawn), or about data reused outside MedFed.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from client.hospital import RoundDeclinedError
from client.privacy_ledger import Mechanism
from common import wire
from common.config import TaskConfig

if TYPE_CHECKING:
    from opacus import PrivacyEngine

# Opacus is imported inside the functions that use it: the import costs about
# a second per process, and the ClientApp imports this module in every run,
# with or without DP-SGD.


class BudgetExceededError(RoundDeclinedError):
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
        epsilon: cumulative epsilon on this data: every mechanism the
            ledger counts (all runs' settled rounds, this one included, and
            rounds of other runs reserved but not settled yet).
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
        return {wire.EPSILON: self.epsilon, wire.RUN_EPSILON: self.run_epsilon,
                wire.DELTA: self.delta, wire.NOISE_MULTIPLIER: self.noise_multiplier,
                wire.SAMPLE_RATE: self.sample_rate, wire.DP_STEPS: float(self.steps)}


class PerSampleLoss(nn.Module):
    """The training loss of :func:`common.training.make_loss`, per sample on request.

    With ``reduction="mean"`` (how it is built) it returns the same scalar as
    :func:`~common.training.make_loss`: cross-entropy (times fixed class
    weights) for classification, Dice + cross-entropy for segmentation. With
    ``reduction="none"`` (what Opacus' ghost clipping switches it to) it
    returns each sample's loss ``[B]``, whose batch mean is that scalar: the
    Dice term is already a mean over each sample's classes, the
    cross-entropy a mean over its pixels.

    Args:
        task: decides the loss.
        class_weights: classification class weights ``[K]``, or None.
    """

    def __init__(self, task: TaskConfig, class_weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.reduction = "mean"
        self.segmentation = task.kind == "segmentation"
        self.class_weights = class_weights
        self.dice: nn.Module | None = None
        if self.segmentation:
            from monai.losses import DiceLoss

            self.dice = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Args: logits ``[B, K, *spatial]``/``[B, K]``; targets ``[B, 1, *spatial]``/``[B]``."""
        if self.dice is not None:
            per_sample = (self.dice(logits, targets).flatten(1).mean(1)
                          + nn.functional.cross_entropy(logits, targets[:, 0].long(),
                                                        reduction="none").flatten(1).mean(1))
        else:
            per_sample = nn.functional.cross_entropy(logits, targets, reduction="none")
            if self.class_weights is not None:
                per_sample = self.class_weights.to(per_sample.device)[targets] * per_sample
        return per_sample if self.reduction == "none" else per_sample.mean()


# What ``grad_sample_mode="auto"`` runs: the fastest mode measured by
# bench/dp_step_cost.py (cnn: faster than Opacus' hooks in every run; unet: as
# fast within noise): Opacus' per-layer rules fed by output tensor hooks
# (client/output_hooks.py) with client/lean_dp_optimizer.py's step. Ghost
# clipping saves time only on Linear/Embedding layers (Opacus 1.6 has norm
# rules for those alone) and makes conv nets pay a second backward pass;
# functorch and expanded weights were slower.
AUTO_MODE = "output_hooks"


def resolve_grad_sample_mode(mode: str, model: nn.Module) -> str:
    """The Opacus mode ``mode`` stands for on ``model`` (``auto`` resolved)."""
    del model  # every configured network measured fastest in the same mode
    return AUTO_MODE if mode == "auto" else mode


@dataclass
class DPRound:
    """One round of DP-SGD: train :attr:`model` with :attr:`optimizer` over :attr:`loader`.

    Use :attr:`criterion` as the loss when it is set (ghost clipping: its
    ``backward`` runs both passes); then :meth:`finish`.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    engine: PrivacyEngine
    hooks: Any
    mode: str = "output_hooks"
    criterion: Any = None

    def empty_batch(self) -> None:
        """Prepare a noise-only step for a batch Poisson sampling left empty.

        Call instead of forward/backward, then ``optimizer.step()`` as usual:
        the step adds noise and is accounted like every other.
        """
        for param in self.model.parameters():
            if not param.requires_grad:
                continue
            if self.mode == "ghost":  # its optimizer sums the (clipped) .grad
                param.grad = torch.zeros_like(param)
            else:
                param.grad_sample = torch.zeros(  # type: ignore[attr-defined]
                    0, *param.shape, device=param.device)

    def finish(self) -> list[Mechanism]:
        """Stop the per-sample hooks; return the mechanisms this round applied."""
        self.hooks.cleanup()
        return [(float(z), float(q), int(n)) for z, q, n in self.engine.accountant.history]


def _secret_generator() -> torch.Generator:
    """A torch generator seeded from the operating system's entropy."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def poisson_loader(loader: DataLoader) -> DataLoader:
    """``loader`` with Poisson sampling drawn from OS entropy.

    The coins never come from the run's seed (which the server knows):
    amplification by sampling needs secret coins. Each epoch has
    ``len(loader)`` batches whatever is drawn, each image in each with
    probability ``1 / len(loader)``.
    """
    from opacus.data_loader import DPDataLoader

    return DPDataLoader.from_data_loader(loader, generator=_secret_generator())


def make_private(*, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                 noise_multiplier: float, max_grad_norm: float, accountant: str,
                 grad_sample_mode: str = "hooks", criterion: nn.Module | None = None) -> DPRound:
    """Hook ``model`` for per-sample clipping and noise over a Poisson ``loader``.

    Every mode clips each sample's whole gradient to ``max_grad_norm`` and
    adds the same noise, so the privacy guarantee and its accounting do not
    depend on the mode; only how the per-sample norms are computed does.

    Args:
        model: the model, weights loaded (hooked in place; keys unchanged).
        optimizer: optimizer over ``model``.
        loader: from :func:`poisson_loader`.
        noise_multiplier: noise std / clipping norm.
        max_grad_norm: per-sample L2 clipping norm.
        accountant: ``prv`` or ``rdp`` (records this round's steps).
        grad_sample_mode: ``auto``, ``output_hooks``, ``hooks``, ``functorch``,
            ``ghost`` or ``ew`` (see :class:`~common.config.PrivacyConfig`).
        criterion: the loss, a :class:`PerSampleLoss`; needed by ``ghost``,
            which returns it wrapped as :attr:`DPRound.criterion`.

    Raises:
        ValueError: ``ghost`` without a per-sample ``criterion``.
    """
    from opacus import PrivacyEngine

    from client import prelu_grad_sample

    prelu_grad_sample.register()  # MONAI's default activation, in closed form
    mode = resolve_grad_sample_mode(grad_sample_mode, model)
    if mode == "ghost" and not isinstance(criterion, PerSampleLoss):
        raise ValueError("grad_sample_mode='ghost' needs the loss as a PerSampleLoss "
                         "(per-sample losses for the second backward pass)")
    engine = PrivacyEngine(accountant=accountant)
    prepared = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        criterion=criterion, poisson_sampling=False,
        grad_sample_mode="hooks" if mode == "output_hooks" else mode,
        wrap_model=mode == "ew",  # expanded weights exist only as a wrapping module
        noise_generator=_secret_generator())
    hooks, dp_optimizer = prepared[0], prepared[1]
    if mode == "output_hooks":  # Opacus validated and built it all; swap in the lean parts
        from client.lean_dp_optimizer import LeanDPOptimizer
        from client.output_hooks import OutputGradSampleHooks

        hooks.remove_hooks()
        hooks = OutputGradSampleHooks(model, batch_first=True, loss_reduction="mean")
        dp_optimizer = LeanDPOptimizer.replacing(dp_optimizer)
    hooks.forbid_grad_accumulation()  # as make_private does for Poisson sampling
    return DPRound(model=hooks if mode == "ew" else model, optimizer=dp_optimizer,
                   loader=prepared[-1], engine=engine, hooks=hooks, mode=mode,
                   criterion=prepared[2] if mode == "ghost" else None)
