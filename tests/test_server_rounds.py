"""Server-side checks: bad replies never reach the aggregate; checkpoints are atomic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from common import wire
from server.checkpoint import (
    Checkpoint,
    load_checkpoint,
    restore_strategy_state,
    save_checkpoint,
    strategy_state,
)
from server.replies import array_spec, train_reply_problem
from server.report import RunRecorder
from server.strategy import RoundFailedError, build_strategy
from tests.conftest import small_settings

pytestmark = pytest.mark.usefixtures("flower_identity")

GLOBAL = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}


def _sent(node: int) -> Message:
    record = RecordDict({wire.ARRAYS: ArrayRecord(GLOBAL),
                         wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})})
    return Message(record, dst_node_id=node, message_type="train")


def _reply(node: int, arrays: dict[str, torch.Tensor], n: float = 10.0, **extra: object) -> Message:
    content = RecordDict({wire.ARRAYS: ArrayRecord(arrays),
                          wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: n, wire.HOSPITAL: node,
                                                      wire.TRAIN_LOSS: 0.5})})
    for key, record in extra.items():
        content[key] = record  # type: ignore[assignment]
    return Message(content, reply_to=_sent(node))


def _filled(value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in GLOBAL.items()}


@pytest.mark.parametrize("arrays,extra,problem", [
    ({**_filled(1.0), "leak": torch.ones(4)}, {}, "extra ['leak']"),
    ({"w": torch.ones(3, 2), "b": torch.ones(3)}, {}, "((3, 2), 'float32')"),
    ({"w": torch.ones(2, 3, dtype=torch.float16), "b": torch.ones(3)}, {}, "'float16')"),
    ({"w": torch.ones(2, 3, dtype=torch.float64), "b": torch.ones(3)}, {}, "'float64')"),
    ({"w": torch.ones(2, 3, dtype=torch.complex64), "b": torch.ones(3)}, {}, "'complex64')"),
    ({"w": torch.full((2, 3), float("nan")), "b": torch.ones(3)}, {}, "non-finite"),
    (_filled(1.0), {"notes": ConfigRecord({"patient": "Jane Doe"})}, "records"),
])
def test_bad_train_replies_are_named(arrays: dict, extra: dict, problem: str) -> None:
    msg = _reply(0, arrays, **extra)
    reason = train_reply_problem(msg, array_spec(ArrayRecord(GLOBAL)))
    assert reason is not None and problem in reason


def test_sound_reply_passes() -> None:
    assert train_reply_problem(_reply(0, _filled(1.0)), array_spec(ArrayRecord(GLOBAL))) is None


def _strategy(tmp_path: Path, *overrides: str):  # type: ignore[no-untyped-def]
    settings = small_settings(tmp_path, *overrides)
    recorder = RunRecorder(tmp_path / "run", "classification", 2, ["a", "b", "c"])
    strategy = build_strategy(settings, recorder)
    strategy._expected = array_spec(ArrayRecord(GLOBAL))
    strategy._global = ArrayRecord(GLOBAL)
    return strategy


def test_bad_replies_never_reach_the_aggregate(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path)
    replies = [
        _reply(0, _filled(1.0)),
        _reply(1, _filled(3.0)),
        _reply(2, {"w": torch.full((2, 3), float("inf")), "b": torch.ones(3)}),
        _reply(2, {**_filled(100.0), "extra": torch.ones(2)}),
        Message(Error(code=1, reason="privacy ceiling reached"), reply_to=_sent(2)),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    aggregated = arrays.to_numpy_ndarrays()
    assert all(np.allclose(a, 2.0) for a in aggregated)  # mean of 1 and 3 only
    assert metrics[wire.NUM_EXAMPLES] == 20
    log = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "non-finite" in log and "extra ['extra']" in log and "privacy ceiling" in log


def test_too_few_sound_replies_fail_the_round(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, "federation.min_train=2")
    replies = [_reply(0, _filled(1.0)),
               Message(Error(code=1, reason="out of memory"), reply_to=_sent(1))]
    with pytest.raises(RoundFailedError, match="only 1 hospital.*min_train=2"):
        strategy.aggregate_train(1, replies)


def test_checkpoint_write_interrupted_keeps_previous(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    first = Checkpoint(1, {"w": torch.ones(3)}, {})
    save_checkpoint(tmp_path, first)

    def broken_save(obj: object, handle) -> None:  # type: ignore[no-untyped-def]
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, Checkpoint(2, {"w": torch.zeros(3)}, {}))
    monkeypatch.undo()
    restored = load_checkpoint(tmp_path)
    assert restored is not None and restored.round == 1
    assert torch.equal(restored.weights["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_fedadam_state_survives_a_checkpoint(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, "strategy=fedadam")
    strategy.strategy.current_arrays = {k: v.numpy() + 1 for k, v in GLOBAL.items()}
    strategy.strategy.m_t = {k: v.numpy() for k, v in _filled(0.5).items()}
    strategy.strategy.v_t = {k: v.numpy() for k, v in _filled(0.25).items()}
    saved = strategy_state(strategy.strategy)
    save_checkpoint(tmp_path, Checkpoint(3, {"w": torch.ones(1)}, saved))
    fresh = _strategy(tmp_path, "strategy=fedadam")
    restored = load_checkpoint(tmp_path)
    assert restored is not None and restored.round == 3
    restore_strategy_state(fresh.strategy, restored.strategy_state)
    inner = fresh.strategy
    assert np.allclose(inner.m_t["w"], 0.5) and np.allclose(inner.v_t["b"], 0.25)
    assert np.allclose(fresh.strategy.current_arrays["w"], 1.0)
