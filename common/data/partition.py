"""Dividing one dataset among hospitals, and one hospital's samples into splits."""

from __future__ import annotations

import numpy as np

from common.data.errors import DataError


def iid_partition(n: int, parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle ``range(n)`` and cut it into ``parts`` near-equal index arrays."""
    return [np.sort(p) for p in np.array_split(rng.permutation(n), parts)]


def dirichlet_partition(labels: np.ndarray, parts: int, alpha: float, rng: np.random.Generator,
                        *, min_size: int = 2) -> list[np.ndarray]:
    """Label-skewed split: each class is spread over hospitals by Dirichlet(alpha) shares.

    Args:
        labels: class index per sample, shape ``[N]``.
        parts: number of hospitals.
        alpha: concentration; small values give strongly skewed hospitals.
        rng: seeded generator.
        min_size: the fewest samples a hospital may receive.

    Returns:
        One sorted index array per hospital; together they cover every sample
        exactly once.

    Raises:
        DataError: a hospital would receive fewer than ``min_size`` samples
            even after 100 redraws.
    """
    classes = np.unique(labels)
    for _ in range(100):
        buckets: list[list[int]] = [[] for _ in range(parts)]
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(parts, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for bucket, chunk in zip(buckets, np.split(idx, cuts), strict=True):
                bucket.extend(chunk.tolist())
        if min(len(b) for b in buckets) >= min_size:
            return [np.sort(np.asarray(b, dtype=int)) for b in buckets]
    raise DataError(
        f"data.dirichlet_alpha={alpha} leaves a hospital with fewer than {min_size} of "
        f"{len(labels)} samples; raise data.dirichlet_alpha or lower federation.num_hospitals"
    )


def partition(labels: np.ndarray, parts: int, split: str, alpha: float,
              rng: np.random.Generator) -> list[np.ndarray]:
    """``iid`` or ``dirichlet`` partition of samples with the given labels."""
    if split == "dirichlet":
        return dirichlet_partition(labels, parts, alpha, rng)
    return iid_partition(len(labels), parts, rng)


def three_way(n: int, val_fraction: float, test_fraction: float, rng: np.random.Generator,
              *, block: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split ``range(n)`` into train / val / test index arrays.

    Args:
        n: number of samples.
        val_fraction: share for validation.
        test_fraction: share for testing.
        rng: seeded generator.
        block: assign contiguous blocks of this many samples together (for
            neighbouring slices of a volume, so near-identical slices do not
            end up on both sides of a split).

    Returns:
        Sorted train, val and test indices; val and test get at least one
        block each when their fraction is positive and ``n`` allows it.
    """
    blocks = [np.arange(i, min(i + block, n)) for i in range(0, n, block)]
    order = rng.permutation(len(blocks))
    n_test = int(round(test_fraction * len(blocks)))
    n_val = int(round(val_fraction * len(blocks)))
    if test_fraction > 0 and len(blocks) >= 3:
        n_test = max(n_test, 1)
    if val_fraction > 0 and len(blocks) >= 3:
        n_val = max(n_val, 1)

    def take(sel: np.ndarray) -> np.ndarray:
        return np.sort(np.concatenate([blocks[i] for i in sel])) if len(sel) else np.array([], int)

    return (take(order[n_test + n_val:]), take(order[n_test:n_test + n_val]), take(order[:n_test]))
