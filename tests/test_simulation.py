"""End to end: real Flower simulations (SuperLink + Ray) started by simulate.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import psutil
import pytest

from common.compose import compose_settings, finalize
from server.runner import RunFailedError
from simulate import main, simulate
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_default_simulation_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    before = _children()
    run_dir = tmp_path / "run"
    code = main(["data.samples_per_hospital=96", "federation.rounds=2", f"run_dir={run_dir}"])
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    # the wall time printed is the whole wait, with the ServerApp's part of it
    shown = re.search(r"wall time ([\d.]+) s \(the ServerApp ([\d.]+) s\)",
                      capsys.readouterr().out)
    assert shown and float(shown[1]) >= float(shown[2]) == round(summary["wall_time_s"], 1)
    assert summary["rounds"] == 2
    assert len(summary["hospitals"]) == 3
    for metrics in summary["hospitals"].values():
        assert 0.0 <= metrics["auc"] <= 1.0 and metrics["num-examples"] > 0
    assert summary["central"]["auc"] > 0.5
    # the threshold is chosen on the pooled validation splits; every clinical figure has
    # its interval; the ROC counts stay in metrics.jsonl
    threshold = summary["threshold"]
    assert threshold["method"] == "youden" and "pooled validation" in threshold["chosen_on"]
    for site in [*summary["hospitals"].values(), summary["overall"], summary["central"]]:
        assert site["threshold"] == threshold["value"]
        for name in ("auc", "accuracy", "sensitivity", "specificity"):
            low, high = site[f"{name}-ci-low"], site[f"{name}-ci-high"]
            assert low is None or low <= site[name] <= high
        assert "roc-tp" not in site and "val-roc-tp" not in site
    assert summary["intervals"]["resamples"] == 500
    with np.load(run_dir / "central_predictions.npz") as central:
        assert central["probs"].shape == (summary["central"]["num-examples"], 2)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    phases = {(r["round"], r["phase"]) for r in rows}
    assert phases >= {(1, "train"), (2, "evaluate"), (2, "central")}
    assert {r["hospital"] for r in rows if r["phase"] == "train"} >= {"hospital-0", "overall"}
    for name in ("config.yaml", "final_model.pt", "checkpoint.pt", "report.html"):
        assert (run_dir / name).is_file()
    events = EventAccumulator(str(run_dir / "tensorboard"))  # tracking=tensorboard, the default
    events.Reload()
    assert {"evaluate/auc/hospital-0", "train/train-loss/overall"} <= set(events.Tags()["scalars"])
    # every process the simulation started has been stopped
    assert _children() - before == set()


def test_failed_rounds_fail_the_run(tmp_path: Path) -> None:
    """Every hospital fails (CUDA asked for on a CPU machine): non-zero, clear error."""
    settings = finalize(compose_settings(["federation.rounds=1", "train.device=cuda",
                                          "data.central_test=false",
                                          f"run_dir={tmp_path / 'run'}"]), base=ROOT)
    before = _children()
    with pytest.raises(RunFailedError, match="trained successfully"):
        simulate(settings)
    assert _children() - before == set()


def test_config_typo_exits_2_without_starting_anything(capsys: pytest.CaptureFixture) -> None:
    assert main(["federation.roundz=3"]) == 2
    assert "unknown config key 'federation.roundz'" in capsys.readouterr().err


def test_resume_continues_round_numbers(tmp_path: Path) -> None:
    """A run stopped after round 1 resumes from its checkpoint and finishes round 2."""
    run_dir = tmp_path / "run"
    common = ["data.samples_per_hospital=64", f"run_dir={run_dir}", "strategy=fedadam"]
    assert main([*common, "federation.rounds=1"]) == 0
    assert main([*common, "federation.rounds=2", "resume=true"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rounds = [r["round"] for r in rows
                    if r["phase"] == "train" and r["hospital"] == "overall"]
    assert train_rounds == [1, 2]
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 2
