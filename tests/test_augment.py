"""Training-time augmentation: masks move with images, training splits only, seeded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from client.hospital import Hospital
from client.local import site_data, train_round
from common.augment import AugmentedDataset, augmented
from common.config import AugmentConfig, ConfigError, TaskConfig
from common.data import load_site
from common.models import build_model
from tests.conftest import small_settings

# Strong geometry (so masks certainly move), everything else as configured by default
STRONG = AugmentConfig(affine_prob=1.0, rotate_deg=30.0, scale=0.2, translate=0.15)


def _blob(size: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """An off-centre box whose intensity is its mask: image [1, *size], mask int64 [1, *size]."""
    mask = torch.zeros(1, *size, dtype=torch.int64)
    box = tuple(slice(s // 5, s // 5 + s // 3) for s in size)
    mask[(0, *box)] = 1
    return mask.float(), mask


def _centroid(volume: torch.Tensor) -> torch.Tensor:
    grids = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in volume.shape),
                           indexing="ij")
    weight = volume.float()
    return torch.stack([(g * weight).sum() / weight.sum() for g in grids])


@pytest.mark.parametrize("size", [[32, 32], [24, 24, 24]], ids=["2d", "3d"])
def test_masks_move_with_their_images(size: list[int]) -> None:
    task = TaskConfig(kind="segmentation", spatial_dims=len(size), image_size=size)
    image, mask = _blob(size)
    data = augmented(TensorDataset(image[None].repeat(6, 1, *[1] * len(size)),
                                   mask[None].repeat(6, 1, *[1] * len(size))),
                     STRONG, task, seed=3)
    moved = 0
    for i in range(len(data)):  # type: ignore[arg-type]
        out_image, out_mask = data[i]
        assert out_image.shape == image.shape and out_image.dtype == torch.float32
        assert out_mask.shape == mask.shape and out_mask.dtype == torch.int64
        assert set(out_mask.unique().tolist()) <= {0, 1}
        thresholded = out_image[0] > 0.5
        foreground = out_mask[0].bool()
        iou = (thresholded & foreground).sum() / (thresholded | foreground).sum()
        assert iou > 0.8, f"sample {i}: image and mask disagree (IoU {iou:.2f})"
        offset = (_centroid(thresholded) - _centroid(foreground)).abs().max()
        assert offset < 1.0, f"sample {i}: centroids {offset:.2f} px apart"
        moved += int(not torch.equal(out_mask, mask))
    assert moved == len(data)  # type: ignore[arg-type]


def test_classification_labels_are_untouched_and_the_base_is_not_written() -> None:
    task = TaskConfig(kind="classification", image_size=[28, 28])
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 2
    base = TensorDataset(images.clone(), labels.clone())
    data = augmented(base, STRONG, task, seed=0)
    changed = [not torch.equal(data[i][0], images[i]) for i in range(8)]
    assert all(changed)
    assert [int(data[i][1]) for i in range(8)] == labels.tolist()
    assert torch.equal(base.tensors[0], images)  # no transform works in place


def test_same_seed_same_draws_whatever_the_order() -> None:
    task = TaskConfig(kind="classification", image_size=[28, 28])
    base = TensorDataset(torch.rand(6, 1, 28, 28), torch.zeros(6, dtype=torch.int64))
    first = augmented(base, STRONG, task, seed=11)
    second = augmented(base, STRONG, task, seed=11)
    forward = [first[i][0] for i in range(6)]
    backward = {i: second[i][0] for i in reversed(range(6))}
    assert all(torch.equal(forward[i], backward[i]) for i in range(6))
    # A second draw of the same image is a new augmentation; another seed differs too
    assert not torch.equal(first[0][0], forward[0])
    other = augmented(base, STRONG, task, seed=12)
    assert not torch.equal(other[0][0], forward[0])


def test_disabled_augmentation_returns_the_split_itself() -> None:
    task = TaskConfig(kind="classification", image_size=[28, 28])
    base = TensorDataset(torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.int64))
    assert augmented(base, AugmentConfig(enabled=False), task, seed=0) is base


def test_bad_augment_values_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="augment.gamma"):
        AugmentConfig(gamma=[1.2, 0.8])
    with pytest.raises(ConfigError, match="augment.affine_prob"):
        AugmentConfig(affine_prob=1.5)
    with pytest.raises(ConfigError, match="augment.flip_axes"):
        small_settings(tmp_path, "augment.flip_axes=[2]")  # 2D images have axes 0 and 1


def test_on_by_default_without_flips_and_off_with_augment_none(tmp_path: Path) -> None:
    settings = small_settings(tmp_path)
    assert settings.augment.enabled and settings.augment.flip_axes == []
    assert not small_settings(tmp_path, "augment=none").augment.enabled


def test_a_round_augments_training_only(tmp_path: Path) -> None:
    """A real round with augmentation leaves the hospital's splits exactly as loaded."""
    settings = small_settings(tmp_path, "federation.local_epochs=1")
    hospital = Hospital(index=0, count=settings.federation.num_hospitals, name="hospital-0")
    fresh = load_site(settings, 0)
    weights = build_model(settings.task, settings.model, seed=0).state_dict()
    result = train_round(settings, hospital, weights, server_round=1)
    assert result.metrics["num-examples"] == len(fresh.train)  # type: ignore[arg-type]
    cached = site_data(settings, hospital)
    for split in ("train", "val", "test"):
        ours, theirs = getattr(cached, split), getattr(fresh, split)
        assert isinstance(ours, TensorDataset), split  # no wrapper stays on a split
        assert all(torch.equal(a, b) for a, b in zip(ours.tensors, theirs.tensors, strict=True))
    # What the round trained on does differ from the stored images
    wrapped = augmented(cached.train, STRONG, settings.task, seed=1)
    assert isinstance(wrapped, AugmentedDataset)
    batch = next(iter(DataLoader(wrapped, batch_size=4)))[0]
    assert not torch.equal(batch, cached.train.tensors[0][:4])
