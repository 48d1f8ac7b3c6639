"""What keeps a simulation of many hospitals linear in the hospitals (no simulation started).

The scale figures themselves (time per round and memory at 10, 30, 100
hospitals) live in ``bench/scale_hospitals.py``; these tests check the parts
that made them grow faster than the hospitals:

- :class:`server.prompt_grid.PromptGrid` with a window keeps at most that many
  messages in Flower's in-memory state, which Flower's simulation engine
  scans in full for every node ten times a second; driven here by Flower's
  own engine loop (``add_messages_to_queue``) on Flower's own in-memory
  state and grid, with a thread answering for the hospitals;
- :class:`client.site_cache.SiteCache` keeps a hundred hospitals' datasets
  instead of four, bounded in bytes, and returns exactly what
  :func:`common.data.load_site` builds.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes, add_messages_to_queue
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from client.local import SITES, site_data
from client.site_cache import SiteCache, site_bytes
from common.data import SiteData, load_site
from server.prompt_grid import PromptGrid, simulation_window
from tests.conftest import small_settings

HOSPITALS = 100
RUN_ID, TASK_ID = 7, 11


@dataclass
class Engine:
    """Flower's in-memory state, grid and engine loop, a thread answering for the nodes.

    Attributes:
        state: the in-memory link state the simulation engine polls.
        grid: the ServerApp's grid on it.
        nodes: node id -> partition id, as Flower's engine registers them.
        silent: nodes that never answer.
        peak_stored: most messages the state held when a message was delivered.
    """

    state: InMemoryLinkState
    grid: InMemoryGrid
    nodes: dict[int, int]
    silent: set[int] = field(default_factory=set)
    peak_stored: int = 0

    def answer(self, inbox: Queue[Message], stop: threading.Event) -> None:
        """Reply to every delivered message (except the silent nodes') at once."""
        while not stop.is_set():
            try:
                msg = inbox.get(timeout=0.02)
            except Empty:
                continue
            self.peak_stored = max(self.peak_stored, len(self.state.message_ins_store))
            if msg.metadata.dst_node_id in self.silent:
                continue
            reply = Message(RecordDict({"config": ConfigRecord(
                {"partition": self.nodes[msg.metadata.dst_node_id]})}), reply_to=msg)
            reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's engine
            self.state.store_message_res(reply)

    def messages(self) -> list[Message]:
        """One training message per node."""
        return [Message(RecordDict(), dst_node_id=node, message_type="train", group_id="1")
                for node in self.nodes]


@pytest.fixture
def engine() -> Iterator[Engine]:
    """Flower's simulation state with ``HOSPITALS`` nodes and its engine loop running."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id = TASK_ID, RUN_ID
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                               ObjectStoreFactory())
    state = factory.state()
    assert isinstance(state, InMemoryLinkState)
    run = Run.create_empty(run_id=RUN_ID)
    run.primary_task_id, run.federation_id = TASK_ID, NOOP_FEDERATION_ID
    state.run_ids[RUN_ID] = RunRecord(run=run)
    state.task_store[TASK_ID] = Task(task_id=TASK_ID, run_id=RUN_ID)
    nodes = _register_nodes(num_nodes=HOSPITALS, state_factory=factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    found = Engine(state, grid, nodes)
    stop, inbox = threading.Event(), Queue[Message]()
    threads = [threading.Thread(target=add_messages_to_queue, args=(state, inbox, nodes, stop)),
               threading.Thread(target=found.answer, args=(inbox, stop))]
    for thread in threads:
        thread.start()
    try:
        yield found
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def partitions(replies: list[Message]) -> list[int]:
    """The partition each reply answers for, sorted."""
    return sorted(int(r.content.config_records["config"]["partition"])  # type: ignore[arg-type]
                  for r in replies)


def test_all_at_once_fills_the_state_with_every_hospital(engine: Engine) -> None:
    replies = list(PromptGrid(engine.grid).send_and_receive(engine.messages(), timeout=30))
    assert partitions(replies) == list(range(HOSPITALS))
    assert engine.peak_stored == HOSPITALS  # each engine poll scans HOSPITALS x HOSPITALS


def test_window_keeps_the_state_small_and_every_reply(engine: Engine) -> None:
    replies = list(PromptGrid(engine.grid, window=10).send_and_receive(engine.messages(),
                                                                       timeout=30))
    assert partitions(replies) == list(range(HOSPITALS))  # each hospital exactly once
    assert 1 <= engine.peak_stored <= 10
    assert not engine.state.message_ins_store  # every answered message was pulled and deleted


def test_window_time_limit_sends_the_rest_as_without_window(engine: Engine) -> None:
    messages = engine.messages()
    engine.silent = {m.metadata.dst_node_id for m in messages[:2]}  # they fill the window
    replies = list(PromptGrid(engine.grid, window=2).send_and_receive(messages, timeout=0.5))
    assert replies == []
    # every message was pushed (has its ID), so the strategy names each missing hospital
    assert all(m.metadata.message_id for m in messages)


def test_window_only_for_the_simulation_grid(engine: Engine, tmp_path: Path) -> None:
    settings = small_settings(tmp_path, "federation.num_hospitals=100",
                              "federation.parallel_hospitals=3")
    window = simulation_window(engine.grid, settings)
    assert window is not None and 6 <= window < HOSPITALS
    assert simulation_window(PromptGrid(engine.grid), settings) is None  # not Flower's in-memory
    with pytest.raises(ValueError, match="window"):
        PromptGrid(engine.grid, window=0)


def same_site(a: SiteData, b: SiteData) -> bool:
    """Whether two hospitals' datasets hold equal tensors in every split."""
    return all(torch.equal(x, y) for split in ("train", "val", "test")
               for x, y in zip(getattr(a, split).tensors, getattr(b, split).tensors,
                               strict=True))


def test_site_cache_keeps_a_hundred_hospitals_built_once(tmp_path: Path) -> None:
    settings = small_settings(tmp_path, "federation.num_hospitals=100",
                              "data.samples_per_hospital=16")
    cache, loads = SiteCache(), []

    def load(h: int) -> SiteData:
        loads.append(h)
        return load_site(settings, h)

    first = [cache.get(h, lambda h=h: load(h)) for h in range(HOSPITALS)]
    again = [cache.get(h, lambda h=h: load(h)) for h in reversed(range(HOSPITALS))][::-1]
    assert loads == list(range(HOSPITALS))  # built once each, the second pass from memory
    assert all(a is b for a, b in zip(first, again, strict=True))
    assert same_site(again[37], load_site(settings, 37))
    assert cache.held_bytes == sum(site_bytes(s, cache.max_bytes) for s in first)


def test_site_cache_evicts_least_recently_used_by_bytes(tmp_path: Path) -> None:
    settings = small_settings(tmp_path, "federation.num_hospitals=10",
                              "data.samples_per_hospital=16")
    sites = [load_site(settings, h) for h in range(4)]
    size = site_bytes(sites[0], 1 << 30)
    assert size == 16 * (4 * 28 * 28 + 8)  # float32 images [1, 28, 28] and int64 labels
    cache = SiteCache(max_bytes=3 * size)
    for h in range(3):
        cache.get(h, lambda h=h: sites[h])
    cache.get(0, lambda: pytest.fail("hospital 0 is held"))  # now the most recent
    cache.get(3, lambda: sites[3])  # pushes out hospital 1, the least recent
    assert len(cache) == 3 and cache.held_bytes == 3 * size
    rebuilt = []
    cache.get(1, lambda: rebuilt.append(1) or sites[1])
    assert rebuilt == [1]
    too_big = SiteCache(max_bytes=size - 1)
    assert too_big.get(0, lambda: sites[0]) is sites[0] and len(too_big) == 0


def test_client_site_data_is_memoised_per_run_and_hospital(tmp_path: Path) -> None:
    from client.hospital import Hospital

    settings = small_settings(tmp_path, "federation.num_hospitals=100",
                              "data.samples_per_hospital=16")
    first = site_data(settings, Hospital(index=99, count=100, name="hospital-99"))
    assert site_data(settings, Hospital(index=99, count=100, name="hospital-99")) is first
    assert same_site(first, load_site(settings, 99))
    assert SITES.held_bytes <= SITES.max_bytes
