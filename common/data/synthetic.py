"""Built-in synthetic images: seeded, instant, no download, hospital-specific.

Classification: smooth tissue-like background; class ``k`` carries ``k``
bright round lesions (class 0 none). Segmentation: one to three ellipsoid
structures, each labelled with a foreground class, brighter than the
background. Every hospital has its own "scanner": gain, offset, contrast
(gamma) and noise level, and, for classification, its own class mix (label
skew), all drawn from the experiment seed and the hospital index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.config import Settings


@dataclass(frozen=True)
class Scanner:
    """One hospital's acquisition differences (intensity = gain * x**gamma + offset + noise)."""

    gain: float
    offset: float
    gamma: float
    noise: float


def scanner(seed: int, hospital: int) -> Scanner:
    """The scanner of ``hospital`` (deterministic)."""
    rng = np.random.default_rng([seed, hospital, 17])
    return Scanner(gain=float(rng.uniform(0.7, 1.3)), offset=float(rng.uniform(-0.1, 0.1)),
                   gamma=float(rng.uniform(0.8, 1.25)), noise=float(rng.uniform(0.04, 0.12)))


def class_mix(settings: Settings, hospital: int) -> np.ndarray:
    """Class probabilities at ``hospital``: Dirichlet label skew, or mild skew for iid."""
    k = settings.task.num_classes
    rng = np.random.default_rng([settings.seed, hospital, 29])
    alpha = settings.data.dirichlet_alpha if settings.data.split == "dirichlet" else 20.0
    mix = rng.dirichlet(np.full(k, alpha))
    mix = np.maximum(mix, 0.05)  # every class appears at every hospital
    return mix / mix.sum()


def _generator(*key: int) -> torch.Generator:
    seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


def _grid(size: list[int]) -> list[torch.Tensor]:
    axes = [torch.linspace(-1, 1, s) for s in size]
    return list(torch.meshgrid(*axes, indexing="ij"))


def _background(n: int, size: list[int], gen: torch.Generator) -> torch.Tensor:
    """Smooth random texture in [0, 0.4], shape ``[n, 1, *size]``."""
    coarse = torch.rand(n, 1, *[max(2, s // 7) for s in size], generator=gen)
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return 0.4 * F.interpolate(coarse, size=size, mode=mode, align_corners=False)


def _blob(grid: list[torch.Tensor], gen: torch.Generator, radius: tuple[float, float],
          margin: float = 0.55) -> torch.Tensor:
    """A random ellipsoid: its signed inside-ness ``1 - r^2`` (positive inside)."""
    centre = (torch.rand(len(grid), generator=gen) * 2 - 1) * margin
    radii = torch.empty(len(grid)).uniform_(*radius, generator=gen)
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True))
    return 1 - r2  # type: ignore[return-value]


def _acquire(clean: torch.Tensor, scan: Scanner, gen: torch.Generator) -> torch.Tensor:
    """Apply the scanner to clean intensities in [0, 1]."""
    noisy = scan.gain * clean.clamp(0, 1) ** scan.gamma + scan.offset
    return noisy + scan.noise * torch.randn(clean.shape, generator=gen)


def classification(settings: Settings, hospital: int, n: int, *, stream: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``[n, C, *size]`` and labels ``[n]`` for ``hospital``.

    ``stream`` selects an independent sample of the same distribution (the
    central test set uses its own stream).
    """
    task = settings.task
    gen = _generator(settings.seed, hospital, stream, 1)
    rng = np.random.default_rng([settings.seed, hospital, stream, 2])
    labels = torch.from_numpy(rng.choice(task.num_classes, size=n, p=class_mix(settings, hospital)))
    images = _background(n, task.image_size, gen)
    grid = _grid(task.image_size)
    for i, label in enumerate(labels.tolist()):
        for _ in range(label):
            inside = _blob(grid, gen, (0.12, 0.25))
            images[i, 0] += 0.6 * torch.sigmoid(8 * inside)
    images = _acquire(images, scanner(settings.seed, hospital), gen)
    return images.repeat(1, task.in_channels, *([1] * len(task.image_size))), labels.long()


def segmentation(settings: Settings, hospital: int, n: int, *, stream: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``[n, C, *size]`` and masks ``[n, 1, *size]`` (int64 classes)."""
    task = settings.task
    gen = _generator(settings.seed, hospital, stream, 3)
    images = _background(n, task.image_size, gen)
    masks = torch.zeros(n, 1, *task.image_size, dtype=torch.long)
    grid = _grid(task.image_size)
    for i in range(n):
        count = int(torch.randint(1, 4, (1,), generator=gen))
        for _ in range(count):
            cls = int(torch.randint(1, task.num_classes, (1,), generator=gen))
            inside = _blob(grid, gen, (0.15, 0.4), margin=0.45)
            masks[i, 0][inside > 0] = cls
            images[i, 0] += (0.25 + 0.35 * cls / task.num_classes) * torch.sigmoid(10 * inside)
    images = _acquire(images, scanner(settings.seed, hospital), gen)
    return images.repeat(1, task.in_channels, *([1] * len(task.image_size))), masks
