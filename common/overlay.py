"""PNG overlays of a heatmap on its image (Pillow): 2D images, and 3D montages.

The image is drawn in grey, the heatmap on top as a blue-to-red colour map
with a constant alpha, and the heatmap's peak as a small white cross. A 3D
volume ``[X, Y, Z]`` (RAS) becomes a montage of the sagittal, coronal and
axial slices through the peak.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common.atomic import atomic_file

ANCHORS = np.array([[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0],
                    [128, 0, 0]], dtype=np.float64)
"""The colour map's colours (RGB) at evenly spaced heat values from 0 to 1 (a jet-like map)."""

MIN_SIDE = 224
"""Pixels of a panel's shorter side at least (small images are enlarged)."""


def colour_map(heat: np.ndarray) -> np.ndarray:
    """RGB uint8 ``[*shape, 3]`` of ``heat`` values in [0, 1]."""
    stops = np.linspace(0.0, 1.0, len(ANCHORS))
    values = np.clip(heat, 0.0, 1.0)
    channels = [np.interp(values, stops, ANCHORS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def _grey(image: np.ndarray) -> np.ndarray:
    """``image`` min-max scaled to uint8 grey RGB ``[*shape, 3]``."""
    low, high = float(image.min()), float(image.max())
    scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
    grey = (scaled * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def overlay(image: np.ndarray, heat: np.ndarray, peak: tuple[int, int] | None = None,
            *, alpha: float = 0.45) -> Image.Image:
    """One 2D panel: ``image`` ``[H, W]`` in grey under ``heat`` ``[H, W]`` in [0, 1].

    Args:
        image: pixel intensities (any range), row 0 at the top.
        heat: heatmap on the same grid.
        peak: ``(row, column)`` marked with a cross; None = no mark.
        alpha: opacity of the heatmap.
    """
    blend = (1 - alpha) * _grey(image) + alpha * colour_map(heat)
    panel = Image.fromarray(blend.astype(np.uint8), mode="RGB")
    scale = max(1, -(-MIN_SIDE // min(image.shape)))
    panel = panel.resize((image.shape[1] * scale, image.shape[0] * scale), Image.Resampling.NEAREST)
    if peak is not None:
        row, col = (peak[0] + 0.5) * scale, (peak[1] + 0.5) * scale
        arm = max(4, scale)
        draw = ImageDraw.Draw(panel)
        draw.line([(col - arm, row), (col + arm, row)], fill=(255, 255, 255), width=2)
        draw.line([(col, row - arm), (col, row + arm)], fill=(255, 255, 255), width=2)
    return panel


def _slices(volume: np.ndarray, peak: tuple[int, ...]) -> list[tuple[str, np.ndarray, tuple]]:
    """Sagittal, coronal and axial slices through ``peak`` of a RAS ``[X, Y, Z]`` array,
    each rotated so superior (or anterior) is up, with the peak's place in it."""
    x, y, z = peak
    sx, sy, sz = volume.shape
    return [("sagittal", np.rot90(volume[x]), (sz - 1 - z, y)),
            ("coronal", np.rot90(volume[:, y]), (sz - 1 - z, x)),
            ("axial", np.rot90(volume[:, :, z]), (sy - 1 - y, x))]


def montage(volume: np.ndarray, heat: np.ndarray, peak: tuple[int, ...]) -> Image.Image:
    """Sagittal, coronal and axial overlays through ``peak`` side by side, labelled.

    Args:
        volume: ``[X, Y, Z]`` intensities (RAS axes).
        heat: ``[X, Y, Z]`` heatmap in [0, 1].
        peak: ``(x, y, z)`` voxel of the heatmap's peak.
    """
    panels = [overlay(img, hm, mark)
              for (_, img, mark), (_, hm, _) in zip(_slices(volume, peak), _slices(heat, peak),
                                                    strict=True)]
    names = [f"{name} {axis}={index}" for (name, _, _), axis, index
             in zip(_slices(volume, peak), "xyz", peak, strict=True)]
    gap, caption = 8, 18
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    sheet = Image.new("RGB", (width, max(p.height for p in panels) + caption), (0, 0, 0))
    draw, left = ImageDraw.Draw(sheet), 0
    for panel, name in zip(panels, names, strict=True):
        sheet.paste(panel, (left, caption))
        draw.text((left + 4, 3), name, fill=(255, 255, 255))
        left += panel.width + gap
    return sheet


def explanation_png(image: np.ndarray, heat: np.ndarray, peak: tuple[int, ...]) -> Image.Image:
    """The overlay of one image ``[C, *spatial]`` (channels averaged): panel (2D), montage (3D)."""
    grey = image.mean(axis=0)
    if grey.ndim == 2:
        return overlay(grey, heat, (peak[0], peak[1]))
    if grey.ndim == 3:
        return montage(grey, heat, peak)
    raise ValueError(f"cannot draw a {grey.ndim}D image; 2D and 3D only")


def save_png(picture: Image.Image, path: Path) -> None:
    """Write ``picture`` to ``path`` as PNG, completely or not at all."""
    with atomic_file(path) as handle:
        picture.save(handle, format="PNG")
