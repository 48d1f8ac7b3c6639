"""Client-level DP with Flower's fixed-clipping wrappers and a real RDP accountant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from server.client_dp import client_level_epsilon, sampled_per_round
from simulate import simulate
from tests.conftest import small_settings


def test_client_level_epsilon_grows_with_rounds_and_matches_rdp(tmp_path: Path) -> None:
    settings = small_settings(tmp_path, "privacy=client_level",
                              "privacy.client_noise_multiplier=1.2")
    figures = [client_level_epsilon(settings, r)["epsilon"] for r in (1, 2, 5)]
    assert 0 < figures[0] < figures[1] < figures[2]
    accountant = RDPAccountant()
    accountant.history = [(1.2, 1.0, 5)]
    assert figures[2] == pytest.approx(accountant.get_epsilon(delta=settings.privacy.delta))
    assert client_level_epsilon(settings, 3)["sample-rate"] == 1.0  # no amplification claimed
    assert sampled_per_round(settings) == 3


@pytest.mark.slow
@pytest.mark.parametrize("side", ["server", "client"])
def test_client_level_simulation_reports_epsilon_per_round(tmp_path: Path, side: str) -> None:
    settings = small_settings(tmp_path, "privacy=client_level", f"privacy.clipping_side={side}",
                              "privacy.client_noise_multiplier=0.8", "federation.rounds=2",
                              "data.central_test=false")
    summary = simulate(settings)
    privacy = summary["privacy"]["client-level"]
    assert privacy["rounds"] == 2 and privacy["epsilon"] > 0
    rows = [json.loads(line) for line in
            (Path(settings.run_dir) / "metrics.jsonl").read_text().splitlines()]
    per_round = [r["epsilon"] for r in rows if r["phase"] == "privacy"]
    assert len(per_round) == 2 and per_round[0] < per_round[1]
