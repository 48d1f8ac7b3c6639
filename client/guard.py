"""Only weights leave a hospital: a ClientApp mod that checks every outgoing reply.

A training reply may carry exactly the model arrays received (same keys,
same shapes), finite values only, and finite scalar metrics; an evaluation
reply only finite scalar metrics. Anything else (an extra array, a record of
strings, a NaN) is refused: it is logged at the hospital and an error reply
goes out instead, so nothing unexpected leaves.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from common.logs import medfed_logger

REFUSED = 4003
"""Error code of a reply the guard refused to send."""

log = medfed_logger()


def _metrics_problem(reply: Message) -> str | None:
    for name, record in reply.content.items():
        if isinstance(record, MetricRecord):
            for key, value in record.items():
                values = value if isinstance(value, list) else [value]
                if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
                    return f"metric {key!r} in {name!r} is not a finite number"
    return None


def outgoing_problem(msg: Message, reply: Message) -> str | None:
    """Why ``reply`` to ``msg`` must not leave the hospital, or None if it may."""
    if reply.has_error():
        return None  # an error reply carries no data
    content = reply.content
    kinds = {name: type(record).__name__ for name, record in content.items()}
    allowed = (ArrayRecord, MetricRecord) if msg.metadata.message_type == "train" else (
        MetricRecord,)
    for name, record in content.items():
        if not isinstance(record, allowed):
            return f"record {name!r} ({kinds[name]}) may not leave the hospital"
    sent = {n: {k: tuple(a.shape) for k, a in r.items()}
            for n, r in msg.content.array_records.items()}
    back = {n: {k: tuple(a.shape) for k, a in r.items()}
            for n, r in content.array_records.items()}
    if msg.metadata.message_type == "train" and back != sent:
        extra = sorted({f"{n}.{k}" for n, r in back.items() for k in r}
                       - {f"{n}.{k}" for n, r in sent.items() for k in r})
        return f"arrays differ from the model received (extra: {extra[:3]})"
    for name, record in content.array_records.items():
        for key, array in record.items():
            values = array.numpy()
            if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
                return f"array {name}.{key} has non-finite values"
    return _metrics_problem(reply)


def only_weights_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Refuse any reply that carries more than the model weights and finite scalars."""
    reply = call_next(msg, context)
    problem = outgoing_problem(msg, reply)
    if problem is None:
        return reply
    log.error("[MedFed] outgoing reply refused at node %s: %s", context.node_id, problem)
    return Message(Error(code=REFUSED, reason=f"refused by the hospital's guard: {problem}"),
                   reply_to=msg)
