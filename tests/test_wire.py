"""Wire cost and the float16 option: byte accounting, casts, and what each side refuses."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from bench.hostile_app import hostile_project
from client import app as medfed_app
from client.guard import REFUSED, only_weights_mod
from client.held_weights import HELD_DIGEST, held, held_weights_mod, keep
from common import wire
from common.config import ConfigError, settings_to_json
from common.digest import arrays_digest
from common.models import build_model
from common.wire_cost import message_bytes, payload_bytes, raw_bytes
from common.wire_dtype import from_wire, reply_spec, to_wire
from server.held_weights import digest_message
from server.prompt_grid import PromptGrid
from server.replies import array_spec, train_reply_problem
from server.report import RunRecorder
from server.strategy import as_float32, build_strategy
from simulate import simulate
from tests.conftest import small_settings
from tests.test_scale import (
    HOSPITALS,
    Engine,
    engine,  # noqa: F401 - the fixture, taken with _engine()
    partitions,
)

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


# --- the global weights cross the wire once a round (held at the hospital) -----------------

def test_digest_names_keys_order_dtypes_shapes_and_values() -> None:
    base = arrays_digest(ArrayRecord(WEIGHTS))
    assert base == arrays_digest(ArrayRecord({k: v.clone() for k, v in WEIGHTS.items()}))
    assert len(base) == 64
    nudged = WEIGHTS["conv.weight"].clone()
    nudged[1, 2] = float(np.nextafter(np.float32(2.0), np.float32(3.0)))  # 2.0 plus one ulp
    one_ulp = {**WEIGHTS, "conv.weight": nudged}
    changed = [
        one_ulp,
        {**WEIGHTS, "conv.bias": torch.zeros(2, dtype=torch.float64)},  # same values, other dtype
        {**WEIGHTS, "conv.weight": WEIGHTS["conv.weight"].reshape(3, 2)},  # same bytes, other shape
        {"conv.w": WEIGHTS["conv.weight"], "conv.bias": WEIGHTS["conv.bias"],
         "steps": WEIGHTS["steps"]},  # a key renamed
        dict(reversed(list(WEIGHTS.items()))),  # the same arrays in another order
    ]
    assert len({base, *(arrays_digest(ArrayRecord(w)) for w in changed)}) == 1 + len(changed)


@pytest.mark.usefixtures("flower_identity")
def test_guard_keeps_a_zero_dimensional_array_zero_dimensional() -> None:
    weights = {**WEIGHTS, "tracked": torch.tensor(5)}  # a num_batches_tracked-like buffer
    reply = only_weights_mod(_sent(weights), Context(run_id=7, node_id=3, node_config={},
                                                     state=RecordDict(), run_config={}),
                             _reply_with(weights))
    assert not reply.has_error()
    arrays = reply.content.array_records[wire.ARRAYS]
    assert tuple(arrays["tracked"].shape) == () and arrays["tracked"].numpy().shape == ()
    assert array_spec(arrays) == array_spec(ArrayRecord(weights))
    assert torch.equal(arrays.to_torch_state_dict()["tracked"], torch.tensor(5))


def _recording_app(seen: list[Message], trained: dict[str, torch.Tensor]) -> ClientApp:
    """MedFed's two mods in Flower's own mod chain; the handler replies ``trained``."""
    app = ClientApp(mods=[only_weights_mod, held_weights_mod])

    @app.train()
    def train(msg: Message, _context: Context) -> Message:
        seen.append(msg)
        return _reply_with(trained)(msg, _context)

    @app.evaluate()
    def evaluate(msg: Message, _context: Context) -> Message:
        return Message(RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 4.0})}),
                       reply_to=msg)

    return app


@pytest.mark.usefixtures("flower_identity")
def test_hospital_trains_from_the_held_weights_a_digest_names(tmp_path: Path) -> None:
    seen: list[Message] = []
    app, node = _recording_app(seen, WEIGHTS), _context(tmp_path, "float32")
    evaluated = Message(RecordDict({wire.ARRAYS: ArrayRecord(WEIGHTS),
                                    wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})}),
                        dst_node_id=3, message_type="evaluate")
    assert not app(message=evaluated, context=node).has_error()
    digest = arrays_digest(ArrayRecord(WEIGHTS))
    assert node.state.config_records[HELD_DIGEST]["digest"] == digest
    light = digest_message(_sent(WEIGHTS), digest)
    assert wire.ARRAYS not in light.content.array_records
    assert light.content.config_records[wire.CONFIG][wire.SERVER_ROUND] == 1
    reply = app(message=light, context=node)
    assert not reply.has_error()  # the guard checked it against the held weights
    received = seen[-1].content.array_records[wire.ARRAYS].to_torch_state_dict()
    assert all(torch.equal(received[k], WEIGHTS[k]) for k in WEIGHTS)
    # a reply that does not fit the held weights is refused as if they had been sent
    other = {**WEIGHTS, "conv.bias": torch.zeros(3)}
    refused = _recording_app(seen, other)(message=digest_message(_sent(WEIGHTS), digest),
                                          context=node)
    assert refused.has_error() and refused.error.code == REFUSED
    # only the latest evaluation's weights are held
    newer = {**WEIGHTS, "conv.bias": torch.ones(2)}
    evaluated.content[wire.ARRAYS] = ArrayRecord(newer)
    app(message=evaluated, context=node)
    assert held(node, digest) is None
    assert held(node, arrays_digest(ArrayRecord(newer))) is not None


@pytest.mark.usefixtures("flower_identity")
def test_a_hospital_without_the_weights_asks_for_them(tmp_path: Path) -> None:
    """MedFed's own ClientApp, on a node that holds nothing (a restarted SuperNode)."""
    settings = small_settings(tmp_path)
    node = Context(run_id=7, node_id=12, node_config={wire.PARTITION_ID: 1,
                                                      wire.NUM_PARTITIONS: 3},
                   state=RecordDict(), run_config={wire.RUN_CONFIG_KEY: settings_to_json(settings)})
    digest = arrays_digest(ArrayRecord(WEIGHTS))
    reply = medfed_app.app(message=digest_message(_sent(WEIGHTS), digest), context=node)
    assert reply.has_error() and reply.error.code == wire.WEIGHTS_NOT_HELD
    assert f"digest {digest[:12]}" in str(reply.error.reason)


@pytest.mark.usefixtures("flower_identity")
def test_held_weights_train_exactly_as_sent_ones(tmp_path: Path) -> None:
    """MedFed's own ClientApp trains bit for bit the same from a digest as from the weights."""
    settings = small_settings(tmp_path, "data.samples_per_hospital=32")
    weights = build_model(settings.task, settings.model, seed=0).state_dict()

    def node() -> Context:
        return Context(run_id=7, node_id=12, node_config={wire.PARTITION_ID: 1,
                                                          wire.NUM_PARTITIONS: 3},
                       state=RecordDict(),
                       run_config={wire.RUN_CONFIG_KEY: settings_to_json(settings)})

    sent = medfed_app.app(message=_sent(weights), context=node())
    holding = node()
    keep(holding, ArrayRecord(weights))
    light = digest_message(_sent(weights), arrays_digest(ArrayRecord(weights)))
    named = medfed_app.app(message=light, context=holding)
    assert not sent.has_error() and not named.has_error()
    a = sent.content.array_records[wire.ARRAYS].to_torch_state_dict()
    b = named.content.array_records[wire.ARRAYS].to_torch_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], weights[k]) for k in a)  # it did train


def _engine(request: pytest.FixtureRequest) -> Engine:
    """Flower's in-memory state, grid and engine loop (``tests.test_scale``'s fixture)."""
    found = request.getfixturevalue("engine")
    assert isinstance(found, Engine)
    return found


@pytest.mark.usefixtures("flower_identity")
def test_strategy_sends_a_digest_only_where_the_weights_are_held(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    loop = _engine(request)
    settings = small_settings(tmp_path)
    strategy = build_strategy(settings, RunRecorder(tmp_path / "run", "classification", 2,
                                                    ["a", "b", "c"]))
    grid = PromptGrid(loop.grid, resend=strategy.resend)
    arrays, config = ArrayRecord(WEIGHTS), ConfigRecord({"local-epochs": 1})
    evaluation = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), grid))
    strategy.aggregate_evaluate(1, grid.send_and_receive(evaluation, timeout=30))
    # other weights than those evaluated, or a grid that would not resend: full messages
    other = ArrayRecord({**WEIGHTS, "conv.bias": torch.ones(2)})
    for weights, via in ((other, grid), (arrays, loop.grid)):
        sent = list(strategy.configure_train(2, weights, config, via))
        assert all(wire.ARRAYS in m.content.array_records for m in sent)
    full_bytes = strategy._wire["wire-bytes-train-sent"]
    sent = list(strategy.configure_train(2, arrays, config, grid))
    assert len(sent) == HOSPITALS and strategy._wire["wire-messages-train-digest"] == HOSPITALS
    digest = arrays_digest(arrays)
    for msg in sent:
        assert wire.ARRAYS not in msg.content.array_records
        assert dict(msg.content.config_records[wire.CONFIG]) == {
            "local-epochs": 1, wire.SERVER_ROUND: 2, wire.GLOBAL_DIGEST: digest}
    light_bytes = strategy._wire["wire-bytes-train-sent"]
    assert light_bytes < HOSPITALS * 300  # config and digest: the weights' bytes are saved
    assert full_bytes - light_bytes > HOSPITALS * (payload_bytes(arrays) - 100)
    grid.send_and_receive(sent, timeout=30)  # pushed (message IDs), answered by the engine
    # a hospital that turns out not to hold them is sent them in full, once
    ask = Message(Error(code=wire.WEIGHTS_NOT_HELD, reason="not held"), reply_to=sent[0])
    full = strategy.resend(ask)
    assert full is not None and full.metadata.dst_node_id == sent[0].metadata.dst_node_id
    assert array_spec(full.content.array_records[wire.ARRAYS]) == array_spec(arrays)
    assert wire.GLOBAL_DIGEST not in full.content.config_records[wire.CONFIG]
    assert full in strategy._sent and sent[0] not in strategy._sent
    assert strategy._wire["wire-bytes-train-sent"] == light_bytes + message_bytes(full)
    assert strategy._wire["wire-messages-train-resent"] == 1
    assert strategy.resend(ask) is None  # once per digest message
    declined = Message(Error(code=4001, reason="declined"), reply_to=sent[1])
    assert strategy.resend(declined) is None


@pytest.mark.parametrize("name", ["fedadam", "fedprox"])
@pytest.mark.usefixtures("flower_identity")
def test_server_optimisers_and_fedprox_send_digests_too(
        name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """FedAdam's float64 aggregate is evaluated and trained as the same float32 weights;
    FedProx's ``proximal-mu`` stays in the digest message's config."""
    loop = _engine(request)
    strategy = build_strategy(small_settings(tmp_path, f"strategy={name}"),
                              RunRecorder(tmp_path / "run", "classification", 2, ["a"]))
    grid = PromptGrid(loop.grid, resend=strategy.resend)
    aggregate = ArrayRecord({k: v.double() if v.is_floating_point() else v
                             for k, v in WEIGHTS.items()})
    evaluation = list(strategy.configure_evaluate(1, aggregate, ConfigRecord(), grid))
    assert evaluation[0].content.array_records[wire.ARRAYS]["conv.weight"].dtype == "float32"
    strategy.aggregate_evaluate(1, grid.send_and_receive(evaluation, timeout=30))
    sent = list(strategy.configure_train(2, aggregate, ConfigRecord({"local-epochs": 1}), grid))
    assert all(wire.ARRAYS not in m.content.array_records for m in sent)
    config = sent[0].content.config_records[wire.CONFIG]
    assert config[wire.GLOBAL_DIGEST] == arrays_digest(as_float32(aggregate))
    assert (wire.PROXIMAL_MU in config) == (name == "fedprox")


def test_prompt_grid_pushes_what_resend_gives_in_place_of_a_reply(
        request: pytest.FixtureRequest) -> None:
    loop = _engine(request)
    messages = loop.messages()
    asking = messages[0].metadata.dst_node_id
    again: list[Message] = []

    def resend(reply: Message) -> Message | None:
        if reply.metadata.src_node_id != asking or again:
            return None
        again.append(Message(RecordDict(), dst_node_id=asking, message_type="train",
                             group_id="1"))
        return again[0]

    replies = list(PromptGrid(loop.grid, window=10, resend=resend)
                   .send_and_receive(messages, timeout=30))
    assert partitions(replies) == list(range(HOSPITALS))  # the asker's first answer replaced
    assert again[0].metadata.message_id in {r.metadata.reply_to_message_id for r in replies}


@pytest.mark.usefixtures("flower_identity")
def test_aggregate_does_not_depend_on_the_order_replies_arrived(tmp_path: Path) -> None:
    settings = small_settings(tmp_path)
    strategy = build_strategy(settings, RunRecorder(tmp_path / "run", "classification", 2,
                                                    ["a", "b", "c"]))
    rng = np.random.default_rng(0)
    replies = []
    for hospital in range(3):
        trained = {k: torch.from_numpy(rng.normal(size=tuple(v.shape)).astype(np.float32))
                   if v.is_floating_point() else v for k, v in WEIGHTS.items()}
        reply = _reply_with(trained)(_sent(WEIGHTS), Context(7, 3, {}, RecordDict(), {}))
        reply.content[wire.METRICS] = MetricRecord({wire.NUM_EXAMPLES: 7.0 + hospital,
                                                    wire.HOSPITAL: hospital})
        replies.append(reply)
    first, _ = strategy.aggregate_checked(1, replies)
    second, _ = strategy.aggregate_checked(1, [replies[2], replies[0], replies[1]])
    assert first is not None and second is not None
    assert all(np.array_equal(first[k].numpy(), second[k].numpy()) for k in first)


@pytest.mark.slow
def test_digest_rounds_train_exactly_as_sending_the_weights(tmp_path: Path) -> None:
    """Two real 2-round simulations: hospitals that hold the weights (digests) and hospitals
    that lose them after each evaluation (every digest answered by resending the weights)."""
    overrides = ("data.central_test=false", "federation.rounds=2")
    light = small_settings(tmp_path / "light", *overrides)
    simulate(light)
    resent = small_settings(tmp_path / "resent", *overrides)
    simulate(resent, project_dir=hostile_project(tmp_path / "forgets",
                                                 dict.fromkeys(range(3), "forgets_weights")))
    final = [torch.load(Path(s.run_dir) / "final_model.pt", weights_only=True)
             for s in (light, resent)]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    size = sum(t.numel() * t.element_size() for t in final[0].values())
    rows = {}
    for name, settings in (("light", light), ("resent", resent)):
        lines = (Path(settings.run_dir) / "metrics.jsonl").read_text().splitlines()
        rows[name] = [r for r in map(json.loads, lines)
                      if r["phase"] == "train" and r["hospital"] == "overall"]
        assert [r["wire-messages-train-digest"] for r in rows[name]] == [0, 3]
    assert [r["wire-messages-train-resent"] for r in rows["light"]] == [0, 0]
    assert [r["wire-messages-train-resent"] for r in rows["resent"]] == [0, 3]
    assert rows["light"][1]["train-loss"] == rows["resent"][1]["train-loss"]
    # round 2 sends the weights once (to evaluate), not twice; resending costs one copy more
    total = {name: sum(r[f"wire-bytes-{p}-{w}"] for p in ("train", "evaluate")
                       for w in ("sent", "received")) for name, (_, r) in rows.items()}
    assert total["light"] < 1.1 * 2 * 3 * size < total["resent"]
    assert rows["light"][1]["wire-bytes-train-sent"] < 3 * 1000
    assert rows["resent"][1]["wire-bytes-train-sent"] > 3 * size
