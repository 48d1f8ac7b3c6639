"""Wire cost and the float16 option: byte accounting, casts, and what each side refuses."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.guard import REFUSED, only_weights_mod
from common import wire
from common.config import ConfigError, settings_to_json
from common.models import build_model
from common.wire_cost import message_bytes, payload_bytes, raw_bytes
from common.wire_dtype import from_wire, reply_spec, to_wire
from server.replies import array_spec, train_reply_problem
from tests.conftest import small_settings

WEIGHTS = {"conv.weight": torch.linspace(-2.0, 2.0, 6).reshape(2, 3), "conv.bias": torch.zeros(2),
           "steps": torch.tensor([3])}


def _context(tmp_path: Path, wire_dtype: str) -> Context:
    settings = small_settings(tmp_path, f"federation.wire_dtype={wire_dtype}")
    return Context(run_id=7, node_id=3, node_config={}, state=RecordDict(),
                   run_config={wire.RUN_CONFIG_KEY: settings_to_json(settings)})


def _sent(weights: dict[str, torch.Tensor]) -> Message:
    content = RecordDict({wire.ARRAYS: ArrayRecord(weights),
                          wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})})
    return Message(content, dst_node_id=3, message_type="train")


def _reply_with(weights: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
    def handler(msg: Message, _context: Context) -> Message:
        metrics = MetricRecord({wire.NUM_EXAMPLES: 10.0})
        return Message(RecordDict({wire.ARRAYS: ArrayRecord(weights), wire.METRICS: metrics}),
                       reply_to=msg)
    return handler


def test_float16_cast_and_back_keeps_keys_shapes_and_integer_arrays() -> None:
    record = ArrayRecord(WEIGHTS)
    halved = ArrayRecord(array_dict={k: Array(to_wire(a.numpy(), "float16"))
                                     for k, a in record.items()})
    assert [a.dtype for a in halved.values()] == ["float16", "float16", "int64"]
    back = from_wire(halved)
    assert array_spec(back) == array_spec(record)
    for key, tensor in back.to_torch_state_dict().items():
        # float16 keeps 11 significant bits: relative error <= 2**-11
        torch.testing.assert_close(tensor, WEIGHTS[key], rtol=2.0**-11, atol=0.0)
    assert to_wire(np.ones(3, np.float32), "float32").dtype == np.float32


@pytest.mark.usefixtures("flower_identity")
def test_guard_sends_float16_only_when_configured_and_refuses_overflow(tmp_path: Path) -> None:
    handler = _reply_with(WEIGHTS)
    halved = only_weights_mod(_sent(WEIGHTS), _context(tmp_path, "float16"), handler)
    assert not halved.has_error()
    assert halved.content.array_records[wire.ARRAYS]["conv.weight"].dtype == "float16"
    plain = only_weights_mod(_sent(WEIGHTS), _context(tmp_path, "float32"), handler)
    assert plain.content.array_records[wire.ARRAYS]["conv.weight"].dtype == "float32"
    # 1e5 is a finite float32 but overflows float16 (max 65504) to inf: refused at the hospital
    big = {**WEIGHTS, "conv.bias": torch.tensor([1.0e5, 0.0])}
    refused = only_weights_mod(_sent(WEIGHTS), _context(tmp_path, "float16"), _reply_with(big))
    assert refused.has_error() and refused.error.code == REFUSED
    assert "arrays.conv.bias has non-finite values as float16" in str(refused.error.reason)


@pytest.mark.usefixtures("flower_identity")
def test_server_accepts_float16_only_when_configured_and_refuses_inf(tmp_path: Path) -> None:
    sent = array_spec(ArrayRecord(WEIGHTS))
    halved = only_weights_mod(_sent(WEIGHTS), _context(tmp_path, "float16"), _reply_with(WEIGHTS))
    assert train_reply_problem(halved, reply_spec(sent, "float16")) is None
    problem = train_reply_problem(halved, reply_spec(sent, "float32"))
    assert problem is not None and "float16" in problem and "expected" in problem
    # a hostile hospital's inf in float16 (no guard of ours) is dropped as non-finite
    record = ArrayRecord(array_dict={
        "conv.weight": Array(np.full((2, 3), np.inf, np.float16)),
        "conv.bias": Array(np.zeros(2, np.float16)),
        "steps": Array(np.array([3]))})
    hostile = Message(RecordDict({wire.ARRAYS: record,
                                  wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10.0})}),
                      reply_to=_sent(WEIGHTS))
    assert train_reply_problem(hostile, reply_spec(sent, "float16")) == \
        "array 'conv.weight' has non-finite values"


def test_wire_dtype_is_checked_at_the_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="federation.wire_dtype='bfloat16'.*float32, float16"):
        small_settings(tmp_path, "federation.wire_dtype=bfloat16")


@pytest.mark.usefixtures("flower_identity")
def test_byte_accounting_matches_the_model_size(tmp_path: Path) -> None:
    settings = small_settings(tmp_path)
    model = build_model(settings.task, settings.model, seed=0)
    state = model.state_dict()
    elements = sum(t.numel() * t.element_size() for t in state.values())
    record = ArrayRecord(state)
    assert raw_bytes(record) == elements
    # Array.data is NumPy's .npy serialisation of each tensor: elements plus its header
    npy = 0
    for tensor in state.values():
        buffer = io.BytesIO()
        np.save(buffer, tensor.numpy(), allow_pickle=False)
        npy += len(buffer.getvalue())
    assert payload_bytes(record) == npy
    halved = ArrayRecord(array_dict={k: Array(to_wire(a.numpy(), "float16"))
                                     for k, a in record.items()})
    assert raw_bytes(halved) == sum(t.numel() * (2 if t.is_floating_point() else t.element_size())
                                    for t in state.values())
    # the whole protobuf message: the payload plus keys, shapes, dtypes and metadata
    size = message_bytes(_sent(state))
    assert npy < size < npy + 64 * len(state) + 256
