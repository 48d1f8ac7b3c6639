"""The hospital's guard: only the model arrays received and finite scalars may leave.

Messages are built as a node receives them (with full metadata, the way
Flower's own tests make them), replies the way a ClientApp handler does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    DEFAULT_TTL,
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.message.message import make_message
from flwr.clientapp import ClientApp

from client import app as medfed_app
from client.guard import MAX_REASON, RAISED, REFUSED, only_weights_mod
from common import wire
from common.config import settings_to_json
from tests.conftest import small_settings

WEIGHTS = {"conv.weight": np.ones((2, 3), dtype=np.float32),
           "conv.bias": np.zeros(2, dtype=np.float32)}
Handler = Callable[[Message, Context], Message]


def received(kind: str = "train") -> Message:
    """A message from the server as the hospital's node receives it."""
    content = RecordDict({wire.ARRAYS: ArrayRecord(array_dict={k: Array(v) for k, v in
                                                               WEIGHTS.items()}),
                          wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})})
    metadata = Metadata(run_id=7, message_id="m-1", src_node_id=1, dst_node_id=3,
                        reply_to_message_id="", group_id="1", created_at=time.time(),
                        ttl=DEFAULT_TTL, message_type=kind)
    return make_message(metadata, content)


def context() -> Context:
    return Context(run_id=7, node_id=3, node_config={}, state=RecordDict(), run_config={})


def replying(content: RecordDict) -> Handler:
    """A ClientApp handler that answers with ``content``."""
    def handler(msg: Message, _context: Context) -> Message:
        return Message(content, reply_to=msg)
    return handler


def arrays(**changes: np.ndarray | None) -> ArrayRecord:
    """The weights received, with some arrays replaced, added or (None) removed."""
    merged = {**WEIGHTS, **changes}
    return ArrayRecord(array_dict={k: Array(v) for k, v in merged.items() if v is not None})


def metrics(**values: float) -> MetricRecord:
    return MetricRecord({wire.NUM_EXAMPLES: 10, wire.TRAIN_LOSS: 0.3, **values})


def guarded(content: RecordDict, kind: str = "train") -> Message:
    return only_weights_mod(received(kind), context(), replying(content))


def reason(reply: Message) -> str:
    assert reply.has_error()
    return str(reply.error.reason)


def test_weights_and_scalars_leave_unchanged() -> None:
    reply = guarded(RecordDict({wire.ARRAYS: arrays(), wire.METRICS: metrics()}))
    assert not reply.has_error()
    out = reply.content.array_records[wire.ARRAYS]
    assert list(out.keys()) == list(WEIGHTS)
    for key, value in WEIGHTS.items():
        np.testing.assert_array_equal(out[key].numpy(), value)
    assert dict(reply.content[wire.METRICS]) == {wire.NUM_EXAMPLES: 10, wire.TRAIN_LOSS: 0.3}
    assert reply.metadata.reply_to_message_id == "m-1"
    assert reply.metadata.dst_node_id == 1


def test_evaluation_may_send_scalar_metrics_only() -> None:
    assert not guarded(RecordDict({wire.METRICS: metrics(auc=0.7)}), "evaluate").has_error()
    refused = guarded(RecordDict({wire.METRICS: metrics(), wire.ARRAYS: arrays()}), "evaluate")
    assert refused.has_error() and refused.error.code == REFUSED
    assert "'arrays' (ArrayRecord)" in reason(refused)


NAN = np.full((2, 3), np.nan, dtype=np.float32)
INF = np.full((2, 3), -np.inf, dtype=np.float32)


@pytest.mark.parametrize(("content", "problem"), [
    pytest.param(RecordDict({wire.ARRAYS: arrays(leak=np.ones(5, np.float32)),
                             wire.METRICS: metrics()}), "extra: ['arrays.leak']",
                 id="extra-array"),
    pytest.param(RecordDict({wire.ARRAYS: arrays(**{"conv.bias": None}),
                             wire.METRICS: metrics()}), "missing: ['arrays.conv.bias']",
                 id="missing-array"),
    pytest.param(RecordDict({wire.ARRAYS: arrays(**{"conv.bias": np.zeros(3, np.float32)}),
                             wire.METRICS: metrics()}), "conv.bias is ((3,), 'float32')",
                 id="wrong-shape"),
    pytest.param(RecordDict({wire.ARRAYS: arrays(**{"conv.bias": np.zeros(2)}),
                             wire.METRICS: metrics()}), "'float64'", id="wrong-dtype"),
    pytest.param(RecordDict({wire.ARRAYS: arrays(**{"conv.weight": NAN}),
                             wire.METRICS: metrics()}), "non-finite", id="nan-weights"),
    pytest.param(RecordDict({wire.ARRAYS: arrays(**{"conv.weight": INF}),
                             wire.METRICS: metrics()}), "non-finite", id="inf-weights"),
    pytest.param(RecordDict({wire.ARRAYS: arrays(), wire.METRICS: metrics(),
                             "notes": ConfigRecord({"patient": "Jane Doe, 1961"})}),
                 "'notes' (ConfigRecord)", id="config-record-of-strings"),
    pytest.param(RecordDict({wire.ARRAYS: arrays(), "more": arrays(), wire.METRICS: metrics()}),
                 "'more' (ArrayRecord)", id="second-array-record"),
    pytest.param(RecordDict({wire.ARRAYS: arrays(),
                             wire.METRICS: metrics(**{wire.TRAIN_LOSS: float("inf")})}),
                 "not a finite number", id="inf-metric"),
    pytest.param(RecordDict({wire.ARRAYS: arrays(),
                             wire.METRICS: MetricRecord({"pixels": [0.1, 0.9, 0.4]})}),
                 "not a single number", id="list-metric"),  # only ROC counts may be lists
    pytest.param(RecordDict({wire.METRICS: metrics()}), "lacks the model arrays",
                 id="no-weights"),
])
def test_anything_else_is_refused(content: RecordDict, problem: str,
                                  caplog: pytest.LogCaptureFixture) -> None:
    medfed_logger = logging.getLogger("medfed")  # it does not propagate to the root
    medfed_logger.addHandler(caplog.handler)
    try:
        reply = guarded(content)
    finally:
        medfed_logger.removeHandler(caplog.handler)
    assert reply.has_error()
    assert not reply.has_content()
    assert reply.error.code == REFUSED
    assert problem in reason(reply)
    assert "refused at node 3" in caplog.text  # logged at the hospital


def test_bytes_hidden_after_an_array_are_dropped() -> None:
    honest = Array(WEIGHTS["conv.bias"])
    smuggled = Array(dtype=honest.dtype, shape=honest.shape, stype=honest.stype,
                     data=honest.data + b"patient: Jane Doe")
    record = ArrayRecord(array_dict={"conv.weight": Array(WEIGHTS["conv.weight"]),
                                     "conv.bias": smuggled})
    reply = guarded(RecordDict({wire.ARRAYS: record, wire.METRICS: metrics()}))
    assert not reply.has_error()
    out = reply.content.array_records[wire.ARRAYS]["conv.bias"]
    assert b"Jane Doe" not in out.data
    np.testing.assert_array_equal(out.numpy(), WEIGHTS["conv.bias"])


def test_expected_arrays_are_read_before_the_clientapp_runs() -> None:
    """A ClientApp that adds an array to the received message cannot widen what may leave."""
    def sneaky(msg: Message, _context: Context) -> Message:
        sent = msg.content.array_records[wire.ARRAYS]
        sent["leak"] = Array(np.ones(4, np.float32))
        return Message(RecordDict({wire.ARRAYS: sent,
                                   wire.METRICS: metrics()}), reply_to=msg)
    reply = only_weights_mod(received(), context(), sneaky)
    assert "arrays.leak" in reason(reply)


def test_an_exception_leaves_only_as_its_type() -> None:
    def failing(_msg: Message, _context: Context) -> Message:
        raise ValueError("cannot read /data/site-a/Jane_Doe_1961.dcm")
    reply = only_weights_mod(received(), context(), failing)
    assert reply.has_error() and reply.error.code == RAISED
    assert "ValueError" in reason(reply)
    assert "Jane_Doe" not in reason(reply)


def test_the_clientapps_own_error_reply_passes_shortened() -> None:
    def declining(msg: Message, _context: Context) -> Message:
        return Message(Error(code=4001, reason="ceiling reached " + "x" * 1000), reply_to=msg)
    reply = only_weights_mod(received(), context(), declining)
    assert reply.error.code == 4001
    assert reason(reply).startswith("ceiling reached")
    assert len(reason(reply)) == MAX_REASON


def test_guard_runs_inside_a_flower_clientapp() -> None:
    """Through Flower's own mod chain, as the SuperNode's ClientApp process calls it."""
    app = ClientApp(mods=[only_weights_mod])

    @app.train()
    def train(msg: Message, _context: Context) -> Message:
        leaked = arrays(**{"conv.weight": NAN})
        return Message(RecordDict({wire.ARRAYS: leaked, wire.METRICS: metrics()}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, _context: Context) -> Message:
        return Message(RecordDict({wire.METRICS: metrics(auc=0.5)}), reply_to=msg)

    assert app(message=received("train"), context=context()).error.code == REFUSED
    assert not app(message=received("evaluate"), context=context()).has_error()


def test_medfeds_clientapp_has_the_guard_outermost() -> None:
    assert medfed_app.app._mods[0] is only_weights_mod


def test_only_the_hospitals_allowed_metrics_leave() -> None:
    """``allowed-metrics`` in the hospital's node config: any other name is refused."""
    node = Context(run_id=7, node_id=3, state=RecordDict(), run_config={},
                   node_config={"allowed-metrics": f"{wire.NUM_EXAMPLES},auc"})
    content = RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10, "auc": 0.7})})
    assert not only_weights_mod(received("evaluate"), node, replying(content)).has_error()
    content[wire.METRICS]["accuracy"] = 0.6
    refused = only_weights_mod(received("evaluate"), node, replying(content))
    assert refused.error.code == REFUSED
    assert "'accuracy' in 'metrics' is not one this hospital lets leave" in reason(refused)


def test_a_dp_sgd_training_reply_carries_no_loss_or_timing(tmp_path: Path) -> None:
    """In a DP-SGD run the guard lets a training reply carry only the privacy figures,
    the count and the hospital's number, whatever the ClientApp puts in."""
    settings = small_settings(tmp_path, "privacy=dp_sgd")
    dp_run = Context(run_id=7, node_id=3, node_config={}, state=RecordDict(),
                     run_config={wire.RUN_CONFIG_KEY: settings_to_json(settings)})
    figures = {wire.NUM_EXAMPLES: 48.0, wire.HOSPITAL: 0.0, wire.EPSILON: 0.4, wire.DELTA: 1e-5}
    sound = RecordDict({wire.ARRAYS: arrays(), wire.METRICS: MetricRecord(figures)})
    assert not only_weights_mod(received(), dp_run, replying(sound)).has_error()
    for leak in (wire.TRAIN_LOSS, wire.TRAIN_SECONDS, wire.TRAIN_STEPS):
        content = RecordDict({wire.ARRAYS: arrays(),
                              wire.METRICS: MetricRecord({**figures, leak: 0.3})})
        refused = only_weights_mod(received(), dp_run, replying(content))
        assert refused.error.code == REFUSED and f"metric '{leak}'" in reason(refused)
    # evaluation replies of the same run keep their metrics
    scores = RecordDict({wire.METRICS: metrics(auc=0.7)})
    assert not only_weights_mod(received("evaluate"), dp_run, replying(scores)).has_error()


ROC = list(range(100, -1, -1))  # 101 non-increasing whole counts


@pytest.mark.parametrize(("values", "problem"), [
    pytest.param({wire.ROC_TP: ROC, wire.ROC_FP: ROC}, None, id="roc-counts-leave"),
    pytest.param({wire.ROC_TP: [float(v) + 0.5 for v in ROC]}, "non-increasing whole counts",
                 id="pixel-values-as-counts"),
    pytest.param({wire.ROC_TP: list(range(101))}, "non-increasing", id="growing-counts"),
    pytest.param({wire.ROC_TP: ROC[:50]}, "non-increasing", id="wrong-length"),
    pytest.param({"roc-pixels": ROC}, "not a single number", id="other-list"),
])
def test_only_roc_counts_leave_as_lists(values: dict, problem: str | None) -> None:
    reply = guarded(RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10, **values})}),
                    "evaluate")
    if problem is None:
        assert not reply.has_error()
        assert dict(reply.content[wire.METRICS])[wire.ROC_TP] == ROC
    else:
        assert problem in reason(reply)
