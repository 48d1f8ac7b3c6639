"""Whether Opacus can train a model with correct per-sample gradients."""

from __future__ import annotations

import copy
import warnings

import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from common.models import ModelError

HINT = ("build it with common.models.build_model, or pass it through "
        "common.models.make_dp_compatible (BatchNorm -> GroupNorm, no in-place ops)")


def check_dp_model(model: nn.Module, *, sample_shape: tuple[int, ...]) -> None:
    """Refuse a model that Opacus cannot train with correct per-sample gradients.

    First Opacus' static validation (BatchNorm, running statistics, LSTM, ...),
    then a dry run of one per-sample backward pass on a copy of the model with
    two random samples, which catches in-place operations that break Opacus'
    hooks. The model itself and the global random state are left untouched.

    Args:
        model: the network, on the device it will train on.
        sample_shape: one input sample's shape ``(C, *spatial)``.

    Raises:
        ModelError: what is wrong, and how to build a DP-ready network.
    """
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        reasons = "; ".join(str(e).split(". ")[0] for e in errors)
        raise ModelError(f"{type(model).__name__} cannot be trained with DP-SGD: {reasons}; "
                         f"{HINT}")
    device = next(model.parameters()).device
    probe = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="mean")
    gpus = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        try:
            probe(torch.randn(2, *sample_shape, device=device)).float().sum().backward()
        except RuntimeError as err:
            raise ModelError(f"{type(model).__name__} cannot be trained with DP-SGD: "
                             f"{str(err).splitlines()[0]}; {HINT}") from err
