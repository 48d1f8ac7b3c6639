"""The one model builder that the server and every hospital use.

Every network comes from MONAI and is built DP-ready from the start, so that
Opacus DP-SGD can wrap it and the weights the server sends always match the
weights a hospital trains:

- no BatchNorm (it mixes samples in a batch): instance or group norm is
  chosen at construction, and Opacus' ``ModuleValidator.fix`` replaces any
  BatchNorm left inside MONAI blocks (AttentionUnet's) by GroupNorm;
- no in-place activations or in-place residual additions (they break the
  per-sample gradient hooks of Opacus).

Opacus is imported only where it is needed (a network with BatchNorm, or
:func:`check_dp_trainable`): the import costs about a second per process,
and every simulated hospital, the server and the baseline build models.
A network that fails Opacus' validation raises :class:`ModelError` there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.networks.nets import (
    AttentionUnet,
    BasicUNet,
    Classifier,
    DenseNet121,
    ResNet,
    SegResNet,
    UNet,
)
from monai.networks.nets.resnet import ResNetBlock
from torch import nn

from common.config import ModelConfig, TaskConfig

Builder = Callable[[TaskConfig, ModelConfig], nn.Module]


class ModelError(ValueError):
    """A configured network cannot be built or cannot be made DP-compatible."""


def _group_norm(channels: int) -> tuple[str, dict[str, int]]:
    """A GroupNorm factory tuple with as many groups (<= 8) as divide ``channels``."""
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return ("group", {"num_groups": groups})


class _AddResNetBlock(ResNetBlock):
    """MONAI's basic ResNet block with group norm and an out-of-place residual add."""

    def __init__(self, in_planes: int, planes: int, spatial_dims: int = 3, stride: int = 1,
                 downsample: nn.Module | None = None, **_: object) -> None:
        super().__init__(in_planes, planes, spatial_dims, stride, downsample,
                         act=("relu", {"inplace": False}), norm=_group_norm(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: ``[B, C, *spatial]``. Returns ``[B, planes, *spatial / stride]``."""
        residual = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + residual)


ACTIVATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "prelu": ("prelu", {}),
    "relu": ("relu", {"inplace": False}),
    "leakyrelu": ("leakyrelu", {"negative_slope": 0.01, "inplace": False}),
}


def _resize_up_layers(net: UNet, spatial_dims: int) -> None:
    """Replace every transposed convolution of MONAI's ``net`` by a resize-convolution.

    Each ``ConvTranspose`` (kernel 3, stride s) becomes MONAI's ``UpSample``
    in ``nontrainable`` mode: nearest-neighbour resize by s, then a 3x3
    convolution with the same channels (its ``post_conv``), so the output
    shape is the same and Opacus computes its per-sample gradients with its
    convolution rule (it has none for transposed convolutions).
    """
    from monai.networks.blocks import UpSample
    from monai.networks.layers.factories import Conv

    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                post = Conv[Conv.CONV, spatial_dims](
                    child.in_channels, child.out_channels, kernel_size=3, padding=1,
                    bias=child.bias is not None)
                setattr(module, name, UpSample(
                    spatial_dims, child.in_channels, child.in_channels,
                    scale_factor=child.stride, mode="nontrainable", pre_conv=None,
                    post_conv=post, interp_mode="nearest", align_corners=None))


def _cnn(task: TaskConfig, model: ModelConfig) -> nn.Module:
    channels = tuple(model.channels)
    return Classifier(
        in_shape=(task.in_channels, *task.image_size),
        classes=task.num_classes,
        channels=channels,
        strides=(2,) * len(channels),
        num_res_units=1,
        act=ACTIVATIONS[model.act],
        norm=("instance", {"affine": True}),
        dropout=model.dropout or None,
    )


def _densenet121(task: TaskConfig, model: ModelConfig) -> nn.Module:
    return DenseNet121(
        spatial_dims=task.spatial_dims,
        in_channels=task.in_channels,
        out_channels=task.num_classes,
        norm=("group", {"num_groups": 8}),
        act=("relu", {"inplace": False}),
        dropout_prob=model.dropout,
    )


def _resnet(layers: list[int]) -> Builder:
    def build(task: TaskConfig, model: ModelConfig) -> nn.Module:
        width = model.channels[0]
        return ResNet(
            block=_AddResNetBlock,
            layers=layers,
            block_inplanes=[width, 2 * width, 4 * width, 8 * width],
            spatial_dims=task.spatial_dims,
            n_input_channels=task.in_channels,
            conv1_t_size=3,
            conv1_t_stride=1,
            no_max_pool=min(task.image_size) < 64,
            num_classes=task.num_classes,
            act=("relu", {"inplace": False}),
            norm=_group_norm(width),
        )

    return build


def _unet(task: TaskConfig, model: ModelConfig) -> nn.Module:
    net = UNet(
        spatial_dims=task.spatial_dims,
        in_channels=task.in_channels,
        out_channels=task.num_classes,
        channels=tuple(model.channels),
        strides=(2,) * (len(model.channels) - 1),
        num_res_units=2,
        act=ACTIVATIONS[model.act],
        norm=("instance", {"affine": True}),
        dropout=model.dropout,
    )
    if model.upsample == "resize":
        _resize_up_layers(net, task.spatial_dims)
    return net


def _basicunet(task: TaskConfig, model: ModelConfig) -> nn.Module:
    f = model.channels[0]
    return BasicUNet(
        spatial_dims=task.spatial_dims,
        in_channels=task.in_channels,
        out_channels=task.num_classes,
        features=(f, f, 2 * f, 4 * f, 8 * f, f),
        act=("LeakyReLU", {"negative_slope": 0.1, "inplace": False}),
        norm=("instance", {"affine": True}),
        dropout=model.dropout,
    )


def _attentionunet(task: TaskConfig, model: ModelConfig) -> nn.Module:
    return AttentionUnet(
        spatial_dims=task.spatial_dims,
        in_channels=task.in_channels,
        out_channels=task.num_classes,
        channels=tuple(model.channels),
        strides=(2,) * (len(model.channels) - 1),
        dropout=model.dropout,
    )


def _segresnet(task: TaskConfig, model: ModelConfig) -> nn.Module:
    return SegResNet(
        spatial_dims=task.spatial_dims,
        init_filters=model.channels[0],
        in_channels=task.in_channels,
        out_channels=task.num_classes,
        norm=("group", {"num_groups": min(8, model.channels[0])}),
        dropout_prob=model.dropout or None,
    )


BUILDERS: dict[str, Builder] = {
    "cnn": _cnn,
    "densenet121": _densenet121,
    "resnet18": _resnet([2, 2, 2, 2]),
    "resnet34": _resnet([3, 4, 6, 3]),
    "unet": _unet,
    "basicunet": _basicunet,
    "attentionunet": _attentionunet,
    "segresnet": _segresnet,
}


class _OutOfPlaceResidual(nn.Module):
    """Wraps a SegResNet residual block so its ``x += identity`` becomes ``x + identity``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b: Any = self.block
        out = b.conv1(b.act(b.norm1(x)))
        out = b.conv2(b.act(b.norm2(out)))
        return out + x


def _out_of_place_residuals(net: nn.Module) -> None:
    """Wrap every SegResNet residual block below ``net`` in :class:`_OutOfPlaceResidual`."""
    from monai.networks.blocks.segresnet_block import ResBlock

    for name, child in list(net.named_children()):
        if isinstance(child, ResBlock):
            setattr(net, name, _OutOfPlaceResidual(child))
        else:
            _out_of_place_residuals(child)


def make_dp_compatible(net: nn.Module) -> nn.Module:
    """Turn ``net`` into a network Opacus can wrap.

    Wraps in-place residual additions, replaces BatchNorm by GroupNorm
    (``ModuleValidator.fix``, once for the whole network: it clones the
    module; skipped when there is no BatchNorm, where it changes nothing) and
    switches every activation to out-of-place. :func:`check_dp_trainable`
    validates the result.
    """
    _out_of_place_residuals(net)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        from opacus.validators import ModuleValidator

        net = ModuleValidator.fix(net)
    for module in net.modules():
        if getattr(module, "inplace", False):
            module.inplace = False  # type: ignore[assignment]
    return net


def build_model(task: TaskConfig, model: ModelConfig, *, seed: int | None = None) -> nn.Module:
    """Build the configured MONAI network, DP-ready, on the CPU.

    Args:
        task: input channels, classes, ``spatial_dims`` and image size.
        model: network name and width.
        seed: when given, initial weights are drawn from this seed so that
            every process builds the same starting model.

    Returns:
        A module mapping ``[B, in_channels, *image_size]`` to logits
        ``[B, num_classes]`` (classifiers) or ``[B, num_classes, *image_size]``
        (segmenters).

    Raises:
        ModelError: unknown ``model.name``.
    """
    builder = BUILDERS.get(model.name)
    if builder is None:
        raise ModelError(f"model.name={model.name!r} is unknown; allowed: {', '.join(BUILDERS)}")
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        net = builder(task, model)
        return make_dp_compatible(net)


def check_dp_trainable(net: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Dry-run one DP-SGD backward pass on two random samples.

    First Opacus' static validation (layers it cannot wrap), then the dry run,
    which catches what validation cannot see, such as an in-place residual
    addition inside a block (``out += residual``), before any hospital trains.

    Args:
        net: a network built by :func:`build_model` (or any module).
        input_shape: one sample's shape ``(C, *spatial)``.

    Raises:
        ModelError: Opacus refuses a layer, or cannot compute per-sample
            gradients, with the reason.
    """
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(net, strict=False)
    if errors:
        raise ModelError(
            f"{type(net).__name__} cannot be made DP-compatible: "
            + "; ".join(str(e) for e in errors)
        )
    probe = GradSampleModule(net, batch_first=True, loss_reduction="mean")
    try:
        probe(torch.randn(2, *input_shape)).float().sum().backward()
    except RuntimeError as err:
        raise ModelError(
            f"{type(net).__name__} cannot be trained with DP-SGD: {str(err).splitlines()[0]}"
        ) from err
    finally:
        probe._close()
        net.zero_grad(set_to_none=True)
        for param in net.parameters():
            if hasattr(param, "grad_sample"):
                del param.grad_sample
