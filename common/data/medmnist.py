"""MedMNIST ``.npz`` files (e.g. PneumoniaMNIST), as published, divided among hospitals.

The file's ``train`` split is partitioned among hospitals (``iid`` or
``dirichlet`` label skew); each hospital's local test set is a
``data.test_fraction`` of its training share; its validation set is its share
of the file's ``val`` split, drawn with the same class shares as its training
share. The file's ``test`` split is the server's central test set.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from common.config import Settings, TaskConfig
from common.data.errors import DataError
from common.data.partition import dirichlet_partitions, iid_partition, three_way
from common.data.resize import resize_image

SPLITS = ("train", "val", "test")


def _channel_first(images: torch.Tensor, task: TaskConfig) -> torch.Tensor:
    """``[N, *spatial]`` grey or ``[N, H, W, 3]`` colour images as ``[N, C, *spatial]``."""
    if images.ndim == 4 and images.shape[-1] == 3 and task.spatial_dims == 2:
        return images.permute(0, 3, 1, 2)
    return images.unsqueeze(1)


def load_split(path: Path, split: str, task: TaskConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, C, *image_size]`` in [0, 1] and labels ``[N]`` of one split.

    Raises:
        DataError: missing or unreadable file, missing keys, multi-label or
            channel counts that do not match ``task.in_channels``.
    """
    if not path.is_file():
        raise DataError(f"data.path: MedMNIST file {path} not found")
    try:
        with np.load(path) as npz:
            missing = [k for k in (f"{split}_images", f"{split}_labels") if k not in npz.files]
            if missing:
                raise DataError(f"{path} has no {missing[0]!r} array (it holds "
                                f"{', '.join(npz.files) or 'none'}); is it a MedMNIST .npz?")
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"cannot read MedMNIST file {path}: {err}") from None
    if labels.ndim == 2 and labels.shape[1] != 1:
        raise DataError(f"{path}: {labels.shape[1]} labels per image (multi-label) are not "
                        "supported; MedMNIST multi-class files have one")
    x = _channel_first(torch.from_numpy(images).float() / 255.0, task)
    if x.ndim - 2 != task.spatial_dims:
        raise DataError(f"{path} holds {x.ndim - 2}D images (shape {tuple(images.shape)}) but "
                        f"task.spatial_dims={task.spatial_dims}")
    if x.shape[1] != task.in_channels:
        raise DataError(f"{path} has {x.shape[1]} channel(s) but task.in_channels="
                        f"{task.in_channels}")
    if list(x.shape[2:]) != list(task.image_size):  # resize all images at once, as channels
        n, c = x.shape[:2]
        x = resize_image(x.flatten(0, 1), task.image_size).view(n, c, *task.image_size)
    y = torch.from_numpy(labels.reshape(-1).astype(np.int64))
    if int(y.max()) >= task.num_classes:
        raise DataError(f"{path} has label {int(y.max())} but task.num_classes={task.num_classes}")
    return x, y


MIN_TRAIN_SHARE = 10
"""The fewest training images a hospital may get from the file (fewer fails)."""

MIN_VAL_SHARE = 2
"""The fewest validation images a hospital may get from the file."""


def _shares(settings: Settings, train_labels: np.ndarray, val_labels: np.ndarray
            ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each hospital's indices into the file's train and val splits."""
    data, parts = settings.data, settings.federation.num_hospitals
    rng = np.random.default_rng([settings.seed, 3])
    min_train = min(MIN_TRAIN_SHARE, len(train_labels) // parts)
    min_val = min(MIN_VAL_SHARE, len(val_labels) // parts)
    if data.split == "dirichlet":
        train, val = dirichlet_partitions([train_labels, val_labels], parts, data.dirichlet_alpha,
                                          rng, min_sizes=[max(min_train, 1), max(min_val, 1)])
        return train, val
    return (iid_partition(len(train_labels), parts, rng, min_size=max(min_train, 1)),
            iid_partition(len(val_labels), parts, rng, min_size=max(min_val, 1)))


def site_splits(settings: Settings, hospital: int
                ) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Train, val and test datasets of ``hospital`` (see the module docstring).

    Raises:
        DataError: bad file, or a partition that leaves a hospital without data.
    """
    path = Path(str(settings.data.path))
    x, y = load_split(path, "train", settings.task)
    vx, vy = load_split(path, "val", settings.task)
    train_shares, val_shares = _shares(settings, y.numpy(), vy.numpy())
    share, val_share = train_shares[hospital], val_shares[hospital]
    train, _, test = three_way(len(share), 0.0, settings.data.test_fraction,
                               np.random.default_rng([settings.seed, hospital, 5]))
    return (TensorDataset(x[share[train]], y[share[train]]),
            TensorDataset(vx[val_share], vy[val_share]),
            TensorDataset(x[share[test]], y[share[test]]))


def central_test(settings: Settings) -> TensorDataset:
    """The file's ``test`` split: images ``[N, C, *image_size]`` and labels ``[N]``."""
    return TensorDataset(*load_split(Path(str(settings.data.path)), "test", settings.task))
