"""Segmentation volumes in the MSD / nnU-Net layout (``imagesTr/``, ``labelsTr/``).

Each image/mask pair is loaded with MONAI, reoriented to RAS (hospitals
export LAS, RAS, LSA... alike), optionally resampled to ``data.spacing``,
intensity-normalised per volume (0.5-99.5 percentiles to [0, 1]), and turned
into samples: 2D slices along ``data.slice_axis``, 3D patches, or the whole
resized volume.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from monai.data import NibabelReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    Orientationd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

from common.config import Settings
from common.data.errors import DataError
from common.data.readers import suffix

Volume = tuple[torch.Tensor, torch.Tensor]  # image [1, X, Y, Z] float, mask [1, X, Y, Z] long


def pairs(folder: Path) -> list[tuple[Path, Path]]:
    """``(image, mask)`` paths of a MSD-layout folder, matched by file name.

    Raises:
        DataError: missing folder or sub-folder, an image without a mask, or
            no images at all.
    """
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    if not folder.is_dir():
        raise DataError(f"data folder {folder} not found")
    for sub in (images_dir, labels_dir):
        if not sub.is_dir():
            raise DataError(f"{folder} lacks {sub.name}/ (expected imagesTr/ and labelsTr/)")
    found = []
    for image in sorted(p for p in images_dir.iterdir() if suffix(p) in (".nii", ".nii.gz")):
        mask = labels_dir / image.name
        if not mask.is_file():
            raise DataError(f"{image} has no mask: {mask} not found")
        found.append((image, mask))
    if not found:
        raise DataError(f"{images_dir} holds no NIfTI images (.nii/.nii.gz)")
    return found


def load_volume(image: Path, mask: Path, settings: Settings) -> Volume:
    """One reoriented, resampled, normalised volume and its integer mask.

    Raises:
        DataError: an unreadable file, or a mask whose grid differs from its
            image (both files and shapes named).
    """
    keys = ["image", "label"]
    steps = [LoadImaged(keys, reader=NibabelReader, image_only=True),
             EnsureChannelFirstd(keys)]
    try:
        loaded = Compose(steps)({"image": str(image), "label": str(mask)})
    except Exception as err:  # noqa: BLE001 - any decoder failure is reported the same way
        raise DataError(f"cannot read {image} / {mask}: {str(err).splitlines()[0][:200]}"
                        ) from None
    if loaded["image"].shape[1:] != loaded["label"].shape[1:]:
        raise DataError(f"mask {mask} has shape {tuple(loaded['label'].shape[1:])} but its "
                        f"image {image} has shape {tuple(loaded['image'].shape[1:])}")
    post: list[MapTransform] = [Orientationd(keys, axcodes="RAS")]
    if settings.data.spacing:
        post.append(Spacingd(keys, pixdim=settings.data.spacing, mode=("bilinear", "nearest")))
    post.append(ScaleIntensityRangePercentilesd("image", lower=0.5, upper=99.5, b_min=0.0,
                                                b_max=1.0, clip=True))
    out = Compose(post)(loaded)
    return torch.as_tensor(out["image"]).float(), torch.as_tensor(out["label"]).round().long()


def _resize(x: torch.Tensor, size: list[int], *, mask: bool) -> torch.Tensor:
    if mask:
        return F.interpolate(x.float(), size=size, mode="nearest").long()
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def slices(volume: Volume, settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """2D samples along ``data.slice_axis``: images ``[S, 1, H, W]``, masks ``[S, 1, H, W]``.

    Slices whose mask covers less than ``data.min_foreground`` of the slice
    are dropped; slices stay in anatomical order (neighbours adjacent).
    """
    image, mask = volume
    axis = settings.data.slice_axis + 1
    imgs = image.movedim(axis, 0)  # [S, 1, a, b]
    masks = mask.movedim(axis, 0)
    fg = (masks > 0).flatten(1).float().mean(1)
    keep = fg >= settings.data.min_foreground if settings.data.min_foreground > 0 else fg >= 0
    size = list(settings.task.image_size)
    return _resize(imgs[keep], size, mask=False), _resize(masks[keep], size, mask=True)


def _grid_patches(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    """Non-overlapping ``size`` patches of ``x`` ``[1, X, Y, Z]``: ``[P, 1, *size]``."""
    for dim, step in enumerate(size, start=1):
        x = x.unfold(dim, step, step)
    return x.reshape(1, -1, *size).movedim(1, 0)


def patches(volume: Volume, settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """3D samples: a grid of ``task.image_size`` patches (``patches``) or the resized volume."""
    image, mask = volume
    size = list(settings.task.image_size)
    if settings.data.volume_mode == "volume":
        return _resize(image[None], size, mask=False), _resize(mask[None], size, mask=True)
    pad = [max(0, s - d) for s, d in zip(size, image.shape[1:], strict=True)]
    padding = [p for amount in reversed(pad) for p in (0, amount)]
    image, mask = F.pad(image, padding), F.pad(mask, padding)
    img_p, msk_p = _grid_patches(image, size), _grid_patches(mask, size)
    fg = (msk_p > 0).flatten(1).float().mean(1)
    keep = fg >= settings.data.min_foreground
    return img_p[keep], msk_p[keep]


def samples(folder: Path, settings: Settings) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Every sample of every volume in ``folder``.

    Returns:
        Images ``[N, 1, *image_size]``, masks ``[N, 1, *image_size]`` and the
        number of samples contributed by each volume (in order).
    """
    images, masks, counts = [], [], []
    for image_path, mask_path in pairs(folder):
        volume = load_volume(image_path, mask_path, settings)
        if settings.task.spatial_dims == 2:
            x, y = slices(volume, settings)
        else:
            x, y = patches(volume, settings)
        images.append(x)
        masks.append(y)
        counts.append(len(x))
    if settings.task.in_channels != 1:
        raise DataError(f"{folder}: NIfTI volumes have 1 channel; set task.in_channels=1")
    return torch.cat(images), torch.cat(masks), counts
