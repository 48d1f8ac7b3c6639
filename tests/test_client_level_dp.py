"""Client-level DP: noise calibrated to the updates aggregated; epsilon from real RDP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import compute_clip_model_update
from opacus.accountants import RDPAccountant

from bench.hostile_app import hostile_project
from common import wire
from server.app import earlier_releases
from server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from server.client_dp import (
    CLIENT_CLIP_TOLERANCE,
    RELEASES,
    client_level_epsilon,
    sampled_per_round,
    wrap_client_level,
)
from server.replies import array_spec
from server.report import RunRecorder
from server.strategy import build_strategy
from simulate import simulate
from tests.conftest import small_settings

GLOBAL = {"w": torch.zeros(200, 100), "b": torch.zeros(100)}


def _rdp(multipliers: list[float], delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = [(z, 1.0, 1) for z in multipliers]
    return float(accountant.get_epsilon(delta=delta))


def test_client_level_epsilon_is_rdp_over_the_releases(tmp_path: Path) -> None:
    settings = small_settings(tmp_path, "privacy=client_level",
                              "privacy.client_noise_multiplier=1.2")
    releases = [{"round": float(r), "aggregated": 3.0, "noise-std": 0.4,
                 "noise-multiplier": z} for r, z in ((1, 1.2), (2, 0.8), (3, 1.2))]
    figures = [client_level_epsilon(settings, releases[:k])["epsilon"] for k in (1, 2, 3)]
    assert 0 < figures[0] < figures[1] < figures[2]
    assert figures[2] == pytest.approx(_rdp([1.2, 0.8, 1.2], settings.privacy.delta))
    last = client_level_epsilon(settings, releases)
    assert last["sample-rate"] == 1.0 and last["rounds"] == 3  # no amplification claimed
    assert client_level_epsilon(settings, [])["epsilon"] == 0.0
    assert sampled_per_round(settings) == 3


def test_releases_survive_a_checkpoint_and_an_old_one_is_refused(tmp_path: Path) -> None:
    releases = [{"round": 1.0, "aggregated": 2.0, "noise-std": 0.4, "noise-multiplier": 0.8}]
    save_checkpoint(tmp_path, Checkpoint(1, {"w": torch.ones(2)}, {RELEASES: releases}))
    restored = load_checkpoint(tmp_path)
    assert restored is not None and earlier_releases(restored) == releases
    save_checkpoint(tmp_path, Checkpoint(1, {"w": torch.ones(2)}, {}))
    with pytest.raises(ValueError, match="no record of its client-level DP releases"):
        earlier_releases(load_checkpoint(tmp_path))


def _sent(node: int) -> Message:
    record = RecordDict({wire.ARRAYS: ArrayRecord(GLOBAL),
                         wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})})
    return Message(record, dst_node_id=node, message_type="train")


def _reply(node: int, arrays: dict[str, torch.Tensor]) -> Message:
    content = RecordDict({wire.ARRAYS: ArrayRecord(arrays),
                          wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10.0,
                                                      wire.UNIT_WEIGHT: 1.0,
                                                      wire.HOSPITAL: node})})
    return Message(content, reply_to=_sent(node))


def _wrapped(tmp_path: Path, side: str):  # type: ignore[no-untyped-def]
    settings = small_settings(tmp_path, "privacy=client_level", f"privacy.clipping_side={side}",
                              "privacy.client_noise_multiplier=0.5", "privacy.clipping_norm=2.0",
                              "federation.min_train=1")
    inner = build_strategy(settings, RunRecorder(tmp_path / "run", "classification", 2,
                                                 ["a", "b", "c"]))
    inner._expected, inner._global = array_spec(ArrayRecord(GLOBAL)), ArrayRecord(GLOBAL)
    wrapped = wrap_client_level(inner, settings)
    wrapped.current_arrays = ArrayRecord(GLOBAL)
    return wrapped


@pytest.mark.usefixtures("flower_identity")
def test_noise_is_calibrated_to_the_updates_aggregated(tmp_path: Path) -> None:
    """3 hospitals planned, 2 answer: noise std z*C/2 on the mean, not z*C/3."""
    wrapped = _wrapped(tmp_path, "server")
    replies = [_reply(0, GLOBAL), _reply(1, GLOBAL),
               Message(Error(code=4001, reason="declined"), reply_to=_sent(2))]
    arrays, _ = wrapped.aggregate_train(1, replies)
    noise = np.concatenate([a.numpy().ravel() for a in arrays.values()])  # zero updates
    assert noise.std() == pytest.approx(0.5 * 2.0 / 2, rel=0.03)
    assert wrapped.releases == [{"round": 1.0, "aggregated": 2.0, "noise-std": 0.5,
                                 "noise-multiplier": pytest.approx(0.5)}]


@pytest.mark.usefixtures("flower_identity")
def test_client_side_update_over_the_bound_is_dropped(tmp_path: Path) -> None:
    wrapped = _wrapped(tmp_path, "client")
    rng = np.random.default_rng(1)
    big = {k: torch.from_numpy(rng.normal(size=tuple(v.shape)).astype(np.float32))
           for k, v in GLOBAL.items()}  # norm ~ 142, clipping norm 2
    clipped = [a.numpy().copy() for a in ArrayRecord(big).values()]
    compute_clip_model_update(param1=clipped,
                              param2=[a.numpy() for a in ArrayRecord(GLOBAL).values()],
                              clipping_norm=2.0)  # what fixedclipping_mod does at a hospital
    honest = dict(zip(GLOBAL, (torch.from_numpy(a) for a in clipped), strict=True))
    arrays, _ = wrapped.aggregate_train(1, [_reply(0, honest), _reply(1, big)])
    assert wrapped.releases[0]["aggregated"] == 1.0
    assert wrapped.releases[0]["noise-multiplier"] == pytest.approx(0.5)
    sensitivity = 2.0 * (1 + CLIENT_CLIP_TOLERANCE)
    assert wrapped.releases[0]["noise-std"] == pytest.approx(0.5 * sensitivity)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    assert any("over the client-side clipping bound" in r.get("error", "") for r in rows)


@pytest.mark.slow
def test_client_level_simulation_reports_epsilon_per_round(tmp_path: Path) -> None:
    settings = small_settings(tmp_path, "privacy=client_level", "privacy.clipping_side=server",
                              "privacy.client_noise_multiplier=0.8", "federation.rounds=2",
                              "data.central_test=false")
    summary = simulate(settings)
    privacy = summary["privacy"]["client-level"]
    assert privacy["rounds"] == 2 and privacy["epsilon"] > 0
    rows = [json.loads(line) for line in
            (Path(settings.run_dir) / "metrics.jsonl").read_text().splitlines()]
    per_round = [r["epsilon"] for r in rows if r["phase"] == "privacy"]
    assert len(per_round) == 2 and per_round[0] < per_round[1]


@pytest.mark.slow
def test_missing_hospital_epsilon_is_the_accountant_over_what_happened(tmp_path: Path) -> None:
    """Hospital 0 is absent in rounds 1 and 3 (client-side clipping, real simulation)."""
    z, clip = 0.8, 1.0
    settings = small_settings(tmp_path, "privacy=client_level", "privacy.clipping_side=client",
                              f"privacy.client_noise_multiplier={z}",
                              f"privacy.clipping_norm={clip}", "federation.rounds=3",
                              "federation.fraction_evaluate=0", "data.central_test=false",
                              "data.samples_per_hospital=40", "model.channels=[8,16]")
    project = hostile_project(tmp_path / "absent", {0: "absent_odd_rounds"})
    summary = simulate(settings, project_dir=project)
    rows = [json.loads(line) for line in
            (Path(settings.run_dir) / "metrics.jsonl").read_text().splitlines()]
    privacy = [r for r in rows if r["phase"] == "privacy"]
    assert [r["aggregated"] for r in privacy] == [2, 3, 2]
    sensitivity = clip * (1 + CLIENT_CLIP_TOLERANCE)
    for row in privacy:
        assert row["noise-std"] == pytest.approx(z * sensitivity / row["aggregated"])
    multipliers = [r["noise-std"] * r["aggregated"] / sensitivity for r in privacy]
    expected = _rdp(multipliers, settings.privacy.delta)
    assert summary["privacy"]["client-level"]["epsilon"] == pytest.approx(expected)
    assert privacy[-1]["epsilon"] == pytest.approx(expected)
    # Flower's wrapper would have divided by 3 in rounds 1 and 3: under-noised
    assert expected < _rdp([z * 2 / 3, z, z * 2 / 3], settings.privacy.delta)
    assert not any("over the client-side clipping bound" in r.get("error", "") for r in rows)
