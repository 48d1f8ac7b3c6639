"""The global weights a hospital holds between messages, so they cross the wire once a round.

Every round the server sends the new global weights to evaluate, and (with
FedAvg-type strategies, which change nothing in between) the same weights
again to train in the next round. :func:`held_weights_mod` keeps the weights
of the latest evaluation message in the node's state (``context.state``: at
the hospital's SuperNode in deployment, in the simulation engine in
simulation; only the latest copy, with its :func:`common.digest.arrays_digest`
computed here). A training message from a server that knows the hospital
holds them carries only their digest (:data:`common.wire.GLOBAL_DIGEST` in its
config record): if the held weights have that digest, the mod puts them in the
message where the server would have sent them (:func:`received_content`), so
what runs inside (the clipping mod, the train handler) sees a message exactly
as if they had come in full, and the guard outside checks the reply against
them. Otherwise (a restarted node, other weights) the message goes on without
weights and the train handler answers :data:`common.wire.WEIGHTS_NOT_HELD`, on
which the server resends them in full within the same round.

The state is only a cache of what the server sent: nothing computed from
the hospital's images is kept there, and nothing in it ever leaves.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from common import wire
from common.digest import arrays_digest

HELD_ARRAYS = "medfed-held-weights"
"""``context.state`` key of the held global weights (an ArrayRecord)."""
HELD_DIGEST = "medfed-held-digest"
"""``context.state`` key of their digest (a ConfigRecord ``{"digest": hex}``)."""


def _type(msg: Message) -> str:
    return msg.metadata.message_type.split(".")[0]


def keep(context: Context, arrays: ArrayRecord) -> str:
    """Hold ``arrays`` in the node's state in place of any earlier ones; returns their digest."""
    digest = arrays_digest(arrays)
    context.state[HELD_ARRAYS] = arrays
    context.state[HELD_DIGEST] = ConfigRecord({"digest": digest})
    return digest


def held(context: Context, digest: str) -> ArrayRecord | None:
    """The held weights if their digest is ``digest``, else None."""
    record = context.state.config_records.get(HELD_DIGEST)
    arrays = context.state.array_records.get(HELD_ARRAYS)
    if record is None or arrays is None or record.get("digest") != digest:
        return None
    return arrays


def digest_named(msg: Message) -> str | None:
    """The ``global-digest`` a training message carries instead of weights, or None."""
    if wire.ARRAYS in msg.content.array_records:
        return None
    config = msg.content.config_records.get(wire.CONFIG)
    value = config.get(wire.GLOBAL_DIGEST) if config is not None else None
    return value if isinstance(value, str) else None


def received_content(msg: Message, context: Context) -> RecordDict:
    """``msg``'s content as the server would have sent it in full.

    A training message that names the digest of the held weights gets them
    (as :data:`common.wire.ARRAYS`) besides its other records; any other
    message's content is returned as it is.
    """
    if not msg.has_content() or _type(msg) != "train" or (digest := digest_named(msg)) is None:
        return msg.content
    arrays = held(context, digest)
    if arrays is None:
        return msg.content
    return RecordDict({wire.ARRAYS: arrays, **msg.content})


def held_weights_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Keep an evaluation's weights; put them into a training message that names their digest.

    Sits inside the guard, which takes the expected reply arrays from
    :func:`received_content` too; replies pass through unchanged.

    Args:
        msg: the message received from the server.
        context: the node's context (its ``state`` holds the weights).
        call_next: the rest of the ClientApp (the other mods, the handler).
    """
    if msg.has_content():
        if _type(msg) == "evaluate" and wire.ARRAYS in msg.content.array_records:
            keep(context, msg.content.array_records[wire.ARRAYS])
        elif _type(msg) == "train":
            msg.content = received_content(msg, context)
    return call_next(msg, context)
