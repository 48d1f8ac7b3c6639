"""Opacus per-sample gradients of ``nn.PReLU`` in closed form.

MONAI's networks use PReLU by default (``act="prelu"``), and Opacus 1.6 has
no grad sampler for it: its hooks fall back to functorch for that layer (a
``vmap`` of the layer's forward and a vector-Jacobian product per call),
which made a DP step of the default classifier slower than the same network
with ReLU. PReLU's gradient needs no such machinery:

    y = max(0, x) + a * min(0, x),   so   dL/da = sum (dL/dy * min(0, x))

summed, for each sample, over every position the parameter is shared by
(all of them when ``num_parameters == 1``; all but the channel dimension 1
when there is one slope per channel). :func:`register` adds that rule to
Opacus' registry, the extension point Opacus documents for layers it does
not cover (``opacus.grad_sample.register_grad_sampler``); the clipping,
noise and accounting stay Opacus'. The result equals autograd's per-sample
gradient exactly (``tests/test_dp_modes.py``).
"""

from __future__ import annotations

import torch
from torch import nn


def prelu_grad_sample(layer: nn.PReLU, activations: list[torch.Tensor],
                      backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient of a PReLU's slopes.

    Args:
        layer: the PReLU; ``layer.weight`` has shape ``[P]``, P = 1 or the
            channels (dimension 1 of the input).
        activations: ``[x]``, the layer's input ``[B, C, *spatial]`` (or
            ``[B, *]`` when P = 1).
        backprops: dL/dy, the shape of ``x``.

    Returns:
        ``{layer.weight: g}`` with ``g`` of shape ``[B, P]`` (empty when the
        slopes are frozen).
    """
    if not layer.weight.requires_grad:
        return {}
    x = activations[0]
    contribution = backprops * torch.clamp(x, max=0.0)  # dL/dy * min(0, x), per position
    if layer.weight.numel() == 1:
        per_sample = contribution.reshape(len(contribution), -1).sum(dim=1, keepdim=True)
    else:
        per_sample = contribution.reshape(*contribution.shape[:2], -1).sum(dim=2)
    return {layer.weight: per_sample}


def register() -> None:
    """Make :func:`prelu_grad_sample` Opacus' rule for ``nn.PReLU`` (idempotent)."""
    from opacus.grad_sample import register_grad_sampler

    register_grad_sampler(nn.PReLU)(prelu_grad_sample)
