"""Dividing one dataset among hospitals, and one hospital's samples into splits.

Every function takes a seeded :class:`numpy.random.Generator` and returns
sorted index arrays, so a split is a pure function of the seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.data.errors import DataError

MAX_REDRAWS = 100
"""Dirichlet draws tried before giving up on a split that starves a hospital."""


def _check_sizes(parts: Sequence[np.ndarray], min_size: int, what: str) -> None:
    for hospital, part in enumerate(parts):
        if len(part) < min_size:
            raise DataError(
                f"{what}: hospital {hospital} would get {len(part)} samples (fewer than "
                f"{min_size}); lower federation.num_hospitals or use more data")


def iid_partition(n: int, parts: int, rng: np.random.Generator, *,
                  min_size: int = 1) -> list[np.ndarray]:
    """Shuffle ``range(n)`` and cut it into ``parts`` near-equal index arrays.

    Raises:
        DataError: a hospital would get fewer than ``min_size`` samples.
    """
    split = [np.sort(p) for p in np.array_split(rng.permutation(n), parts)]
    _check_sizes(split, min_size, f"iid split of {n} samples")
    return split


def dirichlet_proportions(num_classes: int, parts: int, alpha: float,
                          rng: np.random.Generator) -> np.ndarray:
    """Each class's shares over hospitals, ``[num_classes, parts]``; rows sum to 1."""
    return rng.dirichlet(np.full(parts, alpha), size=num_classes)


def split_by_proportions(labels: np.ndarray, proportions: np.ndarray,
                         rng: np.random.Generator) -> list[np.ndarray]:
    """Give each hospital its share of every class.

    Args:
        labels: class index per sample, shape ``[N]``, values below
            ``proportions.shape[0]``.
        proportions: ``[num_classes, parts]`` shares (rows sum to 1).
        rng: seeded generator (shuffles samples within a class).

    Returns:
        One sorted index array per hospital, covering every sample once.
    """
    parts = proportions.shape[1]
    buckets: list[list[np.ndarray]] = [[] for _ in range(parts)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        cuts = np.round(np.cumsum(proportions[cls])[:-1] * len(idx)).astype(int)
        for bucket, chunk in zip(buckets, np.split(idx, cuts), strict=True):
            bucket.append(chunk)
    return [np.sort(np.concatenate(b)).astype(int) if b else np.array([], int) for b in buckets]


def dirichlet_partitions(label_sets: Sequence[np.ndarray], parts: int, alpha: float,
                         rng: np.random.Generator, *, min_sizes: Sequence[int]
                         ) -> list[list[np.ndarray]]:
    """Label-skewed split of several datasets with the same class shares per hospital.

    Used to give a hospital a validation share whose class mix matches its
    training share. Each class is spread over hospitals by Dirichlet(alpha)
    shares; the draw is repeated (up to :data:`MAX_REDRAWS` times) until every
    hospital gets at least ``min_sizes[j]`` samples of dataset ``j``.

    Args:
        label_sets: class index per sample of each dataset, each ``[N_j]``.
        parts: number of hospitals.
        alpha: concentration; small values give strongly skewed hospitals.
        rng: seeded generator.
        min_sizes: the fewest samples a hospital may receive, per dataset.

    Returns:
        Per dataset, one sorted index array per hospital; together they cover
        every sample of that dataset exactly once.

    Raises:
        DataError: no draw gave every hospital enough samples.
    """
    num_classes = int(max(int(labels.max()) for labels in label_sets)) + 1
    for _ in range(MAX_REDRAWS):
        shares = dirichlet_proportions(num_classes, parts, alpha, rng)
        split = [split_by_proportions(labels, shares, rng) for labels in label_sets]
        if all(min(map(len, s)) >= m for s, m in zip(split, min_sizes, strict=True)):
            return split
    sizes = ", ".join(f"{len(labels)} samples (>= {m} each)"
                      for labels, m in zip(label_sets, min_sizes, strict=True))
    raise DataError(
        f"data.dirichlet_alpha={alpha} leaves a hospital with too few of {sizes} in "
        f"{MAX_REDRAWS} draws; raise data.dirichlet_alpha or lower federation.num_hospitals"
    )


def dirichlet_partition(labels: np.ndarray, parts: int, alpha: float, rng: np.random.Generator,
                        *, min_size: int = 2) -> list[np.ndarray]:
    """Label-skewed split of one dataset (see :func:`dirichlet_partitions`).

    Args:
        labels: class index per sample, shape ``[N]``.
        parts: number of hospitals.
        alpha: concentration; small values give strongly skewed hospitals.
        rng: seeded generator.
        min_size: the fewest samples a hospital may receive.

    Returns:
        One sorted index array per hospital, covering every sample exactly once.

    Raises:
        DataError: a hospital would receive fewer than ``min_size`` samples
            even after :data:`MAX_REDRAWS` draws.
    """
    return dirichlet_partitions([labels], parts, alpha, rng, min_sizes=[min_size])[0]


def partition(labels: np.ndarray, parts: int, split: str, alpha: float,
              rng: np.random.Generator, *, min_size: int = 2) -> list[np.ndarray]:
    """``iid`` or ``dirichlet`` partition of samples with the given labels."""
    if split == "dirichlet":
        return dirichlet_partition(labels, parts, alpha, rng, min_size=min_size)
    return iid_partition(len(labels), parts, rng, min_size=min_size)


def contiguous_blocks(volume_ids: np.ndarray, size: int) -> list[np.ndarray]:
    """Runs of at most ``size`` neighbouring samples that never cross a volume.

    Args:
        volume_ids: the volume each sample came from, shape ``[N]``, samples
            of one volume adjacent and in anatomical order.
        size: samples per block.
    """
    blocks: list[np.ndarray] = []
    for volume in np.unique(volume_ids):
        idx = np.flatnonzero(volume_ids == volume)
        blocks.extend(idx[i:i + size] for i in range(0, len(idx), size))
    return blocks


def three_way_groups(groups: Sequence[np.ndarray], val_fraction: float, test_fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Assign whole groups of samples to train / val / test.

    Args:
        groups: index arrays that must stay on one side (single samples,
            blocks of neighbouring slices, or whole volumes).
        val_fraction: share of groups for validation.
        test_fraction: share of groups for testing.
        rng: seeded generator.

    Returns:
        Sorted train, val and test indices. Val and test get at least one
        group each when their fraction is positive and there are >= 3 groups.
    """
    order = rng.permutation(len(groups))
    n_test = int(round(test_fraction * len(groups)))
    n_val = int(round(val_fraction * len(groups)))
    if len(groups) >= 3:
        n_test = max(n_test, int(test_fraction > 0))
        n_val = max(n_val, int(val_fraction > 0))

    def take(sel: np.ndarray) -> np.ndarray:
        return np.sort(np.concatenate([groups[i] for i in sel])) if len(sel) else np.array([], int)

    return take(order[n_test + n_val:]), take(order[n_test:n_test + n_val]), take(order[:n_test])


def three_way(n: int, val_fraction: float, test_fraction: float, rng: np.random.Generator,
              *, block: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split ``range(n)`` into train / val / test in blocks of ``block`` neighbours."""
    return three_way_groups(contiguous_blocks(np.zeros(n, int), block), val_fraction,
                            test_fraction, rng)
