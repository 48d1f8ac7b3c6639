"""Data: synthetic images, partitions, MedMNIST (the real PneumoniaMNIST file).

Helpers here (:func:`make_settings`, :func:`stack`) are shared by the other
``test_data_*`` files. Settings are built from the typed schema directly, so
these tests do not depend on the presets under ``conf/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.metrics import compute_roc_auc
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from common.config import DataConfig, FederationConfig, ModelConfig, Settings, TaskConfig
from common.data import DataError, SiteData, load_central_test, load_pooled, load_site
from common.data.partition import (
    contiguous_blocks,
    dirichlet_partition,
    dirichlet_partitions,
    iid_partition,
    three_way,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PNEUMONIA = SHARED / "data" / "pneumoniamnist" / "pneumoniamnist.npz"
BRAIN = SHARED / "data" / "brain-mri"


def needs(path: Path) -> pytest.MarkDecorator:
    """Skip when a real data file from ``../shared/data`` is not beside the checkout."""
    return pytest.mark.skipif(not path.exists(),
                              reason=f"{path} not found: ../shared/data is not beside the repo")


def make_settings(*, kind: str = "classification", size: tuple[int, ...] = (28, 28),
                  classes: int = 2, channels: int = 1, hospitals: int = 3, seed: int = 0,
                  **data: Any) -> Settings:
    """Settings for data tests: ``data`` holds :class:`DataConfig` fields."""
    task = TaskConfig(kind=kind, spatial_dims=len(size), in_channels=channels,
                      num_classes=classes, image_size=list(size))
    model = ModelConfig(name="cnn" if kind == "classification" else "unet")
    federation = FederationConfig(num_hospitals=hospitals, min_train=1, min_evaluate=1)
    return Settings(task=task, model=model, data=DataConfig(**data), federation=federation,
                    seed=seed)


def stack(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All items of ``dataset`` as two stacked tensors."""
    items = [dataset[i] for i in range(count(dataset))]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def count(dataset: Dataset) -> int:
    """Items in a (sized) dataset."""
    return len(dataset)  # type: ignore[arg-type]


def sizes(site: SiteData) -> tuple[int, int, int]:
    """Train, val and test sizes of a hospital's data."""
    return count(site.train), count(site.val), count(site.test)


# --- synthetic -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,size,channels", [
    ("classification", (28, 28), 1), ("classification", (16, 16, 16), 1),
    ("classification", (32, 24), 3), ("segmentation", (32, 32), 1),
    ("segmentation", (16, 16, 16), 1),
])
def test_synthetic_shapes_and_types(kind: str, size: tuple[int, ...], channels: int) -> None:
    s = make_settings(kind=kind, size=size, channels=channels, classes=3,
                      samples_per_hospital=40)
    site = load_site(s, 1)
    assert site.name == "hospital-1" and sum(sizes(site)) == 40
    x, y = site.train[0]
    assert x.dtype == torch.float32 and tuple(x.shape) == (channels, *size)
    assert y.dtype == torch.int64
    assert tuple(y.shape) == (() if kind == "classification" else (1, *size))
    xs, ys = stack(site.train)
    assert float(xs.min()) > -0.5 and float(xs.max()) < 1.6  # about [0, 1]
    assert set(ys.unique().tolist()) <= {0, 1, 2}
    if kind == "segmentation":
        assert 0.02 < float((ys > 0).float().mean()) < 0.6  # shapes, not empty, not everything


def test_synthetic_is_deterministic_and_differs_per_hospital_and_seed() -> None:
    s = make_settings(samples_per_hospital=32)
    a, b = stack(load_site(s, 0).train), stack(load_site(s, 0).train)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other_hospital = stack(load_site(s, 1).train)
    other_seed = stack(load_site(make_settings(samples_per_hospital=32, seed=1), 0).train)
    assert not torch.equal(a[0][:5], other_hospital[0][:5])
    assert not torch.equal(a[0][:5], other_seed[0][:5])
    central = load_central_test(s)
    assert central is not None and count(central) == 3 * 16
    central_x = stack(central)[0]
    assert not any(torch.equal(central_x[0], x) for x in a[0])  # its own draw


def test_synthetic_scanners_and_dirichlet_label_skew() -> None:
    s = make_settings(samples_per_hospital=200, split="dirichlet", dirichlet_alpha=0.3)
    sites = [stack(ConcatDataset([site.train, site.val, site.test]))
             for site in (load_site(s, h) for h in range(3))]
    shares = [float(y.float().mean()) for _, y in sites]
    brightness = [float(x.mean()) for x, _ in sites]
    assert max(shares) - min(shares) > 0.3
    assert max(brightness) - min(brightness) > 0.02
    mild = make_settings(samples_per_hospital=200)
    iid_shares = [float(stack(load_site(mild, h).train)[1].float().mean()) for h in range(3)]
    assert max(iid_shares) - min(iid_shares) < 0.3


def test_synthetic_classification_is_learnable() -> None:
    """A small CNN reaches a central-test AUC well above 0.9 in a few epochs."""
    s = make_settings(samples_per_hospital=128)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
                        nn.Flatten(), nn.Linear(32, 2))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    loader = DataLoader(load_pooled(s).train, batch_size=32, shuffle=True)
    for _ in range(4):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    central = load_central_test(s)
    assert central is not None
    x, y = stack(central)
    with torch.no_grad():
        score = net(x).softmax(1)[:, 1]
    assert float(compute_roc_auc(score, y)) > 0.95


def test_hospital_out_of_range_is_refused() -> None:
    with pytest.raises(DataError, match="federation.num_hospitals=3"):
        load_site(make_settings(), 3)


# --- partitions ------------------------------------------------------------------------------

def test_dirichlet_covers_every_sample_once_with_skew() -> None:
    labels = np.repeat([0, 1], 500)
    parts = dirichlet_partition(labels, 3, 0.3, np.random.default_rng(0))
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    shares = [labels[p].mean() for p in parts]
    assert max(shares) - min(shares) > 0.2
    iid = iid_partition(1000, 3, np.random.default_rng(0))
    assert sorted(np.concatenate(iid).tolist()) == list(range(1000))
    assert max(map(len, iid)) - min(map(len, iid)) <= 1


def test_dirichlet_shares_are_the_same_for_train_and_val() -> None:
    train, val = np.repeat([0, 1], [3000, 1000]), np.repeat([0, 1], [300, 100])
    train_parts, val_parts = dirichlet_partitions([train, val], 4, 0.5, np.random.default_rng(1),
                                                  min_sizes=[10, 2])
    for tp, vp in zip(train_parts, val_parts, strict=True):
        assert abs(train[tp].mean() - val[vp].mean()) < 0.1
        assert abs(len(tp) / 4000 - len(vp) / 400) < 0.03
    assert sorted(np.concatenate(val_parts).tolist()) == list(range(400))


def test_impossible_partitions_are_refused() -> None:
    with pytest.raises(DataError, match="dirichlet_alpha"):
        dirichlet_partition(np.zeros(4, int), 3, 0.01, np.random.default_rng(0), min_size=2)
    with pytest.raises(DataError, match="hospital 4 would get 0 samples"):
        iid_partition(4, 5, np.random.default_rng(0))


def test_blocks_stay_together_and_within_a_volume() -> None:
    train, val, test = three_way(40, 0.1, 0.2, np.random.default_rng(0), block=4)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(40))
    assert len(val) == 4 and len(test) == 8
    for split in (val, test):
        assert all(i // 4 * 4 in split for i in split)  # whole blocks only
    volumes = np.repeat([0, 1], [5, 3])
    blocks = contiguous_blocks(volumes, 4)
    assert [b.tolist() for b in blocks] == [[0, 1, 2, 3], [4], [5, 6, 7]]


# --- MedMNIST --------------------------------------------------------------------------------

def _pneumonia(**data: Any) -> Settings:
    return make_settings(**{"source": "medmnist", "path": str(PNEUMONIA), "split": "dirichlet",
                            "dirichlet_alpha": 1.0, "test_fraction": 0.1, **data})


@needs(PNEUMONIA)
def test_pneumoniamnist_hospitals_and_central_test() -> None:
    s = _pneumonia()
    sites = [load_site(s, h) for h in range(3)]
    assert sum(count(site.train) + count(site.test) for site in sites) == 4214
    assert sum(count(site.val) for site in sites) == 524
    central = load_central_test(s)
    assert central is not None and count(central) == 468
    x, y = central[0]
    assert tuple(x.shape) == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    train_share = [float(stack(site.train)[1].float().mean()) for site in sites]
    val_share = [float(stack(site.val)[1].float().mean()) for site in sites]
    assert max(train_share) - min(train_share) > 0.05  # label skew ...
    assert all(abs(t - v) < 0.08 for t, v in zip(train_share, val_share, strict=True))  # ... alike
    assert all(count(site.test) > 0 for site in sites)
    assert count(load_pooled(s).train) == sum(count(site.train) for site in sites)


@needs(PNEUMONIA)
def test_pneumoniamnist_iid_resized() -> None:
    s = _pneumonia(split="iid", test_fraction=0.2)
    s.task.image_size = [32, 32]
    site = load_site(s, 2)
    assert tuple(site.train[0][0].shape) == (1, 32, 32)
    assert sizes(site)[1] in (174, 175) and abs(sizes(site)[2] - 281) <= 1


@needs(PNEUMONIA)
def test_medmnist_errors_name_file_and_key(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothing.npz not found"):
        load_site(_pneumonia(path=str(tmp_path / "nothing.npz")), 0)
    partial = tmp_path / "partial.npz"
    with np.load(PNEUMONIA) as npz:
        np.savez(partial, train_images=npz["train_images"], train_labels=npz["train_labels"])
    with pytest.raises(DataError, match="partial.npz has no 'val_images' array"):
        load_site(_pneumonia(path=str(partial)), 0)
    too_many = make_settings(source="medmnist", path=str(PNEUMONIA), hospitals=600)
    with pytest.raises(DataError, match="hospital 524 would get 0 samples.*num_hospitals"):
        load_site(too_many, 0)
