"""Opacus' Poisson-sampled loader, held to the rules DP-SGD accounting relies on.

Poisson sampling (every sample joins a batch independently with probability
``sample_rate``) can draw an empty batch. The accountant counts every step,
and skipping the step of an empty batch would let "this batch was empty"
leak outside the analysis, so :class:`GuardedLoader` never yields one: it
has the noise-only step taken for it (the noised sum of no gradients,
accounted like any other step) and draws the next batch.

A batch larger than ``max_physical`` is yielded in chunks (Opacus' virtual
steps, as in its ``BatchMemoryManager``): the optimizer clips and sums the
per-sample gradients of each chunk and adds noise, accounts and updates only
after the last chunk, so the privacy step is the same and memory is bounded.

It also stops a training loop that draws a batch (or chunk) without
stepping on it, or draws more batches than the round was cleared for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer


class DPUsageError(RuntimeError):
    """The training loop broke a rule DP-SGD accounting relies on."""


@dataclass
class StepTally:
    """Poisson batches drawn from the loader and optimizer steps accounted, this round."""

    drawn: int = 0
    steps: int = 0


def first_tensor(batch: Any) -> torch.Tensor:
    """The first tensor of a sample or collated batch (tensor, sequence or mapping)."""
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, dict) else batch
    return first_tensor(next(iter(items)))


def split_batch(batch: Any, size: int) -> list[Any]:
    """Cut a collated batch (tensor, sequence or mapping of them) into chunks of ``size``."""
    if isinstance(batch, torch.Tensor):
        return list(batch.split(size))
    if isinstance(batch, dict):
        parts = {key: split_batch(value, size) for key, value in batch.items()}
        return [dict(zip(parts, chunk, strict=True)) for chunk in zip(*parts.values(), strict=True)]
    return [type(batch)(chunk) for chunk in zip(*(split_batch(x, size) for x in batch),
                                                 strict=True)]


class GuardedLoader:
    """Yields Opacus' Poisson batches, never an empty one, one optimizer step each.

    Attributes:
        sample_rate: Poisson sampling probability per step.
        dataset: the training dataset.
    """

    def __init__(self, inner: DPDataLoader, tally: StepTally, *, optimizer: DPOptimizer,
                 limit: int, max_physical: int | None, noise_step: Callable[[], None]) -> None:
        self._inner, self._tally, self._optimizer = inner, tally, optimizer
        self._limit, self._max_physical, self._noise_step = limit, max_physical, noise_step
        self.sample_rate = inner.sample_rate
        self.dataset = inner.dataset

    def __len__(self) -> int:
        """Poisson batches per epoch, empty ones included (chunks not counted)."""
        return len(self._inner)

    def _unstepped(self, what: str) -> DPUsageError:
        return DPUsageError(f"{what} was drawn but optimizer.step() was not called for it: "
                            "DP-SGD takes exactly one step per batch (or chunk) drawn")

    def __iter__(self) -> Iterator[Any]:
        """One epoch of non-empty batches (or chunks of at most ``max_physical``).

        Raises:
            DPUsageError: the previous batch or chunk was never stepped on, or
                the round's step limit is reached.
        """
        for batch in self._inner:
            if self._tally.steps != self._tally.drawn:
                raise self._unstepped(f"batch {self._tally.drawn - 1}")
            if self._tally.drawn >= self._limit:
                raise DPUsageError(
                    f"this round was cleared for {self._limit} DP-SGD steps (round_epochs x "
                    f"{len(self._inner)} batches); do not draw more epochs than round_epochs")
            self._tally.drawn += 1
            size = first_tensor(batch).shape[0]
            if size == 0:
                self._noise_step()
            elif self._max_physical is None or size <= self._max_physical:
                yield batch
            else:
                yield from self._chunks(batch)

    def _chunks(self, batch: Any) -> Iterator[Any]:
        chunks = split_batch(batch, self._max_physical or 1)
        for k, chunk in enumerate(chunks):
            if self._optimizer._step_skip_queue:  # a chunk's skip signal not consumed
                raise self._unstepped(f"chunk {k - 1} of batch {self._tally.drawn - 1}")
            # all but the last chunk: clip and accumulate only (no noise, no accounting)
            self._optimizer.signal_skip_step(do_skip=k < len(chunks) - 1)
            yield chunk
