"""Local training: plain functions the ClientApp, the baseline and tests call.

Nothing here knows about Flower or about DP: the caller hands in the model,
optimizer and loader (Opacus' versions when DP-SGD is on).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

from common.config import TaskConfig, TrainConfig

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Flush subnormal floats to zero on the CPU, for every process that trains
# (all of them import this module before computing anything). Once a model
# has trained for a while, tiny gradients and Adam moments become subnormal
# and x86 CPUs then compute 4-8x slower: the pneumonia baseline went from
# 1.1 s to 5-9 s per epoch after epoch 20, with identical losses. Set at
# import, before torch starts its worker threads, which copy the setting of
# the thread that creates them (set later, it reaches only the calling thread).
torch.set_flush_denormal(True)


@dataclass(frozen=True)
class TrainResult:
    """What one call of :func:`train_epochs` did.

    Attributes:
        loss: mean training loss per sample over all steps.
        num_examples: samples processed (the FedAvg weight), not batches.
        steps: optimizer steps taken.
    """

    loss: float
    num_examples: int
    steps: int


def resolve_device(name: str) -> torch.device:
    """Map ``auto``/``cpu``/``cuda`` to a device; ``auto`` picks CUDA when present.

    Raises:
        ValueError: ``cuda`` asked for on a machine without a CUDA device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use device=auto or cpu")
    return torch.device(name)


def make_loss(task: TaskConfig, class_weights: torch.Tensor | None = None) -> Loss:
    """Cross-entropy for classification; Dice + cross-entropy for segmentation.

    The returned function takes logits ``[B, K]`` / ``[B, K, *spatial]`` and
    targets ``[B]`` / ``[B, 1, *spatial]`` (class indices) and returns a
    scalar mean loss.

    Args:
        task: decides the loss.
        class_weights: classification only: weight ``[K]`` of each class.
            The loss is then ``mean_i(w[y_i] x CE_i)``, a plain mean over
            the batch (not PyTorch's division by the batch's summed weights),
            so each sample's gradient depends on that sample alone, as
            Opacus' per-sample clipping with ``loss_reduction="mean"`` needs.
    """
    if task.kind == "classification":
        if class_weights is None:
            return nn.CrossEntropyLoss()
        weights = class_weights

        def weighted(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            per_sample = nn.functional.cross_entropy(logits, targets, reduction="none")
            return (weights.to(per_sample.device)[targets] * per_sample).mean()
        return weighted
    return DiceCELoss(to_onehot_y=True, softmax=True)


def label_counts(dataset: Dataset, num_classes: int) -> torch.Tensor:
    """Samples per class ``[K]`` (int64) of a classification dataset."""
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    labels = [part.tensors[1] if isinstance(part, TensorDataset)
              else torch.as_tensor([int(part[i][1]) for i in range(len(part))])  # type: ignore[arg-type]
              for part in parts]
    return torch.bincount(torch.cat(labels).long().flatten(), minlength=num_classes)


def loss_class_weights(train: TrainConfig, task: TaskConfig,
                       dataset: Dataset) -> torch.Tensor | None:
    """The loss's class weights ``[K]`` for ``train.class_weights``; None for ``none``.

    ``balanced`` gives class k the weight N / (K x N_k) from ``dataset`` (the
    hospital's own training split: its label counts are read where the
    images are and never leave; the trained weights reflect them as they
    reflect every image). A class absent from the split gets weight 0.
    ``fixed`` uses ``train.fixed_class_weights`` (independent of the data,
    hence usable under DP-SGD).
    """
    if train.class_weights == "none" or task.kind != "classification":
        return None
    if train.class_weights == "fixed":
        return torch.tensor(train.fixed_class_weights, dtype=torch.float32)
    counts = label_counts(dataset, task.num_classes).float()
    present = counts > 0
    weights = torch.zeros(task.num_classes)
    weights[present] = counts.sum() / (int(present.sum()) * counts[present])
    return weights


def make_optimizer(model: nn.Module, train: TrainConfig, *,
                   lr: float | None = None) -> torch.optim.Optimizer:
    """The configured optimizer over ``model``'s parameters, at ``lr`` (default ``train.lr``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rate = train.lr if lr is None else lr
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=rate, momentum=train.momentum,
                               weight_decay=train.weight_decay)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=rate, weight_decay=train.weight_decay)
    return torch.optim.Adam(params, lr=rate, weight_decay=train.weight_decay)


def proximal_term(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    """FedProx penalty ``sum ||w - w_global||^2`` over trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))  # type: ignore[return-value]


def train_epochs(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    task: TaskConfig,
    epochs: int,
    device: torch.device,
    amp: bool = False,
    proximal_mu: float = 0.0,
    on_empty_batch: Callable[[], None] | None = None,
    class_weights: torch.Tensor | None = None,
    criterion: Loss | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``epochs`` passes over ``loader``.

    Args:
        model: network on ``device``.
        loader: yields ``(images [B, C, *spatial], targets)``.
        optimizer: optimizer over ``model``'s parameters (DPOptimizer too).
        task: decides the loss.
        epochs: passes over the loader.
        device: where to compute.
        amp: bfloat16/float16 autocast on CUDA.
        proximal_mu: FedProx weight; 0 disables the proximal term.
        on_empty_batch: DP-SGD: called for a batch Poisson sampling left
            empty, before a (noise-only, accounted) optimizer step; without
            it empty batches are skipped.
        class_weights: classification class weights ``[K]`` (see
            :func:`make_loss`); None = unweighted.
        criterion: the loss to use instead of :func:`make_loss`'s (DP-SGD's
            ghost clipping: Opacus' wrapped per-sample loss).

    Returns:
        Mean per-sample loss, samples seen and steps taken.
    """
    criterion = criterion or make_loss(task, class_weights)
    anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    use_amp = amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    model.train()
    total_loss, seen, steps = 0.0, 0, 0
    for _ in range(epochs):
        for images, targets in loader:
            optimizer.zero_grad(set_to_none=True)
            if images.shape[0] == 0:
                if on_empty_batch is not None:
                    on_empty_batch()
                    optimizer.step()
                    steps += 1
                continue
            images, targets = images.to(device), targets.to(device)
            with torch.autocast(device.type, enabled=use_amp):
                loss = criterion(model(images), targets)
                if proximal_mu > 0:
                    loss = loss + proximal_mu / 2 * proximal_term(model, anchor)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total_loss += float(loss.detach()) * images.shape[0]
            seen += images.shape[0]
            steps += 1
    return TrainResult(loss=total_loss / max(seen, 1), num_examples=seen, steps=steps)
