"""MedMNIST ``.npz`` files (e.g. PneumoniaMNIST), as published."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.config import TaskConfig
from common.data.errors import DataError

SPLITS = ("train", "val", "test")


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
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    except KeyError as err:
        raise DataError(f"{path} has no {err.args[0]!r} array; is it a MedMNIST .npz?") from None
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"cannot read MedMNIST file {path}: {err}") from None
    if labels.ndim == 2 and labels.shape[1] != 1:
        raise DataError(f"{path}: {labels.shape[1]} labels per image (multi-label) are not "
                        "supported; MedMNIST multi-class files have one")
    x = torch.from_numpy(images).float() / 255.0
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if x.shape[1] != task.in_channels:
        raise DataError(f"{path} has {x.shape[1]} channel(s) but task.in_channels="
                        f"{task.in_channels}")
    if list(x.shape[2:]) != list(task.image_size):
        if task.spatial_dims != 2:
            raise DataError(f"{path} holds 2D images; set task.spatial_dims=2")
        x = F.interpolate(x, size=list(task.image_size), mode="bilinear", align_corners=False)
    y = torch.from_numpy(labels.reshape(-1).astype(np.int64))
    if int(y.max()) >= task.num_classes:
        raise DataError(f"{path} has label {int(y.max())} but task.num_classes={task.num_classes}")
    return x, y
