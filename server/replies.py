"""Checks on what a hospital sends back, before anything is aggregated.

A training reply must carry exactly the model arrays that were sent (same
keys, same shapes, same dtypes, so no reply can change the global model's
dtype or make the aggregate fail), finite values only, and finite scalar
metrics including a positive ``num-examples``. Anything else is dropped and
logged, never averaged in. How far a sound reply may move the model is
bounded afterwards (:mod:`server.influence`).
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from common import wire

ArraySpec = dict[str, tuple[tuple[int, ...], str]]
"""Array key -> (shape, dtype name) of the global model sent."""


def array_spec(arrays: ArrayRecord) -> ArraySpec:
    """Key -> (shape, dtype) of every array in ``arrays``."""
    return {key: (tuple(array.shape), str(array.dtype)) for key, array in arrays.items()}


def _array_problem(key: str, array: Array, expected: tuple[tuple[int, ...], str]) -> str | None:
    declared = (tuple(array.shape), str(array.dtype))
    if declared != expected:
        return f"array {key!r} is {declared}, expected {expected} (shape, dtype)"
    try:
        values = array.numpy()
    except Exception as err:  # noqa: BLE001 - undecodable bytes are a bad reply, not a crash
        return f"array {key!r} cannot be decoded ({type(err).__name__})"
    if (tuple(values.shape), str(values.dtype)) != expected:
        return f"array {key!r} decodes as {(tuple(values.shape), str(values.dtype))}"
    if np.issubdtype(values.dtype, np.inexact) and not np.isfinite(values).all():
        return f"array {key!r} has non-finite values"
    return None


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
    for key, array in arrays.items():
        problem = _array_problem(key, array, expected[key])
        if problem:
            return problem
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
