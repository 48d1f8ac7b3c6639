"""Opacus' Poisson-sampled loader, held to the rules DP-SGD accounting relies on.

Poisson sampling (every sample joins a batch independently with probability
``sample_rate``) can draw an empty batch. The accountant counts every step,
and skipping the step of an empty batch would let "this batch was empty"
leak outside the analysis, so :class:`GuardedLoader` never yields one: it
has the noise-only step taken for it (the noised sum of no gradients,
accounted like any other step) and draws the next batch. It also stops a
training loop that draws a batch without stepping on it, or that draws more
batches than the round was cleared for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from opacus.data_loader import DPDataLoader


class DPUsageError(RuntimeError):
    """The training loop broke a rule DP-SGD accounting relies on."""


@dataclass
class StepTally:
    """Batches drawn from the loader and optimizer steps accounted, this round."""

    drawn: int = 0
    steps: int = 0


def first_tensor(batch: Any) -> torch.Tensor:
    """The first tensor of a sample or collated batch (tensor, sequence or mapping)."""
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, dict) else batch
    return first_tensor(next(iter(items)))


class GuardedLoader:
    """Yields Opacus' Poisson batches, never an empty one, one optimizer step each.

    Attributes:
        sample_rate: Poisson sampling probability per step.
        dataset: the training dataset.
    """

    def __init__(self, inner: DPDataLoader, tally: StepTally, *, limit: int,
                 noise_step: Callable[[], None]) -> None:
        self._inner, self._tally, self._limit, self._noise_step = inner, tally, limit, noise_step
        self.sample_rate = inner.sample_rate
        self.dataset = inner.dataset

    def __len__(self) -> int:
        """Batches per epoch, empty ones included."""
        return len(self._inner)

    def __iter__(self) -> Iterator[Any]:
        """One epoch of non-empty batches.

        Raises:
            DPUsageError: the previous batch was never stepped on, or the
                round's step limit is reached.
        """
        for batch in self._inner:
            if self._tally.steps != self._tally.drawn:
                raise DPUsageError(
                    f"batch {self._tally.drawn - 1} was drawn but optimizer.step() was not "
                    "called for it: DP-SGD takes exactly one step per batch drawn")
            if self._tally.drawn >= self._limit:
                raise DPUsageError(
                    f"this round was cleared for {self._limit} DP-SGD steps (round_epochs x "
                    f"{len(self._inner)} batches); do not draw more epochs than round_epochs")
            self._tally.drawn += 1
            if first_tensor(batch).shape[0] == 0:
                self._noise_step()
                continue
            yield batch
