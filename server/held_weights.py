"""Which global weights each hospital holds, so a training message can name them instead.

The server's side of :mod:`client.held_weights`. Each round the evaluation
messages carry the new global weights; a hospital keeps the latest ones it
was sent to evaluate. :class:`HeldWeights` records, per node, the digest
(:func:`common.digest.arrays_digest`) of the weights of the last evaluation
message it answered without an error, and turns the next round's training
message to that node into one that carries only the digest (in its config
record, :data:`common.wire.GLOBAL_DIGEST`) when, and only when, the weights
that message would carry have that same digest. Nothing is assumed about
the strategy: the digests of what was evaluated and of what is to be
trained are compared, so a strategy that changes the model in between
(or a server-side optimiser's float64 arrays) simply sends the weights.

A node that does not hold them after all (a restarted SuperNode, a state
lost) answers :data:`common.wire.WEIGHTS_NOT_HELD`; :meth:`HeldWeights.full_for`
then gives the message with the weights, which the grid pushes in its place
within the same phase (:class:`server.prompt_grid.PromptGrid`). Each digest
message is resent at most once.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict

from common import wire
from common.digest import arrays_digest


def _digests(messages: list[Message]) -> dict[int, str]:
    """Digest of the weights each message carries, by the message's position (none: no key).

    Messages built by Flower's strategies share one ArrayRecord: each distinct
    record is hashed once.
    """
    by_record: dict[int, str] = {}
    out = {}
    for index, msg in enumerate(messages):
        arrays = msg.content.array_records.get(wire.ARRAYS) if msg.has_content() else None
        if arrays is not None:
            if id(arrays) not in by_record:
                by_record[id(arrays)] = arrays_digest(arrays)
            out[index] = by_record[id(arrays)]
    return out


def digest_message(full: Message, digest: str) -> Message:
    """``full`` without its weights, naming their ``digest`` in its config record instead."""
    content = RecordDict({name: record for name, record in full.content.items()
                          if name != wire.ARRAYS})
    config = full.content.config_records.get(wire.CONFIG, ConfigRecord())
    content[wire.CONFIG] = ConfigRecord({**config, wire.GLOBAL_DIGEST: digest})
    meta = full.metadata
    return Message(content, dst_node_id=meta.dst_node_id, message_type=meta.message_type,
                   ttl=meta.ttl, group_id=meta.group_id)


class HeldWeights:
    """Per node, the digest of the global weights it holds; see the module docstring."""

    def __init__(self) -> None:
        self._held: dict[int, str] = {}
        """Node -> digest of the weights of the last evaluation it answered."""
        self._evaluating: dict[int, str] = {}
        """Node -> digest of the weights sent to it in the evaluation under way."""
        self._lightened: list[tuple[Message, Message]] = []
        """(digest message, full message) of the training phase under way."""

    @property
    def lightened(self) -> int:
        """Training messages of the phase under way sent with only a digest (and not resent)."""
        return len(self._lightened)

    def sent_to_evaluate(self, messages: list[Message]) -> None:
        """Note the weights each evaluation message carries to its node."""
        digests = _digests(messages)
        self._evaluating = {messages[i].metadata.dst_node_id: d for i, d in digests.items()}

    def evaluated(self, answered: set[int]) -> None:
        """Nodes that answered the evaluation without error hold its weights; others may not."""
        for node, digest in self._evaluating.items():
            if node in answered:
                self._held[node] = digest
            else:
                self._held.pop(node, None)
        self._evaluating = {}

    def lighten(self, messages: list[Message]) -> list[Message]:
        """``messages`` with each one to a node that holds its weights as a digest message."""
        digests = _digests(messages)
        self._lightened = []
        out = []
        for index, msg in enumerate(messages):
            digest = digests.get(index)
            if digest is not None and self._held.get(msg.metadata.dst_node_id) == digest:
                light = digest_message(msg, digest)
                self._lightened.append((light, msg))
                msg = light
            out.append(msg)
        return out

    def full_for(self, reply: Message) -> Message | None:
        """The full message to send instead, if ``reply`` asks for the weights a digest named.

        Returns:
            The training message with the weights (never pushed before),
            for a :data:`common.wire.WEIGHTS_NOT_HELD` error reply to a
            digest message of the phase under way; else None (once per
            digest message: a second ask for the same one is a failure).
        """
        if not reply.has_error() or reply.error.code != wire.WEIGHTS_NOT_HELD:
            return None
        for index, (light, full) in enumerate(self._lightened):
            if light.metadata.message_id == reply.metadata.reply_to_message_id:
                del self._lightened[index]
                self._held.pop(full.metadata.dst_node_id, None)
                return full
        return None
