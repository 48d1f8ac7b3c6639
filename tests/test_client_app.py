"""The ClientApp handlers, called directly with real Flower messages."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.app import evaluate, train
from common import wire
from common.config import Settings, settings_to_json
from common.models import build_model
from tests.conftest import small_settings

pytestmark = pytest.mark.usefixtures("flower_identity")


def _context(settings: Settings, partition: int = 0) -> Context:
    return Context(run_id=7, node_id=11 + partition,
                   node_config={wire.PARTITION_ID: partition, wire.NUM_PARTITIONS: 3},
                   state=RecordDict(), run_config={wire.RUN_CONFIG_KEY: settings_to_json(settings)})


def _message(settings: Settings, kind: str) -> tuple[Message, dict[str, torch.Tensor]]:
    weights = build_model(settings.task, settings.model, seed=settings.seed).state_dict()
    content = RecordDict({wire.ARRAYS: ArrayRecord(weights),
                          wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})})
    return Message(content, dst_node_id=11, message_type=kind), weights


def test_train_replies_trained_weights_and_sample_count(tmp_path: Path) -> None:
    settings = small_settings(tmp_path)
    msg, sent = _message(settings, "train")
    reply = train(msg, _context(settings, partition=1))
    assert not reply.has_error()
    assert set(reply.content.keys()) == {wire.ARRAYS, wire.METRICS}
    received = reply.content[wire.ARRAYS].to_torch_state_dict()
    assert received.keys() == sent.keys()
    assert any(not torch.equal(received[k], sent[k]) for k in sent)
    metrics = reply.content[wire.METRICS]
    # num-examples counts samples of the hospital's training split, not batches
    from common.data import load_site
    assert metrics[wire.NUM_EXAMPLES] == len(load_site(settings, 1).train)  # type: ignore[arg-type]
    assert metrics[wire.HOSPITAL] == 1
    assert math.isfinite(metrics[wire.TRAIN_LOSS])
    # without DP-SGD the reply is what it always was
    assert set(metrics.keys()) == wire.TRAIN_METRICS


def test_evaluate_scores_the_global_model(tmp_path: Path) -> None:
    settings = small_settings(tmp_path)
    msg, _ = _message(settings, "evaluate")
    reply = evaluate(msg, _context(settings, partition=2))
    metrics = reply.content[wire.METRICS]
    assert set(reply.content.keys()) == {wire.METRICS}
    for key in ("auc", "accuracy", "loss", wire.NUM_EXAMPLES):
        assert key in metrics
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_segmentation_handlers_report_dice(tmp_path: Path) -> None:
    settings = small_settings(tmp_path, "task=segmentation", "model=unet",
                              "model.channels=[8,16]", "task.image_size=[32,32]")
    msg, _ = _message(settings, "train")
    reply = train(msg, _context(settings))
    assert reply.content[wire.METRICS][wire.NUM_EXAMPLES] > 0
    msg, _ = _message(settings, "evaluate")
    metrics = evaluate(msg, _context(settings)).content[wire.METRICS]
    assert 0.0 <= metrics["dice"] <= 1.0


def test_weights_of_another_model_are_refused(tmp_path: Path) -> None:
    settings = small_settings(tmp_path)
    content = RecordDict({wire.ARRAYS: ArrayRecord({"other.weight": torch.zeros(2)}),
                          wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})})
    with pytest.raises(ValueError, match="do not match model.name=cnn"):
        train(Message(content, dst_node_id=11, message_type="train"), _context(settings))


def test_a_hospital_can_withhold_the_roc_counts(tmp_path: Path) -> None:
    """The app (guard included) sends only the hospital's allowed-metrics: without the ROC
    names it still evaluates, and no list leaves."""
    from client.app import app

    settings = small_settings(tmp_path)
    msg, _ = _message(settings, "evaluate")
    context = _context(settings)
    allowed = sorted(wire.DEFAULT_ALLOWED_METRICS - wire.ROC_LISTS)
    context.node_config[wire.ALLOWED_METRICS] = ",".join(allowed)
    reply = app(message=msg, context=context)
    assert not reply.has_error()
    metrics = dict(reply.content[wire.METRICS])
    assert "auc" in metrics and "auc-ci-low" in metrics
    assert not any(isinstance(v, list) for v in metrics.values())
    # with the default policy the counts go with the reply
    default = app(message=_message(settings, "evaluate")[0], context=_context(settings))
    assert len(default.content[wire.METRICS][wire.ROC_TP]) == 101
