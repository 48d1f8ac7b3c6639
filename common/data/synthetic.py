"""Built-in synthetic images: seeded, instant, no download, hospital-specific.

Classification: a smooth tissue-like background; an image of class ``k``
carries ``k`` bright round lesions (class 0 none), so the label is visible.
Segmentation: one to three overlapping ellipses (2D) or ellipsoids (3D), each
painted with its class's brightness; the mask holds the class of the top-most
shape at each pixel. Every hospital has its own "scanner" (gain, offset,
contrast gamma, noise level) and, for classification, its own class mix
(label skew): Dirichlet(``data.dirichlet_alpha``) when ``data.split`` is
``dirichlet``, mild otherwise. Everything is a pure function of
``(settings.seed, hospital, stream)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.config import Settings

MILD_SKEW_ALPHA = 20.0
"""Dirichlet concentration of the class mix when ``data.split`` is not ``dirichlet``."""

MIN_CLASS_SHARE = 0.05
"""Every class keeps at least this share at every hospital (before renormalising)."""


@dataclass(frozen=True)
class Scanner:
    """One hospital's acquisition: ``intensity = gain * x**gamma + offset + noise``.

    Attributes:
        gain: multiplicative intensity scale.
        offset: additive intensity shift.
        gamma: contrast curve exponent.
        noise: standard deviation of the Gaussian noise.
    """

    gain: float
    offset: float
    gamma: float
    noise: float


def scanner(seed: int, hospital: int) -> Scanner:
    """The scanner of ``hospital`` (deterministic)."""
    rng = np.random.default_rng([seed, hospital, 17])
    return Scanner(gain=float(rng.uniform(0.75, 1.25)), offset=float(rng.uniform(-0.05, 0.1)),
                   gamma=float(rng.uniform(0.8, 1.25)), noise=float(rng.uniform(0.03, 0.1)))


def class_mix(settings: Settings, hospital: int) -> np.ndarray:
    """Class probabilities at ``hospital``, shape ``[num_classes]``."""
    k = settings.task.num_classes
    rng = np.random.default_rng([settings.seed, hospital, 29])
    alpha = settings.data.dirichlet_alpha if settings.data.split == "dirichlet" else MILD_SKEW_ALPHA
    mix = np.maximum(rng.dirichlet(np.full(k, alpha)), MIN_CLASS_SHARE)
    return mix / mix.sum()


def _generator(*key: int) -> torch.Generator:
    seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


def _uniform(shape: tuple[int, ...], low: float, high: float, gen: torch.Generator
             ) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen)


def _background(n: int, size: list[int], gen: torch.Generator) -> torch.Tensor:
    """Smooth random texture in [0, 0.35], shape ``[n, 1, *size]``."""
    coarse = torch.rand(n, 1, *[max(2, s // 7) for s in size], generator=gen)
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return 0.35 * F.interpolate(coarse, size=size, mode=mode, align_corners=False)


def _ellipsoids(n: int, size: list[int], gen: torch.Generator, radius: tuple[float, float],
                margin: float) -> torch.Tensor:
    """``n`` random axis-aligned ellipsoids as inside-ness ``1 - r^2``, ``[n, 1, *size]``.

    Coordinates run over [-1, 1] per axis; centres lie within ``margin`` of
    the middle and radii are drawn from ``radius``. Positive values are inside.
    """
    dims = len(size)
    centre = _uniform((n, dims), -margin, margin, gen)
    radii = _uniform((n, dims), *radius, gen)
    inside = torch.ones(n, *size)
    for axis, s in enumerate(size):
        coord = torch.linspace(-1, 1, s).view([1] + [s if a == axis else 1 for a in range(dims)])
        c = centre[:, axis].view([n] + [1] * dims)
        r = radii[:, axis].view([n] + [1] * dims)
        inside = inside - ((coord - c) / r) ** 2
    return inside.unsqueeze(1)


def _acquire(clean: torch.Tensor, scan: Scanner, channels: int, gen: torch.Generator
             ) -> torch.Tensor:
    """Apply the scanner to clean ``[n, 1, *size]`` intensities in [0, 1]; ``[n, C, *size]``."""
    shape = (clean.shape[0], channels, *clean.shape[2:])
    signal = scan.gain * clean.clamp(0, 1) ** scan.gamma + scan.offset
    return (signal.expand(shape) + scan.noise * torch.randn(shape, generator=gen)).float()


def classification(settings: Settings, hospital: int, n: int, *, stream: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of ``hospital``.

    Args:
        settings: the experiment (seed, task, split, alpha).
        hospital: hospital index (selects scanner and class mix).
        n: number of images.
        stream: an independent sample of the same distribution (the central
            test set uses its own stream).

    Returns:
        Images ``[n, C, *image_size]`` float32 (about [0, 1]) and labels
        ``[n]`` int64.
    """
    task = settings.task
    gen = _generator(settings.seed, hospital, stream, 1)
    rng = np.random.default_rng([settings.seed, hospital, stream, 2])
    labels = torch.from_numpy(rng.choice(task.num_classes, size=n, p=class_mix(settings, hospital)))
    images = _background(n, task.image_size, gen)
    for lesion in range(task.num_classes - 1):  # class k shows lesions 0..k-1
        inside = _ellipsoids(n, task.image_size, gen, (0.14, 0.28), margin=0.55)
        present = (labels > lesion).float().view([n] + [1] * (images.ndim - 1))
        images = images + present * 0.65 * torch.sigmoid(8 * inside)
    images = _acquire(images, scanner(settings.seed, hospital), task.in_channels, gen)
    return images, labels.long()


def segmentation(settings: Settings, hospital: int, n: int, *, stream: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of ``hospital`` and their masks.

    Returns:
        Images ``[n, C, *image_size]`` float32 and masks ``[n, 1, *image_size]``
        int64 (0 background, 1..num_classes-1 the shapes' classes).
    """
    task = settings.task
    gen = _generator(settings.seed, hospital, stream, 3)
    images = _background(n, task.image_size, gen)
    masks = torch.zeros(n, 1, *task.image_size, dtype=torch.long)
    count = torch.randint(1, 4, (n,), generator=gen)
    view = [n] + [1] * (images.ndim - 1)
    radius = (0.15, 0.4) if task.spatial_dims == 2 else (0.3, 0.55)  # similar area / volume share
    for shape in range(3):
        cls = torch.randint(1, task.num_classes, (n,), generator=gen)
        inside = _ellipsoids(n, task.image_size, gen, radius, margin=0.45)
        alpha = torch.sigmoid(10 * inside) * (count > shape).float().view(view)
        level = (0.3 + 0.6 * cls / (task.num_classes - 1)).float().view(view)
        images = images * (1 - alpha) + level * alpha  # paint over what lies below
        masks = torch.where((inside > 0) & (count > shape).view(view), cls.view(view), masks)
    images = _acquire(images, scanner(settings.seed, hospital), task.in_channels, gen)
    return images, masks
