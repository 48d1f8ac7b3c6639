"""Model selection on the hospitals' validation splits: best round, early stop, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common import wire
from server.checkpoint import load_checkpoint
from server.report import RunRecorder
from server.round_end import RoundEnd
from server.selection import BEST_MODEL, STATE_KEY, EarlyStop, Selection
from server.strategy import build_strategy
from simulate import simulate
from tests.conftest import small_settings


def _sent(node: int) -> Message:
    record = RecordDict({wire.ARRAYS: ArrayRecord({"w": torch.zeros(2)}),
                         wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})})
    return Message(record, dst_node_id=node, message_type="evaluate")


def _evaluation(node: int, val_loss: float) -> Message:
    """An evaluation reply of hospital ``node`` (30 validation images, 40 test images)."""
    metrics = {wire.NUM_EXAMPLES: 40.0, wire.HOSPITAL: float(node), "loss": 1.0, "auc": 0.7,
               wire.VAL_NUM_EXAMPLES: 30.0 * (node + 1), "val-loss": val_loss}
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=_sent(node))


def _round_end(tmp_path: Path, *overrides: str, done: int = 0) -> RoundEnd:
    settings = small_settings(tmp_path, "data.central_test=false", *overrides)
    recorder = RunRecorder(Path(settings.run_dir), "classification", 6, ["a", "b", "c"])
    checked = build_strategy(settings, recorder, round_offset=done)
    saved = load_checkpoint(Path(settings.run_dir)) if done else None
    selection = Selection.restored(settings.selection,
                                   saved.strategy_state.get(STATE_KEY) if saved else None)
    return RoundEnd(settings, checked, checked, recorder, selection, None)


def _close(end: RoundEnd, server_round: int, losses: tuple[float, float]) -> None:
    """Round ``server_round``: two hospitals evaluate; the global model is filled with it."""
    end.checked.aggregate_evaluate(server_round, [_evaluation(0, losses[0]),
                                                  _evaluation(1, losses[1])])
    end(server_round, ArrayRecord({"w": torch.full((2,), float(server_round))}))


@pytest.mark.usefixtures("flower_identity")
def test_best_round_early_stop_and_resume(tmp_path: Path) -> None:
    end = _round_end(tmp_path, "selection.patience=2", "federation.rounds=6")
    _close(end, 1, (0.6, 0.6))
    _close(end, 2, (0.2, 0.5))  # weighted by val-num-examples 30 and 60: 0.4
    # the weighted mean (0.4), not the plain one (0.35), decides: round 3's 0.38 is better
    _close(end, 3, (0.38, 0.38))
    _close(end, 4, (0.5, 0.5))
    with pytest.raises(EarlyStop, match="selection.patience=2"):
        _close(end, 5, (0.45, 0.45))
    assert (end.selection.best_round, end.selection.stale) == (3, 2)
    best = torch.load(tmp_path / "run" / BEST_MODEL, weights_only=True)
    assert torch.equal(best["w"], torch.full((2,), 3.0))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    overall = {r["round"]: r["val-loss"] for r in rows
               if r["phase"] == "evaluate" and r["hospital"] == "overall"}
    assert overall[2] == pytest.approx(0.4) and min(overall, key=overall.__getitem__) == 3

    # resumed after round 5: the best so far comes back from the checkpoint
    resumed = _round_end(tmp_path, "selection.patience=2", "federation.rounds=6", done=5)
    assert (resumed.selection.best_round, resumed.selection.stale) == (3, 2)
    assert torch.equal(resumed.selection.weights["w"], torch.full((2,), 3.0))
    resumed.selection.stale = 0  # (as if patience were raised) round 6 improves on it
    _close(resumed, 1, (0.1, 0.1))
    assert resumed.selection.best_round == 6
    summary = resumed.selection.summary(stopped_early=False)
    assert summary["round"] == 6 and summary["val_loss_gap"] == pytest.approx(0.0)


@pytest.mark.usefixtures("flower_identity")
def test_an_old_checkpoint_starts_selection_afresh(tmp_path: Path) -> None:
    end = _round_end(tmp_path)
    assert Selection.restored(end.settings.selection, None).best_round == 0
    _close(end, 1, (0.3, 0.3))
    assert end.selection.summary(stopped_early=False)["round"] == 1


@pytest.mark.slow
def test_selected_round_is_the_best_validation_round(tmp_path: Path) -> None:
    """A real simulation validating every 2nd round and the last: rounds 2 and 3 of 3."""
    settings = small_settings(tmp_path, "federation.rounds=3", "selection.every=2",
                              "data.central_test=false")
    summary = simulate(settings)
    run_dir = Path(settings.run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluate = [r for r in rows if r["phase"] == "evaluate" and "error" not in r]
    validated = {r["round"]: r["val-loss"] for r in evaluate if r["hospital"] == "overall"
                 and "val-loss" in r}
    assert sorted(validated) == [2, 3]
    best = min(validated, key=validated.__getitem__)
    assert summary["selection"]["round"] == best
    assert summary["selection"]["val_loss_gap"] == pytest.approx(validated[3] - validated[best])
    chosen = {r["hospital"]: r["auc"] for r in evaluate if r["round"] == best}
    assert summary["overall"]["auc"] == chosen.pop("overall")
    assert {k: v["auc"] for k, v in summary["hospitals"].items()} == chosen
    assert summary["last_round"]["round"] == 3
    assert (run_dir / BEST_MODEL).is_file() and (run_dir / "final_model.pt").is_file()


def test_the_baseline_selects_its_best_validation_round(tmp_path: Path) -> None:
    """Centralized training keeps the epoch-round with the lowest pooled validation loss."""
    from torch.utils.data import DataLoader

    from common.data import load_pooled
    from common.evaluation import evaluate
    from common.models import build_model
    from server.baseline import train_centralized

    settings = small_settings(tmp_path, "federation.rounds=3", "federation.local_epochs=1")
    run_dir = Path(settings.run_dir)
    summary = train_centralized(settings)
    chosen = summary["selection"]
    assert 1 <= chosen["round"] <= 3 and chosen["metric"] == "val-loss"
    assert chosen["value"] <= chosen["last_val_loss"]
    model = build_model(settings.task, settings.model)
    model.load_state_dict(torch.load(run_dir / BEST_MODEL, weights_only=True))
    val = DataLoader(load_pooled(settings).val, batch_size=64)
    figures = evaluate(model, val, task=settings.task, device=torch.device("cpu"))
    assert figures["loss"] == pytest.approx(chosen["value"], rel=1e-4)
    assert (run_dir / "final_model.pt").is_file()
