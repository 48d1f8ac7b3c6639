"""Client-side clipping for client-level DP, switched on by the run's settings."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from common import wire
from common.config import settings_from_json


def client_level_clipping_mod(msg: Message, context: Context,
                              call_next: ClientAppCallable) -> Message:
    """Apply Flower's ``fixedclipping_mod`` when the run clips on the hospital side.

    The server's ``DifferentialPrivacyClientSideFixedClipping`` wrapper sends
    the clipping norm; this hospital clips its update to it before replying.
    A training message without weights (a digest of weights this node does not
    hold, :mod:`client.held_weights`) goes straight to the handler, which asks
    for them.
    """
    settings = settings_from_json(str(context.run_config[wire.RUN_CONFIG_KEY]))
    privacy = settings.privacy
    if msg.metadata.message_type == "train" and privacy.mode == "client_level" \
            and privacy.clipping_side == "client" and wire.ARRAYS in msg.content.array_records:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
