"""The float type model arrays travel in (``federation.wire_dtype``).

``float32`` is the model's own type: arrays travel unchanged. ``float16``
halves the bytes of a hospital's reply: the hospital's guard casts every
float32 array of its training reply to float16 just before it leaves (and
refuses the reply if a value overflows float16's range, +-65504, to inf);
the server expects float16 replies only when so configured and casts them
back to float32 before anything is bounded or aggregated. Integer arrays
(counters) are never cast. The global weights the server sends stay float32.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from common.config import WIRE_DTYPES

__all__ = ["WIRE_DTYPES", "from_wire", "reply_spec", "to_wire"]

MODEL_DTYPE = "float32"

Spec = dict[str, tuple[tuple[int, ...], str]]
"""Array key -> (shape, dtype name)."""


def reply_spec(sent: Spec, wire_dtype: str) -> Spec:
    """The (shape, dtype) a training reply must carry for each array ``sent``.

    Args:
        sent: key -> (shape, dtype) of the global arrays sent.
        wire_dtype: ``federation.wire_dtype``.
    """
    return {key: (shape, wire_dtype if dtype == MODEL_DTYPE else dtype)
            for key, (shape, dtype) in sent.items()}


def to_wire(values: np.ndarray, wire_dtype: str) -> np.ndarray:
    """``values`` as they leave in a reply: float32 cast to ``wire_dtype``, others as is."""
    if values.dtype == np.dtype(MODEL_DTYPE) and wire_dtype != MODEL_DTYPE:
        with np.errstate(over="ignore"):  # an overflow becomes inf, which the caller refuses
            return values.astype(wire_dtype)
    return values


def from_wire(arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` with every float16 array cast back to float32 (others unchanged)."""
    if all(a.dtype != "float16" for a in arrays.values()):
        return arrays
    return ArrayRecord(array_dict={
        key: Array(a.numpy().astype(MODEL_DTYPE)) if a.dtype == "float16" else a
        for key, a in arrays.items()})
