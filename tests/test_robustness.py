"""One hostile hospital can neither crash nor take over the global model.

Unit tests feed real Flower Messages / ArrayRecords through the strategy
MedFed builds; the end-to-end test runs a real Flower simulation whose
hospitals 0 and 1 reply with a float16 and a complex64 array (past their
guard, from bench/hostile_app.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from bench.hostile_app import hostile_project
from common import wire
from server.influence import best_agreement, share_cap
from server.replies import array_spec
from server.report import RunRecorder
from server.strategy import build_strategy, trim_fraction
from simulate import simulate
from tests.conftest import small_settings

GLOBAL = {"w": torch.zeros(4, 5), "b": torch.zeros(5)}


def _sent(node: int) -> Message:
    record = RecordDict({wire.ARRAYS: ArrayRecord(GLOBAL),
                         wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})})
    return Message(record, dst_node_id=node, message_type="train")


def _reply(node: int, arrays: dict[str, torch.Tensor], n: float = 10.0) -> Message:
    content = RecordDict({wire.ARRAYS: ArrayRecord(arrays),
                          wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: n, wire.HOSPITAL: node,
                                                      wire.TRAIN_LOSS: 0.5})})
    return Message(content, reply_to=_sent(node))


def _filled(value: float, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value, dtype=dtype) for k, v in GLOBAL.items()}


def _strategy(tmp_path: Path, *overrides: str):  # type: ignore[no-untyped-def]
    settings = small_settings(tmp_path, "federation.min_train=1", *overrides)
    recorder = RunRecorder(tmp_path / "run", "classification", 2, ["a", "b", "c"])
    strategy = build_strategy(settings, recorder)
    strategy._expected = array_spec(ArrayRecord(GLOBAL))
    strategy._global = ArrayRecord(GLOBAL)
    return strategy


def _rows(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]


def _aggregate(strategy, replies: list[Message]) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    arrays, _ = strategy.aggregate_train(1, replies)
    return {k: v.numpy() for k, v in arrays.items()}


@pytest.mark.usefixtures("flower_identity")
def test_other_dtypes_are_dropped_even_first(tmp_path: Path) -> None:
    """float16 arriving first, complex64 and float64 never reach the aggregate."""
    strategy = _strategy(tmp_path)
    replies = [_reply(0, {**_filled(1.0), "w": torch.ones(4, 5, dtype=torch.float16)}),
               _reply(1, {**_filled(1.0), "b": torch.ones(5, dtype=torch.complex64)}),
               _reply(2, _filled(1e300, torch.float64)),
               _reply(3, _filled(2.0))]
    out = _aggregate(strategy, replies)
    assert all(a.dtype == np.float32 and np.allclose(a, 2.0) for a in out.values())
    errors = " ".join(r["error"] for r in _rows(tmp_path) if "error" in r)
    for dtype in ("float16", "complex64", "float64"):
        assert f"'{dtype}')" in errors


@pytest.mark.usefixtures("flower_identity")
def test_long_updates_are_dropped_or_clipped(tmp_path: Path) -> None:
    honest = [_reply(0, _filled(1.0)), _reply(1, _filled(2.0)), _reply(2, _filled(1.5))]
    dropped = _aggregate(_strategy(tmp_path / "d"), [*honest, _reply(3, _filled(1e38))])
    assert all(np.allclose(a, 1.5) for a in dropped.values())
    assert "over the bound" in " ".join(r.get("error", "") for r in _rows(tmp_path / "d"))
    honest = [_reply(0, _filled(1.0)), _reply(1, _filled(2.0))]
    clipped = _aggregate(_strategy(tmp_path / "c", "strategy.over_norm=clip"),
                         [*honest, _reply(2, _filled(1000.0))])
    # bound = 4 x lower median norm (that of the 2.0 update): the x1000 one becomes 8.0
    assert all(np.allclose(a, (1.0 + 2.0 + 8.0) / 3) for a in clipped.values())
    assert any("clipped" in r.get("bounded", "") for r in _rows(tmp_path / "c"))
    absolute = _aggregate(_strategy(tmp_path / "a", "strategy.norm_bound=absolute",
                                    "strategy.max_update_norm=5.0"),
                          [_reply(0, _filled(0.5)), _reply(1, _filled(1.5))])
    assert all(np.allclose(a, 0.5) for a in absolute.values())  # norm 1.5 x sqrt(25) > 5
    # two honest updates 20x apart (seen late in training): no median to judge by, both kept
    two = _strategy(tmp_path / "t")
    _aggregate(two, [_reply(0, _filled(0.1)), _reply(1, _filled(2.0))])
    assert two.last_aggregated == 2


@pytest.mark.usefixtures("flower_identity")
def test_sign_flipped_update_is_dropped_and_honest_ones_kept(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    direction = {k: rng.normal(size=tuple(v.shape)).astype(np.float32) for k, v in GLOBAL.items()}

    def update(scale: float, noise: float) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(scale * d + noise * rng.normal(size=d.shape)
                                    .astype(np.float32)) for k, d in direction.items()}

    honest = [_reply(0, update(1.0, 0.5)), _reply(1, update(0.8, 0.5))]
    strategy = _strategy(tmp_path)
    _aggregate(strategy, [*honest, _reply(2, update(1.1, 0.5))])
    assert strategy.last_aggregated == 3  # honest, noisy, non-identical: all kept
    flipped = _strategy(tmp_path / "f")
    out = _aggregate(flipped, [*honest, _reply(2, update(-1.0, 0.5))])
    assert flipped.last_aggregated == 2
    assert "cosine" in " ".join(r.get("error", "") for r in _rows(tmp_path / "f"))
    sent = [m.content.array_records[wire.ARRAYS] for m in honest]
    mean = {k: (sent[0][k].numpy() + sent[1][k].numpy()) / 2 for k in GLOBAL}
    assert all(np.allclose(out[k], mean[k], atol=1e-6) for k in GLOBAL)


def test_best_agreement_of_identical_and_opposite_updates() -> None:
    u = {"w": np.arange(6.0).reshape(2, 3)}
    cosines = best_agreement([u, u, {"w": -u["w"]}])
    assert cosines[0] == pytest.approx(1.0) and cosines[2] == pytest.approx(-1.0)


@pytest.mark.usefixtures("flower_identity")
def test_claimed_num_examples_are_capped(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path)
    out = _aggregate(strategy, [_reply(0, _filled(1.0), 10), _reply(1, _filled(2.0), 10),
                                _reply(2, _filled(3.0), 1e12)])
    # the 1e12 claim is capped at half the round's weight: (10*1 + 10*2 + 20*3) / 40
    assert all(np.allclose(a, 2.25) for a in out.values())
    assert any("capped to 20" in r.get("bounded", "") for r in _rows(tmp_path))


def test_share_cap_water_filling() -> None:
    assert share_cap([1159.0, 1409.0, 1225.0], 0.5) is None  # honest pneumonia sizes
    assert share_cap([10.0, 10.0, 1e12], 0.5) == pytest.approx(20.0)
    assert share_cap([10.0, 10.0, 1e12], 0.4) == pytest.approx(0.4 * 20 / 0.6)
    assert share_cap([5.0, 10.0, 1e12], 0.2) == 5.0  # below 1/n: equal weights


@pytest.mark.usefixtures("flower_identity")
def test_trimmed_mean_trims_one_per_end_with_three(tmp_path: Path) -> None:
    assert trim_fraction(0.2, 3) * 3 >= 1 and trim_fraction(0.2, 2) == 0.2
    assert trim_fraction(0.2, 10) == 0.2
    strategy = _strategy(tmp_path, "strategy=fedtrimmedavg", "strategy.norm_bound=none",
                         "strategy.min_cosine=null")
    out = _aggregate(strategy, [_reply(0, _filled(1.0)), _reply(1, _filled(2.0)),
                                _reply(2, _filled(6.0))])
    assert all(np.allclose(a, 2.0) for a in out.values())  # not the mean, 3.0


@pytest.mark.slow
def test_float16_and_complex64_replies_are_dropped_and_the_run_completes(
        tmp_path: Path) -> None:
    settings = small_settings(tmp_path, "federation.rounds=2", "federation.min_train=1",
                              "data.samples_per_hospital=40", "model.channels=[8,16]",
                              "data.central_test=false")
    project = hostile_project(tmp_path / "hostile", {0: "float16", 1: "complex64"})
    summary = simulate(settings, project_dir=project)
    assert summary["rounds"] == 2
    rows = [json.loads(line) for line in
            (Path(settings.run_dir) / "metrics.jsonl").read_text().splitlines()]
    errors = [r["error"] for r in rows if "error" in r and r["phase"] == "train"]
    assert sum("'float16')" in e for e in errors) == 2  # both rounds, named
    assert sum("'complex64')" in e for e in errors) == 2
    assert all(e.startswith("reply dropped") for e in errors)
    trained = {r["hospital"] for r in rows if r["phase"] == "train" and "error" not in r}
    assert trained == {"hospital-2", "overall"}
    final = torch.load(Path(settings.run_dir) / "final_model.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in final.values() if v.is_floating_point())
