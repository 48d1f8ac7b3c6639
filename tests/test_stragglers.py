"""A hospital that stalls in training does not hang the run: the round closes at its limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.hostile_app import STRAGGLE_S, hostile_project
from simulate import simulate
from tests.conftest import small_settings

ROUND_TIMEOUT_S = 60  # round 1 includes the hospitals' start-up: keep a margin on 2 busy cores


@pytest.mark.slow
def test_a_sleeping_hospital_is_left_behind_at_the_time_limit(tmp_path: Path) -> None:
    """hospital-2 sleeps 75 s in round 2: round 2's training closes after 60 s with the other two,
    its late reply, which comes while round 2's evaluation is open, never joins that phase,
    and the run completes."""
    assert STRAGGLE_S > ROUND_TIMEOUT_S  # the limit, not the sleep, must end round 2
    settings = small_settings(tmp_path, "federation.rounds=2", "data.central_test=false",
                              f"federation.round_timeout_s={ROUND_TIMEOUT_S}")
    project = hostile_project(tmp_path / "straggler", {2: "straggler_after_round_1"})
    summary = simulate(settings, project_dir=project)
    assert summary["rounds"] == 2
    rows = [json.loads(line) for line in
            (Path(settings.run_dir) / "metrics.jsonl").read_text().splitlines()]
    # The round did not wait the straggler out: its late reply never joined it nor a later phase
    trained = {(r["round"], r["hospital"]) for r in rows
               if r["phase"] == "train" and "error" not in r}
    assert trained == {(1, "hospital-0"), (1, "hospital-1"), (1, "hospital-2"), (1, "overall"),
                       (2, "hospital-0"), (2, "hospital-1"), (2, "overall")}
    missing = [r for r in rows if r["phase"] == "train" and "error" in r]
    assert [(r["round"], r["hospital"]) for r in missing] == [(2, "hospital-2")]
    assert "federation.round_timeout_s" in missing[0]["error"]
    assert isinstance(missing[0]["node"], int)  # the Flower node id, beside the name
    # its late training reply came while round 2's evaluation was open: that phase took
    # hospital-2's evaluation (it was back by then) and nothing else
    evaluated = [(r["round"], r["hospital"]) for r in rows if r["phase"] == "evaluate"]
    assert (2, "hospital-2") in evaluated
    assert not [r for r in rows if r["phase"] == "evaluate" and "error" in r]
