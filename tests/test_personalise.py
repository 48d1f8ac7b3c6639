"""Personalisation: a hospital fine-tunes the global model and scores both on its test split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.app import evaluate
from client.guard import only_weights_mod
from client.hospital import Hospital
from client.local import evaluate_round, site_data, train_round
from client.personalise import personalise_and_score
from common import wire
from common.compose import compose_settings, finalize
from common.config import settings_to_json
from common.models import build_model
from server.personalisation import extend_summary, split_metrics, weighted
from server.report import SUMMARY_FILE
from simulate import main
from tests.conftest import PNEUMONIA, ROOT, needs_shared, small_settings

HOSPITAL = Hospital(index=0, count=3, name="hospital-0")


def _global_weights(settings) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """One real federated-style local round from the seeded model (a realistic global model)."""
    model = build_model(settings.task, settings.model, seed=settings.seed)
    return train_round(settings, Hospital(index=1, count=3, name="hospital-1"),
                       model.state_dict(), server_round=1).weights


def test_personalised_model_is_scored_beside_the_global_one(tmp_path: Path) -> None:
    settings = small_settings(tmp_path, "data.samples_per_hospital=96", "personalise.epochs=3",
                              "personalise.patience=3")
    weights = _global_weights(settings)
    metrics = personalise_and_score(settings, HOSPITAL, weights, epochs=3)
    # the global model's metrics are exactly what a normal evaluation sends
    assert {k: v for k, v in metrics.items() if not k.startswith(wire.PERSONAL_PREFIX)} \
        == evaluate_round(settings, HOSPITAL, weights)
    test_size = len(site_data(settings, HOSPITAL).test)  # type: ignore[arg-type]
    assert metrics[wire.NUM_EXAMPLES] == metrics["personal-num-examples"] == test_size
    assert 0 <= metrics[wire.PERSONAL_EPOCHS] <= 3
    for name in ("loss", "auc", "accuracy"):
        assert math.isfinite(metrics[f"personal-{name}"])
    if metrics[wire.PERSONAL_EPOCHS] > 0:  # a fine-tuned model scores differently
        assert metrics["personal-loss"] != metrics["loss"]
    assert set(metrics) <= wire.DEFAULT_ALLOWED_METRICS
    # the server's view: both side by side
    own, personal = split_metrics(metrics)
    assert personal is not None and own["auc"] == metrics["auc"]
    assert personal["auc"] == metrics["personal-auc"] and "epochs" not in personal


def test_no_better_epoch_on_validation_keeps_the_global_model(tmp_path: Path) -> None:
    """A learning rate that wrecks the model: every epoch's validation loss is worse."""
    settings = small_settings(tmp_path, "personalise.epochs=3", "personalise.lr=1000",
                              "personalise.patience=1")
    weights = _global_weights(settings)
    metrics = personalise_and_score(settings, HOSPITAL, weights, epochs=3)
    assert metrics[wire.PERSONAL_EPOCHS] == 0
    assert metrics["personal-loss"] == pytest.approx(metrics["loss"])
    assert metrics["personal-auc"] == pytest.approx(metrics["auc"])


def test_skipped_under_dp_sgd_ceilings_and_metric_policies(tmp_path: Path) -> None:
    """Nothing is fine-tuned where the fine-tune would leak outside the hospital's epsilon."""
    dp = small_settings(tmp_path, "privacy=dp_sgd", "personalise.epochs=2")
    weights = build_model(dp.task, dp.model, seed=0).state_dict()
    for settings, hospital in (
            (dp, HOSPITAL),
            (small_settings(tmp_path, "personalise.epochs=2"),
             Hospital(index=0, count=3, name="capped", max_epsilon=4.0, ledger_path="l.json")),
            (small_settings(tmp_path, "personalise.epochs=2"),
             Hospital(index=0, count=3, name="strict",
                      allowed_metrics=wire.EVALUATE_METRICS))):
        metrics = personalise_and_score(settings, hospital, weights, epochs=2)
        assert metrics == evaluate_round(settings, hospital, weights)
        assert not any(k.startswith(wire.PERSONAL_PREFIX) for k in metrics)


@needs_shared(PNEUMONIA)
def test_personalisation_on_pneumonia(tmp_path: Path) -> None:
    """Real chest X-rays, Dirichlet-skewed hospital: both models scored on its test split."""
    settings = finalize(compose_settings([
        "experiment=pneumonia", "federation.local_epochs=1", "personalise.epochs=1",
        "model.channels=[8,16]", f"run_dir={tmp_path / 'run'}"]), base=ROOT)
    weights = _global_weights(settings)
    metrics = personalise_and_score(settings, HOSPITAL, weights, epochs=1)
    assert metrics[wire.PERSONAL_EPOCHS] in (0.0, 1.0)
    assert 0.5 < metrics["auc"] <= 1.0 and 0.5 < metrics["personal-auc"] <= 1.0
    assert metrics["personal-num-examples"] == metrics[wire.NUM_EXAMPLES] > 100


def test_summary_gets_both_side_by_side(tmp_path: Path) -> None:
    rows = [{"auc": 0.8, "loss": 0.5, wire.NUM_EXAMPLES: 10.0},
            {"auc": 0.6, wire.NUM_EXAMPLES: 30.0}]
    mean = weighted(rows)
    assert mean["auc"] == pytest.approx(0.65) and mean["loss"] == 0.5
    assert mean[wire.NUM_EXAMPLES] == 40.0
    personalised = {"model": "final_model.pt", "epochs": 2,
                    "hospitals": {"hospital-0": {"global": rows[0], "personalised": rows[1],
                                                 "epochs": 1}}}
    summary = extend_summary(tmp_path, {"rounds": 2}, personalised=personalised)
    written = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert written == summary and written["personalised"]["hospitals"]["hospital-0"][
        "personalised"]["auc"] == 0.6


@pytest.mark.usefixtures("flower_identity")
def test_evaluate_handler_personalises_behind_the_guard(tmp_path: Path) -> None:
    """The real handler behind the hospital's guard: metrics of both models, no weights."""
    settings = small_settings(tmp_path)
    weights = build_model(settings.task, settings.model, seed=settings.seed).state_dict()
    content = RecordDict({wire.ARRAYS: ArrayRecord(weights), wire.CONFIG: ConfigRecord(
        {wire.SERVER_ROUND: 2, wire.PERSONALISE_EPOCHS: 1})})
    node = {wire.PARTITION_ID: 0, wire.NUM_PARTITIONS: 3}
    for node_config, personalised in (
            (node, True),
            ({**node, wire.ALLOWED_METRICS: ",".join(sorted(wire.EVALUATE_METRICS))}, False)):
        context = Context(run_id=7, node_id=11, node_config=node_config, state=RecordDict(),
                          run_config={wire.RUN_CONFIG_KEY: settings_to_json(settings)})
        msg = Message(content, dst_node_id=11, message_type="evaluate")
        reply = only_weights_mod(msg, context, evaluate)
        assert not reply.has_error() and set(reply.content.keys()) == {wire.METRICS}
        metrics = reply.content[wire.METRICS]
        assert ("personal-auc" in metrics) == personalised
        assert ("personal-epochs" in metrics) == personalised and "auc" in metrics


@pytest.mark.slow
def test_simulation_from_a_previous_run_reports_transfer_and_personalisation(
        tmp_path: Path) -> None:
    """Real simulations: run 1's final model starts run 2, which personalises at the end."""
    first = tmp_path / "first"
    assert main(["data.samples_per_hospital=64", "federation.rounds=1",
                 f"run_dir={first}"]) == 0
    second = tmp_path / "second"
    assert main(["data.samples_per_hospital=64", "federation.rounds=1",
                 f"model.init_weights={first / 'final_model.pt'}", "model.freeze=[net.layer_0]",
                 "model.freeze_rounds=1", "personalise.epochs=2", f"run_dir={second}"]) == 0
    transfer = json.loads((second / "transfer.json").read_text())
    final = torch.load(first / "final_model.pt", weights_only=True)
    assert transfer["loaded"] == len(final) and transfer["shape_mismatch"] == 0
    summary = json.loads((second / SUMMARY_FILE).read_text())
    assert summary["transfer"]["loaded"] == len(final)
    # the frozen first block reached the end of round 1 unchanged
    trained = torch.load(second / "final_model.pt", weights_only=True)
    frozen = [k for k in final if k.startswith("net.layer_0.")]
    # (averaging equal tensors may round in the last bit)
    assert frozen and all(torch.allclose(trained[k], final[k], rtol=1e-6, atol=1e-7)
                          for k in frozen)
    assert any(not torch.allclose(trained[k], final[k]) for k in final if k not in frozen)
    side_by_side = summary["personalised"]
    assert set(side_by_side["hospitals"]) == {"hospital-0", "hospital-1", "hospital-2"}
    for both in side_by_side["hospitals"].values():
        assert both["global"]["num-examples"] == both["personalised"]["num-examples"] > 0
        assert 0.0 <= both["personalised"]["auc"] <= 1.0 and 0 <= both["epochs"] <= 2
    assert side_by_side["overall"]["personalised"]["num-examples"] > 0
    rows = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert {(r["hospital"], r["model"]) for r in rows if r["phase"] == "personalise"} == {
        (f"hospital-{i}", m) for i in range(3) for m in ("global", "personalised")}
