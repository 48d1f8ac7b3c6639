"""What a round costs on the wire: bytes of Flower messages and of model weights.

Three sizes, from the smallest to what travels:

- :func:`raw_bytes`: the arrays' elements times their item size (a
  float32 model's "model bytes", the unit of the wire ratio);
- :func:`payload_bytes`: the arrays as Flower serialises them
  (``Array.data``: NumPy's ``.npy`` bytes, a header of about 128 bytes per
  array before the elements);
- :func:`message_bytes`: the whole message as Flower's protobuf encodes it
  (arrays, config and metric records, metadata), i.e. what one hospital's
  message weighs on the gRPC link, without the transport's own framing.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common.serde import message_to_proto


def raw_bytes(arrays: ArrayRecord) -> int:
    """Bytes of the arrays' elements: sum of numel x item size (no headers)."""
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in arrays.values())


def payload_bytes(arrays: ArrayRecord) -> int:
    """Bytes of the arrays as serialised in a Flower message (``Array.data``)."""
    return sum(len(a.data) for a in arrays.values())


def message_bytes(message: Message) -> int:
    """Bytes of ``message`` encoded as Flower's protobuf ``Message``."""
    return int(message_to_proto(message).ByteSize())


def messages_bytes(messages: list[Message]) -> int:
    """Summed :func:`message_bytes` of the messages."""
    return sum(message_bytes(m) for m in messages)
