"""A Flower ``Grid`` that collects replies as soon as they arrive.

Flower 1.41's ``HttpGrid.send_and_receive`` (the grid every ServerApp gets,
in simulation and in deployment) pushes the messages, pulls once, and then
sleeps a fixed 3 s between pulls. A phase whose hospitals answer in 1 s thus
takes 3 s, and every round has two phases (train, evaluate): on the bundled
presets that idle time was most of the federated overhead.

``PromptGrid`` wraps the grid Flower hands to the ServerApp and replaces only
``send_and_receive``, built on the grid's own ``push_messages`` and
``pull_messages``: it pulls again after a short pause that grows while nothing
arrives (50 ms, then x1.5 per empty pull, at most ``max_interval_s``), and
resets to the short pause whenever a reply comes in. Everything else is
delegated unchanged, so transport, TLS and node authentication stay Flower's.

In simulation it keeps at most a window of messages outstanding
(:func:`simulation_window`), so Flower's engine, which scans every stored
message for every node ten times a second, scans only the window.

While replies are outstanding it logs, every ``progress_every_s``, which
hospitals have not answered yet and for how long, and when the phase's
time limit (Flower's ``timeout``, ``federation.round_timeout_s``) closes it
without them. Replies are pulled by the IDs of the messages this call
pushed, so a straggler's late reply to an earlier phase is never returned
with a later one (the SuperLink keeps it until its TTL; nothing reads it).

With ``resend`` (the ServerApp passes
:meth:`server.strategy.CheckedStrategy.resend`), each reply is offered to it
as it arrives: a hospital that was sent only the digest of weights it turns
out not to hold asks for them, and the message ``resend`` returns (the
weights in full) is pushed in its place at once, within the phase's time
limit; the ask itself is not returned.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from common.config import Settings
from common.logs import medfed_logger

FIRST_INTERVAL_S = 0.05
BACKOFF = 1.5
MAX_INTERVAL_S = 0.1
PROGRESS_EVERY_S = 15.0
WINDOW_PER_ACTOR = 2
"""Messages outstanding per Ray actor in simulation (:func:`simulation_window`)."""
NAMES_SHOWN = 10
"""Hospitals named in a progress line; the others are counted."""

log = medfed_logger()


class PromptGrid(Grid):
    """Delegates to ``inner``; ``send_and_receive`` polls with a short, growing pause."""

    def __init__(self, inner: Grid, max_interval_s: float = MAX_INTERVAL_S, *,
                 name_of: Callable[[int], str] = lambda node: f"node {node}",
                 progress_every_s: float = PROGRESS_EVERY_S, window: int | None = None,
                 resend: Callable[[Message], Message | None] | None = None) -> None:
        """Wrap ``inner``; ``name_of`` names a node id's hospital in progress lines;
        ``window``: the most messages outstanding at a time (None: all at once);
        ``resend``: a reply -> the message to push instead of returning it, or None."""
        if max_interval_s <= 0:
            raise ValueError(f"max_interval_s must be > 0 seconds, got {max_interval_s}")
        if progress_every_s <= 0:
            raise ValueError(f"progress_every_s must be > 0 seconds, got {progress_every_s}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 message, got {window}")
        self._window = window
        self._inner = inner
        self._max_interval_s = max_interval_s
        self._name_of = name_of
        self._progress_every_s = progress_every_s
        self.resend = resend
        """Asked about every reply; a strategy digests messages only to a grid that resends."""

    def set_run(self, run: Run) -> None:
        """Set the run this grid operates in (delegated)."""
        self._inner.set_run(run)

    @property
    def run(self) -> Run:
        """The run this grid operates in (delegated)."""
        return self._inner.run

    def create_message(  # pylint: disable=too-many-arguments
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Build a message for one node (delegated)."""
        return self._inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """IDs of the connected nodes (delegated)."""
        return self._inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        """The connected nodes (delegated)."""
        return self._inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Send messages; returns their IDs (delegated)."""
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies that have arrived for these message IDs (delegated)."""
        return self._inner.pull_messages(message_ids)

    def send_and_receive(
        self,
        messages: Iterable[Message],
        *,
        timeout: float | None = None,
    ) -> Iterable[Message]:
        """Push ``messages`` and pull replies until all arrived or ``timeout`` seconds pass.

        Same contract as Flower's: ``timeout=None`` waits for every reply
        (a node that dies is answered by the SuperLink with an error reply).
        With a ``window``, at most that many messages are outstanding at a
        time; each reply lets the next one go; when the time limit closes
        the phase, the rest are pushed as well (as without a window, their
        late replies are never read). A reply for which ``resend`` gives a
        message is replaced by that message, pushed next.
        """
        unsent = deque(messages)
        window = self._window or max(len(unsent), 1)
        waiting = _Waiting(self._name_of, self._progress_every_s, timeout)
        pending: set[str] = set()

        def push(count: int) -> None:
            batch = [unsent.popleft() for _ in range(min(count, len(unsent)))]
            if batch:
                pending.update(self._inner.push_messages(batch))
                waiting.sent(batch)

        push(window)
        replies: list[Message] = []
        interval = FIRST_INTERVAL_S
        while pending or unsent:
            arrived = list(self._inner.pull_messages(pending)) if pending else []
            pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
            for reply in arrived:
                again = self.resend(reply) if self.resend is not None else None
                if again is None:
                    replies.append(reply)
                else:
                    unsent.appendleft(again)
            push(window - len(pending))
            if not pending and not unsent:
                break
            interval = FIRST_INTERVAL_S if arrived else min(interval * BACKOFF,
                                                            self._max_interval_s)
            remaining = waiting.remaining()
            if remaining is not None:
                if remaining <= 0:
                    push(len(unsent))
                    waiting.closed(pending)
                    break
                interval = min(interval, remaining)
            waiting.report(pending, unsent)
            time.sleep(interval)
        return replies


def simulation_window(grid: Grid, settings: Settings) -> int | None:
    """How many messages :class:`PromptGrid` keeps outstanding: a window in simulation.

    Flower 1.41's simulation engine looks for new messages every 0.1 s by
    asking its in-memory state, node by node, for that node's next message;
    each ask scans every stored message. With every hospital's message
    pushed at once that is hospitals^2 checks per 0.1 s (about a quarter of
    a core at 100 hospitals, a core and more beyond). Only as many
    hospitals as there are Ray actors train at once, so a window of
    :data:`WINDOW_PER_ACTOR` messages per actor keeps every actor busy and
    makes that scan independent of the number of hospitals.

    Returns:
        None (everything at once) for any grid but the simulation's
        in-memory one: deployed hospitals all train at the same time.
    """
    from flwr.superlink.grid import InMemoryGrid  # the simulation's grid; not loaded otherwise

    if not isinstance(grid, InMemoryGrid):
        return None
    fed = settings.federation
    actors = max(fed.parallel_hospitals, (os.cpu_count() or 1) // fed.num_cpus, 1)
    return WINDOW_PER_ACTOR * actors


class _Waiting:
    """Who has not answered a phase yet: progress lines every ``every_s`` seconds."""

    def __init__(self, name_of: Callable[[int], str], every_s: float,
                 timeout: float | None) -> None:
        self._node_of: dict[str, int] = {}
        self._name_of, self._every_s = name_of, every_s
        self._started = time.monotonic()
        self._deadline = None if timeout is None else self._started + timeout
        self._next = self._started + every_s

    def sent(self, messages: Iterable[Message]) -> None:
        """Note the nodes of messages just pushed (by their message IDs)."""
        self._node_of.update({m.metadata.message_id: m.metadata.dst_node_id for m in messages})

    def remaining(self) -> float | None:
        """Seconds left before the time limit (None: no limit)."""
        return None if self._deadline is None else self._deadline - time.monotonic()

    def _names(self, pending: set[str], unsent: Iterable[Message] = ()) -> str:
        nodes = [self._node_of.get(m, -1) for m in pending] + [m.metadata.dst_node_id
                                                               for m in unsent]
        names = sorted(self._name_of(n) for n in nodes)
        more = len(names) - NAMES_SHOWN
        return ", ".join(names[:NAMES_SHOWN]) + (f" and {more} more" if more > 0 else "")

    def report(self, pending: set[str], unsent: Iterable[Message] = ()) -> None:
        """Log who is still awaited (sent or not yet), at most once per ``every_s``."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self._every_s
        left = self.remaining()
        log.info("[MedFed] waiting %.0f s for %s%s", now - self._started,
                 self._names(pending, unsent),
                 "" if left is None else f" (time limit in {max(left, 0):.0f} s)")

    def closed(self, pending: set[str]) -> None:
        """Log that the time limit closed the phase without ``pending``."""
        log.warning("[MedFed] no reply after %.0f s (federation.round_timeout_s) from %s; "
                    "going on without them", time.monotonic() - self._started,
                    self._names(pending))
