"""One hospital's train / val / test data, whatever the source.

Splitting rules (all seeded by ``settings.seed``):

* synthetic: each hospital's own generated images, divided at random.
* medmnist: see :mod:`common.data.medmnist`.
* folder, classification: with ``split=natural`` (or a deployed hospital's
  own ``data_path``) one folder is the hospital's whole dataset; with
  ``iid`` / ``dirichlet`` the CSV rows of ``data.path`` are partitioned among
  hospitals by label first. Images are then divided at random.
* folder, segmentation: neighbouring slices of a volume are nearly
  identical, so they must not sit on both sides of a train/test split. When
  a hospital has enough volumes for every split to get at least one, whole
  volumes are assigned to train/val/test; otherwise each volume is cut into
  contiguous blocks of ``data.slice_block`` slices and whole blocks are
  assigned (only the slices at a block's two ends have a neighbour in
  another split). Pooled ``iid`` folders are shared among hospitals the same
  way: whole volumes when there are at least as many as hospitals, else
  blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

from common.config import Settings
from common.data import medmnist, synthetic
from common.data.errors import DataError
from common.data.labelled_folder import load_labelled, read_labels
from common.data.partition import (
    contiguous_blocks,
    iid_partition,
    partition,
    three_way_groups,
)
from common.data.volumes import VolumeSamples, load_samples
from common.participation import taking_part


@dataclass
class SiteData:
    """One hospital's splits; items are ``(image, target)`` tuples.

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


def _singletons(n: int) -> list[np.ndarray]:
    return [np.array([i]) for i in range(n)]


def _assemble(name: str, x: torch.Tensor, y: torch.Tensor, groups: list[np.ndarray],
              settings: Settings, hospital: int) -> SiteData:
    """Divide ``x``/``y`` into train/val/test, keeping each group on one side."""
    train, val, test = three_way_groups(groups, settings.data.val_fraction,
                                        settings.data.test_fraction, _rng(settings, hospital, 5))
    if len(train) == 0:
        raise DataError(f"{name}: {len(x)} samples leave none for training after "
                        f"data.val_fraction and data.test_fraction; add data")
    return SiteData(name, *(TensorDataset(x[i], y[i]) for i in (train, val, test)))


def _enough_volumes(count: int, settings: Settings) -> bool:
    """Whether ``count`` volumes give every non-empty split a whole volume and leave one."""
    held = [round(f * count) for f in (settings.data.val_fraction, settings.data.test_fraction)
            if f > 0]
    return all(h >= 1 for h in held) and count - sum(held) >= 1


def _block(settings: Settings) -> int:
    return settings.data.slice_block if settings.task.spatial_dims == 2 else 1


def _volume_groups(volume: np.ndarray, settings: Settings) -> list[np.ndarray]:
    """Split units of slices/patches from volumes: whole volumes, or contiguous blocks."""
    if _enough_volumes(len(np.unique(volume)), settings):
        return contiguous_blocks(volume, len(volume))  # one group per volume
    return contiguous_blocks(volume, _block(settings))


def site_folders(settings: Settings) -> list[Path]:
    """The per-hospital sub-folders of ``data.path`` for a natural split, sorted by name.

    Raises:
        DataError: missing folder, or a count different from the hospitals.
    """
    root = Path(str(settings.data.path))
    if not root.is_dir():
        raise DataError(f"data.path: folder {root} not found")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) != settings.federation.num_hospitals:
        raise DataError(f"data.split=natural: {root} holds {len(folders)} hospital folders but "
                        f"federation.num_hospitals={settings.federation.num_hospitals}")
    return folders


def split_labelled(name: str, x: torch.Tensor, y: torch.Tensor, settings: Settings,
                   hospital: int) -> SiteData:
    """One hospital's images ``x`` and classes ``y`` divided at random into its splits."""
    return _assemble(name, x, y, _singletons(len(x)), settings, hospital)


def split_samples(name: str, samples: VolumeSamples, settings: Settings,
                  hospital: int) -> SiteData:
    """One hospital's slices/patches divided into its splits by whole volumes or blocks."""
    return _assemble(name, samples.images, samples.masks,
                     _volume_groups(samples.volume, settings), settings, hospital)


def pooled_rows(labels: np.ndarray, settings: Settings, hospital: int) -> np.ndarray:
    """Indices of the pooled CSV rows (classes ``labels``) that go to ``hospital``."""
    return partition(labels, settings.federation.num_hospitals, settings.data.split,
                     settings.data.dirichlet_alpha, _rng(settings, 3), min_size=1)[hospital]


def check_pooled_split(settings: Settings) -> None:
    """Raise :class:`DataError` if a pooled folder of the task cannot be shared by ``data.split``.

    Raises:
        DataError: ``data.split=dirichlet`` for segmentation (label skew needs image labels).
    """
    if settings.data.split == "dirichlet" and settings.task.kind == "segmentation":
        raise DataError("data.split=dirichlet skews image labels and needs task.kind="
                        "classification; share segmentation folders with iid or natural")


def pooled_samples(samples: VolumeSamples, settings: Settings, hospital: int) -> VolumeSamples:
    """``hospital``'s share of a pooled segmentation folder: whole volumes, else blocks."""
    parts = settings.federation.num_hospitals
    units = (contiguous_blocks(samples.volume, len(samples.volume))
             if len(np.unique(samples.volume)) >= parts
             else contiguous_blocks(samples.volume, _block(settings)))
    mine = iid_partition(len(units), parts, _rng(settings, 3))[hospital]
    share = np.concatenate([units[i] for i in mine])
    return VolumeSamples(samples.images[share], samples.masks[share], samples.volume[share])


def _whole_folder(folder: Path, settings: Settings, hospital: int) -> SiteData:
    """A folder that is one hospital's whole dataset."""
    if settings.task.kind == "segmentation":
        return split_samples(folder.name, load_samples(folder, settings), settings, hospital)
    x, y = load_labelled(read_labels(folder, settings.data.labels_csv), settings.task)
    return split_labelled(folder.name, x, y, settings, hospital)


def _folder_share(settings: Settings, hospital: int) -> SiteData:
    """Hospital ``hospital``'s share of one pooled folder (``iid`` / ``dirichlet``)."""
    folder, name = Path(str(settings.data.path)), f"hospital-{hospital}"
    if settings.task.kind == "classification":
        rows = read_labels(folder, settings.data.labels_csv)
        share = pooled_rows(np.array([label for _, label in rows]), settings, hospital)
        x, y = load_labelled([rows[i] for i in share], settings.task)
        return split_labelled(name, x, y, settings, hospital)
    check_pooled_split(settings)  # before reading any volume
    samples = pooled_samples(load_samples(folder, settings), settings, hospital)
    return split_samples(name, samples, settings, hospital)


def _synthetic(settings: Settings, hospital: int, n: int, stream: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    make = (synthetic.classification if settings.task.kind == "classification"
            else synthetic.segmentation)
    return make(settings, hospital, n, stream=stream)


def load_site(settings: Settings, hospital: int, *, data_path: str | None = None) -> SiteData:
    """Data of hospital ``hospital`` (0-based) out of ``federation.num_hospitals``.

    Args:
        settings: the experiment.
        hospital: this hospital's index (its partition, and the seed of its
            local split).
        data_path: a hospital's own folder (deployment, from its node
            config). It is then this hospital's whole dataset, read as a
            ``folder`` source whatever ``data.source`` says, and divided
            locally by ``data.val_fraction`` / ``data.test_fraction``.

    Returns:
        The hospital's splits; items ``(image, target)`` with image float32
        ``[C, *task.image_size]`` and target an int64 class index or an int64
        mask ``[1, *task.image_size]``.

    Raises:
        DataError: missing or bad input, naming the file or key.
    """
    if data_path is not None:
        return _whole_folder(Path(data_path), settings, hospital)
    if not 0 <= hospital < settings.federation.num_hospitals:
        raise DataError(f"hospital {hospital} outside federation.num_hospitals="
                        f"{settings.federation.num_hospitals}")
    if settings.data.source == "medmnist":
        return SiteData(f"hospital-{hospital}", *medmnist.site_splits(settings, hospital))
    if settings.data.source == "folder":
        if settings.data.split == "natural":
            return _whole_folder(site_folders(settings)[hospital], settings, hospital)
        return _folder_share(settings, hospital)
    x, y = _synthetic(settings, hospital, settings.data.samples_per_hospital, stream=0)
    return _assemble(f"hospital-{hospital}", x, y, _singletons(len(x)), settings, hospital)


def load_pooled(settings: Settings) -> SiteData:
    """The train/val/test of the hospitals taking part, pooled, for the centralized baseline."""
    sites = [load_site(settings, h) for h in taking_part(settings)]
    return SiteData("pooled", ConcatDataset([s.train for s in sites]),
                    ConcatDataset([s.val for s in sites]), ConcatDataset([s.test for s in sites]))


def load_central_test(settings: Settings) -> Dataset | None:
    """The source's own held-out test set, for central evaluation at the server.

    MedMNIST: the file's ``test`` split. Synthetic: ``samples_per_hospital // 2``
    fresh images from each hospital's distribution (its own random stream, so
    none of them is in any hospital's data). Folder: None (a hospital's
    images stay at the hospital).
    """
    if settings.data.source == "medmnist":
        return medmnist.central_test(settings)
    if settings.data.source == "synthetic":
        n = max(1, settings.data.samples_per_hospital // 2)
        parts = [_synthetic(settings, h, n, stream=1)
                 for h in range(settings.federation.num_hospitals)]
        return TensorDataset(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return None
