"""The hospital's audit record: what each reply carried, chained by hash, verified by ``audit``.

Entries are written by the same function the runner calls right before a
reply is pushed (:func:`client.task.recorded`), from Flower messages built as
a node receives them. The record of a real deployment run is checked, and
tampered with, in ``tests/test_approval.py``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    DEFAULT_TTL,
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.message.message import make_message

from client import audit
from client.task import NOT_APPROVED, recorded
from common import wire

APP = "a" * 64
WEIGHTS = {"conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
           "conv.bias": np.zeros(2, dtype=np.float32)}


def received(kind: str, round_: int, message_id: str) -> Message:
    """A message from the server as the hospital's node receives it."""
    content = RecordDict({wire.ARRAYS: ArrayRecord(array_dict={k: Array(v) for k, v in
                                                               WEIGHTS.items()}),
                          wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: round_})})
    metadata = Metadata(run_id=7, message_id=message_id, src_node_id=1, dst_node_id=3,
                        reply_to_message_id="", group_id="", created_at=time.time(),
                        ttl=DEFAULT_TTL, message_type=kind)
    return make_message(metadata, content)


def answered(home: Path) -> list[Message]:
    """Three replies recorded: trained weights with epsilon, an evaluation, a refusal."""
    train, evaluate, refused = (received("train", 1, "m-1"), received("evaluate", 1, "m-2"),
                                received("train", 2, "m-3"))
    weights = ArrayRecord(array_dict={k: Array(v + 1) for k, v in WEIGHTS.items()})
    replies = [(train, Message(RecordDict({wire.ARRAYS: weights, wire.METRICS: MetricRecord(
                   {wire.NUM_EXAMPLES: 40, "epsilon": 0.75})}), reply_to=train)),
               (evaluate, Message(RecordDict({wire.METRICS: MetricRecord({"auc": 0.625})}),
                                  reply_to=evaluate)),
               (refused, Message(Error(code=NOT_APPROVED, reason="not approved"),
                                 reply_to=refused))]
    for message, reply in replies:
        assert recorded(home, APP, message, reply) is reply
    return [reply for _, reply in replies]


def test_each_reply_is_recorded_with_digests_and_the_chain_verifies(tmp_path: Path) -> None:
    trained, _, _ = answered(tmp_path)
    path = tmp_path / audit.AUDIT_FILE
    first, evaluated, refused = (json.loads(line) for line in path.read_text().splitlines())
    sent = trained.content.array_records[wire.ARRAYS]
    assert first["arrays"] == [
        {"record": wire.ARRAYS, "name": k, "shape": list(sent[k].shape), "dtype": "float32",
         "sha256": hashlib.sha256(sent[k].data).hexdigest()} for k in WEIGHTS]
    assert first["metrics"] == {wire.METRICS: {wire.NUM_EXAMPLES: 40, "epsilon": 0.75}}
    assert (first["epsilon"], first["round"], first["run_id"], first["app_hash"]) == (
        0.75, 1, 7, APP)
    assert first["prev"] == audit.GENESIS and first["seq"] == 1
    assert evaluated["metrics"] == {wire.METRICS: {"auc": 0.625}} and evaluated["arrays"] == []
    assert evaluated["epsilon"] is None and evaluated["prev"] == first["hash"]
    assert refused["error"] == {"code": NOT_APPROVED, "reason": "not approved"}
    assert refused["round"] == 2
    verdict = audit.verify(path)
    assert verdict.problem is None and verdict.head == refused["hash"]
    assert audit.main(["--home", str(tmp_path), "--expect", first["hash"]]) == 0


@pytest.mark.parametrize(("tamper", "found"), [
    ("metric", "line 1 (seq 1): its content does not match its hash: it was edited"),
    ("rehashed", "line 2 (seq 2): does not follow"),
    ("removed", "line 2 (seq 3): does not follow the entry before it (seq 1)"),
    ("reordered", "line 2 (seq 3): does not follow"),
    ("cut", "line 3: not a MedFed audit entry"),
])
def test_tampering_is_caught_at_the_first_bad_entry(tmp_path: Path, tamper: str, found: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    answered(tmp_path)
    path = tmp_path / audit.AUDIT_FILE
    lines = path.read_text().splitlines()
    entry = json.loads(lines[0])
    if tamper in ("metric", "rehashed"):  # a changed value; then also its hash recomputed
        entry["metrics"][wire.METRICS]["epsilon"] = 0.5
        entry["hash"] = audit.entry_hash(entry) if tamper == "rehashed" else entry["hash"]
        lines[0] = json.dumps(entry)
    lines = {"removed": [lines[0], lines[2]], "reordered": [lines[0], lines[2], lines[1]],
             "cut": [*lines[:2], lines[2][: len(lines[2]) // 2]]}.get(tamper, lines)
    path.write_text("\n".join(lines) + "\n")
    assert audit.main(["--home", str(tmp_path)]) == 1
    assert found in capsys.readouterr().err


def test_a_cut_tail_is_caught_against_a_kept_head(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Dropping the newest entries leaves a valid chain; the head hash kept elsewhere shows it."""
    answered(tmp_path)
    path = tmp_path / audit.AUDIT_FILE
    head = audit.verify(path).head
    path.write_text("\n".join(path.read_text().splitlines()[:2]) + "\n")
    assert audit.main(["--home", str(tmp_path)]) == 0
    assert audit.main(["--home", str(tmp_path), "--expect", head]) == 1
    assert f"no entry has hash {head}" in capsys.readouterr().err


def test_a_damaged_record_is_never_extended(tmp_path: Path) -> None:
    """The reply is not sent (an error goes instead) when the record cannot be extended."""
    path = tmp_path / audit.AUDIT_FILE
    path.write_text('{"seq": 1, "hash": \n')
    message = received("train", 1, "m-1")
    reply = Message(RecordDict({wire.METRICS: MetricRecord({"auc": 0.5})}), reply_to=message)
    instead = recorded(tmp_path, APP, message, reply)
    assert instead.has_error() and "audit record could not be written" in str(instead.error.reason)
    assert path.read_text() == '{"seq": 1, "hash": \n'


def _append_many(path: str, worker: int, count: int) -> None:
    for i in range(count):
        audit.append(Path(path), {"worker": worker, "i": i})


def test_concurrent_writers_keep_one_chain(tmp_path: Path) -> None:
    """Two processes appending at once (two runs answered together) never fork the chain."""
    path = tmp_path / audit.AUDIT_FILE
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=_append_many, args=(str(path), w, 25)) for w in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    verdict = audit.verify(path)
    assert verdict.problem is None and len(verdict.entries) == 50
    assert [e["seq"] for e in verdict.entries] == list(range(1, 51))
