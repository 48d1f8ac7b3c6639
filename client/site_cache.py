"""Hospitals' datasets kept in one process' memory, bounded in bytes.

A simulated hospital's process (a Ray actor) answers messages of any
hospital, in whatever order Flower's engine hands them out, so with more
hospitals than a count-bounded cache holds, every message would rebuild
its hospital's data from scratch (about 0.3 s for 512 synthetic images,
longer for volumes). The cache is therefore bounded by the bytes of the
tensors it holds: many small datasets fit, a few large ones push out the
least recently used.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from common.data import SiteData

DEFAULT_MAX_BYTES = 1 << 30
"""Bytes of hospitals' datasets one process keeps (1 GiB)."""


def dataset_bytes(dataset: Dataset) -> int | None:
    """Bytes of the tensors behind ``dataset``; None when they cannot be told."""
    if isinstance(dataset, TensorDataset):
        return sum(t.nbytes for t in dataset.tensors)
    if isinstance(dataset, ConcatDataset):
        parts = [dataset_bytes(d) for d in dataset.datasets]
        return None if None in parts else sum(p for p in parts if p is not None)
    if isinstance(dataset, Subset):
        return dataset_bytes(dataset.dataset)
    return None


def site_bytes(site: SiteData, max_bytes: int) -> int:
    """Bytes of a hospital's three splits; a quarter of ``max_bytes`` if unknown.

    (An unknown size thus keeps at most four such hospitals, as a count-bounded
    cache of four did.)
    """
    parts = [dataset_bytes(d) for d in (site.train, site.val, site.test)]
    if None in parts:
        return max_bytes // 4
    return sum(p for p in parts if p is not None)


@dataclass
class SiteCache:
    """Least-recently-used hospitals' datasets, at most ``max_bytes`` of tensors.

    A single dataset larger than ``max_bytes`` is returned but not kept.
    Errors are not memoised. Safe to share between threads.

    Attributes:
        max_bytes: the most bytes of tensors held.
    """

    max_bytes: int = DEFAULT_MAX_BYTES
    _sites: OrderedDict[Hashable, tuple[SiteData, int]] = field(default_factory=OrderedDict)
    _held: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def held_bytes(self) -> int:
        """Bytes of tensors held now."""
        return self._held

    def __len__(self) -> int:
        return len(self._sites)

    def get(self, key: Hashable, load: Callable[[], SiteData]) -> SiteData:
        """The dataset cached under ``key``, else ``load()`` (kept if it fits)."""
        with self._lock:
            if key in self._sites:
                self._sites.move_to_end(key)
                return self._sites[key][0]
        site = load()
        size = site_bytes(site, self.max_bytes)
        with self._lock:
            if key in self._sites or size > self.max_bytes:
                return site
            while self._sites and self._held + size > self.max_bytes:
                _, (_, freed) = self._sites.popitem(last=False)
                self._held -= freed
            self._sites[key] = (site, size)
            self._held += size
        return site
