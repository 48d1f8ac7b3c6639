"""The learning rate across server rounds, the same at every hospital.

A hospital knows only the round it is asked to train (``server_round``) and
the planned ``federation.rounds``; from those alone every hospital computes
the same learning rate, so no schedule state travels or needs checkpointing
(a resumed run continues the curve). Within a round the rate is constant.
The centralized baseline follows the same curve by epoch: its epoch ``e``
(1-based) trains at the rate of round ``ceil(e / local_epochs)``.
"""

from __future__ import annotations

import math

import torch

from common.config import TrainConfig


def round_lr(train: TrainConfig, server_round: int, rounds: int) -> float:
    """The learning rate of ``server_round`` (1-based) out of ``rounds``.

    * warm-up: round ``r <= warmup_rounds`` trains at
      ``lr x r / (warmup_rounds + 1)``;
    * ``constant``: ``lr`` afterwards;
    * ``cosine``: from ``lr`` (first round after warm-up) down to
      ``lr x min_lr_factor`` (round ``rounds``) along half a cosine;
    * ``step``: ``lr x step_gamma ** k``, k = completed blocks of
      ``step_rounds`` rounds after warm-up.

    Rounds past ``rounds`` (a run extended on resume) keep the last value.

    Raises:
        ValueError: ``server_round`` or ``rounds`` below 1.
    """
    if server_round < 1 or rounds < 1:
        raise ValueError(f"server_round={server_round} and rounds={rounds} must be >= 1")
    r = min(server_round, rounds)
    if r <= train.warmup_rounds:
        return train.lr * r / (train.warmup_rounds + 1)
    done = r - train.warmup_rounds - 1  # rounds since warm-up ended, 0-based
    if train.lr_schedule == "cosine":
        span = max(rounds - train.warmup_rounds - 1, 1)
        progress = min(done / span, 1.0)
        floor = train.min_lr_factor
        return train.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    if train.lr_schedule == "step":
        return train.lr * train.step_gamma ** (done // train.step_rounds)
    return train.lr


def epoch_lr(train: TrainConfig, epoch: int, *, local_epochs: int, rounds: int) -> float:
    """The rate of centralized epoch ``epoch`` (1-based): that of the round it stands for."""
    return round_lr(train, math.ceil(epoch / local_epochs), rounds)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate (an Opacus DPOptimizer's too)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
