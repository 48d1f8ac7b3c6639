"""Fitting images and masks to ``task.image_size`` with MONAI's resampling.

Images are resized with (bi/tri)linear interpolation and anti-aliasing when
shrinking; masks with ``nearest-exact`` so class indices stay integers and line
up with the image. :func:`pad_to_aspect` first pads a grid to the target's
aspect ratio in millimetres, so anatomy keeps its shape (no stretching) and
every output pixel is square.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.transforms import Resize, SpatialPad
from monai.utils import convert_to_tensor


def resize_image(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize channel-first ``x`` ``[C, *spatial]`` to ``[C, *size]`` (float32).

    Works on a stack of 2D slices too: pass them as channels ``[S, H, W]``.
    """
    if list(x.shape[1:]) == list(size):
        return convert_to_tensor(x, dtype=torch.float32, track_meta=False)
    mode = "bilinear" if len(size) == 2 else "trilinear"
    shrinking = any(s < d for s, d in zip(size, x.shape[1:], strict=True))
    resize = Resize(list(size), mode=mode, align_corners=False, anti_aliasing=shrinking)
    return convert_to_tensor(resize(x.float()), dtype=torch.float32, track_meta=False)


def resize_mask(y: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize an integer mask ``[C, *spatial]`` to ``[C, *size]`` (int64), nearest-exact."""
    if list(y.shape[1:]) == list(size):
        return convert_to_tensor(y, track_meta=False).long()
    resized = Resize(list(size), mode="nearest-exact")(y.float())
    return convert_to_tensor(resized, track_meta=False).round().long()


def padded_shape(shape: Sequence[int], spacing: Sequence[float], size: Sequence[int]
                 ) -> list[int]:
    """The grid that covers ``shape`` voxels of ``spacing`` mm with ``size``'s aspect ratio.

    Args:
        shape: voxels per axis.
        spacing: voxel size per axis, in mm.
        size: the target grid (pixels per axis).

    Returns:
        Voxels per axis (each >= ``shape``) whose physical extents in mm are
        proportional to ``size``.
    """
    mm_per_pixel = max(n * p / s for n, p, s in zip(shape, spacing, size, strict=True))
    return [max(n, math.floor(mm_per_pixel * s / p + 0.5))
            for n, p, s in zip(shape, spacing, size, strict=True)]


def pad_to_aspect(x: torch.Tensor, spacing: Sequence[float], size: Sequence[int],
                  *, skip_axis: int | None = None) -> torch.Tensor:
    """Zero-pad ``x`` ``[C, *spatial]`` symmetrically to ``size``'s aspect ratio in mm.

    Args:
        x: channel-first image or mask.
        spacing: voxel size per spatial axis, in mm.
        size: target pixels per padded axis (one per axis other than
            ``skip_axis``).
        skip_axis: a spatial axis left as it is (the slicing axis).
    """
    axes = [a for a in range(x.ndim - 1) if a != skip_axis]
    target = padded_shape([x.shape[1 + a] for a in axes], [spacing[a] for a in axes], size)
    full = [-1] * (x.ndim - 1)  # -1: keep that axis
    for axis, n in zip(axes, target, strict=True):
        full[axis] = n
    return torch.as_tensor(SpatialPad(full, method="symmetric")(x))
