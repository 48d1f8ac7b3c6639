"""A digest of model weights: what both sides compare instead of resending them.

:func:`arrays_digest` is SHA-256 over every array of an ``ArrayRecord``, in
the record's key order: the key, the dtype (with its byte order), the shape
and the elements' bytes in C order. Two records have the same digest exactly
when they hold the same keys in the same order with the same dtypes, shapes
and element bytes (up to SHA-256 collisions), so a hospital that holds
weights with the digest a server names holds exactly the weights the server
means. It hashes the decoded elements, not Flower's serialised ``.npy``
bytes, so the digest does not depend on NumPy's header format.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from flwr.app import ArrayRecord


def arrays_digest(arrays: ArrayRecord) -> str:
    """SHA-256 (64 hex characters) of ``arrays``: keys, dtypes, shapes and elements, in order.

    Args:
        arrays: the weights (any shapes and dtypes; a 0-d array counts as shape ``()``).
    """
    sha = hashlib.sha256()
    for key, array in arrays.items():
        values = np.asarray(array.numpy(), order="C")
        header = json.dumps([key, values.dtype.str, list(values.shape), values.nbytes])
        sha.update(len(header).to_bytes(8, "little"))
        sha.update(header.encode())
        sha.update(values.tobytes(order="C"))
    return sha.hexdigest()
