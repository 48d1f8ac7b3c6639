"""Each hospital's images: synthetic, a MedMNIST file, or the hospital's own folder.

Every dataset yields ``(image, target)`` tuples: ``image`` float32
``[C, *task.image_size]``; ``target`` an int64 class index (classification)
or an int64 mask ``[1, *task.image_size]`` of class indices (segmentation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

from common.config import Settings
from common.data import medmnist, synthetic, volumes
from common.data.errors import DataError
from common.data.labelled_folder import load_labelled, read_labels
from common.data.partition import partition, three_way

__all__ = ["DataError", "SiteData", "load_central_test", "load_pooled", "load_site",
           "site_folders"]

SLICE_BLOCK = 4
"""Neighbouring slices assigned to the same split together (see :func:`three_way`)."""


@dataclass
class SiteData:
    """One hospital's splits.

    Attributes:
        name: hospital name (``hospital-i``, or its folder name).
        train: samples it trains on.
        val: its validation samples.
        test: its held-out test samples (federated evaluation).
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset


def _rng(settings: Settings, *key: int) -> np.random.Generator:
    return np.random.default_rng([settings.seed, *key])


def _split(name: str, x: torch.Tensor, y: torch.Tensor, settings: Settings, hospital: int,
           *, block: int = 1) -> SiteData:
    train, val, test = three_way(len(x), settings.data.val_fraction, settings.data.test_fraction,
                                 _rng(settings, hospital, 5), block=block)
    return SiteData(name, TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]),
                    TensorDataset(x[test], y[test]))


def site_folders(settings: Settings) -> list[Path]:
    """The per-hospital sub-folders of ``data.path`` for a natural split.

    Raises:
        DataError: missing folder, or a count different from the hospitals.
    """
    root = Path(str(settings.data.path))
    if not root.is_dir():
        raise DataError(f"data.path: folder {root} not found")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if len(folders) != settings.federation.num_hospitals:
        raise DataError(f"data.split=natural: {root} holds {len(folders)} hospital folders but "
                        f"federation.num_hospitals={settings.federation.num_hospitals}")
    return folders


def _folder_samples(folder: Path, settings: Settings
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All samples of one folder and the block size for splitting them."""
    if settings.task.kind == "segmentation":
        x, y, _ = volumes.samples(folder, settings)
        return x, y, SLICE_BLOCK if settings.task.spatial_dims == 2 else 1
    x, y = load_labelled(read_labels(folder, settings.data.labels_csv), settings.task)
    return x, y, 1


def _from_folder(settings: Settings, hospital: int, data_path: str | None) -> SiteData:
    if data_path is not None:  # deployment: this hospital's own folder, whole
        folder = Path(data_path)
        x, y, block = _folder_samples(folder, settings)
        return _split(folder.name, x, y, settings, hospital, block=block)
    if settings.data.split == "natural":
        folder = site_folders(settings)[hospital]
        x, y, block = _folder_samples(folder, settings)
        return _split(folder.name, x, y, settings, hospital, block=block)
    folder = Path(str(settings.data.path))
    if settings.task.kind == "segmentation":  # pool every slice, then divide
        x, y, _ = volumes.samples(folder, settings)
        labels = np.zeros(len(x), dtype=int)
    else:
        rows = read_labels(folder, settings.data.labels_csv)
        labels = np.array([label for _, label in rows])
    share = partition(labels, settings.federation.num_hospitals, settings.data.split,
                      settings.data.dirichlet_alpha, _rng(settings, 3))[hospital]
    if settings.task.kind != "segmentation":
        x, y = load_labelled([rows[i] for i in share], settings.task)
    else:
        x, y = x[share], y[share]
    return _split(f"hospital-{hospital}", x, y, settings, hospital)


def _from_medmnist(settings: Settings, hospital: int) -> SiteData:
    path = Path(str(settings.data.path))
    parts = settings.federation.num_hospitals
    x, y = medmnist.load_split(path, "train", settings.task)
    share = partition(y.numpy(), parts, settings.data.split, settings.data.dirichlet_alpha,
                      _rng(settings, 3))[hospital]
    train, _, test = three_way(len(share), 0.0, settings.data.test_fraction,
                               _rng(settings, hospital, 5))
    vx, vy = medmnist.load_split(path, "val", settings.task)
    val_share = partition(vy.numpy(), parts, settings.data.split, settings.data.dirichlet_alpha,
                          _rng(settings, 4))[hospital]
    return SiteData(f"hospital-{hospital}",
                    TensorDataset(x[share[train]], y[share[train]]),
                    TensorDataset(vx[val_share], vy[val_share]),
                    TensorDataset(x[share[test]], y[share[test]]))


def _synthetic(settings: Settings, hospital: int, n: int, stream: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    make = (synthetic.classification if settings.task.kind == "classification"
            else synthetic.segmentation)
    return make(settings, hospital, n, stream=stream)


def load_site(settings: Settings, hospital: int, *, data_path: str | None = None) -> SiteData:
    """Data of hospital ``hospital`` (0-based) of ``federation.num_hospitals``.

    Args:
        settings: the experiment.
        hospital: this hospital's index (its partition).
        data_path: a hospital's own folder (deployment); it is then this
            hospital's whole dataset, split locally into train/val/test.

    Raises:
        DataError: missing or bad input, naming the file or key.
    """
    if not 0 <= hospital < settings.federation.num_hospitals and data_path is None:
        raise DataError(f"hospital {hospital} outside federation.num_hospitals="
                        f"{settings.federation.num_hospitals}")
    source = settings.data.source
    if source == "folder" or data_path is not None:
        return _from_folder(settings, hospital, data_path)
    if source == "medmnist":
        return _from_medmnist(settings, hospital)
    x, y = _synthetic(settings, hospital, settings.data.samples_per_hospital, stream=0)
    return _split(f"hospital-{hospital}", x, y, settings, hospital)


def load_pooled(settings: Settings) -> SiteData:
    """Every hospital's splits pooled (the centralized baseline's data)."""
    sites = [load_site(settings, h) for h in range(settings.federation.num_hospitals)]
    return SiteData("pooled", ConcatDataset([s.train for s in sites]),
                    ConcatDataset([s.val for s in sites]), ConcatDataset([s.test for s in sites]))


def load_central_test(settings: Settings) -> Dataset | None:
    """The source's own held-out test set, for central evaluation at the server.

    MedMNIST: the file's ``test`` split. Synthetic: an independent sample from
    every hospital's distribution. Folder: None (a hospital's images stay at
    the hospital).
    """
    if settings.data.source == "medmnist":
        return TensorDataset(*medmnist.load_split(Path(str(settings.data.path)), "test",
                                                  settings.task))
    if settings.data.source == "synthetic":
        n = max(1, settings.data.samples_per_hospital // 2)
        parts = [_synthetic(settings, h, n, stream=1)
                 for h in range(settings.federation.num_hospitals)]
        return TensorDataset(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return None
