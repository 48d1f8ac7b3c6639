"""Only weights leave a hospital: a ClientApp mod that checks every outgoing reply.

The guard sits outermost among the ClientApp's mods, so it sees each reply
exactly as it would leave the hospital. A training message that names the
digest of global weights the hospital holds instead of carrying them
(:mod:`client.held_weights`) counts as received with those weights. What
may leave:

- a reply to a ``train`` message: ArrayRecords with exactly the record
  names, array keys, shapes and dtypes of the ArrayRecords received, finite
  values only, plus MetricRecords of finite ``int``/``float`` scalars;
- a reply to any other message (``evaluate``, ``query``): MetricRecords of
  finite scalars only, except the ROC counts of an evaluation
  (:data:`common.wire.ROC_LISTS`): each exactly
  :data:`common.intervals.GRID_SIZE` whole, non-negative counts of images,
  non-increasing along the threshold grid;
- metric names only from the hospital's ``allowed-metrics`` (its node
  config; default: what MedFed sends), and in a DP-SGD run's training reply
  only :data:`common.wire.DP_TRAIN_METRICS` (the privacy figures, the count
  and the hospital's number: no loss, no timing);
- an error reply built by the ClientApp (its code and a reason cut to
  :data:`MAX_REASON` characters).

Anything else (an extra or missing array, a reshaped or recast one, a NaN,
a ConfigRecord of strings, any other list-valued metric) is refused: the guard logs
why at the hospital and sends an error reply with code :data:`REFUSED`
instead, so none of it leaves. An exception raised inside the ClientApp is
logged at the hospital and leaves only as its type name, because exception
messages may quote file names or values. A reply that passes is rebuilt
from the checked values, so bytes hidden in an array's serialized form
(past what its shape declares) are dropped too.
"""

from __future__ import annotations

import math
import traceback

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from client.held_weights import received_content
from client.hospital import allowed_metrics
from common import wire
from common.config import settings_from_json
from common.intervals import GRID_SIZE
from common.logs import medfed_logger
from common.wire_dtype import MODEL_DTYPE, to_wire

REFUSED = 4003
"""Error code of a reply the guard refused to send."""
RAISED = 4004
"""Error code sent instead of an exception raised inside the ClientApp."""
MAX_REASON = 300
"""Longest error reason (characters) a ClientApp's own error reply may carry."""

ArraySpec = dict[str, dict[str, tuple[tuple[int, ...], str]]]
"""Record name -> array key -> (shape, dtype)."""

log = medfed_logger()


class RefusedReplyError(ValueError):
    """A reply carries something that must not leave the hospital."""


def array_spec(content: RecordDict) -> ArraySpec:
    """Shapes and dtypes of every array in ``content``, by record name and key."""
    return {name: {key: (tuple(array.shape), str(array.dtype)) for key, array in record.items()}
            for name, record in content.array_records.items()}


def _is_train(msg: Message) -> bool:
    return msg.metadata.message_type.split(".")[0] == "train"


def _checked_arrays(name: str, record: ArrayRecord,
                    expected: dict[str, tuple[tuple[int, ...], str]],
                    wire_dtype: str = MODEL_DTYPE) -> ArrayRecord:
    """``record`` rebuilt from its decoded arrays, if they match ``expected``.

    Float32 arrays leave as ``wire_dtype`` (``federation.wire_dtype``); the
    finiteness check runs after that cast, so an overflow is refused.
    """
    if set(record.keys()) != set(expected):
        extra = sorted(f"{name}.{key}" for key in set(record.keys()) - set(expected))
        missing = sorted(f"{name}.{key}" for key in set(expected) - set(record.keys()))
        raise RefusedReplyError(f"arrays differ from the model received "
                                f"(extra: {extra[:3]}, missing: {missing[:3]})")
    clean: dict[str, Array] = {}
    for key in expected:  # in the order received
        array = record[key]
        values = array.numpy()
        found = (tuple(values.shape), str(values.dtype))
        if found != expected[key] or found != (tuple(array.shape), str(array.dtype)):
            raise RefusedReplyError(f"array {name}.{key} is {found}, expected {expected[key]}")
        values = to_wire(values, wire_dtype)
        if np.issubdtype(values.dtype, np.inexact) and not np.isfinite(values).all():
            cast = (f" as {wire_dtype} (values beyond its range overflow to inf)"
                    if str(values.dtype) != found[1] else "")
            raise RefusedReplyError(f"array {name}.{key} has non-finite values{cast}")
        clean[key] = Array(np.asarray(values, order="C"))  # keeps a 0-d array 0-d
    return ArrayRecord(array_dict=clean)


def reply_dtype(context: Context) -> str:
    """The run's ``federation.wire_dtype`` (float32 when the run config has no settings)."""
    run_config = context.run_config.get(wire.RUN_CONFIG_KEY)
    if run_config is None:
        return MODEL_DTYPE
    return settings_from_json(str(run_config)).federation.wire_dtype


def metric_policy(msg: Message, context: Context) -> frozenset[str]:
    """Metric names a reply to ``msg`` may carry at this hospital.

    The hospital's ``allowed-metrics``; for a training reply in a DP-SGD run
    (the run config's ``privacy.mode``) only those of them in
    :data:`common.wire.DP_TRAIN_METRICS`.
    """
    allowed = allowed_metrics(context.node_config)
    run_config = context.run_config.get(wire.RUN_CONFIG_KEY)
    if _is_train(msg) and run_config is not None \
            and settings_from_json(str(run_config)).privacy.mode == "dp_sgd":
        return allowed & wire.DP_TRAIN_METRICS
    return allowed


def _checked_value(key: str, name: str, value: object) -> int | float | list[int]:
    """A metric value as sent: a finite number, or for a ROC-count key
    (:data:`common.wire.ROC_LISTS`) exactly ``GRID_SIZE`` non-negative whole
    counts that never grow with the threshold; no other list leaves."""
    if isinstance(value, list):
        if key not in wire.ROC_LISTS:
            raise RefusedReplyError(f"metric {key!r} in {name!r} is not a single number")
        whole = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        counts = [int(v) for v in value] if whole else []
        if len(counts) != GRID_SIZE or any(a < b for a, b in zip(counts, counts[1:],
                                                                   strict=False)):
            raise RefusedReplyError(f"metric {key!r} in {name!r} is not {GRID_SIZE} "
                                    "non-increasing whole counts")
        return counts
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RefusedReplyError(f"metric {key!r} in {name!r} is not a single number")
    if not math.isfinite(value):
        raise RefusedReplyError(f"metric {key!r} in {name!r} is not a finite number")
    return value


def _checked_metrics(name: str, record: MetricRecord,
                     allowed: frozenset[str] | None) -> MetricRecord:
    """``record`` rebuilt from its values, if every one is a finite number (or ROC counts)
    named in ``allowed``."""
    clean: dict[str, int | float | list[int]] = {}
    for key, value in record.items():
        clean[key] = _checked_value(key, name, value)
        if allowed is not None and key not in allowed:
            raise RefusedReplyError(f"metric {key!r} in {name!r} is not one this hospital lets "
                                    f"leave (node config {wire.ALLOWED_METRICS})")
    return MetricRecord(clean)  # type: ignore[arg-type]


def checked_reply(msg: Message, reply: Message, expected: ArraySpec,
                  allowed: frozenset[str] | None = None, wire_dtype: str = MODEL_DTYPE
                  ) -> Message:
    """The reply to ``msg`` rebuilt from checked values only.

    Args:
        msg: the message received from the server.
        reply: what the ClientApp wants to send back.
        expected: :func:`array_spec` of ``msg`` taken before the ClientApp ran.
        allowed: the metric names that may leave (:func:`metric_policy`);
            None = any name.
        wire_dtype: the float type training replies' float32 arrays leave in.

    Raises:
        RefusedReplyError: the reply carries anything but the model arrays
            received (train replies only) and finite scalar metrics named in
            ``allowed``.
    """
    if reply.has_error():
        error = reply.error
        return Message(Error(code=error.code, reason=str(error.reason)[:MAX_REASON]),
                       reply_to=msg)
    train = _is_train(msg)
    clean = RecordDict()
    for name, record in reply.content.items():
        if isinstance(record, MetricRecord):
            clean[name] = _checked_metrics(name, record, allowed)
        elif isinstance(record, ArrayRecord) and train and name in expected:
            clean[name] = _checked_arrays(name, record, expected[name], wire_dtype)
        else:
            kind = type(record).__name__
            raise RefusedReplyError(f"record {name!r} ({kind}) may not leave the hospital")
    if train and set(clean.array_records) != set(expected):
        missing = sorted(set(expected) - set(clean.array_records))
        raise RefusedReplyError(f"the reply lacks the model arrays {missing}")
    return Message(clean, reply_to=msg)


def only_weights_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Let a reply leave only if it carries the model weights and finite scalars.

    Args:
        msg: the message received from the server.
        context: the node's context (passed on unchanged).
        call_next: the rest of the ClientApp (inner mods and the handler).

    Returns:
        The checked reply, or an error reply (:data:`REFUSED` when the
        reply was refused, :data:`RAISED` when the ClientApp raised).
    """
    expected = array_spec(received_content(msg, context))  # before the ClientApp runs
    try:
        reply = call_next(msg, context)
    except Exception as err:  # noqa: BLE001 - the details stay at the hospital
        log.error("[MedFed] ClientApp failed at node %s: %s", context.node_id,
                  traceback.format_exc())
        return Message(Error(code=RAISED, reason=f"{type(err).__name__} in the hospital's "
                             "ClientApp; the details stay in the hospital's log"),
                       reply_to=msg)
    try:
        return checked_reply(msg, reply, expected, metric_policy(msg, context),
                             reply_dtype(context))
    except ValueError as err:  # RefusedReplyError, or a run config that cannot be read
        log.error("[MedFed] outgoing reply refused at node %s: %s", context.node_id, err)
        return Message(Error(code=REFUSED, reason=f"refused by the hospital's guard: {err}"),
                       reply_to=msg)
