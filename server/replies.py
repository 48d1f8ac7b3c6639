"""Checks on what a hospital sends back, before anything is aggregated.

A training reply must carry exactly the model arrays that were sent (same
keys, same shapes), finite values only, and finite scalar metrics including
a positive ``num-examples``. Anything else is dropped and logged, never
averaged in.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from common import wire

ArraySpec = dict[str, tuple[int, ...]]


def array_spec(arrays: ArrayRecord) -> ArraySpec:
    """Key -> shape of every array in ``arrays``."""
    return {key: tuple(array.shape) for key, array in arrays.items()}


def _metric_problem(metrics: MetricRecord) -> str | None:
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            return f"metric {key!r} is not a finite number"
    return None


def _positive_count(metrics: MetricRecord) -> bool:
    value = metrics.get(wire.NUM_EXAMPLES, 0)
    return isinstance(value, int | float) and value > 0


def train_reply_problem(msg: Message, expected: ArraySpec) -> str | None:
    """Why a training reply must not be aggregated, or None if it is sound."""
    content = msg.content
    if set(content.keys()) != {wire.ARRAYS, wire.METRICS}:
        return f"records {sorted(content.keys())} instead of ['{wire.ARRAYS}', '{wire.METRICS}']"
    arrays, metrics = content[wire.ARRAYS], content[wire.METRICS]
    if not isinstance(arrays, ArrayRecord) or not isinstance(metrics, MetricRecord):
        return "wrong record types"
    spec = array_spec(arrays)
    if spec.keys() != expected.keys():
        extra = sorted(spec.keys() - expected.keys())
        missing = sorted(expected.keys() - spec.keys())
        return f"array keys differ from the model (extra {extra[:3]}, missing {missing[:3]})"
    for key, shape in spec.items():
        if shape != expected[key]:
            return f"array {key!r} has shape {shape}, expected {expected[key]}"
    for key, array in arrays.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"array {key!r} has non-finite values"
    problem = _metric_problem(metrics)
    if problem:
        return problem
    if not _positive_count(metrics):
        return f"metric {wire.NUM_EXAMPLES!r} missing or not positive"
    return None


def evaluate_reply_problem(msg: Message) -> str | None:
    """Why an evaluation reply must not be aggregated, or None if it is sound."""
    content = msg.content
    metrics = content.get(wire.METRICS)
    if set(content.keys()) != {wire.METRICS} or not isinstance(metrics, MetricRecord):
        return f"records {sorted(content.keys())} instead of ['{wire.METRICS}']"
    problem = _metric_problem(metrics)
    if problem:
        return problem
    if not _positive_count(metrics):
        return f"metric {wire.NUM_EXAMPLES!r} missing or not positive"
    return None
