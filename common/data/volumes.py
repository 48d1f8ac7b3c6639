"""Segmentation volumes in the MSD / nnU-Net layout (``imagesTr/``, ``labelsTr/``).

Each image/mask pair is loaded with MONAI, reoriented to RAS (hospitals
export LAS, RAS, LSA... alike, so axis 2 is then always inferior-superior),
optionally resampled to ``data.spacing`` mm, intensity-normalised per volume
(0.5-99.5 percentiles to [0, 1]) and turned into samples:

* ``slices`` (``task.spatial_dims=2``): 2D slices along ``data.slice_axis``,
  kept when their mask covers at least ``data.min_foreground`` of the slice;
* ``patches`` (3D): a grid of non-overlapping ``task.image_size`` patches
  (the volume zero-padded to a whole number of patches), kept by the same
  foreground rule;
* ``volume`` (3D): the whole volume resized to ``task.image_size``.

Slices and whole volumes are first zero-padded to the target's aspect ratio
in millimetres, then resized (image: linear with anti-aliasing; mask:
nearest), so anatomy is never stretched and output pixels are square.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import (
    Compose,
    MapTransform,
    Orientationd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)
from monai.utils import convert_to_tensor

from common.config import Settings
from common.data.errors import (
    INCOMPATIBLE,
    LAYOUT,
    MISSING_FILE,
    OUT_OF_RANGE,
    SHAPE_MISMATCH,
    DataError,
)
from common.data.readers import load, suffix
from common.data.resize import pad_to_aspect, resize_image, resize_mask

KEYS = ("image", "label")


@dataclass(frozen=True)
class Volume:
    """One reoriented volume and its mask, channel-first.

    Attributes:
        image: float32 ``[1, X, Y, Z]`` in [0, 1], RAS axes.
        mask: int64 ``[1, X, Y, Z]`` class indices.
        spacing: voxel size along X, Y, Z in mm.
    """

    image: torch.Tensor
    mask: torch.Tensor
    spacing: tuple[float, float, float]


@dataclass(frozen=True)
class VolumeSamples:
    """Every sample cut from the volumes of one folder.

    Attributes:
        images: float32 ``[N, 1, *image_size]``.
        masks: int64 ``[N, 1, *image_size]``.
        volume: index of the volume each sample came from, ``[N]``; the
            samples of one volume are adjacent and in anatomical order.
    """

    images: torch.Tensor
    masks: torch.Tensor
    volume: np.ndarray


def mask_of(image: Path, labels_dir: Path) -> Path:
    """The mask of ``image``: same name (MSD), or without nnU-Net's ``_0000`` channel tag."""
    ext = suffix(image)
    stem = image.name[: -len(ext)]
    channel = re.fullmatch(r"(.+)_(\d{4})", stem)
    if channel and channel.group(2) != "0000":
        raise DataError(f"{image}: multi-channel images (nnU-Net channel {channel.group(2)}) "
                        "are not supported; keep one channel (_0000) per case",
                        kind=INCOMPATIBLE, file=image)
    candidates = [labels_dir / image.name]
    if channel:
        candidates.append(labels_dir / f"{channel.group(1)}{ext}")
    for mask in candidates:
        if mask.is_file():
            return mask
    raise DataError(f"{image} has no mask: {' or '.join(map(str, candidates))} not found",
                    kind=MISSING_FILE, file=image)


def pairs(folder: Path, subset: str = "Tr") -> list[tuple[Path, Path]]:
    """``(image, mask)`` paths of a MSD / nnU-Net folder, matched by file name.

    ``subset`` ``Tr`` reads ``imagesTr/`` + ``labelsTr/``; ``Ts`` the test pair.

    Raises:
        DataError: missing folder or sub-folder, an image without a mask, or
            no images at all.
    """
    images_dir, labels_dir = folder / f"images{subset}", folder / f"labels{subset}"
    if not folder.is_dir():
        raise DataError(f"data folder {folder} not found", kind=LAYOUT, file=folder)
    for sub in (images_dir, labels_dir):
        if not sub.is_dir():
            raise DataError(f"{folder} lacks {sub.name}/ (expected images{subset}/ and "
                            f"labels{subset}/)",
                            kind=LAYOUT, file=sub)
    found = []
    for image in sorted(p for p in images_dir.iterdir() if not p.name.startswith(".")):
        if suffix(image) not in (".nii", ".nii.gz"):
            raise DataError(f"{image}: unknown volume extension {suffix(image)!r}; "
                            "imagesTr/ holds NIfTI files (.nii, .nii.gz)", kind=INCOMPATIBLE,
                            file=image)
        found.append((image, mask_of(image, labels_dir)))
    if not found:
        raise DataError(f"{images_dir} holds no NIfTI images (.nii/.nii.gz)", kind=LAYOUT,
                        file=images_dir)
    return found


def _load(image: Path, mask: Path) -> dict[str, torch.Tensor]:
    """Both files, channel-first with their affines, as stored (no reorientation yet)."""
    return {"image": load(image), "label": load(mask)}


def load_volume(image: Path, mask: Path, settings: Settings) -> Volume:
    """One reoriented, resampled, normalised volume and its integer mask.

    Raises:
        DataError: an unreadable file, a mask whose grid differs from its
            image (both files and shapes named), or mask values outside
            ``[0, task.num_classes)``.
    """
    return prepare_volume(_load(image, mask), image, mask, settings)


def prepare_volume(loaded: dict[str, torch.Tensor], image: Path, mask: Path,
                   settings: Settings) -> Volume:
    """:func:`load_volume` of files already read (``{"image": ..., "label": ...}``, as stored).

    Raises:
        DataError: as :func:`load_volume`, but for unreadable files.
    """
    if loaded["image"].shape[1:] != loaded["label"].shape[1:]:
        raise DataError(f"mask {mask} has shape {tuple(loaded['label'].shape[1:])} but its "
                        f"image {image} has shape {tuple(loaded['image'].shape[1:])}",
                        kind=SHAPE_MISMATCH, file=mask)
    steps: list[MapTransform] = [Orientationd(list(KEYS), axcodes="RAS", labels=None)]
    if settings.data.spacing:
        steps.append(Spacingd(list(KEYS), pixdim=settings.data.spacing,
                              mode=("bilinear", "nearest")))
    steps.append(ScaleIntensityRangePercentilesd("image", lower=0.5, upper=99.5, b_min=0.0,
                                                 b_max=1.0, clip=True))
    out = Compose(steps)(loaded)
    labels = convert_to_tensor(out["label"], track_meta=False).round().long()
    bad = sorted({v for v in labels.unique().tolist() if not 0 <= v < settings.task.num_classes})
    if bad:
        raise DataError(f"mask {mask} holds class(es) {bad} outside [0, task.num_classes="
                        f"{settings.task.num_classes})", kind=OUT_OF_RANGE, file=mask)
    x, y, z = (float(p) for p in out["image"].pixdim)
    return Volume(convert_to_tensor(out["image"], dtype=torch.float32, track_meta=False),
                  labels, (x, y, z))


def _foreground(masks: torch.Tensor) -> torch.Tensor:
    """Share of non-background pixels of each sample ``[N, 1, ...]``: ``[N]``."""
    return (masks > 0).flatten(1).float().mean(1)


def slices(volume: Volume, settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """2D samples along ``data.slice_axis``: images and masks ``[S, 1, *image_size]``.

    Slices whose mask covers less than ``data.min_foreground`` of the
    (resized) slice are dropped; slices stay in anatomical order.
    """
    axis, size = settings.data.slice_axis, settings.task.image_size
    image = pad_to_aspect(volume.image, volume.spacing, size, skip_axis=axis)
    mask = pad_to_aspect(volume.mask, volume.spacing, size, skip_axis=axis)
    images = resize_image(image[0].movedim(axis, 0), size).unsqueeze(1)  # slices as channels
    masks = resize_mask(mask[0].movedim(axis, 0), size).unsqueeze(1)
    keep = _foreground(masks) >= settings.data.min_foreground
    return images[keep], masks[keep]


def _grid_patches(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    """Non-overlapping ``size`` patches of ``x`` ``[1, X, Y, Z]``: ``[P, 1, *size]``."""
    pad = [-d % s for d, s in zip(x.shape[1:], size, strict=True)]
    x = torch.nn.functional.pad(x, [p for amount in reversed(pad) for p in (0, amount)])
    for dim, step in enumerate(size, start=1):
        x = x.unfold(dim, step, step)
    return x.reshape(1, -1, *size).movedim(1, 0)


def patches(volume: Volume, settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """3D samples ``[P, 1, *image_size]``: a patch grid (``patches``) or the resized volume."""
    size = list(settings.task.image_size)
    if settings.data.volume_mode == "volume":
        image = pad_to_aspect(volume.image, volume.spacing, size)
        mask = pad_to_aspect(volume.mask, volume.spacing, size)
        return resize_image(image, size)[None], resize_mask(mask, size)[None]
    images, masks = _grid_patches(volume.image, size), _grid_patches(volume.mask, size)
    keep = _foreground(masks) >= settings.data.min_foreground
    return images[keep], masks[keep]


def volume_samples(volume: Volume, settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples of one volume: slices (2D tasks) or patches / the whole volume (3D)."""
    if settings.task.spatial_dims == 2:
        return slices(volume, settings)
    return patches(volume, settings)


def check_volume_task(folder: Path, settings: Settings) -> None:
    """Raise :class:`DataError` if the task cannot take ``folder``'s volumes.

    Raises:
        DataError: ``task.in_channels`` other than 1, or a ``data.volume_mode``
            that does not fit ``task.spatial_dims``.
    """
    if settings.task.in_channels != 1:
        raise DataError(f"{folder}: NIfTI volumes have 1 channel; set task.in_channels=1",
                        kind=INCOMPATIBLE, file=folder)
    if (settings.task.spatial_dims == 2) != (settings.data.volume_mode == "slices"):
        raise DataError(f"data.volume_mode={settings.data.volume_mode} does not fit task."
                        f"spatial_dims={settings.task.spatial_dims}: 2D tasks use slices, "
                        "3D tasks patches or volume", kind=INCOMPATIBLE)


def load_samples(folder: Path, settings: Settings, *, subset: str = "Tr") -> VolumeSamples:
    """Every sample of every volume in ``folder`` (see the module docstring).

    Raises:
        DataError: bad layout or files (see :func:`pairs`, :func:`load_volume`),
            ``task.in_channels`` other than 1, a ``data.volume_mode`` that
            does not fit ``task.spatial_dims``, or no sample left after the
            ``data.min_foreground`` filter.
    """
    check_volume_task(folder, settings)
    images, masks, volume_ids = [], [], []
    for index, (image_path, mask_path) in enumerate(pairs(folder, subset)):
        x, y = volume_samples(load_volume(image_path, mask_path, settings), settings)
        images.append(x)
        masks.append(y)
        volume_ids.append(np.full(len(x), index))
    if sum(len(x) for x in images) == 0:
        raise DataError(f"{folder}: no sample has a foreground share >= "
                        f"data.min_foreground={settings.data.min_foreground}")
    return VolumeSamples(torch.cat(images), torch.cat(masks), np.concatenate(volume_ids))
