"""Every model builder: 2D and 3D forward shapes, DP-ready, same weights everywhere."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets.resnet import ResNetBlock
from opacus.validators import ModuleValidator
from torch import nn

from common.config import ModelConfig, TaskConfig
from common.models import (
    BUILDERS,
    ModelError,
    build_model,
    check_dp_trainable,
    make_dp_compatible,
)

CLASSIFIERS = ["cnn", "densenet121", "resnet18", "resnet34"]
SEGMENTERS = ["unet", "basicunet", "attentionunet", "segresnet"]
WIDTH = {"cnn": [8, 16], "densenet121": [8], "resnet18": [8], "resnet34": [8], "unet": [8, 16, 32],
         "basicunet": [8], "attentionunet": [8, 16, 32], "segresnet": [8]}


def _task(kind: str, dims: int, side: int = 16) -> TaskConfig:
    size = [32, 32] if dims == 2 else [side] * 3
    return TaskConfig(kind=kind, spatial_dims=dims, in_channels=1, num_classes=3, image_size=size)


def test_every_configured_name_has_a_builder() -> None:
    assert sorted(BUILDERS) == sorted(CLASSIFIERS + SEGMENTERS)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_forward_shape(name: str, dims: int) -> None:
    task = _task("classification", dims, side=32 if name == "densenet121" else 16)
    model = build_model(task, ModelConfig(name=name, channels=WIDTH[name]), seed=0)
    out = model(torch.randn(2, 1, *task.image_size))
    assert out.shape == (2, 3)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", SEGMENTERS)
def test_segmenter_forward_shape(name: str, dims: int) -> None:
    task = _task("segmentation", dims, side=32 if name == "basicunet" else 16)
    model = build_model(task, ModelConfig(name=name, channels=WIDTH[name]), seed=0)
    out = model(torch.randn(2, 1, *task.image_size))
    assert out.shape == (2, 3, *task.image_size)


@pytest.mark.parametrize("name", CLASSIFIERS + SEGMENTERS)
def test_models_are_dp_ready(name: str) -> None:
    kind = "classification" if name in CLASSIFIERS else "segmentation"
    model = build_model(_task(kind, 2), ModelConfig(name=name, channels=WIDTH[name]))
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_same_seed_same_weights_and_keys() -> None:
    task = _task("segmentation", 2)
    a = build_model(task, ModelConfig(name="unet", channels=[8, 16]), seed=3).state_dict()
    b = build_model(task, ModelConfig(name="unet", channels=[8, 16]), seed=3).state_dict()
    c = build_model(task, ModelConfig(name="unet", channels=[8, 16]), seed=4).state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_batchnorm_is_converted_to_groupnorm() -> None:
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
    fixed = make_dp_compatible(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fixed.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in fixed.modules())
    assert not any(getattr(m, "inplace", False) for m in fixed.modules())


@pytest.mark.parametrize("name", CLASSIFIERS + SEGMENTERS)
def test_every_model_passes_the_dp_dry_run(name: str) -> None:
    kind = "classification" if name in CLASSIFIERS else "segmentation"
    task = _task(kind, 2)
    check_dp_trainable(build_model(task, ModelConfig(name=name, channels=WIDTH[name])),
                       (1, *task.image_size))


def test_in_place_residual_is_refused_with_reason() -> None:
    """MONAI's own ResNet block adds its residual in place: Opacus cannot train it."""
    block = ResNetBlock(4, 4, spatial_dims=2, act=("relu", {"inplace": False}),
                        norm=("group", {"num_groups": 2}))
    net = make_dp_compatible(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), block))
    with pytest.raises(ModelError, match="cannot be trained with DP-SGD"):
        check_dp_trainable(net, (1, 8, 8))


def test_layer_opacus_refuses_is_named() -> None:
    """A network not built by build_model (BatchNorm kept) fails validation with the layer."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4))
    with pytest.raises(ModelError, match="cannot be made DP-compatible: .*BatchNorm"):
        check_dp_trainable(net, (1, 8, 8))
